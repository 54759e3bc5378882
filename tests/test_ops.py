"""Tests of raydet.ops against hand-computed values and independent references (torchvision, nn.functional)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from raydet.ops import (DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack, RoIAlign, RoIPool, batched_nms,
                        bbox_overlaps, deform_conv2d, multiclass_nms, nms, roi_align, roi_pool, sigmoid_focal_loss,
                        soft_nms)
from raydet.registry import ConfigError, build


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------- NMS
# Two clusters. IoU(b0, b1) = 80/100 = 0.8, IoU(b0, b2) = 50/100 = 0.5, IoU(b1, b2) = 50/80 = 0.625,
# IoU(b3, b4) = 60/100 = 0.6; the clusters do not touch. Score order: b0, b3, b1, b2, b4.
NMS_BOXES = _t([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 5], [20, 20, 30, 30], [20, 20, 30, 26]])
NMS_SCORES = _t([0.9, 0.8, 0.7, 0.85, 0.6])


@pytest.mark.parametrize("thr, expected", [
    (0.7, [0, 3, 2, 4]),   # only b1 (0.8 with b0) is suppressed; b2 overlaps b0 by 0.5 and b1 is gone
    (0.55, [0, 3, 2]),     # b4 (0.6 with b3) goes too
    (0.45, [0, 3]),        # b2 (0.5 with b0) goes too
])
def test_nms_hand_set(thr, expected):
    keep = nms(NMS_BOXES, NMS_SCORES, thr)
    assert keep.dtype == torch.long
    assert keep.tolist() == expected


def test_nms_empty_and_half():
    keep = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert keep.dtype == torch.long and keep.shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
    # float16 boxes (no CPU half kernel in torchvision; areas above 65504 overflow float16).
    assert nms(NMS_BOXES.half() * 30, NMS_SCORES.half(), 0.55).tolist() == [0, 3, 2]


def test_batched_nms_class_aware():
    idxs = torch.tensor([0, 1, 0, 0, 0])  # b1 is the only box of class 1: nothing of class 0 suppresses it
    assert batched_nms(NMS_BOXES, NMS_SCORES, idxs, 0.55).tolist() == [0, 3, 1, 2]
    assert batched_nms(NMS_BOXES, NMS_SCORES, idxs, 0.55, class_agnostic=True).tolist() == [0, 3, 2]
    # Identical boxes of three different classes all survive.
    boxes = _t([[0, 0, 5, 5]] * 3)
    assert sorted(batched_nms(boxes, _t([0.5, 0.7, 0.6]), torch.tensor([0, 1, 2]), 0.1).tolist()) == [0, 1, 2]
    assert batched_nms(boxes, _t([0.5, 0.7, 0.6]), torch.tensor([0, 1, 2]), 0.1).tolist() == [1, 2, 0]


# Soft-NMS: A = [0,0,10,10] (0.9), B = [0,0,10,5] (0.8), C = [0,4,10,10] (0.7).
# IoU(A, B) = 50/100 = 0.5, IoU(A, C) = 60/100 = 0.6, IoU(B, C) = (10*1) / (50 + 60 - 10) = 0.1.
SOFT_BOXES = _t([[0, 0, 10, 10], [0, 0, 10, 5], [0, 4, 10, 10]])
SOFT_SCORES = _t([0.9, 0.8, 0.7])


def test_soft_nms_linear():
    # Pick A: B = 0.8 * (1 - 0.5) = 0.4, C = 0.7 * (1 - 0.6) = 0.28. Pick B: IoU(B, C) = 0.1 <= 0.3, C unchanged.
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.3, method="linear")
    assert keep.tolist() == [0, 1, 2]
    _close(scores, [0.9, 0.4, 0.28])
    # min_score drops C.
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.3, min_score=0.3, method="linear")
    assert keep.tolist() == [0, 1]
    _close(scores, [0.9, 0.4])
    # With threshold 0.05 the second pick decays C as well: 0.28 * (1 - 0.1) = 0.252.
    _, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.05, method="linear")
    _close(scores, [0.9, 0.4, 0.252])


def test_soft_nms_gaussian():
    # sigma 0.5. Pick A: B = 0.8 exp(-0.25 / 0.5), C = 0.7 exp(-0.36 / 0.5). Pick B: C *= exp(-0.01 / 0.5).
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, sigma=0.5, method="gaussian")
    assert keep.tolist() == [0, 1, 2]
    _close(scores, [0.9, 0.8 * math.exp(-0.5), 0.7 * math.exp(-0.72) * math.exp(-0.02)])


def test_soft_nms_naive_order_and_empty():
    keep, scores = soft_nms(SOFT_BOXES, SOFT_SCORES, iou_threshold=0.3, method="naive")
    assert keep.tolist() == [0]  # hard NMS: B (0.5) and C (0.6) are suppressed by A
    _close(scores, [0.9])
    # The output follows the decayed scores: B drops to 0.4, below the far-away box D (0.5).
    boxes = torch.cat([SOFT_BOXES[:2], _t([[20, 20, 30, 30]])])
    keep, scores = soft_nms(boxes, _t([0.9, 0.8, 0.5]), iou_threshold=0.3, method="linear")
    assert keep.tolist() == [0, 2, 1]
    _close(scores, [0.9, 0.5, 0.4])
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and keep.dtype == torch.long and scores.shape == (0,)
    with pytest.raises(ValueError):
        soft_nms(SOFT_BOXES, SOFT_SCORES, method="cubic")


# multiclass_nms: b0 = [0,0,10,10], b1 = [0,0,10,8] (IoU 0.8 with b0), b2 far away; two classes.
MC_BOXES = _t([[0, 0, 10, 10], [0, 0, 10, 8], [20, 20, 30, 30]])
MC_SCORES = _t([[0.9, 0.3], [0.8, 0.6], [0.04, 0.7]])


def test_multiclass_nms():
    # Candidates > 0.05: (b0,c0,.9) (b0,c1,.3) (b1,c0,.8) (b1,c1,.6) (b2,c1,.7). Class 0: b1 suppressed by b0.
    # Class 1: b2 kept, b1 kept, b0 suppressed by b1. Sorted: (b0,c0,.9) (b2,c1,.7) (b1,c1,.6).
    boxes, scores, labels, inds = multiclass_nms(MC_BOXES, MC_SCORES, 0.05, 0.5, max_per_img=-1, return_inds=True)
    _close(boxes, MC_BOXES[[0, 2, 1]])
    _close(scores, [0.9, 0.7, 0.6])
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 1]
    assert inds.tolist() == [0 * 2 + 0, 2 * 2 + 1, 1 * 2 + 1]
    boxes, scores, labels = multiclass_nms(MC_BOXES, MC_SCORES, 0.05, 0.5, max_per_img=2)
    assert boxes.shape == (2, 4) and labels.tolist() == [0, 1]
    _close(scores, [0.9, 0.7])
    # score_thr 0.75 leaves only (b0,c0) and (b1,c0); NMS removes b1.
    boxes, scores, labels = multiclass_nms(MC_BOXES, MC_SCORES, 0.75, 0.5, max_per_img=100)
    assert labels.tolist() == [0] and scores.tolist() == pytest.approx([0.9])


def test_multiclass_nms_class_specific_boxes_and_empty():
    # Class c uses MC_BOXES + 100 * c; same overlaps inside each class, so the same survivors.
    cs_boxes = torch.stack([MC_BOXES, MC_BOXES + 100], dim=1)  # (3, 2, 4)
    boxes, scores, labels = multiclass_nms(cs_boxes, MC_SCORES, 0.05, 0.5, max_per_img=100)
    _close(boxes, torch.stack([MC_BOXES[0], MC_BOXES[2] + 100, MC_BOXES[1] + 100]))
    assert labels.tolist() == [0, 1, 1]
    boxes, scores, labels = multiclass_nms(MC_BOXES, MC_SCORES, 0.95, 0.5, max_per_img=100)
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,) and labels.dtype == torch.long
    # score_factors multiply the scores first: factor 0.1 on b0 gives (b0, c0) 0.09, now suppressed by (b1, c0) 0.8,
    # and (b0, c1) 0.03, below the threshold.
    boxes, scores, labels = multiclass_nms(MC_BOXES, MC_SCORES, 0.05, 0.5, 100, score_factors=_t([0.1, 1, 1]))
    _close(scores, [0.8, 0.7, 0.6])
    _close(boxes, MC_BOXES[[1, 2, 1]])
    assert labels.tolist() == [0, 1, 1]


def test_multiclass_soft_nms_is_class_aware():
    # Linear Soft-NMS, thr 0.5. Class 0: b0 .9, b1 .8 * (1 - .8) = .16. Class 1: b2 .7, b1 .6 (disjoint from b2),
    # b0 .3 * (1 - .8) = .06. Class-agnostic decay would have zeroed (b0, c1), identical to the (b0, c0) pick.
    boxes, scores, labels = multiclass_nms(MC_BOXES, MC_SCORES, 0.05, 0.5, max_per_img=100, soft="linear")
    _close(scores, [0.9, 0.7, 0.6, 0.16, 0.06])
    assert labels.tolist() == [0, 1, 1, 0, 1]
    _close(boxes, MC_BOXES[[0, 2, 1, 1, 0]])
    _, scores, _ = multiclass_nms(MC_BOXES, MC_SCORES, 0.05, 0.5, max_per_img=100,
                                  soft={"method": "linear", "min_score": 0.1})
    _close(scores, [0.9, 0.7, 0.6, 0.16])


# ---------------------------------------------------------------------------------------------------------- RoI ops
def _ramp(h=16, w=16, batch=2):
    """(batch, 2, h, w): channel 0 = x (column index), channel 1 = y (row index); image b adds 10 * b."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    base = torch.stack([xs, ys])[None]
    return torch.cat([base + 10 * b for b in range(batch)])


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_ramp(aligned, scale):
    # RoI x in [2, 10], y in [3, 7] on the feature map (image coordinates / scale), 2 x 4 bins of 2 x 2 pixels.
    # Bilinear interpolation of a ramp is exact and the bin's average of samples is the value at its centre.
    # Bin centres in continuous coordinates: x = 3, 5, 7, 9; y = 4, 6.
    # aligned=True: continuous c is pixel index c - 0.5 (pixel i covers [i, i+1]) -> x 2.5, 4.5, 6.5, 8.5; y 3.5, 5.5.
    # aligned=False (legacy): no half-pixel shift -> x 3, 5, 7, 9; y 4, 6.
    shift = 0.5 if aligned else 0.0
    exp_x = torch.tensor([3.0, 5, 7, 9]) - shift
    exp_y = torch.tensor([4.0, 6]) - shift
    rois = _t([[0, 2, 3, 10, 7], [1, 2, 3, 10, 7]])
    rois[:, 1:] /= scale
    out = roi_align(_ramp(), rois, (2, 4), spatial_scale=scale, sampling_ratio=0, aligned=aligned)
    assert out.shape == (2, 2, 2, 4)
    for b in range(2):  # image 1 is image 0 + 10: the batch index is honoured
        _close(out[b, 0], exp_x.expand(2, 4) + 10 * b)
        _close(out[b, 1], exp_y[:, None].expand(2, 4) + 10 * b)
    module = RoIAlign((2, 4), spatial_scale=scale, sampling_ratio=2, aligned=aligned)
    _close(module(_ramp(), rois), out)


