"""What a loss-aware sampler (OHEM) needs from the RoI head that calls it: one image's features and the box branch.

An RoI head passes ``context=SamplingContext(...)`` to ``sampler.sample``; samplers that do not rank by loss
ignore it. A cascade head passes the current stage's box forward and box head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["SamplingContext"]


@dataclass
class SamplingContext:
    """One image's view of an RoI head's box branch.

    Attributes:
        feats: the image's pyramid maps, each (1, C, H_l, W_l).
        bbox_forward: ``(feats, rois (R, 5): batch index, x1, y1, x2, y2 in input pixels) -> (cls_score (R, C + 1),
            bbox_pred)``, the head's box branch (``StandardRoIHead.bbox_forward``, or a cascade stage's).
        bbox_head: the box head of that branch: its ``loss_cls`` and ``num_classes``.
    """

    feats: tuple[Tensor, ...]
    bbox_forward: Callable[[tuple[Tensor, ...], Tensor], tuple[Tensor, Tensor]]
    bbox_head: nn.Module

    @torch.no_grad()
    def roi_cls_losses(self, boxes: Tensor, labels: Tensor) -> Tensor:
        """(R,) classification loss of each box (R, 4) for its label (R,) (``num_classes`` = background), from a
        forward pass of the current box branch without gradient (OHEM's read-only network, Shrivastava et al. 2016,
        Sec. 4.1)."""
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes[:, :4]], dim=1)
        cls_score = self.bbox_forward(self.feats, rois)[0]
        return self.bbox_head.loss_cls(cls_score, labels, reduction_override="none").reshape(-1)
