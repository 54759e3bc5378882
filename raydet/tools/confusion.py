"""The detection confusion matrix (MMDetection's ``tools/analysis_tools/confusion_matrix.py``), counted and drawn.

Rows are ground-truth classes, columns predicted classes; the last row and column are "background". Per image,
for every detection scoring at least ``score_thr``:

* each ground-truth box it overlaps with IoU >= ``tp_iou_thr`` adds 1 to ``[gt class, predicted class]`` (a
  detection overlapping two boxes counts twice, as in MMDetection), and a box so matched by a detection of its own
  class is found;
* a detection that matches no ground-truth box adds 1 to ``[background, predicted class]`` (a false positive on
  background), unless it lies on an ignored (crowd / difficult) box: intersection over the detection's area >=
  ``tp_iou_thr``, as COCOeval treats crowd regions; such detections count nowhere;
* every (non-ignored) ground-truth box not found adds 1 to ``[gt class, background]`` (a missed object).

The figure shows each row as percentages of the row's total (MMDetection's normalisation), with the counts.
"""
from __future__ import annotations

import numpy as np

__all__ = ["box_iou", "box_iof", "confusion_matrix", "plot_confusion_matrix"]


def _inter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    return wh[..., 0] * wh[..., 1]


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) x1, y1, x2, y2 boxes -> (n, m) intersection over union (0 where the union is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = _inter(a, b)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iof(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) intersection over the area of ``a``'s boxes (the "foreground"; 0 for empty boxes)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    inter = _inter(a, b)
    area = _area(a)[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def confusion_matrix(ground_truth: list[dict], detections: list[dict], num_classes: int, *, score_thr: float = 0.3,
                     tp_iou_thr: float = 0.5) -> np.ndarray:
    """Count the confusion matrix over images (see the module docstring).

    Args:
        ground_truth: per image ``{"boxes": (n, 4) xyxy, "labels": (n,), "ignore": (n,) bool (optional)}``.
        detections: per image, same order, ``{"boxes": (k, 4) xyxy, "scores": (k,), "labels": (k,)}``.
        num_classes: C; labels are 0..C-1.

    Returns int64 (C + 1, C + 1): ``[gt class, predicted class]``, index C = background.
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"confusion_matrix: {len(ground_truth)} ground-truth images but {len(detections)} "
                         f"detection lists")
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    bg = num_classes
    for gt, det in zip(ground_truth, detections):
        gt_boxes = np.asarray(gt["boxes"], np.float64).reshape(-1, 4)
        gt_labels = np.asarray(gt["labels"], np.int64).reshape(-1)
        ignore = np.asarray(gt.get("ignore", np.zeros(len(gt_labels), bool)), bool).reshape(-1)
        scores = np.asarray(det["scores"], np.float64).reshape(-1)
        keep = scores >= score_thr
        det_boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)[keep]
        det_labels = np.asarray(det["labels"], np.int64).reshape(-1)[keep]
        iou = box_iou(det_boxes, gt_boxes[~ignore]) >= tp_iou_thr         # (k, n_kept)
        on_ignored = (box_iof(det_boxes, gt_boxes[ignore]) >= tp_iou_thr).any(axis=1)
        kept_labels = gt_labels[~ignore]
        found = np.zeros(len(kept_labels), bool)
        for i, label in enumerate(det_labels):
            hits = np.flatnonzero(iou[i])
            if len(hits):
                np.add.at(matrix, (kept_labels[hits], label), 1)
                found[hits[kept_labels[hits] == label]] = True
            elif not on_ignored[i]:
                matrix[bg, label] += 1
        np.add.at(matrix, (kept_labels[~found], bg), 1)
    return matrix


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: str, *,
                          title: str = "Confusion matrix", cmap: str = "plasma") -> None:
    """Draw ``matrix`` ((C + 1, C + 1) counts) as a PNG: each row in percent of its total, cells annotated with
    the percentage and the count; rows ground truth, columns predictions, ``background`` last."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix, np.float64)
    names = list(class_names) + ["background"]
    n = len(names)
    totals = matrix.sum(axis=1, keepdims=True)
    percent = np.divide(100 * matrix, totals, out=np.full_like(matrix, np.nan), where=totals > 0)
    size = max(4.0, 0.6 * n + 2.0)
    fig = Figure(figsize=(size, size * 0.85), dpi=120)  # no pyplot: no global state, no display
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(percent, nan=0.0), cmap=cmap, vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the row (ground-truth class)")
    ax.set_title(title, fontweight="bold")
    ax.set_ylabel("ground truth")
    ax.set_xlabel("prediction")
    ax.set_xticks(np.arange(n))
    ax.set_yticks(np.arange(n))
    ax.set_xticklabels(names, rotation=45, ha="left", rotation_mode="anchor")
    ax.set_yticklabels(names)
    ax.tick_params(axis="x", bottom=False, top=True, labelbottom=False, labeltop=True)
    ax.xaxis.set_label_position("top")
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="w", linewidth=1)
    ax.tick_params(which="minor", length=0)
    font = max(5, 9 - n // 10)
    for i in range(n):
        for j in range(n):
            text = "-" if np.isnan(percent[i, j]) else f"{percent[i, j]:.0f}%\n{int(matrix[i, j])}"
            ax.text(j, i, text, ha="center", va="center", color="k" if np.nan_to_num(percent[i, j]) >= 60 else "w",
                    fontsize=font)
    fig.tight_layout()
    fig.savefig(path, format="png")
