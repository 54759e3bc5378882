"""Head-level code: RoI extraction, mask targets and head, box head, StandardRoIHead, and the dense heads.

Expected values are computed by hand in the comments (or come from torchvision's RoIAlign / RoIPool); the anchor
cases use 1 level, stride 16, one square anchor per location, so every anchor and IoU can be written down.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from raydet.models.task_modules.prior_generators import AnchorGenerator
from raydet.models.task_modules.assigners import MaxIoUAssigner
from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
from raydet.models.dense_heads.retina_head import RetinaHead
from raydet.models.dense_heads.rpn_head import RPNHead
from raydet.models.head_configs import DetectionConfig, ProposalConfig
from raydet.models.losses import CrossEntropyLoss, FocalLoss, GIoULoss, L1Loss
from raydet.models.roi_heads.bbox_heads import ConvFCBBoxHead, Shared2FCBBoxHead, Shared4Conv1FCBBoxHead
from raydet.models.roi_heads.mask_heads import FCNMaskHead, mask_targets
from raydet.models.roi_heads.roi_extractors import SingleRoIExtractor, boxes_to_rois, map_roi_levels
from raydet.models.roi_heads.standard_roi_head import StandardRoIHead
from raydet.models.task_modules.samplers import PseudoSampler, RandomSampler

STRIDES = [4, 8, 16, 32]


def square_rois(sides, x0=0.0, y0=0.0):
    return torch.tensor([[0.0, x0, y0, x0 + s, y0 + s] for s in sides])


# ================================================================================================ RoI extraction
def test_map_roi_levels_thresholds():
    # level = floor(log2(side / 56)): 2 * 56 = 112, 4 * 56 = 224, 8 * 56 = 448 start levels 1, 2, 3.
    rois = square_rois([111, 112, 223, 224, 447, 448, 1000, 4])
    assert map_roi_levels(rois, 4).tolist() == [0, 1, 1, 2, 2, 3, 3, 0]
    # the scale is sqrt(w * h): 392 x 32 has scale 112
    assert map_roi_levels(torch.tensor([[0.0, 10, 20, 402, 52]]), 4).tolist() == [1]
    # clamped to the number of levels; another finest scale shifts the thresholds
    assert map_roi_levels(square_rois([1000, 111]), 2).tolist() == [1, 0]
    assert map_roi_levels(square_rois([111, 112]), 4, finest_scale=28.0).tolist() == [1, 2]


def test_boxes_to_rois_prefixes_the_image_index():
    rois = boxes_to_rois([torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), torch.zeros((0, 4)),
                          torch.tensor([[9.0, 10, 11, 12, 0.9]])])  # a score column is dropped
    assert torch.equal(rois, torch.tensor([[0.0, 1, 2, 3, 4], [0, 5, 6, 7, 8], [2, 9, 10, 11, 12]]))
    assert boxes_to_rois([]).shape == (0, 5)


def pyramid(batch=2, channels=3, size=256, fill=None, generator=None):
    """Feature maps for strides 4..32 of a size x size input; ``fill(level, image)`` gives a constant map."""
    feats = []
    for level, s in enumerate(STRIDES):
        if fill is None:
            feats.append(torch.randn(batch, channels, size // s, size // s, generator=generator))
        else:
            f = torch.empty(batch, channels, size // s, size // s)
            for b in range(batch):
                f[b] = fill(level, b)
            feats.append(f)
    return tuple(feats)


def test_extractor_pools_each_roi_from_its_level_and_image():
    feats = pyramid(size=512, fill=lambda level, image: 10 * (level + 1) + image)
    sides = [40, 111, 112, 223, 224, 450]  # levels 0, 0, 1, 1, 2, 3
    rois = torch.cat([square_rois(sides, 2.0, 3.0), square_rois(sides, 1.0, 1.0)])
    rois[len(sides):, 0] = 1  # the second copy on image 1
    out = SingleRoIExtractor(7, STRIDES)(feats, rois)
    assert out.shape == (12, 3, 7, 7)
    levels = [0, 0, 1, 1, 2, 3]
    expected = torch.tensor([10.0 * (lv + 1) + img for img in (0, 1) for lv in levels])
    assert torch.allclose(out, expected[:, None, None, None].expand_as(out))


@pytest.mark.parametrize("roi_type", ["RoIAlign", "RoIPool"])
def test_extractor_equals_torchvision_on_the_selected_level(roi_type):
    gen = torch.Generator().manual_seed(0)
    feats = pyramid(size=512, generator=gen)
    xy = torch.rand(20, 2, generator=gen) * 40
    side = 2 ** (4.5 + 4.5 * torch.rand(20, 1, generator=gen))  # 22..512 px, log-uniform
    aspect = 2 ** (torch.rand(20, 1, generator=gen) - 0.5)
    wh = torch.cat([side * aspect.sqrt(), side / aspect.sqrt()], dim=1)
    rois = torch.cat([torch.randint(0, 2, (20, 1), generator=gen).float(), xy, xy + wh], dim=1)
    extractor = SingleRoIExtractor(7, STRIDES, sampling_ratio=2, roi_type=roi_type)
    out = extractor(feats, rois)
    scale = torch.sqrt(wh[:, 0] * wh[:, 1])
    levels = torch.floor(torch.log2(scale / 56)).clamp(0, 3).long()
    assert set(levels.tolist()) == {0, 1, 2, 3}  # the case exercises several levels
    for i in range(20):
        lv = int(levels[i])
        if roi_type == "RoIAlign":
            ref = torchvision.ops.roi_align(feats[lv], rois[i:i + 1], 7, 1.0 / STRIDES[lv], 2, True)
        else:
            ref = torchvision.ops.roi_pool(feats[lv], rois[i:i + 1], 7, 1.0 / STRIDES[lv])
        assert torch.allclose(out[i:i + 1], ref, atol=1e-6), i


def test_extractor_with_one_level_and_gradients_reach_every_level():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 2, 16, 16, generator=gen)
    rois = torch.tensor([[0.0, 10, 20, 200, 230], [0, 3, 4, 30, 40]])
    out = SingleRoIExtractor(5, [16], sampling_ratio=0)((feat,), rois)
    assert torch.allclose(out, torchvision.ops.roi_align(feat, rois, 5, 1 / 16, 0, True))

    feats = tuple(f.requires_grad_() for f in pyramid(batch=1, generator=gen))
    SingleRoIExtractor(7, STRIDES)(feats, square_rois([40, 60])).sum().backward()  # only level 0 is used
    assert all(f.grad is not None for f in feats)  # unused levels stay in the graph (DDP)
    assert all(torch.all(f.grad == 0) for f in feats[1:])
    with pytest.raises(ValueError, match="roi_type"):
        SingleRoIExtractor(7, STRIDES, roi_type="RoIWarp")


# ================================================================================================ mask targets
def half_mask(h, w, box, left=True):
    """uint8 (h, w) bitmap that is 1 on the left (or right) half of an integer box."""
    x1, y1, x2, y2 = box
    m = torch.zeros(h, w, dtype=torch.uint8)
    mid = (x1 + x2) // 2
    if left:
        m[y1:y2, x1:mid] = 1
    else:
        m[y1:y2, mid:x2] = 1
    return m


def test_mask_targets_crop_and_resize_the_gt_bitmap():
    gt_box = [8, 8, 36, 36]  # 28 x 28: one target cell per pixel
    masks = half_mask(40, 48, gt_box)[None]
    rois = torch.tensor([[8.0, 8, 36, 36],    # the gt box -> left 14 columns
                         [22.0, 8, 36, 36],   # the right half only -> nothing
                         [8.0, 8, 22, 36]])   # the left half only -> everything
    t = mask_targets(rois, torch.tensor([0, 0, 0]), masks, 28)
    assert t.shape == (3, 28, 28) and t.dtype == torch.float32
    expected = torch.zeros(28, 28)
    expected[:, :14] = 1
    assert torch.equal(t[0], expected)
    assert torch.equal(t[1], torch.zeros(28, 28))
    assert torch.equal(t[2], torch.ones(28, 28))


def test_mask_targets_select_each_rois_own_gt():
    h, w = 40, 48
    masks = torch.stack([torch.zeros(h, w, dtype=torch.uint8),        # gt 0: empty
                         half_mask(h, w, [8, 8, 36, 36], left=True),  # gt 1: left half
                         half_mask(h, w, [8, 8, 36, 36], left=False),  # gt 2: right half
                         torch.ones(h, w, dtype=torch.uint8)])        # gt 3: full
    box = torch.tensor([[8.0, 8, 36, 36]])
    inds = torch.tensor([2, 0, 3, 1, 2])  # unsorted, repeated, not all gts used
    t = mask_targets(box.expand(5, 4), inds, masks, 28)
    left = torch.zeros(28, 28)
    left[:, :14] = 1
    expected = torch.stack([1 - left, torch.zeros(28, 28), torch.ones(28, 28), left, 1 - left])
    assert torch.equal(t, expected)
    assert mask_targets(torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), masks, 28).shape == (0, 28, 28)


# ================================================================================================ FCN mask head
def mask_head(num_classes=3, **kw):
    return FCNMaskHead(num_classes, CrossEntropyLoss(use_mask=True), in_channels=4, conv_out_channels=8, **kw)


def test_fcn_mask_head_shapes_and_channel_selection():
    head = mask_head()
    x = torch.randn(2, 4, 14, 14)
    assert head(x).shape == (2, 3, 28, 28)
    assert mask_head(class_agnostic=True)(x).shape == (2, 1, 28, 28)
    # 4 convs 3x3 4->8, 8->8 x3 with bias, deconv 2x2 8->8, 1x1 8->3
    n = (4 * 8 * 9 + 8) + 3 * (8 * 8 * 9 + 8) + (8 * 8 * 4 + 8) + (8 * 3 + 3)
    assert sum(p.numel() for p in head.parameters()) == n

    logits = torch.arange(3.0).view(1, 3, 1, 1).expand(2, 3, 28, 28)  # channel c holds c
    probs = head.probabilities(logits, torch.tensor([2, 1]))
    assert torch.allclose(probs[0], torch.sigmoid(torch.tensor(2.0)).expand(28, 28))
    assert torch.allclose(probs[1], torch.sigmoid(torch.tensor(1.0)).expand(28, 28))
    agnostic = mask_head(class_agnostic=True).probabilities(logits[:, :1], torch.tensor([2, 1]))
    assert torch.allclose(agnostic, torch.full((2, 28, 28), 0.5))


def test_fcn_mask_head_loss_uses_each_rois_class_channel():
    head = mask_head()
    target = torch.zeros(2, 28, 28)
    target[:, :, :14] = 1
    good = 20 * (2 * target - 1)  # confident and right
    pred = -good[:, None].repeat(1, 3, 1, 1)  # every channel confidently wrong ...
    pred[0, 1], pred[1, 2] = good[0], good[1]  # ... except each RoI's own class
    loss = head.loss(pred, target, torch.tensor([1, 2]))["loss_mask"]
    assert loss.item() < 1e-6
    wrong = head.loss(pred, target, torch.tensor([0, 0]))["loss_mask"]
    assert wrong.item() == pytest.approx(20.0, rel=1e-4)  # BCE of logit -20 against 1: ~20 per pixel
    zero = head.loss(torch.zeros(2, 3, 28, 28), target, torch.tensor([1, 2]))["loss_mask"]
    assert zero.item() == pytest.approx(math.log(2), rel=1e-6)
    empty = head.loss(torch.zeros(0, 3, 28, 28, requires_grad=True), torch.zeros(0, 28, 28),
                      torch.zeros(0, dtype=torch.long))["loss_mask"]
    assert empty.item() == 0.0 and empty.requires_grad


# ================================================================================================ box head
def box_head(cls=Shared2FCBBoxHead, num_classes=2, **kw):
    return cls(num_classes, DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)), CrossEntropyLoss(), L1Loss(),
               **kw)


def test_box_head_loss_hand_case():
    head = box_head(in_channels=4, fc_out_channels=8)
    cls_score = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 1])  # 2 = background
    bbox_pred = torch.tensor([[0.1, 0.2, 0.3, 0.4, 9, 9, 9, 9],   # class 0 deltas, then class 1
                              [7.0, 7, 7, 7, 7, 7, 7, 7],         # background: no box loss
                              [5.0, 5, 5, 5, 0.5, 0, 0, 0]])
    targets = torch.zeros(3, 4)
    rois = torch.zeros(3, 5)
    losses = head.loss(cls_score, bbox_pred, rois, labels, targets)
    ce = [math.log(1 + 2 * math.exp(-2)), math.log(3), math.log(2 + math.e) - 1]
    assert losses["loss_cls"].item() == pytest.approx(sum(ce) / 3, rel=1e-5)
    # |0.1| + |0.2| + |0.3| + |0.4| from RoI 0 (class 0), 0.5 from RoI 2 (class 1), over the 3 sampled RoIs
    assert losses["loss_bbox"].item() == pytest.approx((1.0 + 0.5) / 3, rel=1e-5)

    only_bg = head.loss(cls_score, bbox_pred.requires_grad_(), rois, torch.tensor([2, 2, 2]), targets)
    assert only_bg["loss_bbox"].item() == 0.0 and only_bg["loss_bbox"].requires_grad


def test_box_head_loss_on_decoded_boxes():
    head = ConvFCBBoxHead(2, DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)), CrossEntropyLoss(), GIoULoss(),
                          in_channels=4, fc_out_channels=8)
    rois = torch.tensor([[0.0, 4, 4, 28, 28], [0, 40, 40, 60, 60]])
    targets = torch.tensor([[6.0, 4, 30, 28], [0, 0, 0, 0]])  # boxes, not deltas; RoI 1 is background
    losses = head.loss(torch.zeros(2, 3), torch.zeros(2, 8), rois, torch.tensor([1, 2]), targets)
    # zero deltas decode to the RoI: GIoU loss 96 / 624 (see the dense-head case), over the 2 sampled RoIs
    assert losses["loss_bbox"].item() == pytest.approx(96 / 624 / 2, rel=1e-5)


def test_box_head_class_agnostic_and_delta_selection():
    head = box_head(in_channels=4, fc_out_channels=8, num_classes=3)
    pred = torch.arange(24.0).view(2, 12)
    assert torch.equal(head.select_class_deltas(pred, torch.tensor([2, 0])),
                       torch.tensor([[8.0, 9, 10, 11], [12, 13, 14, 15]]))
    agnostic = box_head(in_channels=4, fc_out_channels=8, num_classes=3, reg_class_agnostic=True)
    assert agnostic.fc_reg.out_features == 4
    assert torch.equal(agnostic.select_class_deltas(pred[:, :4], torch.tensor([2, 0])), pred[:, :4])
    cls, reg = head(torch.randn(5, 4, 7, 7))
    assert cls.shape == (5, 4) and reg.shape == (5, 12)


def test_box_head_predict_boxes_with_zero_deltas_returns_the_rois():
    head = box_head(num_classes=2, in_channels=4, fc_out_channels=8)
    rois = torch.tensor([[0.0, 10, 10, 50, 50], [0, 60, 60, 90, 100], [0, 5, 70, 40, 120]])
    # softmax rows: RoI 0 -> class 0 (0.9), RoI 1 -> class 1 (0.8), RoI 2 -> background (both classes 0.02)
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.02, 0.02, 0.96]])
    cfg = DetectionConfig(score_thr=0.05, nms_iou=0.5, max_per_img=100)
    boxes, scores, labels = head.predict_boxes(rois, probs.log(), torch.zeros(3, 8), (100, 80), cfg)
    # RoI 1 is clipped to the 100 x 80 image; RoI 0's class-1 and RoI 1's class-0 scores are above 0.05
    assert torch.allclose(scores, torch.tensor([0.9, 0.8, 0.1]))
    assert labels.tolist() == [0, 1, 0]
    assert torch.allclose(boxes, torch.tensor([[10.0, 10, 50, 50], [60, 60, 80, 100], [60, 60, 80, 100]]))
    _, _, labels1 = head.predict_boxes(rois, probs.log(), torch.zeros(3, 8), (100, 80),
                                       DetectionConfig(score_thr=0.05, max_per_img=1))
    assert labels1.tolist() == [0]


def test_box_head_parameter_counts():
    c = 80
    outputs = (1024 * (c + 1) + c + 1) + (1024 * 4 * c + 4 * c)
    two_fc = box_head(num_classes=c)
    assert sum(p.numel() for p in two_fc.parameters()) == (256 * 49 * 1024 + 1024) + (1024 * 1024 + 1024) + outputs
    gn = box_head(Shared4Conv1FCBBoxHead, num_classes=c, norm_cfg={"type": "GN", "num_groups": 32})
    convs = 4 * (256 * 256 * 9)  # no conv bias before a norm
    norms = 4 * (2 * 256)  # GN affine weight and bias
    fc = 256 * 7 * 7 * 1024 + 1024
    assert sum(p.numel() for p in gn.parameters()) == convs + norms + fc + outputs
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 4
    plain = box_head(Shared4Conv1FCBBoxHead, num_classes=c)  # without norm the convs have biases
    assert sum(p.numel() for p in plain.parameters()) == convs + 4 * 256 + fc + outputs
    assert isinstance(gn, ConvFCBBoxHead) and gn(torch.randn(2, 256, 7, 7))[1].shape == (2, 4 * c)


# ================================================================================================ StandardRoIHead
def roi_head(with_mask=False, test=None):
    kw = {}
    if with_mask:
        kw = dict(mask_roi_extractor=SingleRoIExtractor(14, STRIDES), mask_head=mask_head(num_classes=3))
    head = StandardRoIHead(
        SingleRoIExtractor(7, STRIDES), box_head(num_classes=3, in_channels=4, fc_out_channels=16),
        MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=with_mask), RandomSampler(32, 0.25),
        test=test or DetectionConfig(score_thr=0.1, nms_iou=0.5, max_per_img=4), **kw)
    # constant class scores: softmax of [2, 1, 0, 0] (background last) and zero box deltas
    nn.init.zeros_(head.bbox_head.fc_cls.weight)
    head.bbox_head.fc_cls.bias.data = torch.tensor([2.0, 1.0, 0.0, 0.0])
    nn.init.zeros_(head.bbox_head.fc_reg.weight)
    nn.init.zeros_(head.bbox_head.fc_reg.bias)
    return head.eval()


def small_feats(batch=1, size=64, channels=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, channels, size // s, size // s, generator=gen) for s in STRIDES)


PROPOSALS = torch.tensor([[2.0, 2, 14, 14], [20, 2, 30, 16], [40, 4, 60, 30], [4, 30, 24, 60], [34, 40, 60, 62]])


def test_roi_head_predict_keeps_max_per_img_above_the_score_threshold():
    head = roi_head()
    meta = {"img_shape": (64, 64), "ori_shape": (64, 64), "scale_factor": (1.0, 1.0)}
    (res,) = head.predict(small_feats(), [PROPOSALS], [meta])
    # every RoI scores p = softmax([2, 1, 0, 0]): 0.61 for class 0, 0.22 for class 1, 0.08 for class 2 (< 0.1);
    # the 5 disjoint RoIs give 10 candidates, and the best 4 are class-0 detections at the RoIs themselves.
    p = torch.softmax(torch.tensor([2.0, 1, 0, 0]), 0)
    assert res["scores"].shape == (4,) and torch.allclose(res["scores"], p[0].expand(4))
    assert res["labels"].tolist() == [0, 0, 0, 0]
    assert all(any(torch.allclose(b, q) for q in PROPOSALS) for b in res["boxes"])
    head.test = DetectionConfig(score_thr=0.1, nms_iou=0.5, max_per_img=100)
    (res,) = head.predict(small_feats(), [PROPOSALS], [meta])
    assert res["labels"].sort().values.tolist() == [0] * 5 + [1] * 5
    assert bool((res["scores"] > 0.1).all())
    head.test = DetectionConfig(score_thr=0.7)
    (res,) = head.predict(small_feats(), [PROPOSALS], [meta])
    assert res["boxes"].shape == (0, 4) and "masks" not in res


def test_roi_head_predict_splits_a_batch_per_image():
    head = roi_head(test=DetectionConfig(score_thr=0.5, max_per_img=100))  # class 0 only (0.61)
    metas = [{"img_shape": (64, 64), "ori_shape": (64, 64), "scale_factor": (1.0, 1.0)},
             {"img_shape": (64, 48), "ori_shape": (32, 24), "scale_factor": (2.0, 2.0)}]
    res = head.predict(small_feats(batch=2), [PROPOSALS[:2], PROPOSALS[2:]], metas)
    assert [r["boxes"].shape[0] for r in res] == [2, 3]
    assert torch.allclose(res[0]["boxes"].sort(0).values, PROPOSALS[:2].sort(0).values)
    # image 1: clipped to its 64 x 48 img_shape, then halved
    expected = PROPOSALS[2:].clone()
    expected[:, 0::2] = expected[:, 0::2].clamp(max=48)
    assert torch.allclose(res[1]["boxes"].sort(0).values, (expected / 2).sort(0).values)


def test_roi_head_predict_rescales_boxes_and_pastes_bool_masks_at_the_original_size():
    head = roi_head(with_mask=True, test=DetectionConfig(score_thr=0.5, max_per_img=100))
    nn.init.zeros_(head.mask_head.conv_logits.weight)
    nn.init.constant_(head.mask_head.conv_logits.bias, 10.0)  # every mask pixel on
    meta = {"img_shape": (64, 64), "ori_shape": (32, 40), "scale_factor": (1.6, 2.0)}
    props = torch.tensor([[8.0, 8, 40, 40], [48, 40, 64, 64]])
    (res,) = head.predict(small_feats(), [props], [meta])
    expected_boxes = torch.tensor([[5.0, 4, 25, 20], [30, 20, 40, 32]])  # x / 1.6, y / 2
    assert torch.allclose(res["boxes"], expected_boxes)
    assert res["masks"].dtype == torch.bool and res["masks"].shape == (2, 32, 40)
    for box, mask in zip(expected_boxes.long().tolist(), res["masks"]):
        expected = torch.zeros(32, 40, dtype=torch.bool)
        expected[box[1]:box[3], box[0]:box[2]] = True
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("flip", [False, True])
def test_roi_head_mask_follows_the_flip(flip, monkeypatch):
    head = roi_head(with_mask=True, test=DetectionConfig(score_thr=0.5, max_per_img=100))
    left = torch.full((28, 28), -10.0)
    left[:, :14] = 10.0  # the mask covers the left half of the RoI in the network's (possibly flipped) input
    monkeypatch.setattr(head.mask_head, "forward", lambda x: left.expand(x.shape[0], 3, 28, 28))
    meta = {"img_shape": (64, 64), "ori_shape": (64, 64), "scale_factor": (1.0, 1.0), "flip": flip}
    (res,) = head.predict(small_feats(), [torch.tensor([[8.0, 8, 40, 40]])], [meta])
    expected = torch.zeros(64, 64, dtype=torch.bool)
    if flip:  # the RoI is [24, 8, 56, 40] in the original image; the input's left half is its right half
        assert torch.allclose(res["boxes"], torch.tensor([[24.0, 8, 56, 40]]))
        expected[8:40, 40:56] = True
    else:
        expected[8:40, 8:24] = True
    assert torch.equal(res["masks"][0], expected)


def test_roi_head_loss_hand_case_with_masks():
    torch.manual_seed(0)
    head = roi_head(with_mask=True).train()
    nn.init.zeros_(head.mask_head.conv_logits.weight)
    head.mask_head.conv_logits.bias.data = torch.tensor([1.0, -3.0, 2.0])  # a constant logit per class
    gt_boxes = torch.tensor([[4.0, 4, 28, 28], [36, 30, 60, 60]])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:28, 4:28] = 1  # each gt mask fills its box: every 28 x 28 target is all ones
    masks[1, 30:60, 36:60] = 1
    batch = {"gt_boxes": [gt_boxes], "gt_labels": [torch.tensor([0, 2])], "gt_masks": [masks],
             "img_metas": [{"img_shape": (64, 64)}]}
    # proposals: the two gt boxes again and three background boxes (IoU 0 with both gts)
    props = torch.cat([gt_boxes, torch.tensor([[40.0, 2, 60, 20], [2, 40, 20, 60], [30, 2, 34, 6]])])
    feats = tuple(f.requires_grad_() for f in small_feats())
    losses = head.loss(feats, [props], batch)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}
    # 4 positives (2 gts added as proposals + 2 proposals equal to them; labels 0, 2, 0, 2) and the 3 negatives
    # (label 3), all scored softmax([2, 1, 0, 0]); zero deltas against zero targets.
    logp = torch.log_softmax(torch.tensor([2.0, 1, 0, 0]), 0)
    assert losses["loss_cls"].item() == pytest.approx(-(2 * logp[0] + 2 * logp[2] + 3 * logp[3]).item() / 7,
                                                      rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    # mask BCE against all-ones targets on each RoI's class channel: softplus(-1) for class 0, softplus(-2) for 2
    softplus = nn.functional.softplus
    expected = (softplus(torch.tensor(-1.0)) + softplus(torch.tensor(-2.0))).item() / 2
    assert losses["loss_mask"].item() == pytest.approx(expected, rel=1e-5)
    sum(losses.values()).backward()
    assert head.mask_head.conv_logits.bias.grad is not None and head.bbox_head.fc_cls.bias.grad is not None


def test_roi_head_predict_with_no_proposals_or_no_detections():
    head = roi_head(with_mask=True, test=DetectionConfig(score_thr=0.9))  # no class reaches 0.9
    meta = {"img_shape": (64, 64), "ori_shape": (30, 40), "scale_factor": (1.0, 1.0)}
    feats = small_feats(batch=2)
    res = head.predict(feats, [torch.zeros((0, 4)), PROPOSALS], [meta, meta])
    for r in res:
        assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].shape == (0,)
        assert r["masks"].shape == (0, 30, 40) and r["masks"].dtype == torch.bool


# ================================================================================================ dense heads
def grid_anchor(x, y, half=12.0, stride=16):
    return [stride * x - half, stride * y - half, stride * x + half, stride * y + half]


def rpn_head(scale=1.5, strides=(16,), sampler=None, allowed_border=-1.0, **kw):
    """1 anchor per location, side ``16 * scale`` (24 by default) centred at (16 x, 16 y)."""
    return RPNHead(4, AnchorGenerator(list(strides), [1.0], [scale]), DeltaXYWHBBoxCoder(),
                   CrossEntropyLoss(use_sigmoid=True), L1Loss(), MaxIoUAssigner(0.7, 0.3, 0.3),
                   sampler=sampler, feat_channels=4, allowed_border=allowed_border, **kw)


def one_image_batch(gt, img=(64, 64)):
    return {"img_metas": [{"img_shape": img, "pad_shape": img, "ori_shape": img, "scale_factor": (1.0, 1.0)}],
            "gt_boxes": [torch.tensor([gt])], "gt_labels": [torch.tensor([0])]}


def targets_of(head, batch, size=(4, 4)):
    anchors = torch.cat(head.anchor_generator.grid_anchors([size]))
    return anchors, head.get_targets(anchors, [size], batch, [torch.zeros(1, dtype=torch.long)])


def test_anchor_targets_one_gt_equal_to_one_anchor():
    head = rpn_head()
    anchors, (labels, label_w, targets, box_w, num_pos, num_neg) = targets_of(head, one_image_batch(grid_anchor(1, 1)))
    assert torch.equal(anchors[5], torch.tensor(grid_anchor(1, 1)))  # location (y=1, x=1) is row 1 * 4 + 1
    # Its neighbours overlap 8 x 24 = 192 px: IoU 192 / 960 = 0.2 < 0.3 -> negative; all others less.
    expected = torch.ones(16, dtype=torch.long)  # background = num_classes = 1
    expected[5] = 0
    assert torch.equal(labels[0], expected)
    assert torch.equal(label_w[0], torch.ones(16))
    assert torch.equal(targets[0], torch.zeros(16, 4))
    assert torch.equal(box_w[0, :, 0], (expected == 0).float())
    assert (num_pos, num_neg) == (1, 15)


def test_anchor_targets_encode_the_offset_and_respect_the_ignore_band():
    head = rpn_head()
    gt = grid_anchor(1, 1)
    gt[0] += 2.0
    gt[2] += 2.0  # shifted right by 2 px: IoU 22 * 24 / (2 * 576 - 528) = 0.85 -> positive, dx = 2 / 24
    _, (labels, _, targets, _, _, _) = targets_of(head, one_image_batch(gt))
    assert labels[0, 5] == 0
    assert torch.allclose(targets[0, 5], torch.tensor([2 / 24, 0, 0, 0]), atol=1e-6)

    # Anchors of side 32 (scale 2): side neighbours of the gt anchor overlap 16 x 32: IoU 512 / 1536 = 1/3, in
    # [0.3, 0.7) -> ignored (weight 0); diagonal ones 256 / 1792 = 0.14 -> negative.
    head = rpn_head(scale=2.0)
    _, (labels, label_w, _, _, num_pos, num_neg) = targets_of(head, one_image_batch(grid_anchor(1, 1, 16)))
    side = [1, 4, 6, 9]
    assert label_w[0, side].tolist() == [0, 0, 0, 0]
    assert labels[0, 5] == 0 and label_w[0, 5] == 1
    assert (num_pos, num_neg) == (1, 11)


def test_allowed_border_ignores_anchors_crossing_the_image():
    gt = grid_anchor(1, 1)
    # Anchors at x = 0 or y = 0 start at -12: they cross the 64 x 64 image; those at x, y in 1..3 lie inside.
    inside = torch.tensor([[x >= 1 and y >= 1 for x in range(4)] for y in range(4)]).reshape(-1)
    _, (labels, label_w, _, _, num_pos, num_neg) = targets_of(rpn_head(allowed_border=0), one_image_batch(gt))
    assert torch.equal(label_w[0] > 0, inside)
    assert (num_pos, num_neg) == (1, 8)
    assert torch.all(labels[0][~inside] == 1)  # outside anchors stay background with weight 0
    _, (_, label_w, _, _, num_pos, num_neg) = targets_of(rpn_head(allowed_border=12), one_image_batch(gt))
    assert torch.all(label_w[0] == 1) and (num_pos, num_neg) == (1, 15)  # 12 px of crossing allowed
    _, (_, label_w, _, _, _, _) = targets_of(rpn_head(allowed_border=-1), one_image_batch(gt))
    assert torch.all(label_w[0] == 1)


@pytest.mark.parametrize("neg_pos_ub, expected_neg", [(3, 3), (5, 5), (-1, 15)])
def test_neg_pos_ub_caps_the_sampled_negatives(neg_pos_ub, expected_neg):
    torch.manual_seed(0)
    sampler = RandomSampler(256, 0.5, neg_pos_ub=neg_pos_ub, add_gt_as_proposals=False)
    _, (labels, label_w, _, _, num_pos, num_neg) = targets_of(rpn_head(sampler=sampler),
                                                              one_image_batch(grid_anchor(1, 1)))
    assert (num_pos, num_neg) == (1, expected_neg)
    assert int(((labels[0] == 1) & (label_w[0] > 0)).sum()) == expected_neg
    assert int((label_w[0] > 0).sum()) == 1 + expected_neg


def test_dense_heads_refuse_a_sampler_that_adds_gts_as_anchors():
    # The gts would be prepended to the candidate anchors and the sampled indices would no longer map to anchors.
    with pytest.raises(ValueError, match="add_gt_as_proposals"):
        rpn_head(sampler=RandomSampler(256, 0.5, add_gt_as_proposals=True))


def test_anchor_targets_without_gts_are_all_negative():
    batch = one_image_batch(grid_anchor(1, 1))
    batch["gt_boxes"] = [torch.zeros((0, 4))]
    anchors = torch.cat(rpn_head().anchor_generator.grid_anchors([(4, 4)]))
    labels, label_w, targets, box_w, num_pos, num_neg = rpn_head().get_targets(
        anchors, [(4, 4)], batch, [torch.zeros(0, dtype=torch.long)])
    assert (num_pos, num_neg) == (0, 16)
    assert torch.all(labels == 1) and torch.all(label_w == 1) and torch.all(box_w == 0)
    retina = retina_head()
    cls = torch.zeros(1, 2, 4, 4, requires_grad=True)
    reg = torch.zeros(1, 4, 4, 4, requires_grad=True)
    losses = retina.loss(None, batch | {"gt_labels": [torch.zeros(0, dtype=torch.long)]}, outputs=([cls], [reg]))
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_bbox"].requires_grad
    # no positives: normalised by 1; 32 negative entries of 0.75 * 0.25 * log 2
    assert losses["loss_cls"].item() == pytest.approx(32 * 0.75 * 0.25 * math.log(2), rel=1e-5)


def test_rpn_and_retina_losses_normalise_as_the_reference():
    gt = grid_anchor(1, 1)
    gt[0] += 2.0
    gt[2] += 2.0  # one positive (anchor 5) with target dx = 2 / 24
    batch = one_image_batch(gt)
    zeros = ([torch.zeros(1, 1, 4, 4)], [torch.zeros(1, 4, 4, 4)])

    # RPN with sampling: normalised by the 16 sampled anchors; zero logits give BCE log 2 each.
    rpn = rpn_head(sampler=RandomSampler(256, 0.5, add_gt_as_proposals=False))
    losses = rpn.loss(None, batch, outputs=zeros)
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-5)
    assert losses["loss_rpn_bbox"].item() == pytest.approx((2 / 24) / 16, rel=1e-5)

    # RetinaNet (no sampling): normalised by the number of positives (1). Focal loss at p = 0.5 with 2 classes:
    # positive term 0.25 * 0.5^2 * log 2, negative term 0.75 * 0.5^2 * log 2; 1 positive and 31 negative entries.
    retina = retina_head(num_classes=2)
    zeros = ([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, 4)])
    losses = retina.loss(None, batch, outputs=zeros)
    expected = (0.25 * 0.25 + 31 * 0.75 * 0.25) * math.log(2)
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(2 / 24, rel=1e-5)


def test_retina_targets_carry_the_gt_class_and_decoded_box_losses_compare_boxes():
    gt = grid_anchor(1, 1)
    gt[0] += 2.0
    gt[2] += 2.0
    batch = one_image_batch(gt) | {"gt_labels": [torch.tensor([1])]}
    head = retina_head(num_classes=3)
    anchors = torch.cat(head.anchor_generator.grid_anchors([(4, 4)]))
    labels, _, targets, _, num_pos, num_neg = head.get_targets(anchors, [(4, 4)], batch, batch["gt_labels"])
    expected = torch.full((16,), 3)  # background = num_classes
    expected[5] = 1
    assert torch.equal(labels[0], expected) and (num_pos, num_neg) == (1, 15)

    # With a decoded-box loss the target is the gt box itself and the zero deltas decode to the anchor:
    # GIoU of [4, 4, 28, 28] and [6, 4, 30, 28]: IoU = 528 / 624, the enclosing box is the union -> loss 96 / 624.
    giou = RetinaHead(
        3, 4, AnchorGenerator([16], [1.0], [1.5]), DeltaXYWHBBoxCoder(), FocalLoss(), GIoULoss(),
        MaxIoUAssigner(0.5, 0.4, 0.0), feat_channels=8, stacked_convs=1)
    _, _, targets, _, _, _ = giou.get_targets(anchors, [(4, 4)], batch, batch["gt_labels"])
    assert torch.equal(targets[0, 5], torch.tensor(gt))
    losses = giou.loss(None, batch, outputs=([torch.zeros(1, 3, 4, 4)], [torch.zeros(1, 4, 4, 4)]))
    assert losses["loss_bbox"].item() == pytest.approx(96 / 624, rel=1e-5)


def proposals_of(head, cls_scores, bbox_preds, shapes, **cfg):
    metas = [{"img_shape": s} for s in shapes]
    return head.proposals(cls_scores, bbox_preds, metas, ProposalConfig(**cfg))


def two_level_outputs(batch=1, log_scale=0.0):
    """Level 0: stride 16, 4 x 4, anchors of side 24; level 1: stride 32, 2 x 2, side 48. Distinct logits."""
    cls = [torch.arange(16.0).view(1, 1, 4, 4).repeat(batch, 1, 1, 1) / 4 - 2,
           torch.arange(4.0).view(1, 1, 2, 2).repeat(batch, 1, 1, 1) / 4 - 1.9]
    reg = [torch.zeros(batch, 4, 4, 4), torch.zeros(batch, 4, 2, 2)]
    for r in reg:
        r[:, 2:] = log_scale
    return cls, reg


def test_rpn_proposals_are_the_clipped_anchors_with_their_scores():
    head = rpn_head(strides=(16, 32))
    cls, reg = two_level_outputs()
    anchors = torch.cat(head.anchor_generator.grid_anchors([(4, 4), (2, 2)]))
    logits = torch.cat([c.reshape(-1) for c in cls])
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_pre=1000, max_per_img=1000, nms_iou=1.0)
    assert props.shape == (20, 5)
    order = logits.argsort(descending=True)
    assert torch.allclose(props[:, 4], logits[order].sigmoid())
    assert torch.allclose(props[:, :4], anchors[order].clamp(0, 64))

    # nms_pre keeps the top 3 of each level: level 0 anchors 15, 14, 13 and level 1 anchors 3, 2, 1 (rows 19..17)
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_pre=3, max_per_img=1000, nms_iou=1.0)
    kept = [15, 14, 13, 19, 18, 17]
    assert torch.allclose(props[:, :4], anchors[sorted(kept, key=lambda i: -logits[i])].clamp(0, 64))
    # max_per_img keeps the best overall
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_pre=3, max_per_img=2, nms_iou=1.0)
    assert torch.allclose(props[:, 4], logits[[15, 14]].sigmoid())


def test_rpn_levels_do_not_suppress_each_other():
    head = rpn_head(strides=(16, 32))
    cls, reg = two_level_outputs(log_scale=math.log(8))  # every box grows 8x and is clipped to the whole image
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_pre=1000, max_per_img=1000, nms_iou=0.7)
    # all 20 boxes are [0, 0, 64, 64]: NMS leaves the best of each level
    assert torch.allclose(props[:, :4], torch.tensor([[0.0, 0, 64, 64]] * 2))
    assert torch.allclose(props[:, 4], torch.tensor([15 / 4 - 2, 3 / 4 - 1.9]).sigmoid())


def test_rpn_min_bbox_size_and_per_image_clipping():
    head = rpn_head(strides=(16, 32))
    cls, reg = two_level_outputs()
    # Level 0 anchors in row y = 0 or column x = 0 are clipped to 12 px (e.g. [-12, -12, 12, 12] -> [0, 0, 12, 12]):
    # 7 of them. Level 1 corner anchors are clipped to 24 px. min_bbox_size 12 drops sides <= 12.
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_iou=1.0, min_bbox_size=12)
    assert props.shape[0] == 16 - 7 + 4
    assert bool(((props[:, 2:4] - props[:, :2]) > 12).all())
    (props,) = proposals_of(head, cls, reg, [(64, 64)], nms_iou=1.0, min_bbox_size=-1)
    assert props.shape[0] == 20

    cls, reg = two_level_outputs(batch=2)
    tall, wide = proposals_of(head, cls, reg, [(40, 64), (64, 20)], nms_iou=1.0, min_bbox_size=-1)
    assert tall[:, [1, 3]].max() == 40 and tall[:, [0, 2]].max() == 60  # y clipped to 40; x untouched (< 64)
    assert wide[:, [0, 2]].max() == 20 and wide[:, [1, 3]].max() == 60
    assert tall.min() >= 0 and wide.min() >= 0


# ------------------------------------------------------------------------------------------------ RetinaHead
def retina_head(num_classes=2, in_channels=4, **kw):
    return RetinaHead(num_classes, in_channels, AnchorGenerator([16], [1.0], [1.5]), DeltaXYWHBBoxCoder(),
                      FocalLoss(), L1Loss(), MaxIoUAssigner(0.5, 0.4, 0.0), PseudoSampler(), feat_channels=8,
                      stacked_convs=2, **kw)


def test_retina_classification_prior():
    head = retina_head()
    assert torch.allclose(head.retina_cls.bias, torch.tensor(-math.log(99.0)))
    cls, _ = head((torch.zeros(1, 4, 4, 4),))  # zero features: every logit is the bias
    assert torch.allclose(cls[0].sigmoid(), torch.tensor(0.01))
    cls, _ = retina_head(prior_prob=0.2)((torch.zeros(1, 4, 4, 4),))
    assert torch.allclose(cls[0].sigmoid(), torch.tensor(0.2))


@pytest.mark.parametrize("flip", [False, True])
def test_retina_predict_returns_anchors_rescaled(flip, monkeypatch):
    head = retina_head(test=DetectionConfig(nms_pre=1000, score_thr=0.05, nms_iou=0.5, max_per_img=100))
    logits = torch.full((1, 2, 4, 4), -10.0)
    logits[0, 1, 1, 1] = 5.0  # anchor (y=1, x=1), class 1
    logits[0, 0, 2, 3] = 3.0  # anchor (y=2, x=3), class 0
    monkeypatch.setattr(head, "forward_single", lambda x: (logits, torch.zeros(1, 4, 4, 4)))
    meta = {"img_shape": (64, 64), "ori_shape": (256, 128), "scale_factor": (0.5, 0.25), "flip": flip}
    (res,) = head.predict((torch.zeros(1, 4, 4, 4),), [meta])
    boxes = torch.tensor([grid_anchor(1, 1), grid_anchor(3, 2)])  # [4, 4, 28, 28], [36, 20, 60, 44]
    if flip:
        boxes = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], dim=1)
    boxes = boxes / torch.tensor([0.5, 0.25, 0.5, 0.25])
    assert torch.allclose(res["boxes"], boxes)
    assert torch.allclose(res["scores"], torch.tensor([5.0, 3.0]).sigmoid())
    assert res["labels"].tolist() == [1, 0]
    head.test = DetectionConfig(nms_pre=1, score_thr=0.05)  # only the best anchor survives the pre-selection
    (res,) = head.predict((torch.zeros(1, 4, 4, 4),), [meta])
    assert res["labels"].tolist() == [1]
