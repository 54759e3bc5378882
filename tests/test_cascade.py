"""Cascade R-CNN, Cascade Mask R-CNN and Hybrid Task Cascade: stage targets, refinement, test-time averaging, the
semantic branch's loss, and tiny variants overfitting a few synthetic images.

Expected values are computed by hand in each test (IoUs of boxes that differ in height only, R-CNN deltas divided by
each stage's target stds, softmax / sigmoid of known logits); AP50 comes from pycocotools through
raydet.evaluation.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import make_shapes_dataset
from raydet.models.roi_heads.cascade_roi_head import refine_boxes, stage_targets
from test_detectors import TINY, TINY_RPN, _ap, _train, small_shapes  # noqa: F401  (a module fixture)

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
STAGES = range(3)
# ResNet-18 / 64-channel variants: every stage's heads shrunk like TINY_ROI / TINY_MASK
TINY_CASCADE = TINY + TINY_RPN + ["model.roi_head.sampler.num=128"] + [
    o for t in STAGES for o in (f"model.roi_head.bbox_head[{t}].in_channels=64",
                                f"model.roi_head.bbox_head[{t}].fc_out_channels=256")]
# the overfitting runs: fewer RoIs (64 sampled per image from 100 proposals) keep three stages' RoIAlign backward cheap
TINY_OVERFIT = ["model.roi_head.sampler.num=64",
                "model.rpn_head.train_proposals={nms_pre: 500, max_per_img: 100, nms_iou: 0.7, min_bbox_size: 0}"]
TINY_CASCADE_MASK = [o for t in STAGES for o in (f"model.roi_head.mask_head[{t}].in_channels=64",
                                                 f"model.roi_head.mask_head[{t}].conv_out_channels=64")]


def _build(pipeline: str, overrides=(), key: str = "model"):
    return load_config(PIPELINES / pipeline, list(overrides)).build(key)


def _roi_head(pipeline: str = "cascade_mask_rcnn_r50_fpn_1x_coco.yaml"):
    masks = TINY_CASCADE_MASK if pipeline.startswith(("cascade_mask", "htc")) else []
    return _build(pipeline, TINY_CASCADE + masks, "model.roi_head")


def _feats(batch: int = 1, size: int = 64, channels: int = 64):
    """P2-P6 maps of a ``size`` x ``size`` input (strides 4-64)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, channels, size // s, size // s, generator=g) for s in (4, 8, 16, 32, 64))


def _set_constant_outputs(head, cls_bias, reg_bias=None):
    """A box head whose every RoI gets the logits ``cls_bias`` and the deltas ``reg_bias`` (zero weights)."""
    with torch.no_grad():
        head.fc_cls.weight.zero_()
        head.fc_cls.bias.copy_(torch.tensor(cls_bias))
        head.fc_reg.weight.zero_()
        head.fc_reg.bias.copy_(torch.tensor(reg_bias if reg_bias is not None else [0.0] * head.fc_reg.out_features))


# ------------------------------------------------------------------------------------------------ stage targets

