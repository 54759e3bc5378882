"""Grid R-CNN (Lu et al. 2019): a two-stage detector whose RoI head locates boxes by grid-point heatmaps."""
from __future__ import annotations

from raydet.models.detectors.base import require_component
from raydet.models.detectors.detectors import TwoStageDetector
from raydet.registry import register

__all__ = ["GridRCNN"]


@register
class GridRCNN(TwoStageDetector):
    """RPN proposals, classified and located by a ``GridRoIHead`` (MMDetection's ``GridRCNN``); the batch needs
    ``gt_masks`` when the head has a mask branch."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        super().__init__(backbone, neck, rpn_head, roi_head)
        require_component(type(self).__name__, "roi_head", roi_head, ("grid_loss",),
                          "a roi_head with a grid head (e.g. {type: GridRoIHead, ...})")

    def loss(self, batch):
        if getattr(self.roi_head, "with_mask", False) and "gt_masks" not in batch:
            raise ValueError("GridRCNN training with a mask head needs 'gt_masks' in the batch (annotations with "
                             "masks)")
        return super().loss(batch)
