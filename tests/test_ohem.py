"""OHEM (Shrivastava et al. 2016): the sampler keeps the RoIs of highest classification loss under the current box
branch, passed by the RoI head as a ``SamplingContext``; a tiny OHEM Faster R-CNN overfits a few images.

Expected values: the per-RoI losses are softmax cross-entropies of constructed class scores written out with
``math`` (log-sum-exp minus the label's logit), and the kept RoIs are picked from them by hand; AP50 comes from
pycocotools.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import raydet.models  # noqa: F401  (registers the components)
from raydet.data.collate import collate_samples
from raydet.models.losses import CrossEntropyLoss
from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers import OHEMSampler, SamplingContext
from test_detectors import TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline, small_shapes  # noqa: F401

# Class scores (2 classes + background) of each candidate; a candidate box's x1 is its row here.
NEG_FG = [0.1, 3.0, -1.0, 2.0, 0.5, 4.0, -2.0, 1.0, 2.5, 0.0]   # negatives' class-0 logit (class 1, bg: 0)
POS = [(0, 2.0), (1, -1.0), (0, 0.5), (1, 3.0), (0, -2.0), (1, 1.0)]  # positives' (label, logit of that label)


class _TableHead(nn.Module):
    """A 'box head' whose class scores are looked up by the RoI's x1 (the row of ``table``)."""

    num_classes = 2

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.loss_cls = CrossEntropyLoss()

    def forward(self, rois: torch.Tensor):
        rows = rois[:, 1].long()
        return self.table[rows], torch.zeros(rows.numel(), 8)


def _case():
    table = torch.zeros(16, 3)
    for k, s in enumerate(NEG_FG):
        table[k, 0] = s
    for k, (label, s) in enumerate(POS):
        table[10 + k, label] = s
    head = _TableHead(table)
    context = SamplingContext(feats=(), bbox_forward=lambda feats, rois: head(rois), bbox_head=head)
    boxes = torch.tensor([[float(k), 0.0, k + 5.0, 5.0] for k in range(16)])
    gt_inds = torch.tensor([0] * 10 + [1] * 6)
    labels = torch.tensor([-1] * 10 + [label for label, _ in POS])
    assign = AssignResult(num_gts=1, gt_inds=gt_inds, max_overlaps=torch.where(gt_inds > 0, 0.7, 0.2), labels=labels)
    return context, boxes, assign


def _ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_ohem_keeps_the_rois_of_highest_loss():
    """num 8 at 25%: the 2 hardest of 6 positives and the 6 hardest of 10 negatives.

    Negative k (logits [s_k, 0, 0], background label 2): loss log(e^s_k + 2) -> highest for s = 4, 3, 2.5, 2, 1,
    0.5: candidates 5, 1, 8, 3, 7, 4. Positive (label l with logit s, the others 0): loss log(e^s + 2) - s, highest
    for the lowest s: -2 (candidate 14), -1 (candidate 11)."""
    context, boxes, assign = _case()
    losses = context.roi_cls_losses(boxes, torch.tensor([2] * 10 + [label for label, _ in POS]))
    hand = [_ce([s, 0.0, 0.0], 2) for s in NEG_FG] + [_ce([s if c == lab else 0.0 for c in range(3)], lab)
                                                      for lab, s in POS]
    torch.testing.assert_close(losses, torch.tensor(hand), rtol=0, atol=1e-5)

    sampler = OHEMSampler(num=8, pos_fraction=0.25, add_gt_as_proposals=False)
    res = sampler.sample(assign, boxes, torch.zeros(1, 4), torch.tensor([0]), context=context)
    assert res.pos_inds.tolist() == [11, 14]
    assert res.neg_inds.tolist() == [1, 3, 4, 5, 7, 8]
    # fewer candidates than wanted: all kept, no forward pass needed (no context)
    few = OHEMSampler(num=64, pos_fraction=0.25, add_gt_as_proposals=False)
    res = few.sample(assign, boxes, torch.zeros(1, 4), torch.tensor([0]))
    assert res.num_pos == 6 and res.num_neg == 10
    with pytest.raises(ValueError, match="needs the RoI head's context"):
        sampler.sample(assign, boxes, torch.zeros(1, 4), torch.tensor([0]))


@pytest.fixture(scope="module")
def trained(small_shapes):  # noqa: F811
    """The tiny OHEM Faster R-CNN trained on the two small shapes images (shared by the tests below): (model, first
    and last losses, batch, records)."""
    samples, records = small_shapes
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_r50_fpn_ohem_1x_coco.yaml", TINY + TINY_RPN + TINY_ROI)
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, lr=2e-3, warmup=10, fused=True)  # AP50 1.0 for seeds 0, 1, 2
    return model, first, last, batch, records


def test_ohem_faster_rcnn_overfits_a_few_images(trained):
    model, first, last, batch, records = trained
    assert type(model.roi_head.sampler).__name__ == "OHEMSampler"
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_standard_roi_head_passes_each_images_features_and_its_box_branch(trained):
    """StandardRoIHead.sample(proposals, batch, feats) gives the sampler, per image, that image's maps (batch size
    1, the same values) and its own box branch, so OHEM's kept negatives are those with the highest loss under it."""
    model, _, _, batch, _ = trained
    with torch.no_grad():
        feats = model.extract_feat(batch["images"][:2])
    seen = []
    sampler = copy.deepcopy(model.roi_head.sampler)
    original = sampler.sample

    def spy(*args, context=None, **kwargs):
        seen.append(context)
        return original(*args, context=context, **kwargs)

    sampler.sample = spy
    sampler.num = 8  # fewer than the candidates' negatives, so the hardest are chosen
    head = copy.copy(model.roi_head)  # the trained head with the spying sampler
    head.sampler = sampler
    proposals = [torch.tensor([[8.0, 8.0, 40.0, 40.0], [60.0, 10.0, 120.0, 50.0]] + [[k, k, k + 20.0, k + 30.0]
                                                                                      for k in range(0, 100, 4)])] * 2
    with torch.no_grad():
        results = head.sample(proposals, batch, feats)
    assert len(seen) == 2
    for i, ctx in enumerate(seen):
        assert all(torch.equal(f, g[i:i + 1]) for f, g in zip(ctx.feats, feats))
        assert ctx.bbox_head is model.roi_head.bbox_head
    # image 0: the kept negatives are the hardest under the head
    res = results[0]
    gt = batch["gt_boxes"][0]
    candidates = torch.cat([gt, proposals[0]])
    neg_all = [k for k in range(candidates.shape[0]) if k not in res.pos_inds.tolist()]
    with torch.no_grad():
        rois = torch.cat([torch.zeros(candidates.shape[0], 1), candidates], 1)
        scores = model.roi_head.bbox_head(model.roi_head.bbox_roi_extractor(seen[0].feats, rois))[0]
        bg = torch.log_softmax(scores, dim=1)[:, -1].neg()
    kept = set(res.neg_inds.tolist())
    dropped = [k for k in neg_all if k not in kept]
    assert res.num_neg == 8 - res.num_pos and dropped
    assert min(bg[list(kept)]) >= max(bg[dropped])
