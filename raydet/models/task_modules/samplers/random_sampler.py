"""Random sampling of positives and negatives to a fixed number and positive fraction."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.base_sampler import BaseSampler
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.registry import register

__all__ = ["RandomSampler"]


@register
class RandomSampler(BaseSampler):
    """Sample ``num`` boxes with up to ``num * pos_fraction`` positives, uniformly at random (MMDetection's
    ``RandomSampler``); the arguments are :class:`~raydet.models.task_modules.samplers.base_sampler.BaseSampler`'s:
    ``num``, ``pos_fraction``, ``neg_pos_ub`` (when >= 0, at most ``neg_pos_ub * max(1, num_pos)`` negatives) and
    ``add_gt_as_proposals``. The RoI head's ``context`` is not used.
    """

    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None, context: SamplingContext | None) -> Tensor:
        return self.random_pos(assign_result, num_expected, generator)

    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None, context: SamplingContext | None) -> Tensor:
        return self.random_neg(assign_result, num_expected, generator)
