"""Double-Head R-CNN's RoI head (Wu et al. 2019, Sec. 3.2): the box head's two branches pool different regions."""
from __future__ import annotations

import torch

from raydet.models.head_configs import DetectionConfig
from raydet.models.roi_heads.standard_roi_head import StandardRoIHead
from raydet.registry import register

__all__ = ["DoubleHeadRoIHead"]


@register
class DoubleHeadRoIHead(StandardRoIHead):
    """StandardRoIHead whose box head (:class:`DoubleConvFCBBoxHead`) gets two poolings of each RoI: the RoI itself
    for the classification (fc) branch, and the RoI enlarged ``reg_roi_scale_factor`` times about its centre for the
    regression (conv) branch, pooled on the FPN level of the original RoI (MMDetection's ``DoubleHeadRoIHead``).

    Args:
        reg_roi_scale_factor: width and height factor of the regression RoIs (MMDetection's config: 1.3).
        The others: :class:`StandardRoIHead`'s.
    """

    def __init__(self, bbox_roi_extractor, bbox_head, assigner, sampler, reg_roi_scale_factor: float = 1.3,
                 mask_roi_extractor=None, mask_head=None, test: DetectionConfig = DetectionConfig()):
        super().__init__(bbox_roi_extractor, bbox_head, assigner, sampler, mask_roi_extractor, mask_head, test)
        if reg_roi_scale_factor <= 0:
            raise ValueError(f"reg_roi_scale_factor must be > 0, got {reg_roi_scale_factor}")
        self.reg_roi_scale_factor = float(reg_roi_scale_factor)

    def bbox_forward(self, feats, rois: torch.Tensor):
        """(R, 5) RoIs -> (cls_score (R, C + 1), bbox_pred (R, 4C)) from the RoIs' and the enlarged RoIs' features."""
        cls_feats = self.bbox_roi_extractor(feats, rois)
        reg_feats = self.bbox_roi_extractor(feats, rois, roi_scale_factor=self.reg_roi_scale_factor)
        return self.bbox_head(cls_feats, reg_feats)