def test_roi_align_small_roi_legacy_min_size():
    # RoI x in [5, 5.5], y in [5, 5.5], one bin. aligned: centre 5.25 -> pixel 4.75.
    # Legacy: the RoI is stretched to 1 pixel, [5, 6], centre 5.5.
    rois = _t([[0, 5, 5, 5.5, 5.5]])
    _close(roi_align(_ramp(batch=1), rois, 1, aligned=True)[0, :, 0, 0], [4.75, 4.75])
    _close(roi_align(_ramp(batch=1), rois, 1, aligned=False)[0, :, 0, 0], [5.5, 5.5])


def test_roi_align_half_and_empty():
    rois = _t([[0, 2, 3, 10, 7]])
    out = roi_align(_ramp().half(), rois.half(), (2, 4))
    assert out.dtype == torch.float16
    _close(out.float()[0, 0, 0], [2.5, 4.5, 6.5, 8.5], atol=1e-2)
    assert roi_align(_ramp(), torch.zeros(0, 5), 7).shape == (0, 2, 7, 7)
    with pytest.raises(ValueError):
        roi_align(_ramp(), torch.zeros(3, 4), 7)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_pool_ramp(scale):
    # RoI x in [2, 9], y in [3, 6] on the feature map: rounded, inclusive -> 8 x 4 pixels.
    # 4 x-bins of 2 pixels: [2,3] [4,5] [6,7] [8,9], max x = 3, 5, 7, 9; 2 y-bins [3,4] [5,6], max y = 4, 6.
    rois = _t([[0, 2, 3, 9, 6], [1, 2, 3, 9, 6]])
    rois[:, 1:] /= scale
    out = roi_pool(_ramp(), rois, (2, 4), spatial_scale=scale)
    for b in range(2):
        _close(out[b, 0], _t([3, 5, 7, 9]).expand(2, 4) + 10 * b)
        _close(out[b, 1], _t([[4], [6]]).expand(2, 4) + 10 * b)
    _close(RoIPool((2, 4), scale)(_ramp(), rois), out)


