"""R-FCN's RoI stage (Dai et al. 2016): position-sensitive score maps computed once per image, pooled per RoI."""
from __future__ import annotations

import torch

from raydet.models.head_configs import DetectionConfig
from raydet.models.roi_heads.standard_roi_head import StandardRoIHead
from raydet.registry import register

__all__ = ["RFCNRoIHead"]


@register
class RFCNRoIHead(StandardRoIHead):
    """:class:`StandardRoIHead` (sampling, targets, losses, NMS) whose box branch is fully convolutional: the box
    head (:class:`~raydet.models.roi_heads.bbox_heads.RFCNBBoxHead`) turns the one feature map into score maps, the
    extractor (:class:`~raydet.models.roi_heads.roi_extractors.PSRoIExtractor`) PS-pools them per RoI, and the bins
    vote. There is no per-RoI layer with weights (paper Sec. 2). ``feats`` is a one-map tuple (C5 at stride 16)."""

    def __init__(self, bbox_roi_extractor, bbox_head, assigner, sampler, test: DetectionConfig = DetectionConfig()):
        super().__init__(bbox_roi_extractor, bbox_head, assigner, sampler, test=test)

    def bbox_forward(self, feats, rois: torch.Tensor):
        if len(feats) != 1:
            raise ValueError(f"RFCNRoIHead takes one feature map (C5), got {len(feats)}")
        cls_maps, reg_maps = self.bbox_head.score_maps(feats[0])
        return self.bbox_head(self.bbox_roi_extractor(cls_maps, rois), self.bbox_roi_extractor(reg_maps, rois))
