"""Evaluation: COCO (COCOeval box / mask AP), proposal recall, Pascal VOC mAP."""
from .coco import (COCO_METRIC_NAMES, coco_from_records, coco_gt_from_json, evaluate_coco, format_coco_table,
                   predictions_to_coco_results, write_coco_results)
from .recall import COCO_IOU_THRS, box_iou, evaluate_proposals, recall_at
from .voc import average_precision, format_voc_table, voc_map

__all__ = [
    "COCO_METRIC_NAMES", "coco_from_records", "coco_gt_from_json", "evaluate_coco", "format_coco_table",
    "predictions_to_coco_results", "write_coco_results", "COCO_IOU_THRS", "box_iou", "evaluate_proposals", "recall_at",
    "average_precision", "format_voc_table", "voc_map",
]