def test_roi_modules_from_config():
    m = build({"type": "RoIAlign", "output_size": [7, 7], "spatial_scale": 0.25, "sampling_ratio": 0})
    assert isinstance(m, RoIAlign) and m.output_size == (7, 7) and m.aligned
    with pytest.raises(ConfigError):
        build({"type": "RoIAlign", "output_size": "seven"})


# ---------------------------------------------------------------------------------------------------------- overlaps
A, B, C, D = [0, 0, 10, 10], [2, 2, 6, 6], [20, 0, 30, 10], [5, 5, 15, 15]
# A: area 100. B inside A: area 16. C disjoint from A (enclosure [0,0,30,10] = 300, union 200).
# D overlaps A by 5 x 5 = 25 (union 175, enclosure 15 x 15 = 225) and B by 1 x 1 (union 115, enclosure 13 x 13).
# B with C: enclosure [2,0,30,10] = 280, union 116.
EXPECTED = {
    "iou": [[1, 0.16, 0, 25 / 175], [0.16, 1, 0, 1 / 115]],
    "iof": [[1, 0.16, 0, 0.25], [1, 1, 0, 1 / 16]],
    "giou": [[1, 0.16, -100 / 300, 25 / 175 - 50 / 225], [0.16, 1, -164 / 280, 1 / 115 - 54 / 169]],
}


