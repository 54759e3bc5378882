"""Box heads of the RoI stage: pooled RoI features -> class scores and box deltas, one module per kind."""
from raydet.models.roi_heads.bbox_heads.convfc_bbox_head import (ConvFCBBoxHead, Shared2FCBBoxHead,
                                                                 Shared4Conv1FCBBoxHead)
from raydet.models.roi_heads.bbox_heads.double_bbox_head import DoubleConvFCBBoxHead
from raydet.models.roi_heads.bbox_heads.cls_only_bbox_head import Shared2FCClsOnlyBBoxHead
from raydet.models.roi_heads.bbox_heads.rfcn_bbox_head import RFCNBBoxHead

__all__ = ["ConvFCBBoxHead", "Shared2FCBBoxHead", "Shared4Conv1FCBBoxHead", "DoubleConvFCBBoxHead",
           "Shared2FCClsOnlyBBoxHead", "RFCNBBoxHead"]
