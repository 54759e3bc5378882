"""Non-maximum suppression: hard (class-agnostic and class-aware), Soft-NMS, and the multi-class test-time
post-process."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torchvision
from torch import Tensor

from ._utils import upcast
from .bbox_overlaps import bbox_overlaps

__all__ = ["nms", "batched_nms", "soft_nms", "batched_soft_nms", "multiclass_nms"]

_SOFT_METHODS = ("linear", "gaussian", "naive")


def _check_boxes_scores(fn: str, boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{fn}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{fn}: scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Hard NMS: drop every box whose IoU with a higher-scoring kept box is > ``iou_threshold``.

    Args:
        boxes: (N, 4) x1, y1, x2, y2. scores: (N,).
    Returns:
        int64 (K,) indices of the kept boxes, by decreasing score.
    """
    _check_boxes_scores("nms", boxes, scores)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = upcast(boxes)
    return torchvision.ops.nms(boxes, scores.to(boxes.dtype), float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                class_agnostic: bool = False) -> Tensor:
    """Class-aware hard NMS: boxes with different ``idxs`` never suppress each other.

    Args:
        boxes: (N, 4). scores: (N,). idxs: int64 (N,) category (or image) of each box.
        class_agnostic: ignore ``idxs`` (plain :func:`nms`).
    Returns:
        int64 (K,) indices of the kept boxes, by decreasing score.
    """
    _check_boxes_scores("batched_nms", boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_nms: idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if class_agnostic:
        return nms(boxes, scores, iou_threshold)
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = upcast(boxes)
    return torchvision.ops.batched_nms(boxes, scores.to(boxes.dtype), idxs, float(iou_threshold))


def _offset_by_class(boxes: Tensor, idxs: Tensor) -> Tensor:
    """Shift each category's boxes into its own disjoint region so that boxes of different ``idxs`` have IoU 0."""
    span = boxes.max() - boxes.min() + 1
    return boxes + (idxs.to(boxes) * span)[:, None]


# Defaults as mmcv.ops.soft_nms (mmcv/ops/nms.py: iou_threshold=0.3, sigma=0.5, min_score=1e-3, method='linear'),
# which MMDetection's test_cfg ``nms=dict(type='soft_nms', ...)`` calls.
def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             min_score: float = 1e-3, method: str = "linear") -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., ICCV 2017): decay, rather than drop, the scores of boxes overlapping a pick.

    Repeatedly pick the highest-scoring remaining box M, then rescale every remaining box b_i by
      linear:   (1 - IoU(M, b_i)) if IoU >= ``iou_threshold`` (N_t) else 1 (the paper's rule, eq. 2; mmcv uses >),
      gaussian: exp(-IoU(M, b_i)^2 / ``sigma``) (no threshold; eq. 3),
      naive:    0 if IoU > ``iou_threshold`` else 1 (hard NMS, as :func:`nms`),
    and discard boxes whose score falls below ``min_score``. The picks are sequential; each step is
    vectorised over the remaining boxes (O(N) memory).

    Args:
        boxes: (N, 4). scores: (N,).
    Returns:
        keep: int64 (K,) indices of the kept boxes; new_scores: (K,) their decayed scores (dtype of ``scores``),
        both by decreasing new score, all >= ``min_score``.
    """
    _check_boxes_scores("soft_nms", boxes, scores)
    if method not in _SOFT_METHODS:
        raise ValueError(f"soft_nms: method must be one of {_SOFT_METHODS}, got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"soft_nms: sigma must be > 0, got {sigma}")
    boxes = upcast(boxes)
    cur = scores.to(boxes.dtype, copy=True)
    active = cur >= min_score
    keep, kept_scores = [], []
    # Each iteration removes the picked box, so there are at most N iterations.
    for _ in range(boxes.shape[0]):
        if not bool(active.any()):
            break
        i = torch.where(active, cur, cur.new_tensor(-math.inf)).argmax()
        keep.append(i)
        kept_scores.append(cur[i])
        active[i] = False
        iou = bbox_overlaps(boxes[i][None], boxes)[0]
        if method == "linear":
            decay = torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
        elif method == "gaussian":
            decay = torch.exp(-(iou * iou) / sigma)
        else:
            decay = (iou <= iou_threshold).to(iou.dtype)
        cur = torch.where(active, cur * decay, cur)
        active &= cur >= min_score
    if not keep:
        return (torch.empty(0, dtype=torch.long, device=boxes.device),
                torch.empty(0, dtype=scores.dtype, device=boxes.device))
    # Scores only decay, so each pick scores at most as much as the previous one: the order is already sorted.
    return torch.stack(keep), torch.stack(kept_scores).to(scores.dtype)


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
                     min_score: float = 1e-3, method: str = "linear") -> tuple[Tensor, Tensor]:
    """Class-aware :func:`soft_nms`: boxes with different ``idxs`` never decay each other (as :func:`batched_nms`).

    Args:
        boxes: (N, 4). scores: (N,). idxs: int64 (N,) category of each box.
    Returns:
        keep: int64 (K,) indices, new_scores: (K,) decayed scores, by decreasing new score, all >= ``min_score``.
    """
    _check_boxes_scores("batched_soft_nms", boxes, scores)
    if idxs.shape != scores.shape:
        raise ValueError(f"batched_soft_nms: idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")
    if boxes.numel() == 0:
        return (torch.empty(0, dtype=torch.long, device=boxes.device),
                torch.empty(0, dtype=scores.dtype, device=boxes.device))
    return soft_nms(_offset_by_class(upcast(boxes), idxs), scores, iou_threshold, sigma, min_score, method)


def multiclass_nms(boxes: Tensor, scores: Tensor, score_thr: float, iou_threshold: float, max_per_img: int,
                   soft: str | Mapping | None = None, *, score_factors: Tensor | None = None,
                   return_inds: bool = False):
    """Test-time post-process of a detector: score filter, class-wise NMS, top ``max_per_img``.

    Every (box, class) pair with score > ``score_thr`` is a candidate; candidates of the same class are
    suppressed by NMS, then the ``max_per_img`` best survivors over all classes are returned.

    Args:
        boxes: (N, 4) shared by all classes, or (N, C, 4) class-specific.
        scores: (N, C) foreground class scores (no background column).
        score_thr: keep candidates with score > ``score_thr``.
        iou_threshold: NMS IoU threshold.
        max_per_img: number of detections kept (<= 0 keeps all).
        soft: None for hard NMS; a Soft-NMS method name ("linear", "gaussian", "naive") or a mapping of
            :func:`soft_nms` keyword arguments (``method``, ``sigma``, ``min_score``) for class-wise Soft-NMS
            (the returned scores are then the decayed ones).
        score_factors: optional (N,) factors multiplied into the scores before thresholding (e.g. centerness).
        return_inds: also return the (k,) int64 index of each detection in the flattened (N * C) candidates
            (``ind // C`` is its row in ``boxes``).

    Returns:
        boxes (k, 4), scores (k,), labels int64 (k,), by decreasing score [, inds int64 (k,)].
    """
    if scores.dim() != 2:
        raise ValueError(f"multiclass_nms: scores must have shape (N, C), got {tuple(scores.shape)}")
    n, c = scores.shape
    if not (boxes.shape == (n, 4) or boxes.shape == (n, c, 4)):
        raise ValueError(f"multiclass_nms: boxes must have shape ({n}, 4) or ({n}, {c}, 4), got {tuple(boxes.shape)}")
    if score_factors is not None:
        if score_factors.shape != (n,):
            raise ValueError(f"multiclass_nms: score_factors must have shape ({n},), got {tuple(score_factors.shape)}")
        scores = scores * score_factors[:, None]

    flat_scores = scores.reshape(-1)
    inds = torch.nonzero(flat_scores > score_thr).squeeze(1)
    labels = inds % c
    cand_boxes = boxes[inds // c] if boxes.dim() == 2 else boxes.reshape(-1, 4)[inds]
    cand_scores = flat_scores[inds]

    if soft is None:
        keep = batched_nms(cand_boxes, cand_scores, labels, iou_threshold)
    else:
        kwargs = {"method": soft} if isinstance(soft, str) else dict(soft)
        kwargs.setdefault("iou_threshold", iou_threshold)
        keep, new_scores = batched_soft_nms(cand_boxes, cand_scores, labels, **kwargs)
        cand_scores = cand_scores.clone()
        cand_scores[keep] = new_scores
    if max_per_img > 0:
        keep = keep[:max_per_img]
    out = (cand_boxes[keep], cand_scores[keep], labels[keep])
    return out + (inds[keep],) if return_inds else out
