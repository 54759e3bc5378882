"""The synthetic shapes dataset and collate_samples.

References: pycocotools rasterises the polygons (pixel (x, y) covers [x, x + 1) x [y, y + 1), the frame of every
raydet box); box extents, paddings and normalised values are computed by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from raydet.data.collate import collate_samples
from raydet.data.synthetic import CLASSES, make_shape_sample, make_shapes_dataset
from raydet.structures import IMAGENET_MEAN, IMAGENET_STD


def rasterise(polygons, h, w):
    """pycocotools directly: (h, w) bool union of an instance's polygons."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)


@pytest.fixture(scope="module")
def dataset():
    return make_shapes_dataset(40, height=96, width=128, seed=3)


# ================================================================================================ synthetic
def test_deterministic_for_a_seed_and_different_for_another():
    a = make_shapes_dataset(4, seed=0)
    b = make_shapes_dataset(4, seed=0)
    c = make_shapes_dataset(4, seed=1)
    for (ia, ra), (ib, rb), (ic, _) in zip(a, b, c):
        assert np.array_equal(ia, ib)
        assert np.array_equal(ra["boxes"], rb["boxes"]) and np.array_equal(ra["labels"], rb["labels"])
        assert ra["masks"] == rb["masks"]
        assert not np.array_equal(ia, ic)
    # image ids are start_id, start_id + 1, ...; one sample is reproducible on its own
    assert [r["image_id"] for _, r in make_shapes_dataset(3, start_id=5)] == [5, 6, 7]
    image, record = make_shape_sample(2, seed=0)
    assert np.array_equal(image, a[1][0]) and np.array_equal(record["boxes"], a[1][1]["boxes"])


def test_record_format(dataset):
    counts = []
    for image, rec in dataset:
        assert image.shape == (96, 128, 3) and image.dtype == np.uint8
        n = len(rec["labels"])
        counts.append(n)
        assert rec["boxes"].shape == (n, 4) and rec["boxes"].dtype == np.float32
        assert rec["labels"].dtype == np.int64 and set(rec["labels"].tolist()) <= {0, 1, 2}
        assert rec["ignore"].dtype == bool and not rec["ignore"].any()
        assert len(rec["masks"]) == n
        assert (rec["height"], rec["width"]) == (96, 128)
        assert rec["file_name"] == f"synthetic_{rec['image_id']:06d}.png"
    assert 1 <= min(counts) and max(counts) <= 3
    assert {int(lab) for _, r in dataset for lab in r["labels"]} == set(range(len(CLASSES)))


def test_boxes_lie_inside_the_image_with_the_requested_sizes(dataset):
    boxes = np.concatenate([r["boxes"] for _, r in dataset])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    wh = boxes[:, 2:] - boxes[:, :2]
    assert (wh >= 20 - 1e-3).all() and (wh <= 48 + 1e-3).all()  # min_size 20, max_size min(96, 128) // 2
    big = np.concatenate([r["boxes"] for _, r in make_shapes_dataset(10, min_size=30, max_size=40, seed=1)])
    wh = big[:, 2:] - big[:, :2]
    assert (wh >= 30 - 1e-3).all() and (wh <= 40 + 1e-3).all()


def test_masks_fit_their_boxes(dataset):
    for _, rec in dataset:
        for box, label, polys in zip(rec["boxes"], rec["labels"], rec["masks"]):
            m = rasterise(polys, 96, 128)
            ys, xs = np.nonzero(m)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
            # every mask pixel's centre lies in the box
            assert xs.min() + 0.5 >= box[0] and xs.max() + 0.5 <= box[2]
            assert ys.min() + 0.5 >= box[1] and ys.max() + 0.5 <= box[3]
            if label in (0, 1):  # rectangles and ellipses reach their box on all four sides
                assert np.abs(tight - box).max() <= 1.0, (label, box, tight)
            else:  # a triangle's sharp apex and base corners hold no pixel centre; its base is a full edge
                assert abs(tight[3] - box[3]) <= 1.0 and np.abs(tight - box).max() <= 3.0, (box, tight)


def test_shapes_do_not_overlap(dataset):
    for _, rec in dataset:
        b = rec["boxes"]
        masks = np.stack([rasterise(p, 96, 128) for p in rec["masks"]])
        assert masks.sum(axis=0).max() <= 1
        for i in range(len(b)):
            for j in range(i + 1, len(b)):  # boxes at least 4 px apart along x or y
                assert (b[i, 2] + 4 < b[j, 0] or b[j, 2] + 4 < b[i, 0] or b[i, 3] + 4 < b[j, 1]
                        or b[j, 3] + 4 < b[i, 1])