@pytest.mark.parametrize("mode", ["iou", "iof", "giou"])
def test_bbox_overlaps_hand_pairs(mode):
    out = bbox_overlaps(_t([A, B]), _t([A, B, C, D]), mode=mode)
    assert out.shape == (2, 4)
    _close(out, EXPECTED[mode])
    # Aligned: (A, A), (A, C), (A, D), (B, A), (B, D).
    aligned = bbox_overlaps(_t([A, A, A, B, B]), _t([A, C, D, A, D]), mode=mode, is_aligned=True)
    e = EXPECTED[mode]
    _close(aligned, [e[0][0], e[0][2], e[0][3], e[1][0], e[1][3]])
    # Batch dimensions: (2, 2, 4) x (2, 4, 4); the second batch swaps the roles of the sets' rows.
    b1 = torch.stack([_t([A, B]), _t([B, A])])
    b2 = torch.stack([_t([A, B, C, D])] * 2)
    out = bbox_overlaps(b1, b2, mode=mode)
    assert out.shape == (2, 2, 4)
    _close(out[0], e)
    _close(out[1], [e[1], e[0]])
    # Broadcast of a shared second set.
    _close(bbox_overlaps(b1, _t([A, B, C, D]), mode=mode), out)


def test_bbox_overlaps_empty_and_errors():
    assert bbox_overlaps(torch.zeros(0, 4), torch.rand(3, 4)).shape == (0, 3)
    assert bbox_overlaps(torch.rand(3, 4), torch.zeros(0, 4), mode="giou").shape == (3, 0)
    assert bbox_overlaps(torch.zeros(2, 0, 4), torch.zeros(2, 5, 4)).shape == (2, 0, 5)
    assert bbox_overlaps(torch.zeros(0, 4), torch.zeros(0, 4), is_aligned=True).shape == (0,)
    with pytest.raises(ValueError):
        bbox_overlaps(torch.rand(3, 4), torch.rand(2, 4), is_aligned=True)
    with pytest.raises(ValueError):
        bbox_overlaps(torch.rand(3, 4), torch.rand(2, 4), mode="diou")
    # Degenerate boxes give 0, not NaN.
    assert bbox_overlaps(_t([[1, 1, 1, 1]]), _t([[1, 1, 1, 1]])).item() == 0


