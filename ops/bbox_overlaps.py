"""IoU / IoF / GIoU between (x1, y1, x2, y2) boxes, pairwise or aligned, with batch dimensions."""
from __future__ import annotations

import torch
from torch import Tensor

from ._utils import compute_dtype

__all__ = ["bbox_overlaps"]

_MODES = ("iou", "iof", "giou")


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", is_aligned: bool = False,
                  eps: float = 1e-6) -> Tensor:
    """Overlaps between two sets of boxes.

    Args:
        boxes1: (..., N, 4) boxes (x1, y1, x2, y2) in pixels; widths are x2 - x1.
        boxes2: (..., M, 4); leading dimensions broadcast with those of ``boxes1``.
        mode: "iou" (intersection / union), "iof" (intersection / area of ``boxes1``, "intersection over
            foreground") or "giou" (IoU - (enclosing area - union) / enclosing area, in [-1, 1]).
        is_aligned: compare ``boxes1[..., i]`` with ``boxes2[..., i]`` only (then N must equal M).
        eps: lower bound of the denominators, so that degenerate boxes give 0 instead of NaN.

    Returns:
        (..., N, M) overlaps, or (..., N) when ``is_aligned``; the dtype of ``boxes1`` (float16 inputs are
        computed in float32, as their areas overflow). Peak memory is a few (..., N, M) tensors.
    """
    if mode not in _MODES:
        raise ValueError(f"bbox_overlaps: mode must be one of {_MODES}, got {mode!r}")
    if boxes1.shape[-1] != 4 or boxes2.shape[-1] != 4:
        raise ValueError(f"bbox_overlaps: boxes must have shape (..., 4), got {tuple(boxes1.shape)} and "
                         f"{tuple(boxes2.shape)}")
    if is_aligned and boxes1.shape[-2] != boxes2.shape[-2]:
        raise ValueError(f"bbox_overlaps: is_aligned needs as many boxes1 as boxes2, got {boxes1.shape[-2]} "
                         f"and {boxes2.shape[-2]}")
    out_dtype = boxes1.dtype
    dtype = compute_dtype(torch.promote_types(boxes1.dtype, boxes2.dtype))
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)

    # Coordinates as (..., N, 1) and (..., 1, M) (pairwise) or (..., N) and (..., N) (aligned); every
    # binary op below then yields the output shape directly, never an (..., N, M, 2) intermediate.
    if is_aligned:
        x1a, y1a, x2a, y2a = b1.unbind(-1)
        x1b, y1b, x2b, y2b = b2.unbind(-1)
    else:
        x1a, y1a, x2a, y2a = b1.unsqueeze(-2).unbind(-1)
        x1b, y1b, x2b, y2b = b2.unsqueeze(-3).unbind(-1)
    area1 = (x2a - x1a) * (y2a - y1a)
    area2 = (x2b - x1b) * (y2b - y1b)

    inter = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp(min=0)
    inter = inter * (torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)).clamp(min=0)
    if mode == "iof":
        union = area1
    else:
        union = area1 + area2 - inter
    eps_t = union.new_tensor(eps)
    union = torch.maximum(union, eps_t)
    overlaps = inter / union
    if mode == "giou":
        enclose = (torch.maximum(x2a, x2b) - torch.minimum(x1a, x1b)).clamp(min=0)
        enclose = enclose * (torch.maximum(y2a, y2b) - torch.minimum(y1a, y1b)).clamp(min=0)
        enclose = torch.maximum(enclose, eps_t)
        overlaps = overlaps - (enclose - union) / enclose
    return overlaps.to(out_dtype)
