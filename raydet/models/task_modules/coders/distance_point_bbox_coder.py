"""Boxes as distances from a point to their four sides (FCOS, Tian et al. 2019, Sec. 3.1; MMDetection's
``DistancePointBBoxCoder``).

For a point (x, y) and a box (x1, y1, x2, y2), all in pixels::

    l = x - x1    t = y - y1    r = x2 - x    b = y2 - y

and back ``(x - l, y - t, x + r, y + b)``. A point inside the box has four positive distances.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["DistancePointBBoxCoder"]


@register
class DistancePointBBoxCoder:
    """Encode boxes as (l, t, r, b) distances from points and decode them back.

    Args:
        clip_border: clip decoded boxes to ``max_shape`` (H, W) when it is given.
    """

    def __init__(self, clip_border: bool = True):
        self.clip_border = bool(clip_border)

    @staticmethod
    def _check(points: Tensor, other: Tensor, what: str) -> None:
        if points.shape[-1] < 2 or other.shape[-1] != 4 or points.shape[:-1] != other.shape[:-1]:
            raise ValueError(f"{what} expects points (..., 2) and (..., 4) values with the same leading shape, got "
                             f"{tuple(points.shape)} and {tuple(other.shape)}")

    def encode(self, points: Tensor, gt_boxes: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
        """(..., 4) distances (l, t, r, b) of ``points`` (..., 2) (extra columns, e.g. strides, are ignored) to the
        sides of ``gt_boxes`` (..., 4); with ``max_dis`` clamped to [0, max_dis - eps]."""
        self._check(points, gt_boxes, "encode")
        x, y = points[..., 0], points[..., 1]
        dist = torch.stack([x - gt_boxes[..., 0], y - gt_boxes[..., 1], gt_boxes[..., 2] - x,
                            gt_boxes[..., 3] - y], dim=-1)
        if max_dis is not None:
            dist = dist.clamp(min=0, max=max_dis - eps)
        return dist

    def decode(self, points: Tensor, distances: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """(..., 4) boxes (x1, y1, x2, y2) from ``points`` (..., 2) and ``distances`` (..., 4) (l, t, r, b); with
        ``max_shape`` (H, W) and ``clip_border``, x is clipped to [0, W] and y to [0, H]."""
        self._check(points, distances, "decode")
        x, y = points[..., 0], points[..., 1]
        boxes = torch.stack([x - distances[..., 0], y - distances[..., 1], x + distances[..., 2],
                             y + distances[..., 3]], dim=-1)
        if max_shape is not None and self.clip_border:
            h, w = float(max_shape[0]), float(max_shape[1])
            boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                                 boxes[..., 3].clamp(0, h)], dim=-1)
        return boxes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(clip_border={self.clip_border})"
