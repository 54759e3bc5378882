"""Test-time post-processing: class-wise NMS as a head's ``test`` settings ask, and mapping outputs from the
network's input frame back to the original image."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydet.ops import batched_nms, batched_soft_nms

__all__ = ["detection_nms", "boxes_to_original", "paste_masks"]


def detection_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, cfg) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Class-wise NMS of one image's candidates by a :class:`~raydet.models.head_configs.DetectionConfig`.

    Args:
        boxes: (n, 4). scores: (n,). labels: int64 (n,).
        cfg: ``nms`` (hard NMS or Soft-NMS and its settings), ``nms_iou``, ``max_per_img``.

    Returns:
        keep: int64 (k,) indices into the candidates and their scores (k,) (decayed by Soft-NMS), by decreasing
        score, at most ``max_per_img`` (<= 0: all).
    """
    soft = cfg.soft_nms_args()
    if soft is None:
        keep = batched_nms(boxes, scores, labels, cfg.nms_iou)
        new_scores = scores[keep]
    else:
        keep, new_scores = batched_soft_nms(boxes, scores, labels, cfg.nms_iou, **soft)
    if cfg.max_per_img > 0:
        keep, new_scores = keep[: cfg.max_per_img], new_scores[: cfg.max_per_img]
    return keep, new_scores


def boxes_to_original(boxes: torch.Tensor, meta: dict) -> torch.Tensor:
    """(n, 4) boxes in resized-image pixels -> original-image pixels (undo flip, undo resize, clip)."""
    boxes = boxes.clone()
    if meta.get("flip", False):
        w = meta["img_shape"][1]
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    sx, sy = meta.get("scale_factor", (1.0, 1.0))
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    h0, w0 = meta["ori_shape"][:2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w0)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h0)
    return boxes


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5,
                max_elements: int = 1 << 26) -> torch.Tensor:
    """Paste per-box mask probabilities into a full image.

    Args:
        masks: (n, M, M) probabilities in [0, 1], each covering its box.
        boxes: (n, 4) in the target image's pixels.
        height, width: target image size.
        threshold: binarisation threshold; < 0 returns the probabilities.
        max_elements: bound on n_chunk * height * width sampled at once (memory).

    Returns:
        (n, height, width) bool masks (float when threshold < 0).

    Each output pixel centre (x + 0.5, y + 0.5) is mapped into its box's mask grid and sampled bilinearly, so the
    whole paste is one ``grid_sample`` per chunk with no loop over masks.
    """
    n = masks.shape[0]
    dtype = torch.bool if threshold >= 0 else masks.dtype
    out = masks.new_zeros((n, height, width), dtype=dtype)
    if n == 0:
        return out
    chunk = max(1, max_elements // max(1, height * width))
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    for start in range(0, n, chunk):
        m = masks[start:start + chunk, None].float()
        b = boxes[start:start + chunk].float()
        x1, y1, x2, y2 = (b[:, i, None] for i in range(4))
        gx = (xs[None] - x1) / (x2 - x1).clamp(min=1e-6) * 2 - 1  # (k, W) in [-1, 1] inside the box
        gy = (ys[None] - y1) / (y2 - y1).clamp(min=1e-6) * 2 - 1  # (k, H)
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
        pasted = F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        out[start:start + chunk] = pasted >= threshold if threshold >= 0 else pasted.to(dtype)
    return out
