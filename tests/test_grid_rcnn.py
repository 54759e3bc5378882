"""Grid R-CNN (Lu et al. 2019): sub-regions, heatmap targets of a known box, the grid-guided box correction on a
constructed heatmap, the head's fusion and outputs, and a tiny variant overfitting a few synthetic images.

Expected values: pixel positions and boxes computed by hand from the paper's definitions (Sec. 3.1, 3.3) and Grid
R-CNN Plus's sub-regions; AP50 from pycocotools (through raydet.evaluation). The R-50 pipeline's parameter count and
MMDetection names are checked against MMDetection's model in tests/test_interop_mmdet.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.models.losses import CrossEntropyLoss
from raydet.models.roi_heads.grid_roi_head import jitter_boxes
from raydet.models.roi_heads.mask_heads.grid_head import (GridHead, grid_points_to_boxes, grid_sub_regions,
                                                         grid_targets)
from test_detectors import PIPELINES, TINY, TINY_RPN, _ap, _train, build_from_pipeline, small_shapes  # noqa: F401


def test_sub_regions_of_a_3x3_grid_on_a_56_map():
    # column-major points: x index p // 3, y index p % 3; starts 0, int((1/2 - 1/4) * 56) = 14, 28; sides 28
    starts = [0, 14, 28]
    expected = [(starts[p // 3], starts[p % 3], starts[p // 3] + 28, starts[p % 3] + 28) for p in range(9)]
    assert grid_sub_regions(3, 56) == expected


def _cross(cx, cy, size=56):
    t = torch.zeros(size, size)
    for x, y in [(cx, cy), (cx - 1, cy), (cx + 1, cy), (cx, cy - 1), (cx, cy + 1)]:
        if 0 <= x < size and 0 <= y < size:
            t[y, x] = 1
    return t


def test_grid_targets_of_a_known_box():
    """RoI (10, 10, 38, 38): its 2x frame is (-4, -4, 52, 52), 56 px on a 56 map, so a map pixel is an input pixel.

    The gt (12.7, 10, 38, 30.5) has points x in {12.7, 25.35, 38}, y in {10, 20.25, 30.5}: pixels trunc(x + 4) =
    16, 29, 42 and trunc(y + 4) = 14, 24, 34; radius 1 marks the pixel and its 4 neighbours."""
    roi = torch.tensor([[10.0, 10.0, 38.0, 38.0]])
    gt = torch.tensor([[12.7, 10.0, 38.0, 30.5]])
    t = grid_targets(roi, gt, grid_size=3, map_size=56, pos_radius=1)
    assert t.shape == (1, 9, 56, 56)
    xs, ys = [16, 29, 42], [14, 24, 34]
    for p in range(9):
        torch.testing.assert_close(t[0, p], _cross(xs[p // 3], ys[p % 3]), msg=f"point {p}")
    # a point on the map's edge keeps the part of its cross inside the map: gt corner at the frame's origin
    edge = grid_targets(roi, torch.tensor([[-4.0, -4.0, 38.0, 38.0]]), 3, 56, 1)
    assert edge[0, 0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]
    # radius 0: one pixel per point; a RoI whose 2x frame is <= 3 px wide gets no positive
    assert grid_targets(roi, gt, 3, 56, 0).sum() == 9
    assert grid_targets(torch.tensor([[0.0, 0.0, 1.5, 20.0]]), gt, 3, 56, 1).sum() == 0


def test_head_targets_are_the_sub_regions_of_the_whole_map():
    """A gt equal to the RoI puts every point at the centre of its sub-region: whole-map pixels 14, 28, 42 a side,
    each 14 px past its region's start (0, 14, 28)."""
    head = GridHead(CrossEntropyLoss(use_sigmoid=True), in_channels=8, point_feat_channels=4, num_convs=1,
                    norm_cfg={"type": "GN", "num_groups": 9})
    roi = torch.tensor([[10.0, 10.0, 38.0, 38.0]])
    t = head.targets(roi, roi)
    assert t.shape == (1, 9, 28, 28)
    for p in range(9):
        torch.testing.assert_close(t[0, p], _cross(14, 14, 28))


def test_grid_points_vote_the_box_on_a_constructed_heatmap():
    """RoI (10, 10, 38, 38): a heatmap pixel (x, y) of point p is at input x = x + region_x1 + 0.5 - 4.

    Left column (points 0, 1, 2) peaks at local x 14, 16, 12 with probabilities 0.9, 0.6, 0.3 -> x 10.5, 12.5, 8.5,
    x1 = (0.9 * 10.5 + 0.6 * 12.5 + 0.3 * 8.5) / 1.8 = 10.8333. Every other point peaks at local (14, 14) with 0.8:
    y1 = the top row (points 0, 3, 6) = (0.9 * 10.5 + 0.8 * 10.5 + 0.8 * 10.5) / 2.5 = 10.5 (point 0's local y is
    14), x2 = 14 + 28 + 0.5 - 4 = 38.5, y2 = 38.5."""
    probs = torch.full((1, 9, 28, 28), 0.01)
    peaks = {0: (14, 0.9), 1: (16, 0.6), 2: (12, 0.3)}
    for p in range(9):
        x, score = peaks.get(p, (14, 0.8))
        probs[0, p, 14, x] = score
    boxes = grid_points_to_boxes(probs, torch.tensor([[10.0, 10.0, 38.0, 38.0]]), grid_sub_regions(3, 56), 3)
    torch.testing.assert_close(boxes, torch.tensor([[19.5 / 1.8, 10.5, 38.5, 38.5]]))
    # scale: the same heatmap on a RoI twice as large about the same origin frame -> twice the offsets
    boxes2 = grid_points_to_boxes(probs, torch.tensor([[20.0, 20.0, 76.0, 76.0]]), grid_sub_regions(3, 56), 3)
    torch.testing.assert_close(boxes2, torch.tensor([[2 * 19.5 / 1.8, 21.0, 77.0, 77.0]]))