# One 40 x 40 ground truth; proposals that share its x-extent and top edge but are H px tall overlap it by
# IoU = 40 / H: A (H 40) 1.0, B (H 50) 0.8, C (H 64) 0.625, D (H 72) 0.5556, E disjoint 0.
GT = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
HEIGHTS = {"A": 40.0, "B": 50.0, "C": 64.0, "D": 72.0}
PROPOSALS = torch.tensor([[10.0, 10.0, 50.0, 10.0 + h] for h in HEIGHTS.values()] + [[60.0, 60.0, 100.0, 100.0]])
STDS = [(0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]  # [mmdet] per stage


def _batch(gt=GT, labels=(1,), size=(128, 128)):
    return {"gt_boxes": [gt], "gt_labels": [torch.tensor(labels)],
            "img_metas": [{"img_shape": (*size, 3), "ori_shape": (*size, 3), "scale_factor": (1.0, 1.0)}]}


def test_stage_targets_follow_each_stages_iou_and_stds():
    """Positives at IoU >= 0.5 / 0.6 / 0.7 (the ground truth, added as a proposal, first), negatives below; a positive
    of height H regresses onto the gt by dx = dw = 0, dy = (30 - (10 + H / 2)) / H = 20 / H - 0.5, dh = log(40 / H),
    each divided by the stage's std."""
    head = _roi_head()
    expected_pos = [["A", "B", "C", "D"], ["A", "B", "C"], ["A", "B"]]
    for t in STAGES:
        (s,) = head.sample(t, [PROPOSALS], _batch())
        pos = [GT[0]] + [PROPOSALS[list(HEIGHTS).index(k)] for k in expected_pos[t]]
        torch.testing.assert_close(s.pos_boxes, torch.stack(pos))
        assert s.pos_is_gt.tolist() == [1] + [0] * len(expected_pos[t])
        assert s.num_neg == len(PROPOSALS) - len(expected_pos[t])
        labels, targets = stage_targets([s], head.bbox_head[t])
        assert labels.tolist() == [1] * (1 + len(expected_pos[t])) + [3] * s.num_neg  # 3 classes: background 3
        _, sy, _, sh = STDS[t]
        hand = [[0.0, 0.0, 0.0, 0.0]] + [[0.0, (20 / HEIGHTS[k] - 0.5) / sy, 0.0, math.log(40 / HEIGHTS[k]) / sh]
                                         for k in expected_pos[t]]
        torch.testing.assert_close(targets[: len(hand)], torch.tensor(hand), rtol=0, atol=1e-5)
        assert torch.equal(targets[len(hand):], torch.zeros(s.num_neg, 4))
    # e.g. B at stage 2: dy = -0.1 / 0.033, dh = log 0.8 / 0.067
    (s,) = head.sample(2, [PROPOSALS], _batch())
    torch.testing.assert_close(stage_targets([s], head.bbox_head[2])[1][2],
                               torch.tensor([0.0, -3.0303, 0.0, -3.3305]), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ refinement

def test_refine_boxes_regresses_drops_added_gts_and_clips():
    """Class-agnostic deltas (1, 0, 0, 0) with stds 0.1 move a 40 px wide box right by 0.1 x 40 = 4 px; the gt the
    sampler added is dropped; a box pushed past the 64 px wide image is clipped to it."""
    head = _roi_head().bbox_head[0]
    rois = torch.tensor([[0, 10.0, 10.0, 50.0, 50.0],    # image 0: the added gt
                         [0, 12.0, 10.0, 52.0, 50.0],    # a positive
                         [0, 30.0, 0.0, 62.0, 20.0],     # a negative (32 px wide: moves 3.2 px, clipped at 64)
                         [1, 0.0, 0.0, 20.0, 40.0]])     # image 1: a negative
    bbox_pred = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4)
    cls_score = torch.zeros(4, 4)
    labels = torch.tensor([1, 1, 3, 3])
    out = refine_boxes(head, rois, cls_score, bbox_pred, labels, [torch.tensor([1, 0], dtype=torch.uint8),
                                                                  torch.zeros(0, dtype=torch.uint8)],
                       [(64, 64, 3), (64, 64, 3)])
    torch.testing.assert_close(out[0], torch.tensor([[16.0, 10.0, 56.0, 50.0], [33.2, 0.0, 64.0, 20.0]]))
    torch.testing.assert_close(out[1], torch.tensor([[2.0, 0.0, 22.0, 40.0]]))


def test_refine_boxes_class_specific_uses_gt_class_for_positives_and_argmax_for_negatives():
    """A class-specific head: the positive (label 0) takes class 0's deltas (dx 1 -> +4 px), the negative (label 2 =
    background) its highest-scoring foreground class, 1 (dy 1 -> +4 px)."""
    head = _build("faster_rcnn_r50_fpn_1x_coco.yaml", ["num_classes=2", "model.roi_head.bbox_head.in_channels=64",
                                                       "model.roi_head.bbox_head.fc_out_channels=16"],
                  "model.roi_head.bbox_head")
    rois = torch.tensor([[0, 10.0, 10.0, 50.0, 50.0], [0, 10.0, 10.0, 50.0, 50.0]])
    bbox_pred = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]]).expand(2, 8)
    cls_score = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 9.0]])
    (out,) = refine_boxes(head, rois, cls_score, bbox_pred, torch.tensor([0, 2]),
                          [torch.tensor([0], dtype=torch.uint8)], [(100, 100, 3)])
    torch.testing.assert_close(out, torch.tensor([[14.0, 10.0, 54.0, 50.0], [10.0, 14.0, 50.0, 54.0]]))


