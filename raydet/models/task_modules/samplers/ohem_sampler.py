"""Online hard example mining for R-CNN heads (Shrivastava et al. 2016, "Training Region-based Object Detectors
with Online Hard Example Mining", Sec. 4): the RoIs a head trains on are those of highest loss under the current
box branch, found by a forward pass without gradient (the paper's read-only RoI network)."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.samplers.base_sampler import BaseSampler
from raydet.models.task_modules.samplers.sampling_context import SamplingContext
from raydet.registry import register

__all__ = ["OHEMSampler"]


@register
class OHEMSampler(BaseSampler):
    """The hardest positives (up to ``num * pos_fraction``) and the hardest negatives (up to ``num`` in all), ranked
    by their classification loss (MMDetection's ``OHEMSampler`` with ``loss_key='loss_cls'``): a positive's loss for
    its gt's label, a negative's for the background. Where there are no more candidates than wanted, all are kept.
    Among equal losses the lower index wins.

    The calling RoI head passes ``context`` (:class:`SamplingContext`: the image's features, its box branch and box
    head, or a cascade stage's); ``StandardRoIHead`` does.

    Args:
        num, pos_fraction, neg_pos_ub, add_gt_as_proposals: as :class:`BaseSampler` (MMDetection's R-CNN: 512,
            0.25, -1, True).
    """

    def __init__(self, num: int = 512, pos_fraction: float = 0.25, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        super().__init__(num, pos_fraction, neg_pos_ub, add_gt_as_proposals)

    @staticmethod
    def _hardest(inds: Tensor, num_expected: int, boxes: Tensor, labels: Tensor,
                 context: SamplingContext | None) -> Tensor:
        if inds.numel() <= num_expected:
            return inds
        if context is None:
            raise ValueError("OHEMSampler ranks RoIs by their loss and needs the RoI head's context=SamplingContext"
                             "(feats, bbox_forward, bbox_head); call it from an RoI head that passes one")
        losses = context.roi_cls_losses(boxes[inds], labels)
        order = losses.sort(descending=True, stable=True).indices[:num_expected]
        return inds[order]

    def sample_pos(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        pos = torch.nonzero(assign_result.gt_inds > 0).flatten()
        return self._hardest(pos, num_expected, boxes, assign_result.labels[pos], context)

    def sample_neg(self, assign_result: AssignResult, num_expected: int, boxes: Tensor,
                   generator: torch.Generator | None = None, context: SamplingContext | None = None) -> Tensor:
        neg = torch.nonzero(assign_result.gt_inds == 0).flatten()
        if neg.numel() > num_expected and context is not None:
            labels = neg.new_full((neg.numel(),), int(context.bbox_head.num_classes))
        else:
            labels = neg
        return self._hardest(neg, num_expected, boxes, labels, context)
