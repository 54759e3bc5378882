"""The sampling flow every R-CNN sampler shares; a subclass says which positives and which negatives it picks."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.models.task_modules.samplers.sampling_result import SamplingResult, make_sampling_result

__all__ = ["BaseSampler", "random_subset"]


def random_subset(inds: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """At most ``num`` of ``inds`` chosen uniformly without replacement (all of them when there are fewer)."""
    num = max(int(num), 0)
    if inds.numel() <= num:
        return inds
    device = generator.device if generator is not None else inds.device
    perm = torch.randperm(inds.numel(), generator=generator, device=device)[:num].to(inds.device)
    return inds[perm]


class BaseSampler(ABC):
    """Pick up to ``num * pos_fraction`` positives, then negatives up to ``num`` in all (MMDetection's
    ``BaseSampler.sample``); a subclass defines :meth:`sample_pos` and :meth:`sample_neg`.

    Args:
        num: boxes per image.
        pos_fraction: the largest share of positives; missing positives are filled with negatives.
        neg_pos_ub: when >= 0, at most ``neg_pos_ub * max(1, num_pos)`` negatives.
        add_gt_as_proposals: prepend the gt boxes to the candidates as positives of their own gt (IoU 1).
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

    @abstractmethod
    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None, context: SamplingContext | None) -> Tensor:
        """Indices (into ``boxes``) of at most ``num_expected`` positives (``gt_inds > 0``)."""

    @abstractmethod
    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None, context: SamplingContext | None) -> Tensor:
        """Indices (into ``boxes``) of at most ``num_expected`` negatives (``gt_inds == 0``)."""

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               generator: torch.Generator | None = None, context: SamplingContext | None = None) -> SamplingResult:
        """Sample from N candidate boxes (N, 4) assigned to K gts (K, 4) with labels (K,).

        ``context`` carries what a loss-aware sampler (OHEM) needs from the calling RoI head; others ignore it.
        """
        boxes = boxes[:, :4]
        gt_flags = torch.zeros(boxes.shape[0], dtype=torch.uint8, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            if gt_labels is None:
                raise ValueError(f"{type(self).__name__}: gt_labels are needed when add_gt_as_proposals is True")
            boxes = torch.cat([gt_boxes[:, :4].to(boxes.dtype), boxes])
            assign_result = assign_result.clone()
            assign_result.add_gt_(gt_labels)
            gt_flags = torch.cat([torch.ones(gt_boxes.shape[0], dtype=torch.uint8, device=boxes.device), gt_flags])
        pos_inds = self.sample_pos(assign_result, int(self.num * self.pos_fraction), boxes, generator, context)
        pos_inds = pos_inds.unique()  # sorted ascending
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self.sample_neg(assign_result, num_neg, boxes, generator, context).unique()
        return make_sampling_result(pos_inds, neg_inds, boxes, gt_boxes, assign_result, gt_flags)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num={self.num}, pos_fraction={self.pos_fraction}, "
                f"neg_pos_ub={self.neg_pos_ub}, add_gt_as_proposals={self.add_gt_as_proposals})")

    @staticmethod
    def random_pos(assign_result: AssignResult, num_expected: int, generator: torch.Generator | None) -> Tensor:
        """Uniformly random positives (RandomSampler's choice)."""
        return random_subset(torch.nonzero(assign_result.gt_inds > 0).flatten(), num_expected, generator)

    @staticmethod
    def random_neg(assign_result: AssignResult, num_expected: int, generator: torch.Generator | None) -> Tensor:
        """Uniformly random negatives (RandomSampler's choice)."""
        return random_subset(torch.nonzero(assign_result.gt_inds == 0).flatten(), num_expected, generator)
