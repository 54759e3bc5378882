"""Box coders: boxes <-> the regression targets a head predicts."""
from raydet.models.task_modules.coders.delta_xywh_bbox_coder import DeltaXYWHBBoxCoder

__all__ = ["DeltaXYWHBBoxCoder"]
