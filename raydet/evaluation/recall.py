"""Proposal recall: COCO-style AR@N through COCOeval, and a NumPy ``recall_at`` for VOC-style use.

:func:`evaluate_proposals` is what MMDetection reports for an RPN on COCO: COCOeval on boxes with
``useCats = 0`` (class-agnostic) and ``maxDets = proposal_nums``, AR@N = mean recall over IoU 0.5:0.95, all areas.
:func:`recall_at` is MMDetection's ``eval_recalls``: per image, ground truths and the top-N proposals are paired
greedily by highest IoU (one to one), and recall at a threshold is the fraction of ground truths whose pair reaches it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from .coco import _numpy, evaluate_coco

__all__ = ["box_iou", "evaluate_proposals", "recall_at", "COCO_IOU_THRS"]

# 0.5, 0.55, ..., 0.95 exactly as COCOeval builds them (np.arange(0.5, 0.96, 0.05) is off by 1e-16 from 0.6 on).
COCO_IOU_THRS = np.linspace(0.5, 0.95, 10)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) (x1, y1, x2, y2) boxes -> float64 (n, m) IoU; widths are x2 - x1; empty union gives 0."""
    a = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)[None, :, :]
    wh = (np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2])).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def evaluate_proposals(coco_gt: COCO, proposals: list[dict], image_ids: list[int],
                       proposal_nums: Sequence[int] = (100, 300, 1000)) -> dict[str, float]:
    """COCO average recall of class-agnostic proposals.

    Args:
        coco_gt: ground truth (crowd regions are ignored, as COCOeval does).
        proposals: one dict per image, ``boxes`` (n, 4) x1, y1, x2, y2 in original image pixels and ``scores`` (n,).
        image_ids: the COCO image id of each entry of ``proposals``.
        proposal_nums: the N of AR@N, increasing.

    Returns:
        ``{"proposal/AR@<n>": recall}`` on a 0-1 scale.
    """
    if len(proposals) != len(image_ids):
        raise ValueError(f"evaluate_proposals: {len(proposals)} proposal sets for {len(image_ids)} image ids")
    cat_id = int(coco_gt.getCatIds()[0]) if coco_gt.getCatIds() else 1  # ignored with useCats = 0
    results = []
    for props, image_id in zip(proposals, image_ids):
        boxes = _numpy(props["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _numpy(props["scores"]).astype(np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(f"evaluate_proposals: image {image_id} has {len(boxes)} boxes and {len(scores)} scores")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        results.extend({"image_id": int(image_id), "category_id": cat_id, "bbox": b, "score": s}
                       for b, s in zip(xywh.tolist(), scores.tolist()))
    return evaluate_coco(coco_gt, results, iou_types=("proposal",), proposal_nums=proposal_nums)


def _top_proposals(props: Any, num: int) -> np.ndarray:
    """The ``num`` highest-scoring boxes of one image: dict {boxes, scores}, (n, 5) with score last, or (n, 4) in order."""
    if isinstance(props, dict):
        boxes = _numpy(props["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = props.get("scores")
        scores = None if scores is None else _numpy(scores).astype(np.float64).reshape(-1)
    else:
        arr = _numpy(props).astype(np.float64)
        arr = arr.reshape(-1, arr.shape[-1]) if arr.size else arr.reshape(0, 4)
        if arr.shape[1] not in (4, 5):
            raise ValueError(f"recall_at: proposals must be (n, 4) or (n, 5), got {arr.shape}")
        boxes, scores = arr[:, :4], (arr[:, 4] if arr.shape[1] == 5 else None)
    if scores is not None:
        boxes = boxes[np.argsort(-scores, kind="stable")]
    return boxes[:num]


def _greedy_match_ious(ious: np.ndarray, min_iou: float) -> np.ndarray:
    """IoU of each ground truth (row) with its greedy one-to-one partner; -1 for unpaired or below ``min_iou``.

    Repeatedly take the highest remaining IoU (first ground truth, then first proposal, on ties), record it for
    that ground truth and remove its row and column. Pairs below ``min_iou`` cannot count, so stop there.
    """
    ious = ious.copy()
    out = np.full(ious.shape[0], -1.0)
    for _ in range(min(ious.shape)):
        flat = int(ious.argmax())
        g, p = divmod(flat, ious.shape[1])
        if ious[g, p] < min_iou:
            break
        out[g] = ious[g, p]
        ious[g, :] = -1.0
        ious[:, p] = -1.0
    return out


def recall_at(proposals: list, gt_boxes: list, num: int,
              iou_thrs: Sequence[float] | np.ndarray = COCO_IOU_THRS) -> float:
    """Average recall of the top-``num`` proposals over ``iou_thrs`` (MMDetection's ``eval_recalls``).

    Args:
        proposals: per image, a dict ``{"boxes": (n, 4), "scores": (n,)}``, an (n, 5) array with the score last,
            or an (n, 4) array already sorted by score (NumPy or torch).
        gt_boxes: per image, (k, 4) ground-truth boxes (drop difficult / crowd ones beforehand).
        num: proposals kept per image.
        iou_thrs: IoU thresholds; a pair counts at ``thr`` when IoU >= thr.

    Returns:
        The fraction of all ground truths recalled, averaged over the thresholds (0 when there is none).
    """
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"recall_at: {len(proposals)} proposal sets for {len(gt_boxes)} ground-truth sets")
    thrs = np.atleast_1d(np.asarray(iou_thrs, dtype=np.float64))
    matched = [_greedy_match_ious(box_iou(_numpy(g).reshape(-1, 4), _top_proposals(p, num)), float(thrs.min()))
               for p, g in zip(proposals, gt_boxes)]
    matched = np.concatenate(matched) if matched else np.zeros(0)
    if matched.size == 0:
        return 0.0
    return float((matched[:, None] >= thrs[None, :]).mean(axis=0).mean())
