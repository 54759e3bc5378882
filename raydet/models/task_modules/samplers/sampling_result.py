"""The boxes a head trains on, picked from an ``AssignResult`` by a sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult

__all__ = ["SamplingResult", "make_sampling_result"]


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


def make_sampling_result(pos_inds: Tensor, neg_inds: Tensor, boxes: Tensor, gt_boxes: Tensor, assign_result: AssignResult,
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
