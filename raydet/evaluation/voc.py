"""Pascal VOC mean average precision.

Per class, detections of all images are ranked by score. Each is paired with the ground truth of its class in its
image that it overlaps most (difficult ones included, as the VOC devkit and MMDetection's ``eval_map`` do):

* IoU >= ``iou_thr`` with a difficult ground truth (record ``ignore``: VOC ``difficult``, COCO ``iscrowd`` or
  ``ignore``; the boxes training and COCOeval ignore too): neither true nor false positive;
* IoU >= ``iou_thr`` with a ground truth no higher-ranked detection took: true positive (it takes it);
* otherwise (low IoU, or the ground truth already taken): false positive.

Recall counts the non-difficult ground truths. AP is the area under the monotone precision envelope ("area",
VOC2010 and later) or the mean of the envelope at recall 0, 0.1, ..., 1 ("11points", VOC2007). Classes without
non-difficult ground truth are left out of the mean. Boxes are (x1, y1, x2, y2) with widths x2 - x1 (no +1).
"""
from __future__ import annotations

import numpy as np

from .coco import _numpy
from .recall import box_iou

__all__ = ["voc_map", "average_precision", "format_voc_table", "VOC_MODES"]

VOC_MODES = ("area", "11points")  # MMDetection's eval_map eval_mode; settings key evaluation.voc_mode


def average_precision(recall: np.ndarray, precision: np.ndarray, mode: str = "area") -> float:
    """AP from the (recall, precision) curve of the ranked detections (both (d,), recall non-decreasing)."""
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if mode == "area":
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision at this recall or beyond
        steps = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    if mode == "11points":
        levels = np.linspace(0.0, 1.0, 11)
        reached = recall[None, :] >= levels[:, None]  # (11, d)
        return float(np.where(reached, precision[None, :], 0.0).max(axis=1, initial=0.0).mean())
    raise ValueError(f"average_precision: mode must be one of {VOC_MODES}, got {mode!r}")


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def voc_map(predictions: list[dict], records: list[dict], num_classes: int, iou_thr: float = 0.5,
            mode: str = "area", class_names: list[str] | None = None) -> dict[str, float]:
    """VOC mAP of ``predictions`` (one per record, same order) against ``records``.

    Args:
        predictions: per image ``boxes`` (m, 4), ``scores`` (m,), ``labels`` (m,) in original image pixels
            (NumPy or torch).
        records: per image ``boxes`` (n, 4), ``labels`` (n,), optional ``ignore`` (n,) = difficult.
        num_classes: number of classes; labels are in [0, num_classes).
        iou_thr: a detection matches at IoU >= iou_thr.
        mode: "area" or "11points".
        class_names: names for the per-class keys (default the class index).

    Returns:
        ``{"voc/mAP": .., "voc/AP_<name>": ..}`` on a 0-1 scale; a class without ground truth has AP NaN.
    """
    if mode not in VOC_MODES:
        raise ValueError(f"voc_map: mode must be one of {VOC_MODES}, got {mode!r}")
    if len(predictions) != len(records):
        raise ValueError(f"voc_map: {len(predictions)} predictions for {len(records)} records")
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"voc_map: {len(names)} class_names for {num_classes} classes")

    # Every detection's best same-class ground truth (index into the concatenated ground truths) and its IoU.
    gt_labels, gt_ignore = [], []
    det_labels, det_scores, det_iou, det_gt = [], [], [], []
    num_gt = 0
    for i, (pred, rec) in enumerate(zip(predictions, records)):
        gb = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        gl = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        gi = np.asarray(rec.get("ignore", np.zeros(len(gl), bool)), dtype=bool).reshape(-1)
        db = _numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        ds = _numpy(pred["scores"]).astype(np.float64).reshape(-1)
        dl = _numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not (len(gb) == len(gl) == len(gi) and len(db) == len(ds) == len(dl)):
            raise ValueError(f"voc_map: image {i}: inconsistent lengths of boxes / labels / scores / ignore")
        for what, lab in (("record", gl), ("prediction", dl)):
            if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(f"voc_map: image {i}: {what} labels outside [0, {num_classes})")
        ious = np.where(dl[:, None] == gl[None, :], box_iou(db, gb), -1.0)  # (m, n); other classes never match
        if len(gl):
            det_iou.append(ious.max(axis=1))
            det_gt.append(ious.argmax(axis=1) + num_gt)
        else:
            det_iou.append(np.full(len(dl), -1.0))
            det_gt.append(np.zeros(len(dl), dtype=np.int64))
        det_labels.append(dl)
        det_scores.append(ds)
        gt_labels.append(gl)
        gt_ignore.append(gi)
        num_gt += len(gl)

    det_labels, det_scores = _cat(det_labels, np.int64), _cat(det_scores, np.float64)
    det_iou, det_gt = _cat(det_iou, np.float64), _cat(det_gt, np.int64)
    gt_labels, gt_ignore = _cat(gt_labels, np.int64), _cat(gt_ignore, bool)

    metrics: dict[str, float] = {}
    aps = []
    for c in range(num_classes):
        num_pos = int(np.count_nonzero((gt_labels == c) & ~gt_ignore))
        if num_pos == 0:
            metrics[f"voc/AP_{names[c]}"] = float("nan")
            continue
        idx = np.flatnonzero(det_labels == c)
        idx = idx[np.argsort(-det_scores[idx], kind="stable")]
        hit = det_iou[idx] >= iou_thr
        gt_idx = det_gt[idx]
        counted = ~(hit & gt_ignore[gt_idx])  # hits on difficult ground truth are dropped
        hit, gt_idx = hit[counted], gt_idx[counted]
        # A ground truth goes to the first (highest-scoring) detection that hits it; later hits are duplicates.
        tp = np.zeros(len(hit), dtype=bool)
        hits = np.flatnonzero(hit)
        _, first = np.unique(gt_idx[hits], return_index=True)
        tp[hits[first]] = True
        tp_cum = np.cumsum(tp)
        recall = tp_cum / num_pos
        precision = tp_cum / np.arange(1, len(tp) + 1)
        ap = average_precision(recall, precision, mode)
        metrics[f"voc/AP_{names[c]}"] = ap
        aps.append(ap)
    return {"voc/mAP": float(np.mean(aps)) if aps else 0.0, **metrics}


def format_voc_table(metrics: dict[str, float]) -> str:
    """A plain-text table of :func:`voc_map` metrics: AP per class, then mAP."""
    per_class = [(k[len("voc/AP_"):], v) for k, v in metrics.items() if k.startswith("voc/AP_")]
    width = max([len("mAP")] + [len(n) for n, _ in per_class])
    lines = [f"{'class':<{width}}  {'AP':>6}"]
    lines.extend(f"{n:<{width}}  {v:>6.3f}" for n, v in per_class)
    lines.append(f"{'mAP':<{width}}  {metrics.get('voc/mAP', float('nan')):>6.3f}")
    return "\n".join(lines)
