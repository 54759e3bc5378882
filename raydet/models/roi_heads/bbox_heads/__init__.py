"""Box heads of the RoI stage: pooled RoI features -> class scores and box deltas, one module per kind."""
from raydet.models.roi_heads.bbox_heads.convfc_bbox_head import (ConvFCBBoxHead, Shared2FCBBoxHead,
                                                                 Shared4Conv1FCBBoxHead)

__all__ = ["ConvFCBBoxHead", "Shared2FCBBoxHead", "Shared4Conv1FCBBoxHead"]
