"""Every assigned positive and negative box, unsampled (for heads that weigh all boxes, e.g. RetinaNet)."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.sampling_result import SamplingResult, make_sampling_result
from raydet.registry import register

__all__ = ["PseudoSampler"]


@register
class PseudoSampler:
    """No sampling: every positive (gt_inds > 0) and every negative (gt_inds == 0)."""

    def __init__(self):
        pass

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               generator: torch.Generator | None = None, context=None) -> SamplingResult:
        """``context`` (an RoI head's ``SamplingContext``, for loss-ranking samplers) is not used."""
        boxes = boxes[:, :4]
        pos_inds = torch.nonzero(assign_result.gt_inds > 0).flatten()
        neg_inds = torch.nonzero(assign_result.gt_inds == 0).flatten()
        gt_flags = torch.zeros(boxes.shape[0], dtype=torch.uint8, device=boxes.device)
        return make_sampling_result(pos_inds, neg_inds, boxes, gt_boxes, assign_result, gt_flags)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
