"""RandomSampler and PseudoSampler: counts, caps, gts as proposals, determinism."""
import pytest
import torch

from raydet.models.task_modules.assigners import AssignResult
from raydet.models.task_modules.samplers import PseudoSampler, RandomSampler, SamplingResult
from raydet.registry import build


def make_assign(num_pos, num_neg, num_ignore, num_gts=2, seed=0):
    """An AssignResult with the given counts in shuffled order, and boxes whose x1 is their index."""
    gen = torch.Generator().manual_seed(seed)
    n = num_pos + num_neg + num_ignore
    gt_inds = torch.cat([torch.randint(1, num_gts + 1, (num_pos,), generator=gen),
                         torch.zeros(num_neg, dtype=torch.long), torch.full((num_ignore,), -1)])
    gt_inds = gt_inds[torch.randperm(n, generator=gen)]
    gt_labels = torch.arange(num_gts) + 10
    labels = torch.where(gt_inds > 0, gt_labels[(gt_inds - 1).clamp(min=0)], torch.full_like(gt_inds, -1))
    assign = AssignResult(num_gts, gt_inds, torch.rand(n, generator=gen), labels)
    idx = torch.arange(n, dtype=torch.float32)
    boxes = torch.stack([idx, idx, idx + 5, idx + 5], 1)
    gt_boxes = torch.tensor([[1000.0 + 10 * k, 0.0, 1005.0 + 10 * k, 5.0] for k in range(num_gts)]).reshape(-1, 4)
    return assign, boxes, gt_boxes, gt_labels


def check_consistent(res: SamplingResult, assign: AssignResult, boxes, gt_boxes):
    assert res.pos_inds.unique().numel() == res.num_pos  # no duplicates
    assert res.neg_inds.unique().numel() == res.num_neg
    assert (assign.gt_inds[res.pos_inds] > 0).all()
    assert (assign.gt_inds[res.neg_inds] == 0).all()
    assert torch.equal(res.pos_boxes, boxes[res.pos_inds])
    assert torch.equal(res.neg_boxes, boxes[res.neg_inds])
    assert torch.equal(res.pos_assigned_gt_inds, assign.gt_inds[res.pos_inds] - 1)
    assert torch.equal(res.pos_gt_boxes, gt_boxes[res.pos_assigned_gt_inds])
    assert torch.equal(res.pos_gt_labels, assign.labels[res.pos_inds])
    assert torch.equal(res.boxes, torch.cat([res.pos_boxes, res.neg_boxes]))


def test_few_positives_filled_with_negatives():
    assign, boxes, gt_boxes, gt_labels = make_assign(10, 900, 90)
    res = RandomSampler(256, 0.5, add_gt_as_proposals=False).sample(assign, boxes, gt_boxes, gt_labels)
    assert res.num_pos == 10 and res.num_neg == 246
    check_consistent(res, assign, boxes, gt_boxes)
    assert not res.pos_is_gt.any()


def test_many_positives_capped_at_fraction():
    assign, boxes, gt_boxes, gt_labels = make_assign(300, 700, 0)
    res = RandomSampler(256, 0.25, add_gt_as_proposals=False).sample(assign, boxes, gt_boxes, gt_labels)
    assert res.num_pos == 64 and res.num_neg == 192
    check_consistent(res, assign, boxes, gt_boxes)


def test_too_few_negatives():
    assign, boxes, gt_boxes, gt_labels = make_assign(300, 20, 50)
    res = RandomSampler(256, 0.5, add_gt_as_proposals=False).sample(assign, boxes, gt_boxes, gt_labels)
    assert res.num_pos == 128 and res.num_neg == 20


def test_neg_pos_ub_caps_negatives():
    assign, boxes, gt_boxes, gt_labels = make_assign(10, 900, 0)
    sampler = RandomSampler(256, 0.5, neg_pos_ub=3, add_gt_as_proposals=False)
    res = sampler.sample(assign, boxes, gt_boxes, gt_labels)
    assert res.num_pos == 10 and res.num_neg == 30
    # With no positives the cap is neg_pos_ub * 1.
    assign, boxes, gt_boxes, gt_labels = make_assign(0, 900, 0)
    res = sampler.sample(assign, boxes, gt_boxes, gt_labels)
    assert res.num_pos == 0 and res.num_neg == 3