def test_each_stage_trains_on_the_previous_stages_refined_boxes_without_gradient():
    """Stage 0 shifts every RoI right by 0.1 x width (deltas (1, 0, 0, 0), std 0.1) and stage 1 by 0.05 x width
    (std 0.05): stage 1's proposals are stage 0's sampled boxes minus the added gt, shifted; stage 2's are those
    shifted again; none carries a gradient."""
    head = _roi_head("cascade_rcnn_r50_fpn_1x_coco.yaml")
    for t in STAGES:
        _set_constant_outputs(head.bbox_head[t], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    seen = []
    sample = head.sample

    def recording(stage, proposals, batch, feats=None):
        seen.append([p.clone() for p in proposals])
        assert not any(p.requires_grad for p in proposals)
        return sample(stage, proposals, batch, feats)

    head.sample = recording
    proposals = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 100.0]])
    losses = head.loss(_feats(size=128), [proposals], _batch())
    assert sorted(losses) == sorted(f"loss_{k}_s{t}" for k in ("cls", "bbox") for t in STAGES)
    # stage 0 samples the gt (positive, dropped) and both proposals
    expected1 = torch.tensor([[14.0, 10.0, 54.0, 50.0], [64.0, 60.0, 104.0, 100.0]]).clamp(max=128)
    torch.testing.assert_close(seen[1][0], expected1)
    # stage 1 samples the gt again plus its two proposals, shifts them by 0.05 x 40 = 2 px
    torch.testing.assert_close(seen[2][0], expected1 + torch.tensor([2.0, 0.0, 2.0, 0.0]))


def test_stage_loss_weights_scale_each_stages_losses():
    """The same head in every stage on the same proposals (no refinement: zero deltas, IoU 0.5 assigners): stage t's
    losses are stage 0's times its weight 1 / 0.5 / 0.25."""
    overrides = TINY_CASCADE + [f"model.roi_head.assigner[{t}].{k}=0.5" for t in STAGES
                                for k in ("pos_iou_thr", "neg_iou_thr", "min_pos_iou")]
    overrides += [f"model.roi_head.bbox_head[{t}].bbox_coder.target_stds=[0.1, 0.1, 0.2, 0.2]" for t in STAGES]
    head = _build("cascade_rcnn_r50_fpn_1x_coco.yaml", overrides, "model.roi_head")
    for t in STAGES:
        head.bbox_head[t].load_state_dict(head.bbox_head[0].state_dict())
        with torch.no_grad():
            head.bbox_head[t].fc_reg.weight.zero_()
            head.bbox_head[t].fc_reg.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    # regressing by (0.3, -0.2, 0.1, 0) moves the boxes; keep them by making every stage see the same proposals
    head.sample = lambda stage, proposals, batch, feats=None: type(head).sample(head, stage, [PROPOSALS], batch)
    losses = head.loss(_feats(size=128), [PROPOSALS], _batch())
    for k in ("cls", "bbox"):
        base = losses[f"loss_{k}_s0"]
        assert base > 0
        torch.testing.assert_close(losses[f"loss_{k}_s1"], 0.5 * base)
        torch.testing.assert_close(losses[f"loss_{k}_s2"], 0.25 * base)


# ------------------------------------------------------------------------------------------------ test time