def _random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_bbox_overlaps_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    b1, b2 = _random_boxes(40, gen), _random_boxes(30, gen)
    torch.testing.assert_close(bbox_overlaps(b1, b2), torchvision.ops.box_iou(b1, b2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bbox_overlaps(b1, b2, mode="giou"), torchvision.ops.generalized_box_iou(b1, b2),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bbox_overlaps(b1[:30], b2, is_aligned=True),
                               torchvision.ops.box_iou(b1[:30], b2).diagonal(), atol=1e-5, rtol=1e-5)


def test_bbox_overlaps_half_large_boxes_and_grad():
    # Areas of 160000 px^2 overflow float16; the result must still be exact.
    out = bbox_overlaps(_t([[0, 0, 400, 400]]).half(), _t([[0, 0, 400, 200], [0, 0, 400, 400]]).half())
    assert out.dtype == torch.float16
    _close(out.float(), [[0.5, 1.0]], atol=1e-3)
    pred = _t([[0, 0, 10, 10], [20, 0, 30, 10]]).requires_grad_()
    loss = (1 - bbox_overlaps(pred, _t([A, A]), mode="giou", is_aligned=True)).sum()
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].abs().sum() > 0  # GIoU pulls the disjoint box in


# ---------------------------------------------------------------------------------------------------------- focal loss
def _focal(logit, positive, gamma=2.0, alpha=0.25):
    p = 1 / (1 + math.exp(-logit))
    p_t = p if positive else 1 - p
    a_t = alpha if positive else 1 - alpha
    return -a_t * (1 - p_t) ** gamma * math.log(p_t)


def test_focal_loss_hand_values():
    # logit 0 -> p = 0.5: positive 0.25 * 0.5^2 * ln 2, negative 0.75 * 0.5^2 * ln 2.
    loss = sigmoid_focal_loss(_t([[0.0, 0.0]]), torch.tensor([0]), reduction="none")
    _close(loss, [[0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)]])
    logits = _t([[2.0, -1.0], [0.5, 3.0], [-2.0, 1.5]])
    targets = torch.tensor([0, 1, 2])  # row 2 is background: both classes negative
    expected = [[_focal(2.0, True), _focal(-1.0, False)],
                [_focal(0.5, False), _focal(3.0, True)],
                [_focal(-2.0, False), _focal(1.5, False)]]
    loss = sigmoid_focal_loss(logits, targets, reduction="none")
    assert loss.shape == (3, 2)
    _close(loss, expected, atol=1e-6)
    total = sum(sum(r) for r in expected)
    _close(sigmoid_focal_loss(logits, targets, reduction="sum"), total, atol=1e-6)
    _close(sigmoid_focal_loss(logits, targets, reduction="mean"), total / 6, atol=1e-6)
    _close(sigmoid_focal_loss(logits, targets, reduction="mean", avg_factor=2.0), total / 2, atol=1e-6)
    # gamma = 3, alpha = 0.5.
    _close(sigmoid_focal_loss(logits, targets, gamma=3.0, alpha=0.5, reduction="none")[0, 0],
           _focal(2.0, True, gamma=3.0, alpha=0.5), atol=1e-7)


