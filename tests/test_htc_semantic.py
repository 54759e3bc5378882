"""Semantic maps for HTC's semantic branch (raydet.data.seg_maps): a dataset's ``seg_prefix`` PNGs, the transforms
moving a ``seg_map`` with the image, the collate step padding it with 255, and the errors naming the file.

Expected maps are written out by hand; a nearest-neighbour resize by an integer factor repeats each pixel in a block.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from raydet.data import (CocoDataset, CollateConfig, MinIoURandomCrop, RandomFlip, Resize, TorchDetectionDataset,
                         collate_detection)
from raydet.data.augmentation import Expand
from raydet.data.seg_maps import read_seg_map, seg_map_path
from raydet.data.synthetic import make_shape_sample

# 3 x 4 map; 255 = ignored
SRC = np.array([[0, 1, 2, 3],
                [4, 5, 6, 7],
                [8, 9, 10, 255]], np.uint8)


def _sample(seg: np.ndarray, image_id: int = 1) -> dict:
    h, w = seg.shape
    return {"image": np.zeros((h, w, 3), np.uint8), "boxes": np.array([[0, 0, w, h]], np.float32),
            "labels": np.zeros(1, np.int64), "ignore_boxes": np.zeros((0, 4), np.float32), "image_id": image_id,
            "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False, "seg_map": seg}


def test_seg_map_follows_resize_flip_crop_and_pads_with_255():
    rng = np.random.default_rng(0)
    # Resize to [8, 6]: factor min(8 / 4, 6 / 3) = 2 -> 6 x 8, each id a 2 x 2 block
    s = Resize([8, 6])(_sample(SRC), rng)
    assert s["seg_map"].dtype == np.uint8
    np.testing.assert_array_equal(s["seg_map"], [[0, 0, 1, 1, 2, 2, 3, 3],
                                                 [0, 0, 1, 1, 2, 2, 3, 3],
                                                 [4, 4, 5, 5, 6, 6, 7, 7],
                                                 [4, 4, 5, 5, 6, 6, 7, 7],
                                                 [8, 8, 9, 9, 10, 10, 255, 255],
                                                 [8, 8, 9, 9, 10, 10, 255, 255]])
    s = RandomFlip(prob=1.0)(s, rng)  # columns reversed
    # crop to x 1..6, y 1..5 of the flipped map
    #   3 3 2 2 1 1 0 0  /  7 7 6 6 5 5 4 4  (twice each)  /  255 255 10 10 9 9 8 8 (twice)
    s = MinIoURandomCrop().crop(s, (1, 1, 6, 5))
    crop = [[3, 2, 2, 1, 1],
            [7, 6, 6, 5, 5],
            [7, 6, 6, 5, 5],
            [255, 10, 10, 9, 9]]
    np.testing.assert_array_equal(s["seg_map"], crop)
    # a second, 2 x 3 image in the batch; Pad(size_divisor=8): the batch is 8 x 8, 255 outside each map
    other = _sample(np.array([[1, 2, 3], [4, 5, 6]], np.uint8), image_id=2)
    batch = collate_detection([s, other], CollateConfig(size_divisor=8))
    seg = batch["gt_semantic_seg"]
    assert seg.shape == (2, 8, 8) and seg.dtype == torch.uint8
    expected = np.full((2, 8, 8), 255, np.uint8)
    expected[0, :4, :5] = crop
    expected[1, :2, :3] = [[1, 2, 3], [4, 5, 6]]
    np.testing.assert_array_equal(seg.numpy(), expected)


def test_nearest_resize_makes_no_new_ids_and_expand_fills_255():
    # 3 x 4 -> [6, 5]: factor min(6 / 4, 5 / 3) = 1.5 -> 5 x 6 (4.5 rounded half up); bilinear would blend ids
    s = Resize([6, 5])(_sample(SRC), np.random.default_rng(0))
    assert s["seg_map"].shape == (5, 6)
    assert set(np.unique(s["seg_map"])) == set(np.unique(SRC))
    # Expand by 2 with the image at (left 1, top 0): a 6 x 8 canvas of 255 with the map at rows 0-2, columns 1-4
    out = Expand(prob=1.0).expand(_sample(SRC), 2.0, 1, 0)
    expected = np.full((6, 8), 255, np.uint8)
    expected[0:3, 1:5] = SRC
    np.testing.assert_array_equal(out["seg_map"], expected)


def test_synthetic_seg_map_is_label_plus_one_on_each_shape():
    image, rec = make_shape_sample(3, 64, 64, max_objects=3, seed=1, with_seg=True)
    plain, _ = make_shape_sample(3, 64, 64, max_objects=3, seed=1)
    np.testing.assert_array_equal(image, plain)  # the option does not change the draws
    from raydet.masks import instance_masks_to_bitmaps

    expected = np.zeros((64, 64), np.uint8)
    for bitmap, label in zip(instance_masks_to_bitmaps(rec["masks"], 64, 64), rec["labels"]):
        expected[bitmap.astype(bool)] = label + 1
    np.testing.assert_array_equal(rec["seg_map"], expected)
    assert expected.any()


# ------------------------------------------------------------------------------------------------ files

def _coco(tmp_path, sizes=((6, 8), (4, 5)), check_images=True, write=None, **kw):
    """Two images (h, w) with one box each; their maps under tmp_path/seg, written by ``write(i, h, w)`` (default:
    a map of the image's size whose pixel (x, y) holds x + y)."""
    (tmp_path / "img" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "seg" / "sub").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        name = f"sub/{i}.jpg"
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(tmp_path / "img" / name)
        images.append({"id": 10 + i, "file_name": name, "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": 10 + i, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 0})
        seg = write(i, h, w) if write else np.add.outer(np.arange(h), np.arange(w)).astype(np.uint8)
        if seg is not None:
            Image.fromarray(seg).save(tmp_path / "seg" / "sub" / f"{i}.png")
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                   "categories": [{"id": 1, "name": "a"}]}))
    return CocoDataset(str(tmp_path / "ann.json"), str(tmp_path / "img"), seg_prefix=str(tmp_path / "seg"),
                       check_images=check_images, **kw)


