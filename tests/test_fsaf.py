"""FSAF (Zhu et al. 2019): the TBLR coder, the centre-region assigner, online feature selection, the pipeline.

Expected values are computed by hand in the comments, from torchvision (ResNet-50's parameters, the sigmoid focal
loss), from MMDetection's own model (the parameter count and state-dict shapes of configs/fsaf/fsaf_r50_fpn_1x_coco.py
in tests/fixtures/interop/mmdet/), or by pycocotools (AP50 of the overfitted tiny model).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import CLASSES, make_shapes_dataset
from raydet.evaluation import coco_from_records, evaluate_coco, predictions_to_coco_results
from raydet.models.dense_heads.fsaf_head import FSAFHead, select_levels
from raydet.models.losses import FocalLoss, IoULoss
from raydet.models.task_modules.assigners import CenterRegionAssigner
from raydet.models.task_modules.coders import TBLRBBoxCoder
from raydet.models.task_modules.prior_generators import AnchorGenerator

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "fsaf_r50_fpn_1x_coco.yaml"
MMDET_FIXTURE = ROOT / "tests" / "fixtures" / "interop" / "mmdet" / "fsaf_r50_fpn_1x_coco.json"


# ----------------------------------------------------------------------------------------------- TBLR coder

def test_tblr_encode_by_hand():
    coder = TBLRBBoxCoder(normalizer=4.0)
    # prior (0, 0, 8, 8): centre (4, 4), side 8; gt (1, 2, 13, 6): top 4 - 2 = 2, bottom 6 - 4 = 2, left 4 - 1 = 3,
    # right 13 - 4 = 9 pixels; / 8 (prior side) / 4 (normalizer)
    got = coder.encode(torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([[1.0, 2, 13, 6]]))
    torch.testing.assert_close(got, torch.tensor([[2 / 32, 2 / 32, 3 / 32, 9 / 32]]))
    # a 16 x 8 prior: t, b divide by its height 8, l, r by its width 16; per-side normalizer (t, b, l, r)
    coder = TBLRBBoxCoder(normalizer=[1.0, 2.0, 1.0, 2.0])
    got = coder.encode(torch.tensor([[0.0, 0, 16, 8]]), torch.tensor([[2.0, 1, 20, 10]]))
    torch.testing.assert_close(got, torch.tensor([[3 / 8, 6 / 8 / 2, 6 / 16, 12 / 16 / 2]]))


def test_tblr_decode_round_trip_and_clip():
    coder = TBLRBBoxCoder(normalizer=4.0)
    priors = torch.tensor([[0.0, 0, 8, 8], [8.0, 8, 24, 24], [-4.0, 12, 4, 20]])
    gts = torch.tensor([[1.0, 2, 13, 6], [0.0, 3, 30, 17], [-10.0, 9, 3, 40]])
    torch.testing.assert_close(coder.decode(priors, coder.encode(priors, gts)), gts)
    # (1, 1, 1, 1) x 4 x side 8 = 32 pixels each way from (4, 4): (-28, -28, 36, 36), clipped to w 12, h 10
    ones = torch.ones(1, 4)
    torch.testing.assert_close(coder.decode(priors[:1], ones, max_shape=(10, 12)), torch.tensor([[0.0, 0, 12, 10]]))
    # per-image (h, w) for a (B, N, 4) batch
    batched = coder.decode(priors[:1].expand(2, 1, 4), ones.expand(2, 1, 4),
                           max_shape=torch.tensor([[10, 12], [20, 30]]))
    torch.testing.assert_close(batched, torch.tensor([[[0.0, 0, 12, 10]], [[0.0, 0, 30, 20]]]))
    unclipped = TBLRBBoxCoder(normalizer=4.0, clip_border=False).decode(priors[:1], ones, max_shape=(10, 12))
    torch.testing.assert_close(unclipped, torch.tensor([[-28.0, -28, 36, 36]]))
    with pytest.raises(ValueError, match="normalizer"):
        TBLRBBoxCoder(normalizer=[1.0, 2.0])


# ---------------------------------------------------------------------------------------- centre-region assigner

def test_center_region_assigner_effective_and_ignoring_regions():
    """gt (0, 0, 40, 40): effective region (pos_scale 0.2) (16, 16, 24, 24); with neg_scale 0.2 the ignoring
    (shadow) region is the same box, so a prior is shadowed when it overlaps it (> 1% of the prior's area) but its
    centre is not inside the gt."""
    assigner = CenterRegionAssigner(pos_scale=0.2, neg_scale=0.2, min_pos_iof=0.01)
    priors = torch.tensor([
        [16.0, 16, 24, 24],  # 0: the effective region itself -> positive
        [9.0, 16, 17, 24],   # 1: centre (13, 20) in the gt, overlaps the region 1 x 8 = 1/8 of its area -> positive
        [8.0, 16, 16, 24],   # 2: centre in the gt, touches the region with zero area -> negative
        [0.0, 0, 8, 8],      # 3: far from the region -> negative
        [16.0, 16, 64, 24],  # 4: overlaps the region 64 / 384, centre (40, 20) on the gt's border -> shadowed
    ])
    res = assigner.assign(priors, torch.tensor([[0.0, 0, 40, 40]]), torch.tensor([1]))
    assert res.gt_inds.tolist() == [1, 1, 0, 0, 0]
    assert res.labels.tolist() == [1, 1, -1, -1, -1]
    assert res.shadowed_labels.tolist() == [[4, 1]]  # prior 4: class 1 ignored, other classes negative

    # the paper's ignoring region epsilon_i = 0.5: (10, 10, 30, 30); prior (8, 8, 16, 16) overlaps it by 36 / 64
    wide = CenterRegionAssigner(pos_scale=0.2, neg_scale=0.5, min_pos_iof=0.01)
    res = wide.assign(torch.tensor([[8.0, 8, 16, 16], [0.0, 0, 8, 8]]), torch.tensor([[0.0, 0, 40, 40]]),
                      torch.tensor([1]))
    assert res.gt_inds.tolist() == [0, 0] and res.shadowed_labels.tolist() == [[0, 1]]


def test_center_region_assigner_overlapping_gts_and_ignore_boxes():
    """Prior (16, 16, 24, 24) lies in the effective regions of A (0, 0, 40, 40) and of the smaller B (10, 10, 30, 30)
    (IoF 16 / 64 with B's (18, 18, 22, 22)): B takes it, A shadows it."""
    prior = torch.tensor([[16.0, 16, 24, 24]])
    a, b = [0.0, 0, 40, 40], [10.0, 10, 30, 30]
    assigner = CenterRegionAssigner(pos_scale=0.2, neg_scale=0.2)
    res = assigner.assign(prior, torch.tensor([a, b]), torch.tensor([1, 2]))
    assert (res.gt_inds.tolist(), res.labels.tolist(), res.shadowed_labels.tolist()) == ([2], [2], [[0, 1]])
    res = assigner.assign(prior, torch.tensor([b, a]), torch.tensor([2, 1]))  # by area, not by order
    assert (res.gt_inds.tolist(), res.labels.tolist(), res.shadowed_labels.tolist()) == ([1], [2], [[0, 1]])
    # both of class 1: positive and ignored for one class -> background with class 1 ignored ...
    res = assigner.assign(prior, torch.tensor([a, b]), torch.tensor([1, 1]))
    assert (res.gt_inds.tolist(), res.labels.tolist(), res.shadowed_labels.tolist()) == ([0], [-1], [[0, 1]])
    # ... unless the foreground dominates
    dominant = CenterRegionAssigner(pos_scale=0.2, neg_scale=0.2, foreground_dominate=True)
    res = dominant.assign(prior, torch.tensor([a, b]), torch.tensor([1, 1]))
    assert (res.gt_inds.tolist(), res.labels.tolist(), res.shadowed_labels.tolist()) == ([2], [1], [])

    # ignore box (0, 0, 40, 40) x ignore_gt_scale 0.5 = (10, 10, 30, 30): centres (20, 20), (13, 20) inside
    priors = torch.tensor([[16.0, 16, 24, 24], [9.0, 16, 17, 24], [0.0, 0, 8, 8]])
    res = assigner.assign(priors, torch.tensor([a]), torch.tensor([1]), gt_boxes_ignore=torch.tensor([a]))
    assert res.gt_inds.tolist() == [-1, -1, 0]
    res = assigner.assign(priors, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long))
    assert res.gt_inds.tolist() == [0, 0, 0] and res.shadowed_labels.shape == (0, 2)


# --------------------------------------------------------------------------------------------------- FSAF head

def _head(num_classes: int, strides, neg_scale: float = 0.2) -> FSAFHead:
    return FSAFHead(
        num_classes, in_channels=8, feat_channels=8, stacked_convs=1,
        anchor_generator=AnchorGenerator(strides=strides, ratios=[1.0], octave_base_scale=1, scales_per_octave=1),
        bbox_coder=TBLRBBoxCoder(normalizer=4.0),
        loss_cls=FocalLoss(gamma=2.0, alpha=0.25, reduction="none"),
        loss_bbox=IoULoss(mode="log", eps=1e-6, reduction="none"),
        assigner=CenterRegionAssigner(pos_scale=0.2, neg_scale=neg_scale, min_pos_iof=0.01))


def _batch(n_images: int, boxes, labels, ignore=None) -> dict:
    meta = {"img_shape": (32, 32), "pad_shape": (32, 32), "batch_input_shape": (32, 32)}
    return {"img_metas": [dict(meta) for _ in range(n_images)],
            "gt_boxes": [torch.tensor(boxes, dtype=torch.float32) for _ in range(n_images)],
            "gt_labels": [torch.tensor(labels) for _ in range(n_images)],
            "gt_boxes_ignore": [torch.tensor(ignore if ignore else [], dtype=torch.float32).reshape(-1, 4)
                                for _ in range(n_images)]}


def test_select_levels_takes_the_smallest_mean_loss():
    # gt 0: level 0 mean (1 + 3) / 2 = 2, level 1 mean 0.5 -> 1; gt 1: level 0 mean (5 + 1) / 2 = 3, level 2: 4 -> 0;
    # gt 2: no positive anywhere -> level 0
    losses = torch.tensor([1.0, 3.0, 0.5, 4.0, 5.0, 1.0])
    levels = torch.tensor([0, 0, 1, 2, 0, 0])
    gts = torch.tensor([0, 0, 0, 1, 1, 1])
    assert select_levels(losses, levels, gts, num_levels=3, num_gts=3).tolist() == [1, 0, 0]


def test_fsaf_trains_each_gt_on_its_lowest_loss_level():
    """A 32 x 32 image, gt (4, 4, 28, 28) of class 0, priors of strides 8 (4 x 4) and 16 (2 x 2). Its effective region
    (13.6, 13.6, 18.4, 18.4) gives one positive per level: the priors centred at (16, 16), (12, 12, 20, 20) (level 0,
    index 10) and (8, 8, 24, 24) (level 1, index 3). The gt's exact targets are t = b = l = r = 12 / side / 4.

    Image 0: level 0 has logit +2 but a box (4, 4, 18, 28) of IoU 14 / 24; level 1 logit -1 and a box (4, 4, 26, 28)
    of IoU 22 / 24. Summed losses: level 0 ~ 0.0005 + 0.539, level 1 ~ 0.176 + 0.087: level 1 wins although its
    classification is worse. Image 1 swaps the levels, so level 0 wins. Every other logit is -6.
    """
    torch.manual_seed(0)
    head = _head(2, [8, 16])
    cls = [torch.full((2, 2, 4, 4), -6.0), torch.full((2, 2, 2, 2), -6.0)]
    reg = [torch.full((2, 4, 4, 4), 0.1), torch.full((2, 4, 2, 2), 0.1)]
    good, poor = [12 / 32, 12 / 32, 12 / 32, 10 / 32], [12 / 32, 12 / 32, 12 / 32, 2 / 32]  # level 0, right 10 / 2 px
    cls[0][0, 0, 2, 2], reg[0][0, :, 2, 2] = 2.0, torch.tensor(poor)
    cls[1][0, 0, 1, 1], reg[1][0, :, 1, 1] = -1.0, torch.tensor(good) / 2  # side 16: half the level-0 targets
    cls[0][1, 0, 2, 2], reg[0][1, :, 2, 2] = -1.0, torch.tensor(good)
    cls[1][1, 0, 1, 1], reg[1][1, :, 1, 1] = 2.0, torch.tensor(poor) / 2
    for t in cls + reg:
        t.requires_grad_(True)
    losses = head.loss(None, _batch(2, [[4.0, 4, 28, 28]], [0]), outputs=(cls, reg))

    # 2 selected positives, each with a box of IoU 22 / 24
    assert float(losses["num_pos"]) == 1.0 and float(losses["pos_recall"]) == 100.0
    assert float(losses["loss_bbox"].detach()) == pytest.approx(-math.log(22 / 24), rel=1e-5)
    # classification: every (prior, class) term against one-hot targets (torchvision's focal loss), except the class
    # of the positive on the level not selected (image 0 level 0, image 1 level 1), over 2 positives
    from torchvision.ops import sigmoid_focal_loss

    expected = 0.0
    for level, (logits, dropped_image) in enumerate(zip(cls, (0, 1))):
        target = torch.zeros_like(logits)
        y = x = 2 if level == 0 else 1
        target[:, 0, y, x] = 1.0
        weight = torch.ones_like(logits)
        weight[dropped_image, 0, y, x] = 0.0
        expected += float((sigmoid_focal_loss(logits.detach(), target, alpha=0.25, gamma=2.0) * weight).sum())
    assert float(losses["loss_cls"].detach()) == pytest.approx(expected / 2, rel=1e-5)

    # the box of a positive on its gt's other level gets no gradient
    (losses["loss_cls"] + losses["loss_bbox"]).backward()
    assert reg[0].grad[0, :, 2, 2].abs().sum() == 0 and reg[1].grad[0, :, 1, 1].abs().sum() > 0
    assert reg[1].grad[1, :, 1, 1].abs().sum() == 0 and reg[0].grad[1, :, 2, 2].abs().sum() > 0


def test_fsaf_loss_without_gts_averages_over_the_negatives():
    """No gt: every one of the 4 x 4 + 2 x 2 = 20 priors is a negative for both classes; the classification loss is
    divided by the 20 negatives, i.e. 2 x the negative focal term (1 - alpha) p^2 (-ln(1 - p)) of logit -2."""
    head = _head(2, [8, 16])
    cls = [torch.full((1, 2, 4, 4), -2.0, requires_grad=True), torch.full((1, 2, 2, 2), -2.0, requires_grad=True)]
    reg = [torch.full((1, 4, 4, 4), 0.3, requires_grad=True), torch.full((1, 4, 2, 2), 0.3, requires_grad=True)]
    batch = _batch(1, [], [])
    batch["gt_boxes"], batch["gt_labels"] = [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.long)]
    losses = head.loss(None, batch, outputs=(cls, reg))
    p = 1 / (1 + math.exp(2.0))
    assert float(losses["loss_cls"].detach()) == pytest.approx(2 * 0.75 * p ** 2 * -math.log(1 - p), rel=1e-5)
    assert float(losses["loss_bbox"].detach()) == 0.0 and float(losses["num_pos"]) == 0.0
    (losses["loss_cls"] + losses["loss_bbox"]).backward()  # the box branch stays in the graph (DDP)
    assert reg[0].grad is not None and float(reg[0].grad.abs().sum()) == 0.0