def test_grid_head_fuses_neighbours_and_predicts_half_size_heatmaps():
    torch.manual_seed(0)
    head = GridHead(CrossEntropyLoss(use_sigmoid=True, loss_weight=15.0), in_channels=8, point_feat_channels=4,
                    num_convs=2, roi_feat_size=14, norm_cfg={"type": "GN", "num_groups": 9})
    assert head.neighbour_points[4] == (1, 3, 5, 7) and head.neighbour_points[0] == (1, 3)
    assert sum(len(t) for t in head.forder_trans) == sum(len(t) for t in head.sorder_trans) == 24
    x = torch.randn(3, 8, 14, 14)
    fused, unfused = head.train()(x)
    assert fused.shape == unfused.shape == (3, 9, 28, 28)
    assert not torch.allclose(fused, unfused)
    with torch.no_grad():  # without the transitions, the fused features are the point features themselves
        for trans in [*head.forder_trans, *head.sorder_trans]:
            for t in trans:
                for p in t.parameters():
                    p.zero_()
    fused, unfused = head(x)
    torch.testing.assert_close(fused, unfused)
    fused, unfused = head.eval()(x)
    assert unfused is None and fused.shape == (3, 9, 28, 28)
    # initial heatmaps: the deconv bias gives each pixel the 1% prior
    torch.testing.assert_close(head.deconv2.bias, torch.full((9,), -torch.log(torch.tensor(99.0)).item()))
    # loss: 15 x mean binary CE on the fused plus on the unfused heatmaps
    targets = (torch.rand(3, 9, 28, 28) > 0.9).float()
    f, u = torch.randn(3, 9, 28, 28), torch.randn(3, 9, 28, 28)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(head.loss(f, u, targets), 15 * (bce(f, targets) + bce(u, targets)))


def test_dilation_and_bad_grids():
    head = GridHead(CrossEntropyLoss(use_sigmoid=True), in_channels=8, point_feat_channels=4, num_convs=3,
                    dilation=2, norm_cfg={"type": "GN", "num_groups": 9})
    assert head.convs[0].conv.dilation == (1, 1) and head.convs[1].conv.dilation == (2, 2)
    assert head(torch.randn(2, 8, 14, 14))[0].shape == (2, 9, 28, 28)
    with pytest.raises(ValueError, match="grid_points must be a square"):
        GridHead(CrossEntropyLoss(use_sigmoid=True), grid_points=8)
    with pytest.raises(ValueError, match="14x14 RoI features"):
        head(torch.randn(2, 8, 7, 7))


def test_jitter_boxes_stay_within_the_amplitude_and_the_image():
    torch.manual_seed(0)
    boxes = torch.tensor([[20.0, 30.0, 60.0, 50.0]]).repeat(200, 1)
    out = jitter_boxes(boxes, 0.15, (100, 100))
    centre, wh = (out[:, :2] + out[:, 2:]) / 2, out[:, 2:] - out[:, :2]
    assert ((centre - torch.tensor([40.0, 40.0])).abs() <= torch.tensor([40.0, 20.0]) * 0.15 + 1e-4).all()
    assert ((wh / torch.tensor([40.0, 20.0]) - 1).abs() <= 0.15 + 1e-4).all()
    assert not torch.equal(out, boxes)
    torch.testing.assert_close(jitter_boxes(torch.tensor([[-5.0, 10.0, 120.0, 50.0]]), 0.0, (100, 100)),
                               torch.tensor([[0.0, 10.0, 99.0, 50.0]]))


TINY_GRID = [
    "model.roi_head.bbox_head.in_channels=64",
    "model.roi_head.bbox_head.fc_out_channels=256",
    "model.roi_head.sampler.num=128",
    "model.roi_head.grid_head.in_channels=64",
    "model.roi_head.grid_head.point_feat_channels=8",
    "model.roi_head.grid_head.num_convs=2",
    "model.roi_head.grid_head.norm_cfg={type: GN, num_groups: 9}",
    "model.roi_head.max_num_grid=32",
]


