"""Small typed settings shared by heads (the registry checks their keys and types when a pipeline is loaded)."""
from __future__ import annotations

from dataclasses import dataclass

from raydet.registry import closest

__all__ = ["ProposalConfig", "DetectionConfig"]

# mmcv's soft_nms defaults (mmcv/ops/nms.py: sigma=0.5, min_score=1e-3, method='linear')
_SOFT_NMS_DEFAULTS = {"method": "linear", "sigma": 0.5, "min_score": 1e-3}


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

    nms: which suppression, as MMDetection's ``test_cfg.nms`` (its threshold stays ``nms_iou``): None or
    ``{type: nms}`` is hard NMS (drop boxes with IoU > nms_iou); ``{type: soft_nms, method, sigma, min_score}`` is
    Soft-NMS (Bodla et al. 2017, Algorithm 1, class-wise): ``method: linear`` scales a score by (1 - IoU) when
    IoU >= nms_iou, ``gaussian`` by exp(-IoU^2 / sigma); boxes decayed below ``min_score`` are dropped. Defaults
    as mmcv's ``soft_nms`` (mmcv/ops/nms.py): linear, sigma 0.5, min_score 1e-3.

    min_bbox_size: candidate boxes narrower or lower than this many pixels are dropped before NMS (torchvision's
    ``remove_small_boxes(boxes, min_size=1e-2)``; 0 keeps all). mask_paste: how mask probabilities are pasted into
    the image: ``grid_sample`` (bilinear at each pixel centre, Detectron2's ``paste_masks_in_image``) or
    ``torchvision`` (torchvision's ``paste_masks_in_image``: the mask padded by one cell, resized to the box rounded
    to whole pixels).
    """

    nms_pre: int = 1000
    score_thr: float = 0.05
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    nms: dict | None = None
    min_bbox_size: float = 0.0
    mask_paste: str = "grid_sample"

    def __post_init__(self):
        if self.mask_paste not in ("grid_sample", "torchvision"):
            raise ValueError(f"mask_paste must be one of grid_sample, torchvision, got {self.mask_paste!r}")
        self.soft_nms_args()  # checks `nms`

    def soft_nms_args(self) -> dict | None:
        """Keyword arguments of :func:`raydet.ops.soft_nms` (without the IoU threshold), or None for hard NMS.

        Raises:
            ValueError: ``nms`` has an unknown type, method or key, or a sigma <= 0 or min_score < 0.
        """
        nms = dict(self.nms or {})
        kind = nms.pop("type", "nms")
        if kind not in ("nms", "soft_nms"):
            raise ValueError(f"nms.type must be nms or soft_nms, got {kind!r}")
        allowed = {"nms": {}, "soft_nms": _SOFT_NMS_DEFAULTS}[kind]
        unknown = sorted(set(nms) - set(allowed))
        if unknown:
            raise ValueError(f"nms: unknown key {unknown[0]!r} for type {kind}{closest(unknown[0], allowed)} "
                             f"(the IoU threshold is nms_iou)")
        if kind == "nms":
            return None
        args = {**_SOFT_NMS_DEFAULTS, **nms}
        if args["method"] not in ("linear", "gaussian"):
            raise ValueError(f"nms.method must be linear or gaussian, got {args['method']!r}")
        if not float(args["sigma"]) > 0:
            raise ValueError(f"nms.sigma must be > 0, got {args['sigma']}")
        if not float(args["min_score"]) >= 0:
            raise ValueError(f"nms.min_score must be >= 0, got {args['min_score']}")
        return {"method": args["method"], "sigma": float(args["sigma"]), "min_score": float(args["min_score"])}