def test_fsaf_targets_ignore_only_the_shadowing_class():
    """One level of stride 8 on 32 x 32, gt (4, 4, 28, 28) of class 1 with the paper's ignoring region (neg_scale 0.5:
    (10, 10, 22, 22)): the prior at (16, 16) (index 10) is positive, its 8 neighbours overlap the ignoring region
    (e.g. (4, 4, 12, 12) by 4 / 64) and ignore class 1 only. A crowd box (-8, -8, 8, 8) x 0.5 holds the centre of
    prior 0: ignored for every class."""
    head = _head(3, [8], neg_scale=0.5)
    anchors = head.anchor_generator.grid_anchors([(4, 4)])[0]
    batch = _batch(1, [[4.0, 4, 28, 28]], [1], ignore=[[-8.0, -8, 8, 8]])
    t = head.get_targets(anchors, [(4, 4)], batch, batch["gt_labels"])
    weights = t.label_weights[0]
    shadowed = [5, 6, 7, 9, 11, 13, 14, 15]
    assert t.labels[0].tolist() == [3] * 10 + [1] + [3] * 5
    assert t.pos_gt_inds[0].tolist() == [-1] * 10 + [0] + [-1] * 5
    assert weights[0].tolist() == [0, 0, 0]
    assert all(weights[i].tolist() == [1, 0, 1] for i in shadowed)
    assert all(weights[i].tolist() == [1, 1, 1] for i in range(1, 16) if i not in shadowed)
    assert t.num_neg == 14 and t.bbox_targets[0, 10].tolist() == [4.0, 4, 28, 28]