def test_grid_rcnn_overfits_a_few_images(small_shapes):  # noqa: F811
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (AP50 1.0)
    model = build_from_pipeline("grid_rcnn_r50_fpn_gn-head_2x_coco.yaml", TINY + TINY_RPN + TINY_GRID)
    assert not hasattr(model.roi_head.bbox_head, "fc_reg")  # classification only: the grid head locates
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, lr=2e-3, warmup=10, fused=True)
    # the grid loss starts near its floor (the 1% prior on maps that are 5 / 784 positive): it falls, but less
    assert last["loss_cls"] < 0.5 * first["loss_cls"] and last["loss_grid"] < 0.95 * first["loss_grid"]
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_grid_roi_head_with_ohem_trains_on_the_hardest_rois():
    """The tiny grid RoI head with an OHEMSampler(num 8, 25% positives) on hand-made proposals of one 64 px image.

    gts g0 (6, 6, 30, 30) label 0 and g1 (34, 28, 60, 58) label 2 (added as proposals: candidates 0, 1); five
    shifted copies of them (IoU 0.85-0.92, candidates 2-6) are positives; twelve 12 x 12 boxes (IoU <= 144 / 576 =
    0.25 with either gt, candidates 7-18) are negatives. The per-candidate losses are recomputed here with
    F.cross_entropy on the box head's scores (label: the gt's, 3 = background for the negatives): the sampled
    positives must be the 2 of highest loss of the 7, the negatives the 6 of highest loss of the 12; loss_cls is the
    mean cross-entropy over those 8, and the grid head's targets are built for exactly the 2 sampled positives
    (jitter 0: their boxes unchanged) against their own gts."""
    cfg = load_config(PIPELINES / "grid_rcnn_r50_fpn_gn-head_2x_coco.yaml", TINY + TINY_GRID + [
        "model.roi_head.sampler={_delete_: true, type: OHEMSampler, num: 8, pos_fraction: 0.25}",
        "model.roi_head.jitter_amplitude=0.0"])
    torch.manual_seed(0)
    head = cfg.build("model.roi_head").train()
    assert type(head.sampler).__name__ == "OHEMSampler"
    feats = tuple(torch.randn(1, 64, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64))  # the FPN's P2-P6
    gt = torch.tensor([[6.0, 6.0, 30.0, 30.0], [34.0, 28.0, 60.0, 58.0]])
    gt_labels = torch.tensor([0, 2])
    pos = torch.tensor([[7.0, 6.0, 31.0, 30.0], [6.0, 8.0, 30.0, 32.0], [5.0, 5.0, 29.0, 29.0],
                        [35.0, 29.0, 61.0, 58.0], [33.0, 28.0, 59.0, 57.0]])
    neg = torch.tensor([[x, y, x + 12.0, y + 12.0] for y in (0.0, 46.0) for x in (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)])
    proposals = torch.cat([pos, neg])
    candidates = torch.cat([gt, proposals])
    labels = torch.tensor([0, 2, 0, 0, 0, 2, 2] + [3] * 12)
    with torch.no_grad():
        rois = torch.cat([torch.zeros(19, 1), candidates], 1)
        scores = head.bbox_head(head.bbox_roi_extractor(feats, rois))[0]
    ce = F.cross_entropy(scores, labels, reduction="none")
    hard_pos = sorted(ce[:7].topk(2).indices.tolist())
    hard_neg = sorted((7 + ce[7:].topk(6).indices).tolist())
    assert ce[7:].topk(7).values[5] > ce[7:].topk(7).values[6] and ce[:7].topk(3).values[1] > ce[:7].topk(3).values[2]

    seen = {}
    sample, targets = head.sample, head.grid_head.targets

    def spy_sample(*args, **kwargs):
        seen["samples"] = sample(*args, **kwargs)
        return seen["samples"]

    def spy_targets(boxes, gt_boxes):
        seen["grid"] = (boxes, gt_boxes)
        return targets(boxes, gt_boxes)

    head.sample, head.grid_head.targets = spy_sample, spy_targets
    batch = {"gt_boxes": [gt], "gt_labels": [gt_labels], "img_metas": [{"img_shape": (64, 64, 3)}]}
    losses = head.loss(feats, [proposals], batch)
    (res,) = seen["samples"]
    assert res.pos_inds.tolist() == hard_pos and res.neg_inds.tolist() == hard_neg
    sampled = hard_pos + hard_neg
    torch.testing.assert_close(losses["loss_cls"].detach(), ce[sampled].mean(), rtol=1e-5, atol=1e-6)
    grid_boxes, grid_gts = seen["grid"]
    assert grid_boxes.shape == (2, 4)
    match = torch.cdist(grid_boxes, candidates[hard_pos]).argmin(dim=1)  # the grid RoIs come in a random order
    assert sorted(match.tolist()) == [0, 1]
    torch.testing.assert_close(grid_boxes, candidates[hard_pos][match], rtol=0, atol=1e-4)
    torch.testing.assert_close(grid_gts, gt[labels[hard_pos][match] // 2])  # label 0 -> g0, label 2 -> g1
    assert torch.isfinite(losses["loss_grid"]) and losses["loss_grid"] > 0
