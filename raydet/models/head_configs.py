"""Small typed settings shared by heads (the registry checks their keys and types when a pipeline is loaded)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ProposalConfig", "DetectionConfig"]


@dataclass
class ProposalConfig:
    """How the RPN turns its dense outputs into proposals (per image).

    nms_pre: top-scoring anchors kept per level before NMS; nms_iou: NMS IoU threshold; max_per_img: proposals kept
    after NMS; min_bbox_size: proposals with width or height <= this (pixels) are dropped.
    """

    nms_pre: int = 1000
    max_per_img: int = 1000
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0


@dataclass
class DetectionConfig:
    """Test-time post-processing of class scores and boxes (per image).

    nms_pre: top candidates kept per level before NMS (dense heads; -1 keeps all); score_thr: minimum class score;
    nms_iou: class-wise NMS IoU threshold; max_per_img: detections kept; mask_thr: mask binarisation threshold.
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
