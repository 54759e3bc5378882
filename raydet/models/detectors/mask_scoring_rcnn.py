"""Mask Scoring R-CNN (Huang et al. 2019): Mask R-CNN whose masks are scored by a MaskIoU head."""
from __future__ import annotations

from raydet.models.detectors.base import require_component
from raydet.models.detectors.detectors import MaskRCNN
from raydet.registry import register

__all__ = ["MaskScoringRCNN"]


@register
class MaskScoringRCNN(MaskRCNN):
    """Mask R-CNN with a :class:`~raydet.models.roi_heads.MaskScoringRoIHead`; predictions add ``mask_scores``."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        require_component(type(self).__name__, "roi_head", getattr(roi_head, "mask_iou_head", None), ("forward",),
                          "a roi_head with a mask_iou_head (e.g. {type: MaskScoringRoIHead, ...})")
        super().__init__(backbone, neck, rpn_head, roi_head)
