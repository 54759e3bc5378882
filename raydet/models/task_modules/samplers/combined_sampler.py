"""One sampler's positives with another's negatives (MMDetection's ``CombinedSampler``; Libra R-CNN pairs
instance-balanced positives with IoU-balanced negatives)."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.base_sampler import BaseSampler
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.registry import register

__all__ = ["CombinedSampler"]


@register
class CombinedSampler(BaseSampler):
    """``num``, ``pos_fraction``, ``neg_pos_ub`` and ``add_gt_as_proposals`` as :class:`BaseSampler`; positives
    chosen by ``pos_sampler.sample_pos`` and negatives by ``neg_sampler.sample_neg`` (their own counts unused).

    Args:
        pos_sampler, neg_sampler: samplers (e.g. ``{type: InstanceBalancedPosSampler}``,
            ``{type: IoUBalancedNegSampler, floor_thr: -1, floor_fraction: 0, num_bins: 3}``).
    """

    def __init__(self, num: int, pos_fraction: float, pos_sampler, neg_sampler, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        super().__init__(num, pos_fraction, neg_pos_ub, add_gt_as_proposals)
        for key, sampler, method in (("pos_sampler", pos_sampler, "sample_pos"),
                                     ("neg_sampler", neg_sampler, "sample_neg")):
            if not callable(getattr(sampler, method, None)):
                raise ValueError(f"CombinedSampler: {key} must be a sampler with {method} (e.g. "
                                 f"InstanceBalancedPosSampler, IoUBalancedNegSampler), got {type(sampler).__name__}")
        self.pos_sampler = pos_sampler
        self.neg_sampler = neg_sampler

    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        return self.pos_sampler.sample_pos(assign_result, num_expected, boxes, generator, context)

    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        return self.neg_sampler.sample_neg(assign_result, num_expected, boxes, generator, context)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, pos_sampler={self.pos_sampler!r}, neg_sampler={self.neg_sampler!r})"
