"""Cascade R-CNN (Cai and Vasconcelos 2018): RPN proposals refined by a cascade of RoI heads; with per-stage mask
heads it is Cascade Mask R-CNN (MMDetection's ``CascadeRCNN`` covers both)."""
from __future__ import annotations

from raydet.models.detectors.detectors import TwoStageDetector
from raydet.registry import register

__all__ = ["CascadeRCNN"]


@register
class CascadeRCNN(TwoStageDetector):
    """A two-stage detector whose ``roi_head`` is a cascade (e.g. ``CascadeRoIHead``); the batch needs ``gt_masks``
    when the head has mask heads."""

    def loss(self, batch):
        if getattr(self.roi_head, "with_mask", False) and "gt_masks" not in batch:
            raise ValueError(f"{type(self).__name__} training with mask heads needs 'gt_masks' in the batch "
                             "(annotations with masks)")
        return super().loss(batch)
