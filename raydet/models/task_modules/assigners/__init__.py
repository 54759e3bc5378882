"""Assigners: each prior to a ground-truth box, to the background, or to "ignore" (an ``AssignResult``)."""
from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.assigners.max_iou_assigner import MaxIoUAssigner
from raydet.models.task_modules.assigners.approx_max_iou_assigner import ApproxMaxIoUAssigner
from raydet.models.task_modules.assigners.center_region_assigner import CenterRegionAssigner, CenterRegionAssignResult

__all__ = ["AssignResult", "MaxIoUAssigner", "ApproxMaxIoUAssigner", "CenterRegionAssigner", "CenterRegionAssignResult"]