def test_dataset_reads_maps_named_like_the_images(tmp_path):
    ds = _coco(tmp_path, pipeline=[{"type": "RandomFlip", "prob": 1.0}])
    assert seg_map_path("s3://b/stuff/", "x/a.b.jpg") == "s3://b/stuff/x/a.b.png"
    assert [r["seg_map_path"] for r in ds.records] == [str(tmp_path / "seg" / "sub" / f"{i}.png") for i in (0, 1)]
    sample = TorchDetectionDataset(ds, train=True)[1]
    h, w = 4, 5  # pixel (x, y) holds x + y; flipped: (w - 1 - x) + y
    np.testing.assert_array_equal(sample["seg_map"], [[w - 1 - x + y for x in range(w)] for y in range(h)])
    # a palette PNG gives its indices, not its colours
    p = Image.frombytes("P", (2, 2), bytes([0, 3, 255, 1]))
    p.putpalette([7] * 768)
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_seg_map(str(tmp_path / "p.png")), [[0, 3], [255, 1]])


def test_missing_or_wrong_size_map_fails_naming_the_file_and_image(tmp_path):
    no_second = lambda i, h, w: None if i == 1 else np.zeros((h, w), np.uint8)  # noqa: E731
    with pytest.raises(ValueError) as err:
        _coco(tmp_path / "a", write=no_second)
    assert "missing_seg_map" in str(err.value) and str(tmp_path / "a" / "seg" / "sub" / "1.png") in str(err.value)
    assert "image id 11 (file_name 'sub/1.jpg')" in str(err.value)
    # a 4 x 6 map for the 8 x 6 image (width x height)
    with pytest.raises(ValueError, match=r"image id 10 .*semantic map .*0\.png is 4 x 6 \(width x height\) but its "
                                         r"image is 8 x 6"):
        _coco(tmp_path / "b", write=lambda i, h, w: np.zeros((h, w - 4 * (i == 0)), np.uint8))
    with pytest.raises(ValueError, match=r"bad_seg_map.*mode 'RGB'"):
        _coco(tmp_path / "c", write=lambda i, h, w: np.zeros((h, w, 3), np.uint8))
    # on_error: skip drops the image without a map, with a warning
    with pytest.warns(UserWarning, match="missing_seg_map"):
        ds = _coco(tmp_path / "d", write=no_second, on_error="skip")
    assert [r["image_id"] for r in ds.records] == [10]
    # without the look when reading (check_images: false), decoding the sample says it
    ds = _coco(tmp_path / "e", write=no_second, check_images=False)
    missing = re.escape(str(tmp_path / "e" / "seg" / "sub" / "1.png"))
    with pytest.raises(FileNotFoundError, match=f"image id 11: semantic map not found: {missing}"):
        TorchDetectionDataset(ds, train=False)[1]
