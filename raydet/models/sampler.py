"""Pick the positive and negative boxes that a head trains on, from an ``AssignResult``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raydet.models.assigner import AssignResult
from raydet.registry import register

__all__ = ["SamplingResult", "RandomSampler", "PseudoSampler"]


@dataclass
class SamplingResult:
    """Sampled boxes of one image.

    Indices refer to the sampler's box list: the K gts followed by the N candidates when gts were added as proposals,
    the N candidates otherwise.

    Attributes:
        pos_inds, neg_inds: (P,), (Q,) long, sorted ascending.
        pos_boxes, neg_boxes: (P, 4), (Q, 4).
        pos_gt_boxes: (P, 4) the gt box of each positive.
        pos_assigned_gt_inds: (P,) long, 0-based gt index of each positive.
        pos_gt_labels: (P,) long.
        pos_is_gt: (P,) uint8, 1 where the positive is a gt added as a proposal.
        num_gts: K.
    """

    pos_inds: Tensor
    neg_inds: Tensor
    pos_boxes: Tensor
    neg_boxes: Tensor
    pos_gt_boxes: Tensor
    pos_assigned_gt_inds: Tensor
    pos_gt_labels: Tensor
    pos_is_gt: Tensor
    num_gts: int = 0

    @property
    def boxes(self) -> Tensor:
        """(P + Q, 4) positives then negatives."""
        return torch.cat([self.pos_boxes, self.neg_boxes])

    @property
    def num_pos(self) -> int:
        return int(self.pos_inds.numel())

    @property
    def num_neg(self) -> int:
        return int(self.neg_inds.numel())


def _make_result(pos_inds: Tensor, neg_inds: Tensor, boxes: Tensor, gt_boxes: Tensor, assign_result: AssignResult,
                 gt_flags: Tensor) -> SamplingResult:
    pos_assigned = assign_result.gt_inds[pos_inds] - 1
    gt_boxes = gt_boxes.reshape(-1, 4).to(boxes.dtype)
    if gt_boxes.shape[0] == 0:
        pos_gt_boxes = gt_boxes.new_zeros((0, 4))
    else:
        pos_gt_boxes = gt_boxes[pos_assigned]
    return SamplingResult(
        pos_inds=pos_inds, neg_inds=neg_inds, pos_boxes=boxes[pos_inds], neg_boxes=boxes[neg_inds],
        pos_gt_boxes=pos_gt_boxes, pos_assigned_gt_inds=pos_assigned, pos_gt_labels=assign_result.labels[pos_inds],
        pos_is_gt=gt_flags[pos_inds], num_gts=int(gt_boxes.shape[0]))


def _random_subset(inds: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    """At most ``num`` of ``inds`` chosen uniformly without replacement, sorted ascending."""
    if inds.numel() <= num:
        return inds
    device = generator.device if generator is not None else inds.device
    perm = torch.randperm(inds.numel(), generator=generator, device=device)[:num].to(inds.device)
    return inds[perm].sort().values


@register
class RandomSampler:
    """Sample ``num`` boxes with up to ``num * pos_fraction`` positives, uniformly at random.

    Args:
        num: boxes per image.
        pos_fraction: the largest share of positives; missing positives are filled with negatives.
        neg_pos_ub: when >= 0, at most ``neg_pos_ub * max(1, num_pos)`` negatives.
        add_gt_as_proposals: prepend the gt boxes to the candidates as positives of their own gt.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1, add_gt_as_proposals: bool = True):
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = float(neg_pos_ub)
        self.add_gt_as_proposals = add_gt_as_proposals

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> SamplingResult:
        """Sample from N candidate boxes (N, 4) assigned to K gts (K, 4) with labels (K,)."""
        boxes = boxes[:, :4]
        gt_flags = torch.zeros(boxes.shape[0], dtype=torch.uint8, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            if gt_labels is None:
                raise ValueError("RandomSampler: gt_labels are needed when add_gt_as_proposals is True")
            boxes = torch.cat([gt_boxes[:, :4].to(boxes.dtype), boxes])
            assign_result = assign_result.clone()
            assign_result.add_gt_(gt_labels)
            gt_flags = torch.cat([torch.ones(gt_boxes.shape[0], dtype=torch.uint8, device=boxes.device), gt_flags])

        pos_all = torch.nonzero(assign_result.gt_inds > 0).flatten()
        neg_all = torch.nonzero(assign_result.gt_inds == 0).flatten()
        pos_inds = _random_subset(pos_all, int(self.num * self.pos_fraction), generator)
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = _random_subset(neg_all, num_neg, generator)
        return _make_result(pos_inds, neg_inds, boxes, gt_boxes, assign_result, gt_flags)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num={self.num}, pos_fraction={self.pos_fraction}, "
                f"neg_pos_ub={self.neg_pos_ub}, add_gt_as_proposals={self.add_gt_as_proposals})")


@register
class PseudoSampler:
    """No sampling: every positive (gt_inds > 0) and every negative (gt_inds == 0)."""

    def __init__(self):
        pass

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               generator: torch.Generator | None = None) -> SamplingResult:
        boxes = boxes[:, :4]
        pos_inds = torch.nonzero(assign_result.gt_inds > 0).flatten()
        neg_inds = torch.nonzero(assign_result.gt_inds == 0).flatten()
        gt_flags = torch.zeros(boxes.shape[0], dtype=torch.uint8, device=boxes.device)
        return _make_result(pos_inds, neg_inds, boxes, gt_boxes, assign_result, gt_flags)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