def test_test_scores_average_the_stages_logits_and_boxes_come_from_the_last_stage():
    """Stage logits (3, 0, 0, 0), (0, 0, 0, 0), (0, 3, 0, 0) (classes 0-2, background) average to (1, 1, 0, 0):
    softmax gives classes 0 and 1 the score e / (2e + 2) = 0.3655 each and class 2 1 / (2e + 2) = 0.1345, below the
    0.2 threshold set here (averaged probabilities would give class 0 (0.8700 + 0.25 + 0.0433) / 3 = 0.3878).
    Stages 0 and 1 move the 40 px box right by 0.1 x 40 = 4 and 0.05 x 40 = 2 px (deltas (1, 0, 0, 0), stds 0.1,
    0.05); the last stage's deltas (0, 1, 0, 0), std 0.033, move it down by 1.32 px."""
    head = _roi_head("cascade_rcnn_r50_fpn_1x_coco.yaml")
    _set_constant_outputs(head.bbox_head[0], [3.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    _set_constant_outputs(head.bbox_head[1], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    _set_constant_outputs(head.bbox_head[2], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0])
    head.test.score_thr = 0.2
    meta = {"img_shape": (128, 128, 3), "ori_shape": (128, 128, 3), "scale_factor": (1.0, 1.0)}
    (res,) = head.predict(_feats(size=128), [torch.tensor([[10.0, 10.0, 50.0, 50.0]])], [meta])
    score = math.e / (2 * math.e + 2)
    assert sorted(res["labels"].tolist()) == [0, 1]
    torch.testing.assert_close(res["scores"], torch.tensor([score, score]))
    torch.testing.assert_close(res["boxes"], torch.tensor([[16.0, 11.32, 56.0, 51.32]] * 2), rtol=0, atol=1e-4)


def test_test_masks_average_the_stages_mask_probabilities():
    """Mask heads with constant logits -1, 0, 2 (zero weights): every pixel's probability is
    (sigmoid(-1) + 0.5 + sigmoid(2)) / 3 = (0.2689 + 0.5 + 0.8808) / 3 = 0.5499."""
    head = _roi_head()
    for h, b in zip(head.mask_head, (-1.0, 0.0, 2.0)):
        with torch.no_grad():
            h.conv_logits.weight.zero_()
            h.conv_logits.bias.fill_(b)
    rois = torch.tensor([[0, 10.0, 10.0, 50.0, 50.0], [0, 0.0, 0.0, 30.0, 60.0]])
    probs = head.mask_probabilities(_feats(size=128), rois, torch.tensor([0, 2]))
    expected = (1 / (1 + math.e) + 0.5 + 1 / (1 + math.exp(-2))) / 3
    assert probs.shape == (2, 28, 28)
    torch.testing.assert_close(probs, torch.full((2, 28, 28), expected))


# ------------------------------------------------------------------------------------------------ HTC parts

def test_htc_mask_information_flow_trains_the_earlier_mask_heads():
    """Stage 2's mask loss runs heads 0 and 1's conv towers (their features flow in through conv_res), so it reaches
    their convs and head 2's conv_res, but not their logits layers."""
    head = _roi_head("htc_without_semantic_r50_fpn_1x_coco.yaml")
    assert head.mask_head[0].conv_res is None and head.mask_head[2].conv_res is not None
    batch = _batch()
    batch["gt_masks"] = [torch.zeros(1, 128, 128, dtype=torch.uint8)]
    batch["gt_masks"][0][0, 10:50, 10:50] = 1
    (s,) = head.sample(2, [PROPOSALS], batch)
    loss = head.mask_loss(2, _feats(size=128), [s], batch)["loss_mask"]
    loss.backward()
    for i in (0, 1):
        assert head.mask_head[i].convs[0].weight.grad.abs().sum() > 0
        assert head.mask_head[i].conv_logits.weight.grad is None
    assert head.mask_head[1].conv_res[0].weight.grad.abs().sum() > 0
    assert head.mask_head[2].conv_res[0].weight.grad.abs().sum() > 0


def test_fused_semantic_loss_on_a_known_map():
    """Zero logits over 3 classes: each labelled pixel costs log 3; a 16 x 16 map at seg_scale_factor 1/8 is read
    at pixels (0, 0), (0, 8), (8, 0), (8, 8); one of them is 255 (ignored: 0, still counted in the mean), so the
    loss is 0.2 x 3 log 3 / 4."""
    from raydet.models.losses import CrossEntropyLoss
    from raydet.models.roi_heads.mask_heads import FusedSemanticHead

    head = FusedSemanticHead(CrossEntropyLoss(ignore_index=255, loss_weight=0.2), num_ins=2, fusion_level=1,
                             num_convs=1, in_channels=4, conv_out_channels=4, num_classes=3)
    gt = torch.zeros((1, 16, 16), dtype=torch.uint8)
    gt[0, :8, 8:], gt[0, 8:, :8], gt[0, 8:, 8:] = 1, 2, 255
    loss = head.loss(torch.zeros(1, 3, 2, 2), gt)
    torch.testing.assert_close(loss, torch.tensor(0.2 * 3 * math.log(3) / 4))
    logits, feats = head((torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)))
    assert logits.shape == (1, 3, 2, 2) and feats.shape == (1, 4, 2, 2)  # at the fusion level (stride 8)
    with pytest.raises(ValueError, match="not the semantic logits"):
        head.loss(torch.zeros(1, 3, 2, 2), gt[:, :8])


def test_htc_with_semantic_needs_semantic_maps_and_adds_their_loss():
    model = _build("htc_r50_fpn_1x_coco.yaml", TINY_CASCADE + TINY_CASCADE_MASK + [
        "model.roi_head.semantic_head.in_channels=64", "model.roi_head.semantic_head.conv_out_channels=64",
        "model.roi_head.semantic_head.num_convs=1"])
    samples = make_shapes_dataset(1, height=64, width=64, max_objects=2, seed=1)
    batch = collate_samples(samples, with_masks=True)
    with pytest.raises(ValueError, match="needs 'gt_semantic_seg'"):
        model(batch)
    batch["gt_semantic_seg"] = torch.zeros(1, *batch["images"].shape[-2:], dtype=torch.uint8)
    losses = model(batch)
    assert "loss_semantic_seg" in losses and all(f"loss_mask_s{t}" in losses for t in STAGES)
    assert losses["loss_semantic_seg"] > 0


# ------------------------------------------------------------------------------------------------ overfitting

@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3)
    return samples, [r for _, r in samples]