def test_add_gt_as_proposals():
    assign, boxes, gt_boxes, gt_labels = make_assign(5, 900, 0, num_gts=2)
    before = assign.gt_inds.clone()
    res = RandomSampler(512, 0.25).sample(assign, boxes, gt_boxes, gt_labels)
    # The two gts come first in the box list and are positives of themselves.
    assert res.num_pos == 7 and res.num_neg == 505
    assert res.pos_inds[:2].tolist() == [0, 1]
    assert res.pos_is_gt.tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(res.pos_boxes[:2], gt_boxes)
    assert res.pos_assigned_gt_inds[:2].tolist() == [0, 1]
    assert res.pos_gt_labels[:2].tolist() == [10, 11]
    assert res.num_gts == 2
    # Indices past the gts point at the original boxes shifted by K.
    assert torch.equal(res.pos_boxes[2:], boxes[res.pos_inds[2:] - 2])
    assert torch.equal(res.neg_boxes, boxes[res.neg_inds - 2])
    assert (before[res.neg_inds - 2] == 0).all()
    # The caller's assignment is untouched.
    assert torch.equal(assign.gt_inds, before)
    # Without gts nothing is added.
    empty = AssignResult(0, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.full((4,), -1))
    res = RandomSampler(8, 0.25).sample(empty, boxes[:4], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert res.num_pos == 0 and res.num_neg == 4 and res.pos_gt_boxes.shape == (0, 4)


def test_add_gt_needs_labels():
    assign, boxes, gt_boxes, _ = make_assign(5, 10, 0)
    with pytest.raises(ValueError, match="gt_labels"):
        RandomSampler(16, 0.25).sample(assign, boxes, gt_boxes, None)


def test_pseudo_sampler_takes_everything():
    assign, boxes, gt_boxes, gt_labels = make_assign(7, 30, 5)
    res = PseudoSampler().sample(assign, boxes, gt_boxes, gt_labels)
    assert res.pos_inds.tolist() == torch.nonzero(assign.gt_inds > 0).flatten().tolist()
    assert res.neg_inds.tolist() == torch.nonzero(assign.gt_inds == 0).flatten().tolist()
    assert res.num_pos == 7 and res.num_neg == 30
    check_consistent(res, assign, boxes, gt_boxes)
    assert build({"type": "PseudoSampler"}).sample(assign, boxes, gt_boxes).num_pos == 7


def test_seeded_generator_is_deterministic():
    assign, boxes, gt_boxes, gt_labels = make_assign(200, 800, 0)
    sampler = build({"type": "RandomSampler", "num": 256, "pos_fraction": 0.5, "add_gt_as_proposals": False})
    a = sampler.sample(assign, boxes, gt_boxes, gt_labels, generator=torch.Generator().manual_seed(3))
    b = sampler.sample(assign, boxes, gt_boxes, gt_labels, generator=torch.Generator().manual_seed(3))
    c = sampler.sample(assign, boxes, gt_boxes, gt_labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.pos_inds, b.pos_inds) and torch.equal(a.neg_inds, b.neg_inds)
    assert not torch.equal(a.pos_inds, c.pos_inds)
    assert not torch.equal(a.neg_inds, c.neg_inds)
    check_consistent(a, assign, boxes, gt_boxes)


def test_sampling_is_spread_over_candidates():
    # Not always the first positives: over a few seeds every positive gets picked at least once.
    assign, boxes, gt_boxes, gt_labels = make_assign(40, 100, 0)
    sampler = RandomSampler(20, 0.5, add_gt_as_proposals=False)
    seen = set()
    for seed in range(20):
        seen |= set(sampler.sample(assign, boxes, gt_boxes, gt_labels,
                                   generator=torch.Generator().manual_seed(seed)).pos_inds.tolist())
    assert seen == set(torch.nonzero(assign.gt_inds > 0).flatten().tolist())


def test_bad_arguments():
    with pytest.raises(ValueError):
        RandomSampler(0, 0.5)
    with pytest.raises(ValueError):
        RandomSampler(256, 1.5)