def test_focal_loss_weights_and_bce_limit():
    logits = _t([[2.0, -1.0], [0.5, 3.0], [-2.0, 1.5]])
    targets = torch.tensor([0, 1, 2])
    plain = sigmoid_focal_loss(logits, targets, reduction="none")
    w = _t([1.0, 0.0, 2.0])
    _close(sigmoid_focal_loss(logits, targets, weight=w, reduction="none"), plain * w[:, None])
    w2 = _t([[1.0, 0.0], [0.5, 1.0], [0.0, 3.0]])
    _close(sigmoid_focal_loss(logits, targets, weight=w2, reduction="sum"), (plain * w2).sum())
    with pytest.raises(ValueError):
        sigmoid_focal_loss(logits, targets, weight=torch.ones(2))
    # gamma 0 and no alpha weighting is binary cross-entropy.
    onehot = _t([[1, 0], [0, 1], [0, 0]])
    _close(sigmoid_focal_loss(logits, targets, gamma=0.0, alpha=-1, reduction="none"),
           F.binary_cross_entropy_with_logits(logits, onehot, reduction="none"))


def test_focal_loss_half_and_grad():
    logits = _t([[2.0, -1.0], [0.5, 3.0]]).requires_grad_()
    loss = sigmoid_focal_loss(logits.half(), torch.tensor([1, 2]), reduction="none")
    assert loss.dtype == torch.float32
    _close(loss[0, 1], _focal(-1.0, True), atol=1e-3)
    loss.sum().backward()
    # Positive with a negative logit: the gradient pushes the logit up; a negative pushes it down.
    assert logits.grad[0, 1] < 0 and logits.grad[0, 0] > 0


# ---------------------------------------------------------------------------------------------------------- deform conv
@pytest.mark.parametrize("stride, padding, dilation, groups, dg", [(1, 1, 1, 1, 1), (2, 2, 2, 2, 2)])
def test_deform_conv_zero_offset_is_conv(stride, padding, dilation, groups, dg):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 9, generator=gen)
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen)
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    offset = torch.zeros(2, 2 * dg * 9, *ref.shape[-2:])
    _close(deform_conv2d(x, offset, w, b, stride, padding, dilation), ref, atol=1e-4)
    mask = torch.ones(2, dg * 9, *ref.shape[-2:])
    _close(deform_conv2d(x, offset, w, b, stride, padding, dilation, mask=mask), ref, atol=1e-4)
    # A mask of 0.5 halves the weighted sum (not the bias).
    _close(deform_conv2d(x, offset, w, b, stride, padding, dilation, mask=mask / 2),
           F.conv2d(x, w / 2, b, stride, padding, dilation, groups), atol=1e-4)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_deform_conv_integer_offset_is_shift(axis):
    # Offsets are (dy, dx) pairs per kernel tap. dx = +1 everywhere samples x[..., c + 1] where a conv samples
    # x[..., c]: the same as a conv on the image shifted left by one pixel. At the left border the shifted conv
    # sees its zero padding where the deformable one sees column 0, so only interior pixels are compared.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=gen)
    w = torch.randn(5, 3, 3, 3, generator=gen)
    offset = torch.zeros(1, 18, 8, 8)
    shifted = torch.zeros_like(x)
    if axis == "x":
        offset[:, 1::2] = 1.0
        shifted[..., :, :-1] = x[..., :, 1:]
    else:
        offset[:, 0::2] = 1.0
        shifted[..., :-1, :] = x[..., 1:, :]
    out = deform_conv2d(x, offset, w, padding=1)
    ref = F.conv2d(shifted, w, padding=1)
    interior = (..., slice(None), slice(1, -1)) if axis == "x" else (..., slice(1, -1), slice(None))
    _close(out[interior], ref[interior], atol=1e-4)
    assert not torch.allclose(out, F.conv2d(x, w, padding=1), atol=1e-2)


