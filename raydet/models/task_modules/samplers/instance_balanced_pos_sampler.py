"""Instance-balanced positive sampling (Libra R-CNN's R-CNN sampler in MMDetection; Pang et al. 2019): each gt
contributes about the same number of positives, so large objects with many overlapping proposals do not dominate."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.base_sampler import BaseSampler, random_subset
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.registry import register

__all__ = ["InstanceBalancedPosSampler"]


@register
class InstanceBalancedPosSampler(BaseSampler):
    """Positives balanced over gts, negatives uniformly at random (MMDetection's ``InstanceBalancedPosSampler``).

    With more positives than ``num_expected`` among G gts, each gt keeps at most ``round(num_expected / G) + 1`` of
    its positives (chosen at random); a shortfall is filled at random from the positives left, an excess is cut at
    random to ``num_expected``.

    Args:
        num, pos_fraction, neg_pos_ub, add_gt_as_proposals: as :class:`BaseSampler` (unused when this sampler is
            a ``CombinedSampler``'s ``pos_sampler``: that sampler's own counts apply).
    """

    def __init__(self, num: int = 512, pos_fraction: float = 0.25, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        super().__init__(num, pos_fraction, neg_pos_ub, add_gt_as_proposals)

    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        gt_inds = assign_result.gt_inds
        pos = torch.nonzero(gt_inds > 0).flatten()
        if pos.numel() <= num_expected:
            return pos
        gts = gt_inds[pos].unique()
        per_gt = round(num_expected / gts.numel()) + 1
        chosen = torch.cat([random_subset(pos[gt_inds[pos] == g], per_gt, generator) for g in gts])
        if chosen.numel() < num_expected:
            left = pos[~torch.isin(pos, chosen)]
            chosen = torch.cat([chosen, random_subset(left, num_expected - chosen.numel(), generator)])
        elif chosen.numel() > num_expected:
            chosen = random_subset(chosen, num_expected, generator)
        return chosen

    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        return self.random_neg(assign_result, num_expected, generator)
