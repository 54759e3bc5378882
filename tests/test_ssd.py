"""SSD (Liu et al. 2016): priors, L2Norm, hard negative mining, the head's loss, the SSD augmentation, the
pipelines' architecture, and a thin SSD overfitting a few images.

Expected values: prior sizes and counts by hand from MMDetection's rule (ssd300.py / ssd512_coco.py); the losses
and transforms by hand in the comments; key names, shapes and parameter counts from MMDetection 3.3.0's own models
(tests/fixtures/interop/mmdet/, written by make_mmdet_fixtures.py), checked against a count by hand; AP50 by
pycocotools (through raydet.evaluation).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.data import Expand, MinIoURandomCrop, PhotoMetricDistortion, build_transforms
from raydet.data.augmentation import box_iou
from raydet.data.collate import collate_samples
from raydet.data.pipeline import record_to_sample
from raydet.data.synthetic import make_shapes_dataset
from raydet.masks import bitmap_to_rle, instance_masks_to_bitmaps
from raydet.models.dense_heads.ssd_head import SSDHead
from raydet.models.losses import CrossEntropyLoss
from raydet.models.necks.ssd_neck import L2Norm
from raydet.models.task_modules.assigners import MaxIoUAssigner
from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
from raydet.models.task_modules.prior_generators import SSDAnchorGenerator
from raydet.models.task_modules.samplers import hard_negative_mining
from test_detectors import _ap, _train, build_from_pipeline

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop" / "mmdet"

SSD300 = {"strides": [8, 16, 32, 64, 100, 300], "ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]], "input_size": 300}
SSD512 = {"strides": [8, 16, 32, 64, 128, 256, 512], "ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
          "input_size": 512}


# ------------------------------------------------------------------------------------------------------ priors

def test_ssd300_coco_prior_sizes_and_counts_by_hand():
    gen = SSDAnchorGenerator(basesize_ratio_range=(0.15, 0.9), **SSD300)
    # levels 2-6: percents 15, 33, 51, 69, 87 (step int(75 / 4) = 18) of 300, max the next percent; level 1: 7 / 15 %
    assert gen.min_sizes == [[21], [45], [99], [153], [207], [261]]
    assert gen.max_sizes == [[45], [99], [153], [207], [261], [315]]
    assert gen.num_base_priors == [4, 6, 6, 6, 4, 4]
    sizes = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    counts = [a.shape[0] for a in gen.grid_anchors(sizes)]
    assert counts == [38 * 38 * 4, 19 * 19 * 6, 10 * 10 * 6, 5 * 5 * 6, 3 * 3 * 4, 4]  # 5776, 2166, 600, 150, 36, 4
    assert sum(counts) == 8732
    # location (0, 0) of level 1, centred at (4, 4): 21 x 21; ratio h/w = 1/2: w = 21 sqrt(2), h = 21 / sqrt(2);
    # ratio 2 the transpose; then sqrt(21 x 45) = sqrt(945) square
    r, s = 21 * math.sqrt(2) / 2, math.sqrt(945) / 2
    expected = [[-6.5, -6.5, 14.5, 14.5], [4 - r, 4 - r / 2, 4 + r, 4 + r / 2], [4 - r / 2, 4 - r, 4 + r / 2, 4 + r],
                [4 - s, 4 - s, 4 + s, 4 + s]]
    np.testing.assert_allclose(gen.grid_anchors(sizes)[0][:4].numpy(), expected, atol=1e-4)
    # level 2 location (1, 2) (row 1, column 2) of the 19 x 19 grid: centre (2.5 x 16, 1.5 x 16) = (40, 24); its
    # fifth prior has ratio 3: w = 45 / sqrt(3), h = 45 sqrt(3)
    w, h = 45 / math.sqrt(3), 45 * math.sqrt(3)
    np.testing.assert_allclose(gen.grid_anchors(sizes)[1][(1 * 19 + 2) * 6 + 4].numpy(),
                               [40 - w / 2, 24 - h / 2, 40 + w / 2, 24 + h / 2], rtol=1e-5)
    # the 1 x 1 level: centred at 150, squares of 261 and sqrt(261 x 315); not clipped to the image
    s = math.sqrt(261 * 315) / 2
    np.testing.assert_allclose(gen.grid_anchors(sizes)[5][[0, 3]].numpy(),
                               [[19.5, 19.5, 280.5, 280.5], [150 - s, 150 - s, 150 + s, 150 + s]], rtol=1e-5)


def test_ssd300_voc_and_ssd512_prior_sizes_and_counts_by_hand():
    voc = SSDAnchorGenerator(basesize_ratio_range=(0.2, 0.9), **SSD300)
    # percents 20, 37, 54, 71, 88 (step int(70 / 4) = 17) of 300, first level 10 / 20 %
    assert voc.min_sizes == [[30], [60], [111], [162], [213], [264]]
    assert voc.max_sizes == [[60], [111], [162], [213], [264], [315]]
    gen = SSDAnchorGenerator(basesize_ratio_range=(0.1, 0.9), **SSD512)
    # percents 10, 26, 42, 58, 74, 90 (step int(80 / 5) = 16) of 512, first level 4 / 10 %
    assert gen.min_sizes == [[20], [51], [133], [215], [296], [378], [460]]
    assert gen.max_sizes == [[51], [133], [215], [296], [378], [460], [542]]
    sizes = [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    counts = [a.shape[0] for a in gen.grid_anchors(sizes)]
    assert counts == [64 * 64 * 4, 32 * 32 * 6, 16 * 16 * 6, 8 * 8 * 6, 4 * 4 * 6, 2 * 2 * 4, 4]
    assert sum(counts) == 24564
    # valid flags: every location of a 512 x 512 image is valid; a 500 x 256 padded image keeps ceil(256 / 8) = 32
    # of level 1's 64 columns and all its 63 rows (ceil(500 / 8))
    assert all(bool(v.all()) for v in gen.valid_flags(sizes, (512, 512)))
    assert int(gen.valid_flags(sizes, (500, 256))[0].sum()) == 63 * 32 * 4


def test_ssd_anchor_generator_errors():
    with pytest.raises(ValueError, match="min_sizes and max_sizes"):
        SSDAnchorGenerator(strides=[8, 16, 32], ratios=[[2], [2], [2]], input_size=128)
    with pytest.raises(ValueError, match="both min_sizes and max_sizes"):
        SSDAnchorGenerator(strides=[8], ratios=[[2]], min_sizes=[10])
    with pytest.raises(ValueError, match="larger than its min"):
        SSDAnchorGenerator(strides=[8], ratios=[[2]], min_sizes=[10], max_sizes=[10])


# ---------------------------------------------------------------------------------------------- backbone, L2Norm

@pytest.mark.parametrize("ceil_mode,conv4,fc7", [(True, 10, 5), (False, 9, 4)])
def test_ssd_vgg_returns_conv4_3_and_fc7(ceil_mode, conv4, fc7):
    from raydet.models.backbones import SSDVGG

    vgg = SSDVGG(depth=16, ceil_mode=ceil_mode, base_channels=8, fc_channels=16)
    # VGG-16: 2, 2, 3, 3, 3 (conv, ReLU) pairs with a pool after the first four stages, then pool5, fc6, ReLU, fc7,
    # ReLU: conv4_3's ReLU is layer 2 + 2 + 3 + 3 pairs x 2 + 3 pools - 1 = 22, fc7's ReLU the last, 34
    assert vgg.out_feature_indices == (22, 34) and len(vgg.features) == 35 and vgg.out_channels == [64, 16]
    assert vgg.features[31].dilation == (6, 6) and vgg.features[31].padding == (6, 6)
    # 75 pixels: ceil 75 -> 38 -> 19 -> 10 (floor 37 -> 18 -> 9) at conv4; pool4 halves it again, pool5 keeps it
    c4, f7 = vgg(torch.zeros(1, 3, 75, 75))
    assert tuple(c4.shape) == (1, 64, conv4, conv4) and tuple(f7.shape) == (1, 16, fc7, fc7)


# ------------------------------------------------------------------------------------------------------ L2Norm

def test_l2norm_scales_each_location_to_the_learned_weight():
    norm = L2Norm(2, scale=20)
    assert norm.weight.requires_grad and norm.weight.tolist() == [20.0, 20.0]
    x = torch.tensor([[[[3.0, 0.0]], [[4.0, 2.0]]]])  # (1, 2, 1, 2): channel vectors (3, 4) and (0, 2)
    out = norm(x)
    # (3, 4) / 5 x 20 = (12, 16); (0, 2) / 2 x 20 = (0, 20)
    np.testing.assert_allclose(out[0, :, 0, 0].detach().numpy(), [12, 16], rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 0, 1].detach().numpy(), [0, 20], rtol=1e-6)
    out.sum().backward()  # d/dweight_c = sum over locations of x_c / ||x||: (0.6 + 0, 0.8 + 1)
    np.testing.assert_allclose(norm.weight.grad.numpy(), [0.6, 1.8], rtol=1e-6)


# ------------------------------------------------------------------------------------------ hard negative mining

def test_hard_negative_mining_keeps_the_hardest_negatives_per_image():
    losses = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.95],
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0],
                           [0.2, 0.1, 0.6, 0.3, 0.0, 0.0, 0.0]])
    pos = torch.zeros(3, 7, dtype=torch.bool)
    pos[0, 0] = pos[2, 0] = pos[2, 1] = True
    neg = torch.zeros(3, 7, dtype=torch.bool)
    neg[0, 1:6] = True   # index 6 (loss 0.95) is ignored: never a negative
    neg[1, :] = True     # no positive: no negative kept
    neg[2, 2:4] = True   # 2 positives want 6 negatives; only 2 exist
    kept = hard_negative_mining(losses, pos, neg, 3)
    assert torch.nonzero(kept).tolist() == [[0, 1], [0, 3], [0, 5], [2, 2], [2, 3]]  # image 0: 0.9, 0.8, 0.7
    assert torch.nonzero(hard_negative_mining(losses, pos, neg, 1.5)).tolist() == [[0, 1], [2, 2], [2, 3]]


# ---------------------------------------------------------------------------------------------------- the head

def _one_level_head(num_classes: int = 2) -> SSDHead:
    """One level of stride 32 (a 2 x 2 map of a 64 x 64 image), ratios [] -> 2 priors per location: a 32 x 32 square
    and a sqrt(32 x 128) = 64 square. All weights zero: uniform class probabilities; deltas from the biases."""
    gen = SSDAnchorGenerator(strides=[32], ratios=[[]], min_sizes=[32], max_sizes=[128])
    head = SSDHead(num_classes, [4], gen, DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)),
                   MaxIoUAssigner(0.5, 0.5, 0.0, gt_max_assign_all=False))
    for m in head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias)
    torch.nn.init.constant_(head.reg_convs[0][0].bias, 0.5)
    return head


def test_ssd_head_loss_by_hand():
    head = _one_level_head()
    assert head.num_base_priors == [2] and head.cls_out_channels == 3
    meta = {"img_shape": (64, 64), "pad_shape": (64, 64), "batch_input_shape": (64, 64)}
    # image 1: one gt equal to the 32-square prior at (16, 16): IoU 1; the other 7 priors have IoU <= 0.25 with it
    # (64-square at (16, 16): 1024 / 4096), so 1 positive and 7 negatives. Image 2 has no object: no positive, and
    # so no negative is mined.
    batch = {"img_metas": [meta, meta], "gt_boxes": [torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.zeros(0, 4)],
             "gt_labels": [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]}
    losses = head.loss((torch.zeros(2, 4, 2, 2),), batch)
    # each prior's cross-entropy over 3 uniform outputs is log 3; 1 positive + 3 mined negatives, over 1 positive
    assert losses["loss_cls"].item() == pytest.approx(4 * math.log(3), rel=1e-6)
    # target deltas 0 (the prior is the gt), predicted 0.5 each: smooth L1 (beta 1) 0.5 x 0.5^2 = 0.125, x 4
    assert losses["loss_bbox"].item() == pytest.approx(0.5, rel=1e-6)
    # no object in the batch: no positive, no negative; the losses are exact zeros
    empty = dict(batch, gt_boxes=[torch.zeros(0, 4)] * 2, gt_labels=[torch.zeros(0, dtype=torch.long)] * 2)
    losses = head.loss((torch.zeros(2, 4, 2, 2),), empty)
    assert losses["loss_cls"].item() == 0.0 and losses["loss_bbox"].item() == 0.0


def test_ssd_head_predicts_softmax_scores_without_the_background():
    head = _one_level_head(num_classes=2)
    meta = {"img_shape": (64, 64), "pad_shape": (64, 64), "batch_input_shape": (64, 64), "ori_shape": (64, 64)}
    (result,) = head.predict((torch.zeros(1, 4, 2, 2),), [meta])
    # 3 uniform outputs (2 classes and the background): every detection scores 1/3, not 1/2
    assert len(result["scores"]) > 0
    np.testing.assert_allclose(result["scores"].numpy(), 1 / 3, rtol=1e-6)
    # the top-left 32-square moved by deltas 0.5 x stds (0.1, 0.1, 0.2, 0.2): centre 16 + 0.05 x 32 = 17.6, side
    # 32 e^0.1 = 35.37: (-0.08, -0.08, 35.28, 35.28), clipped to the image
    side = 32 * math.exp(0.1)
    expected = [0, 0, 17.6 + side / 2, 17.6 + side / 2]
    assert any(np.allclose(b, expected, atol=1e-3) for b in result["boxes"].numpy())


def test_ssd_head_needs_a_softmax_classifier():
    gen = SSDAnchorGenerator(strides=[32], ratios=[[]], min_sizes=[32], max_sizes=[128])
    sigmoid = CrossEntropyLoss(use_sigmoid=True)
    with pytest.raises(ValueError, match="softmax outputs: set loss_cls.use_sigmoid: false"):
        SSDHead(2, [4], gen, DeltaXYWHBBoxCoder(), MaxIoUAssigner(0.5, 0.5), loss_cls=sigmoid)


# ------------------------------------------------------------------------------------------------ augmentation

def _sample(h, w, boxes, labels=None, ignore=(), masks=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    s = {"image": (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3), "boxes": boxes,
         "labels": np.arange(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels, np.int64),
         "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4), "image_id": 1, "ori_shape": (h, w),
         "img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False}
    if masks is not None:
        s["masks"] = masks
    return s


def test_expand_by_hand():
    bitmap = np.zeros((10, 20), np.uint8)
    bitmap[1:8, 2:12] = 1
    s = _sample(10, 20, [[2, 1, 12, 8]], ignore=[[0, 0, 4, 4]],
                masks=[[[2, 1, 12, 1, 12, 8, 2, 8]]])
    s["masks"].append(bitmap_to_rle(bitmap))
    s["boxes"] = np.concatenate([s["boxes"], s["boxes"]])
    s["labels"] = np.array([0, 1])
    # mean given in BGR order with to_rgb false: the RGB fill is (123, 116, 103), truncated to uint8
    t = Expand(mean=[103.53, 116.28, 123.675], to_rgb=False, ratio_range=(1, 4), prob=1.0)
    out = t.expand(s, ratio=2.0, left=5, top=3)  # canvas int(10 x 2) x int(20 x 2)
    assert out["image"].shape == (20, 40, 3) and out["img_shape"] == (20, 40)
    np.testing.assert_array_equal(out["image"][3:13, 5:25], s["image"])
    assert (out["image"][:3] == [123, 116, 103]).all() and (out["image"][:, 25:] == [123, 116, 103]).all()
    np.testing.assert_allclose(out["boxes"], [[7, 4, 17, 11]] * 2)
    np.testing.assert_allclose(out["ignore_boxes"], [[5, 3, 9, 7]])
    expected = np.zeros((20, 40), np.uint8)
    expected[4:11, 7:17] = 1
    np.testing.assert_array_equal(instance_masks_to_bitmaps(out["masks"], 20, 40), [expected, expected])
    assert s["image"].shape == (10, 20, 3) and s["boxes"][0, 0] == 2  # the input is untouched


def test_expand_draws_offset_and_ratio_in_range():
    s = _sample(10, 20, [[2, 1, 12, 8]])
    assert Expand(prob=0.0)(s, np.random.default_rng(0))["image"] is s["image"]
    t = Expand(mean=[0, 0, 0], ratio_range=(1, 4), prob=1.0)
    for seed in range(20):
        out = t(s, np.random.default_rng(seed))
        h, w = out["image"].shape[:2]
        assert 10 <= h <= 40 and 20 <= w <= 80
        left, top = (out["boxes"][0] - s["boxes"][0])[:2].astype(int)
        np.testing.assert_allclose(out["boxes"][0] - s["boxes"][0], [left, top, left, top])
        np.testing.assert_array_equal(out["image"][top:top + 10, left:left + 20], s["image"])


def test_min_iou_random_crop_by_hand():
    boxes = [[10, 10, 30, 30], [40, 40, 90, 90], [0, 60, 20, 100]]  # centres (20, 20), (65, 65), (10, 80)
    polys = [[[10, 10, 30, 10, 30, 30, 10, 30]], [[40, 40, 90, 40, 90, 90, 40, 90]], [[0, 60, 20, 60, 20, 100, 0, 100]]]
    s = _sample(100, 100, boxes, labels=[5, 6, 7], ignore=[[60, 0, 80, 20], [16, 50, 24, 60]], masks=polys)
    out = MinIoURandomCrop().crop(s, (15, 15, 70, 70))
    assert out["image"].shape == (55, 55, 3) and out["img_shape"] == (55, 55)
    np.testing.assert_array_equal(out["image"], s["image"][15:70, 15:70])
    # kept: the first two (centres inside), clipped to the patch and shifted by (15, 15); the third is dropped
    np.testing.assert_allclose(out["boxes"], [[0, 0, 15, 15], [25, 25, 55, 55]])
    assert out["labels"].tolist() == [5, 6]
    # ignore boxes: centre (70, 10) outside; centre (20, 55) inside
    np.testing.assert_allclose(out["ignore_boxes"], [[1, 35, 9, 45]])
    bitmaps = instance_masks_to_bitmaps(out["masks"], 55, 55)
    assert bitmaps.shape == (2, 55, 55) and bitmaps[0].sum() == 15 * 15 and bitmaps[1].sum() == 30 * 30


def test_min_iou_random_crop_patches_meet_the_iou_and_centre_constraints():
    boxes = np.array([[20, 20, 60, 60], [50, 10, 90, 40]], np.float32)
    t = MinIoURandomCrop(min_crop_size=0.3)
    found = 0
    for seed in range(100):
        patch = t.draw_patch(boxes, (100, 100), 0.3, np.random.default_rng(seed))
        if patch is None:
            continue
        found += 1
        x1, y1, x2, y2 = patch
        assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100 and x2 - x1 >= 29 and y2 - y1 >= 29
        assert box_iou(np.array(patch, float), boxes).min() >= 0.3
        assert MinIoURandomCrop.centre_inside(boxes, patch).any()
    assert found >= 20  # 42 of these 100 seeds find one within 50 tries
    # the whole transform: kept boxes lie inside the crop with positive area, labels follow their boxes
    s = _sample(100, 100, boxes, labels=[3, 4])
    for seed in range(30):
        out = MinIoURandomCrop()(s, np.random.default_rng(seed))
        h, w = out["image"].shape[:2]
        b = out["boxes"]
        assert len(b) >= 1 and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        sizes = {3: (40, 40), 4: (40, 30)}  # a kept box is never larger than the original
        assert all(bw <= sizes[lab][0] and bh <= sizes[lab][1]
                   for (bw, bh), lab in zip(b[:, 2:] - b[:, :2], out["labels"]))


def test_photometric_distortion_by_hand():
    img = np.array([[[100, 200, 250], [255, 0, 0]], [[200, 100, 0], [0, 0, 0]]], np.uint8)
    apply = PhotoMetricDistortion.apply
    np.testing.assert_array_equal(apply(img, {"brightness": 10.0})[0, 0], [110, 210, 255])  # 260 clipped
    np.testing.assert_array_equal(apply(img, {"contrast": 0.5, "contrast_first": False})[0, 0], [50, 100, 125])
    out = apply(img, {"saturation": 0.0})
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])   # red without saturation: grey at V = 255
    # (200, 100, 0): H 30, S 1, V 200; S 0.5: min = 100, G = 100 + 100 x 30 / 60
    np.testing.assert_array_equal(apply(img, {"saturation": 0.5})[1, 0], [200, 150, 100])
    np.testing.assert_array_equal(apply(img, {"hue": 120.0})[0, 1], [0, 255, 0])    # red + 120 degrees: green
    np.testing.assert_array_equal(apply(img, {"hue": -120.0})[0, 1], [0, 0, 255])   # 0 - 120 -> 240: blue
    np.testing.assert_array_equal(apply(img, {"swap": [2, 1, 0]})[0, 0], [250, 200, 100])
    np.testing.assert_array_equal(apply(img, {}), img)  # nothing drawn: the HSV round trip keeps the image
    # each step on about half of the images, each value within its range
    t = PhotoMetricDistortion()
    draws = [t.draw(np.random.default_rng(i)) for i in range(2000)]
    for key, lo, hi in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5), ("hue", -18, 18)):
        values = [d[key] for d in draws if d[key] is not None]
        assert abs(len(values) / 2000 - 0.5) < 0.05 and lo <= min(values) and max(values) <= hi
    s = _sample(8, 8, [[1, 1, 5, 5]])
    out = t(s, np.random.default_rng(0))
    assert out["image"].dtype == np.uint8 and out["boxes"] is s["boxes"]


def test_ssd300_train_pipeline_gives_300_pixel_images_with_boxes_inside():
    from raydet.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "pipelines" / "ssd300_coco.yaml")
    transforms, collate = build_transforms(cfg["data.train.pipeline"])
    assert collate.std == (1.0, 1.0, 1.0) and collate.size_divisor == 1
    assert [type(t).__name__ for t in transforms.transforms] == [
        "Expand", "MinIoURandomCrop", "Resize", "RandomFlip", "PhotoMetricDistortion"]
    (image, record), = make_shapes_dataset(1, height=96, width=128, seed=5)
    for seed in range(5):
        out = transforms(record_to_sample(record, image), np.random.default_rng(seed))
        assert out["image"].shape == (300, 300, 3) and out["image"].dtype == np.uint8
        b = out["boxes"]
        assert len(b) >= 1 and (b >= 0).all() and (b <= 300).all() and (b[:, 2:] > b[:, :2]).all()


# --------------------------------------------------------------------------------------------------- pipelines

def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# By hand, SSD300 with C classes: VGG-16 convs 14,714,688 + fc6 (512 x 1024 x 9 + 1024) 4,719,616 + fc7 (1024^2 + 1024)
# 1,049,600 = 20,483,904; neck: L2Norm 512 + extra levels (1024->256->512) 262,400 + 1,180,160, (512->128->256)
# 65,664 + 295,168, 2 x (256->128->256) 32,896 + 295,168 = 2,460,032; head: sum over levels of A (C + 1 + 4)
# (9 in + 1) with (in, A) = (512, 4), (1024, 6), (512, 6), (256, 6), (256, 4), (256, 4) = 133,662 x (C + 5).
@pytest.mark.parametrize("name,num_classes", [("ssd300_coco", 80), ("ssd512_coco", 80), ("ssd300_voc0712", 20)])
def test_pipeline_builds_mmdetections_ssd(name, num_classes):
    model = build_from_pipeline(f"{name}.yaml")
    assert type(model).__name__ == "SSD"
    if name != "ssd512_coco":
        assert _count(model) == 20_483_904 + 2_460_032 + 133_662 * (num_classes + 5)
    if name != "ssd300_voc0712":  # MMDetection 3.3.0's own model of the config: the same keys, shapes and count
        ref = json.loads((FIXTURES / f"{name}.json").read_text())
        assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["state_dict"]
        assert _count(model) == ref["num_params"]
    # the feature maps of the input size, on the meta device (shapes only)
    size = 512 if "512" in name else 300
    model = model.to("meta")
    feats = model.extract_feat(torch.empty(1, 3, size, size, device="meta"))
    grids = [tuple(f.shape[-2:]) for f in feats]
    assert grids == ([(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)] if size == 512
                     else [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])
    assert sum(a.shape[0] for a in model.bbox_head.anchor_generator.grid_anchors(grids)) == (
        24564 if size == 512 else 8732)


# -------------------------------------------------------------------------------------------------- overfitting

# A thin SSD on 128-pixel images: VGG-16 at 1/8 of the widths (base 8, fc 128), two extra levels (16, 8, 4, 2
# cells), priors sized for the 20-64 pixel shapes.
TINY_SSD = [
    "num_classes=3",
    "model.backbone.base_channels=8",
    "model.backbone.fc_channels=128",
    "model.neck.in_channels=[64, 128]",
    "model.neck.out_channels=[64, 128, 64, 32]",
    "model.neck.level_strides=[2, 2]",
    "model.neck.level_paddings=[1, 1]",
    "model.bbox_head.in_channels=[64, 128, 64, 32]",
    ("model.bbox_head.anchor_generator={type: SSDAnchorGenerator, strides: [8, 16, 32, 64], "
     "ratios: [[2], [2, 3], [2, 3], [2]], min_sizes: [12, 24, 48, 80], max_sizes: [24, 48, 80, 112]}"),
]


def test_tiny_ssd_overfits_a_few_images():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3)
    records = [r for _, r in samples]
    torch.manual_seed(0)
    model = build_from_pipeline("ssd300_coco.yaml", TINY_SSD)
    batch = collate_samples(samples, size_divisor=1)
    first, last = _train(model, batch, 80)
    assert sum(last.values()) < 0.1 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