def test_deform_conv_modules_at_init():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7)
    m = DeformConv2d(4, 6, 3, padding=1)
    _close(m(x, torch.zeros(2, 18, 7, 7)), F.conv2d(x, m.weight, m.bias, padding=1), atol=1e-4)
    pack = DeformConv2dPack(4, 6, 3, stride=2, padding=1, deform_groups=2, bias=False)
    assert pack.bias is None and pack.conv_offset.out_channels == 2 * 2 * 9
    _close(pack(x), F.conv2d(x, pack.weight, None, stride=2, padding=1), atol=1e-4)
    # DCNv2 starts with zero offsets and masks sigmoid(0) = 0.5.
    mod = ModulatedDeformConv2dPack(4, 6, 3, padding=1, groups=2)
    assert mod.conv_offset.out_channels == 3 * 9
    _close(mod(x), F.conv2d(x, mod.weight / 2, mod.bias, padding=1, groups=2), atol=1e-4)
    # The offset branch is wired in: it receives gradient even though it starts at zero.
    mod(x).square().sum().backward()
    assert mod.conv_offset.weight.grad.abs().sum() > 0


def test_deform_conv_half_config_and_errors():
    m = build({"type": "DeformConv2dPack", "deform_groups": 1}, in_channels=4, out_channels=4, kernel_size=3,
              padding=1, bias=False)
    assert isinstance(m, DeformConv2dPack)
    assert isinstance(build({"type": "ModulatedDeformConv2dPack", "in_channels": 4, "out_channels": 4,
                             "kernel_size": [3, 3]}), ModulatedDeformConv2dPack)
    x = torch.randn(1, 4, 6, 6)
    out = deform_conv2d(x.half(), torch.zeros(1, 18, 6, 6).half(), m.weight.detach().half(), padding=1)
    assert out.dtype == torch.float16
    _close(out.float(), F.conv2d(x.half().float(), m.weight.detach().half().float(), padding=1), atol=1e-2)
    with pytest.raises(ConfigError):
        build({"type": "DeformConv2dPack", "in_channels": 4, "out_channels": 4, "kernel_size": 3,
               "deform_groups": 3})
    with pytest.raises(ValueError):
        deform_conv2d(x, torch.zeros(1, 10, 6, 6), m.weight, padding=1)


# ---------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_cuda_match_cpu():
    gen = torch.Generator().manual_seed(0)
    b1, b2 = _random_boxes(50, gen), _random_boxes(20, gen)
    scores = torch.rand(50, generator=gen)
    cuda = torch.device("cuda")
    _close(bbox_overlaps(b1.to(cuda), b2.to(cuda), mode="giou").cpu(), bbox_overlaps(b1, b2, mode="giou"))
    assert nms(b1.to(cuda), scores.to(cuda), 0.3).cpu().tolist() == nms(b1, scores, 0.3).tolist()
    k_gpu, s_gpu = soft_nms(b1.to(cuda), scores.to(cuda), method="gaussian")
    k_cpu, s_cpu = soft_nms(b1, scores, method="gaussian")
    assert k_gpu.cpu().tolist() == k_cpu.tolist()
    _close(s_gpu.cpu(), s_cpu)
    rois = _t([[0, 2, 3, 10, 7], [1, 1, 1, 12, 9]])
    _close(roi_align(_ramp().to(cuda), rois.to(cuda), 3).cpu(), roi_align(_ramp(), rois, 3))
    _close(roi_align(_ramp().half().to(cuda), rois.to(cuda), 3).float().cpu(), roi_align(_ramp(), rois, 3),
           atol=2e-2)
    mod = ModulatedDeformConv2dPack(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 7, 7)
    _close(mod.to(cuda)(x.to(cuda)).cpu(), mod.cpu()(x), atol=1e-4)
    logits = torch.randn(5, 3, generator=gen)
    t = torch.tensor([0, 1, 2, 3, 3])
    _close(sigmoid_focal_loss(logits.to(cuda), t.to(cuda), reduction="none").cpu(),
           sigmoid_focal_loss(logits, t, reduction="none"))