def test_painted_pixels_are_exactly_the_masks(dataset):
    # Shapes are painted in colours >= 120 per channel; the background is at most 59 plus mild noise.
    for image, rec in dataset:
        union = np.zeros((96, 128), dtype=bool)
        for polys in rec["masks"]:
            union |= rasterise(polys, 96, 128)
        painted = image.min(axis=2) >= 110
        assert np.array_equal(painted, union)
        for polys in rec["masks"]:  # one flat colour per instance
            pixels = image[rasterise(polys, 96, 128)]
            assert (pixels == pixels[0]).all()


# ================================================================================================ collate
def rect_polygon(x1, y1, x2, y2):
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]


def two_samples():
    a = np.zeros((50, 70, 3), dtype=np.uint8)
    a[...] = np.round(IMAGENET_MEAN).astype(np.uint8)  # ~0 after normalisation
    a[0, 0] = 255
    rec_a = {"boxes": np.array([[1, 2, 11, 12], [20, 20, 40, 45], [5, 5, 8, 8]], dtype=np.float32),
             "labels": np.array([0, 1, 2]), "ignore": np.array([False, False, True]),
             "masks": [rect_polygon(1, 2, 11, 12), rect_polygon(20, 20, 40, 45), rect_polygon(5, 5, 8, 8)]}
    b = np.full((40, 30, 3), 7, dtype=np.uint8)
    rec_b = {"boxes": np.zeros((0, 4), dtype=np.float32), "labels": np.zeros(0, dtype=np.int64), "masks": [],
             "image_id": 7, "ori_shape": (80, 60), "scale_factor": (0.5, 0.5), "flip": True}
    return [(a, rec_a), (b, rec_b)]


def test_collate_pads_to_the_divisor_and_records_shapes():
    batch = collate_samples(two_samples(), size_divisor=32)
    assert batch["images"].shape == (2, 3, 64, 96)  # max (50, 70) padded to multiples of 32
    ma, mb = batch["img_metas"]
    assert ma["img_shape"] == (50, 70) and ma["pad_shape"] == (64, 96)
    assert mb["img_shape"] == (40, 30) and mb["pad_shape"] == (64, 32)  # its own padding, not the batch's
    assert ma["batch_input_shape"] == mb["batch_input_shape"] == (64, 96)
    assert ma["ori_shape"] == (50, 70) and ma["scale_factor"] == (1.0, 1.0) and ma["flip"] is False
    assert mb["ori_shape"] == (80, 60) and mb["scale_factor"] == (0.5, 0.5) and mb["flip"] is True
    assert mb["image_id"] == 7

    images = batch["images"]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(images[0, :, 0, 0], (255 - mean) / std)
    assert torch.allclose(images[0, :, 10, 10], (torch.tensor(IMAGENET_MEAN).round() - mean) / std)
    assert torch.allclose(images[1, :, 39, 29], (7 - mean) / std)
    assert torch.all(images[0, :, 50:] == 0) and torch.all(images[0, :, :, 70:] == 0)
    assert torch.all(images[1, :, 40:] == 0) and torch.all(images[1, :, :, 30:] == 0)

    unpadded = collate_samples(two_samples(), size_divisor=1)
    assert unpadded["images"].shape == (2, 3, 50, 70)
    assert unpadded["img_metas"][1]["pad_shape"] == (40, 30)


def test_collate_separates_ignored_boxes_and_rasterises_masks():
    batch = collate_samples(two_samples(), with_masks=True)
    assert torch.equal(batch["gt_boxes"][0], torch.tensor([[1.0, 2, 11, 12], [20, 20, 40, 45]]))
    assert batch["gt_labels"][0].tolist() == [0, 1] and batch["gt_labels"][0].dtype == torch.int64
    assert torch.equal(batch["gt_boxes_ignore"][0], torch.tensor([[5.0, 5, 8, 8]]))
    assert batch["gt_boxes"][1].shape == (0, 4) and batch["gt_boxes_ignore"][1].shape == (0, 4)
    masks = batch["gt_masks"]
    assert masks[0].shape == (2, 50, 70) and masks[0].dtype == torch.uint8  # the ignored instance is dropped
    expected = np.zeros((2, 50, 70), dtype=np.uint8)
    expected[0, 2:12, 1:11] = 1  # integer rectangles cover exactly their pixels
    expected[1, 20:45, 20:40] = 1
    assert np.array_equal(masks[0].numpy(), expected)
    assert np.array_equal(masks[0][1].numpy().astype(bool), rasterise(rect_polygon(20, 20, 40, 45), 50, 70))
    assert masks[1].shape == (0, 40, 30)
    assert "gt_masks" not in collate_samples(two_samples())