# ------------------------------------------------------------------------------------------------ the pipeline

def test_fsaf_r50_fpn_matches_mmdetections_model():
    """36,419,732 parameters, by hand: ResNet-50 without its fc (torchvision); FPN laterals (512 + 1024 + 2048) x 256
    + 3 x 256 = 918,272, three 3x3 output convs 3 x 590,080, P6 3x3/2 on C5 2048 x 9 x 256 + 256 = 4,718,848, P7
    590,080 (7,997,440); head towers 8 x 590,080, classifier 256 x 9 x 80 + 80 = 184,400, distances 256 x 9 x 4 + 4
    = 9,220 (4,914,260). MMDetection's own model of the config has the same count and tensor shapes."""
    from torchvision.models import resnet50

    model = load_config(PIPELINE, []).build("model")
    assert type(model).__name__ == "FSAF" and type(model.bbox_head).__name__ == "FSAFHead"
    count = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for n, p in resnet50(weights=None).named_parameters() if not n.startswith("fc."))
    assert count == backbone + 7_997_440 + 4_914_260 == 36_419_732
    reference = json.loads(MMDET_FIXTURE.read_text())
    assert reference["config"].endswith("fsaf_r50_fpn_1x_coco.py") and count == reference["num_params"]
    assert [list(v.shape) for v in model.state_dict().values()] == [shape for _, shape in reference["state_dict"]]
    head = model.bbox_head
    assert head.num_anchors == 1 and torch.all(head.retina_reg.bias == 0.25)


def test_tiny_fsaf_overfits_a_few_images():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(2, height=64, width=64, max_objects=2, seed=3)  # 3 shapes of 23-30 px
    records = [r for _, r in samples]
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (AP50 1.0)
    model = load_config(PIPELINE, [
        "num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=-1",
        "model.backbone.norm_eval=false", "model.neck.in_channels=[64, 128, 256, 512]", "model.neck.out_channels=64",
        "model.bbox_head.in_channels=64", "model.bbox_head.feat_channels=64"]).build("model")
    batch = collate_samples(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4, fused=True)  # as tests/test_detectors.py's _train
    model.train()
    for it in range(60):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, 0.1 + 0.9 * it / 10)
        losses = model(batch)
        loss = losses["loss_cls"] + losses["loss_bbox"]
        if it == 0:
            first = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
    assert float(loss.detach()) < 0.2 * first
    model.eval()
    with torch.no_grad():
        preds = model(batch, mode="predict")
    gt = coco_from_records(records, list(CLASSES))
    metrics = evaluate_coco(gt, predictions_to_coco_results(preds, [r["image_id"] for r in records], [1, 2, 3]),
                            ("bbox",))
    assert metrics["bbox/AP50"] > 0.9, metrics
