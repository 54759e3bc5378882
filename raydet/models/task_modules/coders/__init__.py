"""Box coders: boxes <-> the regression targets a head predicts."""
from raydet.models.task_modules.coders.delta_xywh_bbox_coder import DeltaXYWHBBoxCoder
from raydet.models.task_modules.coders.distance_point_bbox_coder import DistancePointBBoxCoder
from raydet.models.task_modules.coders.tblr_bbox_coder import TBLRBBoxCoder

__all__ = ["DeltaXYWHBBoxCoder", "DistancePointBBoxCoder", "TBLRBBoxCoder"]
