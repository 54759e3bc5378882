"""Hybrid Task Cascade (Chen et al. 2019): Cascade Mask R-CNN with interleaved box / mask branches, mask information
flow and an optional semantic segmentation branch (MMDetection's ``HybridTaskCascade``)."""
from __future__ import annotations

from raydet.models.detectors.cascade_rcnn import CascadeRCNN
from raydet.registry import register

__all__ = ["HybridTaskCascade"]


@register
class HybridTaskCascade(CascadeRCNN):
    """A CascadeRCNN whose ``roi_head`` is a HybridTaskCascadeRoIHead; the batch needs ``gt_masks``, and
    ``gt_semantic_seg`` (B, H, W) class maps when the head has a semantic branch."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        super().__init__(backbone, neck, rpn_head, roi_head)
        if not getattr(roi_head, "with_mask", False):
            raise ValueError("HybridTaskCascade needs roi_head.mask_roi_extractor and roi_head.mask_head")

    @property
    def with_semantic(self) -> bool:
        return bool(getattr(self.roi_head, "with_semantic", False))
