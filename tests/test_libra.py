"""Libra R-CNN (Pang et al. 2019): IoU-balanced negatives, instance-balanced positives, the balanced feature pyramid
(BFP) and its non-local refinement, and a tiny Libra Faster R-CNN that overfits a few images.

Expected values: sample counts per IoU bin / per gt are counted by hand from the constructed assignments (the sampler's
rule of MMDetection's ``IoUBalancedNegSampler`` / ``InstanceBalancedPosSampler``); the BFP's output is recomputed with
block maxima and repeated pixels written out here, not with the pooling calls the module uses; the non-local block's
output on a two-pixel map is the paper's formula in scalars; AP50 comes from pycocotools.
"""
from __future__ import annotations

import math

import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.models.necks import BFP
from raydet.models.non_local import NonLocal2d
from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers import (CombinedSampler, InstanceBalancedPosSampler, IoUBalancedNegSampler,
                                                 RandomSampler)
from test_detectors import (PIPELINES, TINY, TINY_RETINA, TINY_ROI, TINY_RPN, _ap, _train,  # noqa: F401
                            build_from_pipeline, small_shapes)

# The list neck [FPN, BFP] of the Libra pipelines, at test_detectors' tiny sizes
TINY_LIBRA = [t for t in TINY if not t.startswith("model.neck")] + [
    "model.neck[0].in_channels=[64, 128, 256, 512]",
    "model.neck[0].out_channels=64",
    "model.neck[1].in_channels=64",
]


def _assign(gt_inds: list[int], ious: list[float], labels: list[int] | None = None, num_gts: int = 1) -> AssignResult:
    gt = torch.tensor(gt_inds)
    lab = torch.tensor(labels) if labels is not None else torch.where(gt > 0, 0, -1)
    return AssignResult(num_gts=num_gts, gt_inds=gt, max_overlaps=torch.tensor(ious), labels=lab)


# ------------------------------------------------------------------------------------------------------- sampling

def test_iou_balanced_negatives_fill_each_iou_bin_then_the_rest_at_random():
    """One gt, added as a proposal (IoU 1, so the bins split [0, 1) into thirds); candidates: one positive (IoU 0.8),
    30 negatives at IoU 0.1 (bin [0, 1/3)) and 3 at IoU 0.4 (bin [1/3, 2/3)). num 12 at 25%: 3 positives wanted, 2
    exist (the gt and the candidate), so 10 negatives: int(10 / 3) = 3 per bin -> 3 from bin 0, all 3 of bin 1, none
    of bin 2, then the 4 missing at random from the 27 left (all in bin 0): 7 at IoU 0.1 and 3 at IoU 0.4, whatever
    the draw. (Uniform sampling would take 10 x 3 / 33 = 0.9 of the IoU-0.4 negatives on average.)"""
    sampler = IoUBalancedNegSampler(num=12, pos_fraction=0.25, floor_thr=-1, floor_fraction=0, num_bins=3)
    assign = _assign([1] + [0] * 33, [0.8] + [0.1] * 30 + [0.4] * 3)
    boxes = torch.arange(34, dtype=torch.float32)[:, None].repeat(1, 4) + torch.tensor([0.0, 0.0, 10.0, 10.0])
    gt = torch.tensor([[100.0, 100.0, 120.0, 120.0]])
    for seed in range(5):
        res = sampler.sample(assign, boxes, gt, torch.tensor([0]), generator=torch.Generator().manual_seed(seed))
        assert res.pos_inds.tolist() == [0, 1]  # the gt (index 0 after adding) and the candidate
        neg_iou = torch.cat([torch.ones(1), assign.max_overlaps])[res.neg_inds]
        assert res.num_neg == 10
        assert int((neg_iou == 0.4).sum()) == 3 and int((neg_iou == 0.1).sum()) == 7


def test_iou_balanced_floor_set_takes_its_fraction():
    """floor_thr 0.2, floor_fraction 0.5: of 10 negatives, int(10 x 0.5) = 5 come from IoU >= 0.2 (12 there: 10 at
    0.25, 2 at 0.45) and the other 5 from the floor set IoU < 0.2 (20 at 0.05). With fewer negatives than wanted,
    all are kept."""
    sampler = IoUBalancedNegSampler(num=11, pos_fraction=0.1, floor_thr=0.2, floor_fraction=0.5, num_bins=2,
                                    add_gt_as_proposals=False)
    ious = [0.9] + [0.05] * 20 + [0.25] * 10 + [0.45] * 2
    assign = _assign([1] + [0] * 32, ious)
    boxes = torch.zeros(33, 4)
    res = sampler.sample(assign, boxes, torch.zeros(1, 4), torch.tensor([0]),
                         generator=torch.Generator().manual_seed(0))
    neg_iou = assign.max_overlaps[res.neg_inds]
    assert res.num_pos == 1 and res.num_neg == 10
    assert int((neg_iou < 0.2).sum()) == 5 and int((neg_iou >= 0.2).sum()) == 5
    few = _assign([1, 0, 0, 0], [0.9, 0.1, 0.3, 0.45])
    assert sampler.sample(few, torch.zeros(4, 4), torch.zeros(1, 4), torch.tensor([0])).neg_inds.tolist() == [1, 2, 3]


