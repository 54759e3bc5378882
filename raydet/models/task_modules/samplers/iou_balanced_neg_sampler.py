"""IoU-balanced negative sampling (Libra R-CNN, Pang et al. 2019, Sec. 3.1): negatives drawn evenly from IoU bins,
so the rarer hard negatives (higher IoU with a gt) are not swamped by easy background."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.base_sampler import BaseSampler, random_subset
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.registry import register

__all__ = ["IoUBalancedNegSampler"]


def _without(inds: Tensor, taken: Tensor) -> Tensor:
    return inds[~torch.isin(inds, taken)]


@register
class IoUBalancedNegSampler(BaseSampler):
    """Positives uniformly at random; negatives IoU-balanced (MMDetection's ``IoUBalancedNegSampler``).

    When there are more negatives than ``num_expected``:

    * ``floor_thr`` > 0: negatives with IoU in [0, floor_thr) form the floor set, the rest (IoU >= floor_thr) the
      balanced set; ``floor_thr`` = 0: the floor set is IoU == 0; ``floor_thr`` = -1: no floor set, every negative
      is balanced (the bins then start at 0).
    * ``int(num_expected * (1 - floor_fraction))`` come from the balanced set: its IoU range [lower, M), M the
      largest IoU of any of the sampler's boxes (the gts added as proposals included, as MMDetection: then M = 1),
      is split into ``num_bins`` equal bins, each gives at most ``int(quota / num_bins)`` at random, and a shortfall
      is filled at random from the balanced negatives left (``num_bins`` = 1: uniformly at random).
    * the floor set fills up to ``num_expected``, then any negative left does.

    Args:
        num, pos_fraction, neg_pos_ub, add_gt_as_proposals: as :class:`BaseSampler` (unused when this sampler is
            a ``CombinedSampler``'s ``neg_sampler``: that sampler's own counts apply).
        floor_thr: -1 or >= 0 (Libra R-CNN: -1).
        floor_fraction: share of the negatives drawn from the floor set, in [0, 1] (Libra R-CNN: 0).
        num_bins: IoU bins, >= 1 (Libra R-CNN: 3, the paper's K).
    """

    def __init__(self, num: int = 512, pos_fraction: float = 0.25, floor_thr: float = -1, floor_fraction: float = 0.0,
                 num_bins: int = 3, neg_pos_ub: float = -1, add_gt_as_proposals: bool = True):
        super().__init__(num, pos_fraction, neg_pos_ub, add_gt_as_proposals)
        if not (floor_thr >= 0 or floor_thr == -1):
            raise ValueError(f"floor_thr must be -1 or >= 0, got {floor_thr}")
        if not 0.0 <= floor_fraction <= 1.0:
            raise ValueError(f"floor_fraction must be in [0, 1], got {floor_fraction}")
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.floor_thr = float(floor_thr)
        self.floor_fraction = float(floor_fraction)
        self.num_bins = int(num_bins)

    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        return self.random_pos(assign_result, num_expected, generator)

    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        neg = torch.nonzero(assign_result.gt_inds == 0).flatten()
        if neg.numel() <= num_expected:
            return neg
        iou = assign_result.max_overlaps[neg]
        if self.floor_thr > 0:
            floor, balanced = neg[iou < self.floor_thr], neg[iou >= self.floor_thr]
        elif self.floor_thr == 0:
            floor, balanced = neg[iou == 0], neg[iou > 0]
        else:
            floor, balanced = neg[:0], neg
        quota = int(num_expected * (1 - self.floor_fraction))
        if balanced.numel() <= quota:
            chosen = balanced
        elif self.num_bins >= 2:
            chosen = self._by_bins(assign_result.max_overlaps, balanced, quota, generator)
        else:
            chosen = random_subset(balanced, quota, generator)
        chosen = torch.cat([chosen, random_subset(floor, num_expected - chosen.numel(), generator)])
        if chosen.numel() < num_expected:
            chosen = torch.cat([chosen, random_subset(_without(neg, chosen), num_expected - chosen.numel(),
                                                      generator)])
        return chosen

    def _by_bins(self, max_overlaps: Tensor, balanced: Tensor, quota: int,
                 generator: torch.Generator | None) -> Tensor:
        """``quota`` of ``balanced``, at most ``int(quota / num_bins)`` per IoU bin, the shortfall at random."""
        lower = max(self.floor_thr, 0.0)
        width = (float(max_overlaps.max()) - lower) / self.num_bins
        iou = max_overlaps[balanced]
        per_bin = int(quota / self.num_bins)
        parts = []
        for b in range(self.num_bins):
            start, end = lower + b * width, lower + (b + 1) * width
            parts.append(random_subset(balanced[(iou >= start) & (iou < end)], per_bin, generator))
        chosen = torch.cat(parts)
        if chosen.numel() < quota:
            chosen = torch.cat([chosen, random_subset(_without(balanced, chosen), quota - chosen.numel(), generator)])
        return chosen

    def __repr__(self) -> str:
        return (f"{super().__repr__()[:-1]}, floor_thr={self.floor_thr}, floor_fraction={self.floor_fraction}, "
                f"num_bins={self.num_bins})")