@pytest.fixture(scope="module")
def cascade_mask_rcnn(small_shapes):  # noqa: F811
    """One tiny Cascade Mask R-CNN trained on the images (its box branch is Cascade R-CNN's)."""
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2: box and mask AP50 1.0
    model = _build("cascade_mask_rcnn_r50_fpn_1x_coco.yaml", TINY_CASCADE + TINY_CASCADE_MASK + TINY_OVERFIT)
    batch = collate_samples(samples, with_masks=True)
    first, last = _train(model, batch, 30, lr=2e-3, warmup=10, fused=True)
    return model, batch, first, last, _ap(model, batch, records, iou_types=("bbox", "segm"))


def test_cascade_rcnn_overfits_boxes(cascade_mask_rcnn):
    _, _, first, last, metrics = cascade_mask_rcnn
    assert all(last[f"loss_cls_s{t}"] < 0.5 * first[f"loss_cls_s{t}"] for t in STAGES)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_cascade_mask_rcnn_overfits_masks(cascade_mask_rcnn):
    _, _, first, last, metrics = cascade_mask_rcnn
    assert all(last[f"loss_mask_s{t}"] < 0.5 * first[f"loss_mask_s{t}"] for t in STAGES)
    assert metrics["segm/AP50"] > 0.9, metrics


# HTC's semantic branch on the shapes' semantic maps: 4 classes (background 0, each shape's label + 1)
TINY_SEMANTIC = ["model.roi_head.semantic_head.in_channels=64", "model.roi_head.semantic_head.conv_out_channels=64",
                 "model.roi_head.semantic_head.num_convs=1", "model.roi_head.semantic_head.num_classes=4"]
# HTC's overfitting run: 16 RoIs per image and 2-conv mask heads (RoIAlign backward through 12 extractions per
# iteration, box and mask branches plus their semantic features, dominates the CPU time)
TINY_HTC_OVERFIT = ["model.roi_head.sampler.num=16"] + [f"model.roi_head.mask_head[{t}].num_convs=2" for t in STAGES]


def test_htc_with_semantic_branch_overfits(shapes):
    """HTC with its semantic branch (covers the branch-free HTC path too) trained on the same images with semantic
    maps painted from their masks (make_shapes_dataset(with_seg=True): same draws, same images)."""
    _, records = shapes
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3, with_seg=True)
    torch.manual_seed(0)
    model = _build("htc_r50_fpn_1x_coco.yaml",
                   TINY_CASCADE + TINY_CASCADE_MASK + TINY_OVERFIT + TINY_SEMANTIC + TINY_HTC_OVERFIT)
    batch = collate_samples(samples, with_masks=True)
    assert batch["gt_semantic_seg"].shape == (4, 128, 128)
    first, last = _train(model, batch, 30, fused=True)
    assert last["loss_semantic_seg"] < 0.5 * first["loss_semantic_seg"], (first, last)
    assert all(last[f"loss_mask_s{t}"] < 0.5 * first[f"loss_mask_s{t}"] for t in STAGES)
    metrics = _ap(model, batch, records, iou_types=("bbox", "segm"))
    assert metrics["bbox/AP50"] > 0.9, metrics
    assert metrics["segm/AP50"] > 0.9, metrics