def test_instance_balanced_positives_cap_each_gt():
    """8 positives wanted (num 32 x 0.25). gt 1 has 20 positives, gt 2 has 2: each gt keeps at most
    round(8 / 2) + 1 = 5, so 5 + 2 = 7 and the missing one comes from gt 1's 15 others -> 6 and 2 whatever the draw
    (uniform sampling would take 8 x 2 / 22 = 0.7 of gt 2's on average). Three gts of 10 positives: at most
    round(8 / 3) + 1 = 4 each, 12 cut to 8 at random, so no gt has more than 4."""
    sampler = InstanceBalancedPosSampler(num=32, pos_fraction=0.25, add_gt_as_proposals=False)
    assign = _assign([1] * 20 + [2] * 2 + [0] * 40, [0.7] * 22 + [0.1] * 40, [0] * 20 + [1] * 2 + [-1] * 40, 2)
    for seed in range(5):
        res = sampler.sample(assign, torch.zeros(62, 4), torch.zeros(2, 4), torch.tensor([0, 1]),
                             generator=torch.Generator().manual_seed(seed))
        assert res.pos_assigned_gt_inds.bincount(minlength=2).tolist() == [6, 2]
        assert res.num_neg == 24
    three = _assign([1] * 10 + [2] * 10 + [3] * 10 + [0] * 30, [0.7] * 30 + [0.1] * 30,
                    [0] * 30 + [-1] * 30, 3)
    for seed in range(5):
        res = sampler.sample(three, torch.zeros(60, 4), torch.zeros(3, 4), torch.tensor([0, 0, 0]),
                             generator=torch.Generator().manual_seed(seed))
        counts = res.pos_assigned_gt_inds.bincount(minlength=3)
        assert int(counts.sum()) == 8 and int(counts.max()) <= 4


def test_libra_pipeline_combines_the_two_samplers():
    """The pipeline's R-CNN sampler is MMDetection's libra config's: CombinedSampler(512, 0.25) with instance-balanced
    positives and IoU-balanced negatives (floor_thr -1, floor_fraction 0, 3 bins); the counts of the constructed
    cases above hold through it (its own num / pos_fraction, not the inner samplers')."""
    cfg = load_config(PIPELINES / "libra_faster_rcnn_r50_fpn_1x_coco.yaml")
    sampler = cfg.build("model.roi_head.sampler")
    assert isinstance(sampler, CombinedSampler) and (sampler.num, sampler.pos_fraction) == (512, 0.25)
    assert isinstance(sampler.pos_sampler, InstanceBalancedPosSampler)
    neg = sampler.neg_sampler
    assert isinstance(neg, IoUBalancedNegSampler) and (neg.floor_thr, neg.floor_fraction, neg.num_bins) == (-1, 0, 3)
    rpn_sampler = cfg.build("model.rpn_head.sampler")
    assert isinstance(rpn_sampler, RandomSampler) and rpn_sampler.neg_pos_ub == 5

    small = CombinedSampler(num=12, pos_fraction=0.25, pos_sampler=sampler.pos_sampler, neg_sampler=neg)
    assign = _assign([1] + [0] * 33, [0.8] + [0.1] * 30 + [0.4] * 3)
    res = small.sample(assign, torch.zeros(34, 4), torch.zeros(1, 4), torch.tensor([0]))
    neg_iou = torch.cat([torch.ones(1), assign.max_overlaps])[res.neg_inds]
    assert res.num_pos == 2 and int((neg_iou == 0.4).sum()) == 3 and int((neg_iou == 0.1).sum()) == 7
    with pytest.raises(ValueError, match="neg_sampler must be a sampler with sample_neg"):
        CombinedSampler(num=4, pos_fraction=0.5, pos_sampler=sampler.pos_sampler, neg_sampler=object())


# ------------------------------------------------------------------------------------------------------------ BFP

def _block_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H / k, W / k): the maximum of each k x k block."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // k, k, w // k, k).amax(dim=(3, 5))


def _repeat(x: torch.Tensor, k: int) -> torch.Tensor:
    """Nearest upsampling by an integer factor: each pixel repeated k x k times."""
    return x.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)


def test_bfp_integrates_at_the_refine_level_and_adds_back_to_every_level():
    """Four levels 8x8, 4x4, 2x2, 1x1, refine level 1 (4x4). With the non-local block as initialised (its output conv
    zero: the identity), the balanced map is the mean of: level 0's 2x2 block maxima, level 1, level 2 and level 3
    repeated to 4x4; each output is its input plus that map repeated to 8x8 (level 0), itself (level 1), its 2x2
    block maxima (level 2), its maximum (level 3)."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, s, s) for s in (8, 4, 2, 1)]
    bfp = BFP(in_channels=3, num_levels=4, refine_level=1, refine_type="non_local")
    assert torch.count_nonzero(bfp.refine.conv_out.weight) == 0
    outs = bfp(inputs)
    bsf = (_block_max(inputs[0], 2) + inputs[1] + _repeat(inputs[2], 2) + _repeat(inputs[3], 4)) / 4
    expected = [inputs[0] + _repeat(bsf, 2), inputs[1] + bsf, inputs[2] + _block_max(bsf, 2),
                inputs[3] + bsf.amax(dim=(2, 3), keepdim=True)]
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2), (2, 3, 1, 1)]
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)

    # Libra Faster R-CNN's layout: five FPN levels of a 64 x 96 input (strides 4-64), integrated at P4 (level 2)
    fpn_like = [torch.randn(1, 8, 64 // s, 96 // s) for s in (4, 8, 16, 32, 64)]
    shapes_out = [tuple(o.shape) for o in BFP(8, 5, refine_level=2, refine_type="non_local")(fpn_like)]
    assert shapes_out == [tuple(x.shape) for x in fpn_like]
    with pytest.raises(ValueError, match="refine_type must be null, 'conv' or 'non_local'"):
        BFP(8, 5, refine_type="nonlocal")


def test_non_local_block_on_two_pixels_follows_the_paper_formula():
    """C = 1, a 1 x 2 map (x1, x2), 1x1 convs theta = a x, phi = b x, g = c x (no biases), output conv d y + e:
    y_i = sum_j softmax_j(theta_i phi_j) g_j (embedded Gaussian, Wang et al. 2018, Eq. 1-3), z_i = x_i + d y_i + e;
    with use_scale the logits are divided by sqrt(1) = 1."""
    block = NonLocal2d(1, reduction=1, use_scale=False)
    a, b, c, d, e = 0.7, -1.3, 2.0, 0.5, 0.25
    with torch.no_grad():
        for conv, w in ((block.theta, a), (block.phi, b), (block.g, c), (block.conv_out, d)):
            conv.weight.fill_(w)
            conv.bias.zero_()
        block.conv_out.bias.fill_(e)
    x = [1.5, -0.5]
    expected = []
    for i in range(2):
        logits = [a * x[i] * b * x[j] for j in range(2)]
        weights = [math.exp(v) / sum(math.exp(u) for u in logits) for v in logits]
        expected.append(x[i] + d * sum(w * c * x[j] for j, w in enumerate(weights)) + e)
    out = block(torch.tensor(x).reshape(1, 1, 1, 2))
    torch.testing.assert_close(out.reshape(-1), torch.tensor(expected), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ overfitting

def test_libra_faster_rcnn_overfits_a_few_images(small_shapes):  # noqa: F811
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2: AP50 1.0
    model = build_from_pipeline("libra_faster_rcnn_r50_fpn_1x_coco.yaml", TINY_LIBRA + TINY_RPN + TINY_ROI)
    assert type(model.neck[1]).__name__ == "BFP" and type(model.roi_head.sampler).__name__ == "CombinedSampler"
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, lr=2e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_libra_retinanet_overfits_a_few_images(small_shapes):  # noqa: F811
    """RetinaNet with the [FPN, BFP] neck and the balanced L1 loss (libra_retinanet_r50_fpn_1x_coco.yaml), trained
    as test_detectors' RetinaNet on its two 64 px images."""
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass
    model = build_from_pipeline("libra_retinanet_r50_fpn_1x_coco.yaml", TINY_LIBRA + TINY_RETINA)
    assert type(model.neck[1]).__name__ == "BFP" and type(model.bbox_head.loss_bbox).__name__ == "BalancedL1Loss"
    batch = collate_samples(samples)
    first, last = _train(model, batch, 80, lr=2e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
