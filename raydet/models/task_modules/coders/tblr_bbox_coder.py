"""Box regression targets as distances from the prior's centre to the box's sides (FSAF, Zhu et al. 2019, Sec. 3.2).

For a prior with centre (px, py) and size (pw, ph) and a box (x1, y1, x2, y2), the four targets in MMDetection's
``TBLRBBoxCoder`` order (top, bottom, left, right) are::

    t = (py - y1) / ph / n    b = (y2 - py) / ph / n    l = (px - x1) / pw / n    r = (x2 - px) / pw / n

with ``n`` the ``normalizer`` (one number, or four: one per t, b, l, r). FSAF's anchor-free branch uses a square
"anchor" of side ``stride`` at each location, so with n = 4 the targets are the paper's distances divided by
``4 * stride`` (the paper's S = 4.0). Widths are x2 - x1 (no +1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["TBLRBBoxCoder"]


@register
class TBLRBBoxCoder:
    """Encode boxes as normalised (top, bottom, left, right) distances from prior centres, and decode them back.

    Args:
        normalizer: divisor of the prior-size-normalised distances: one number for all four, or four numbers
            (t, b, l, r). MMDetection's default and the paper's S: 4.0.
        clip_border: clip decoded boxes to ``max_shape`` when it is given (MMDetection's default: True).

    Raises:
        ValueError: a normalizer that is not one positive number or four.
    """

    def __init__(self, normalizer: float | Sequence[float] = 4.0, clip_border: bool = True):
        if isinstance(normalizer, (int, float)):
            norm = (float(normalizer),) * 4
        else:
            norm = tuple(float(v) for v in normalizer)
            if len(norm) != 4:
                raise ValueError(f"TBLRBBoxCoder: normalizer needs 1 or 4 values (t, b, l, r), got {list(normalizer)}")
        if any(v <= 0 for v in norm):
            raise ValueError(f"TBLRBBoxCoder: normalizer must be positive, got {normalizer}")
        self.normalizer = normalizer if isinstance(normalizer, (int, float)) else list(norm)
        self._norm = norm
        self.clip_border = bool(clip_border)

    def encode(self, priors: Tensor, gt_boxes: Tensor) -> Tensor:
        """(..., 4) targets (t, b, l, r) that map ``priors`` (..., 4) onto ``gt_boxes`` (..., 4)."""
        if priors.shape[-1] != 4 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"encode expects (..., 4) boxes, got {tuple(priors.shape)} and {tuple(gt_boxes.shape)}")
        dtype = torch.promote_types(priors.dtype, gt_boxes.dtype)
        dtype = dtype if dtype.is_floating_point else torch.float32
        priors, gt_boxes = priors.to(dtype), gt_boxes.to(dtype)
        cx = (priors[..., 0] + priors[..., 2]) * 0.5
        cy = (priors[..., 1] + priors[..., 3]) * 0.5
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        tblr = torch.stack([(cy - gt_boxes[..., 1]) / ph, (gt_boxes[..., 3] - cy) / ph,
                            (cx - gt_boxes[..., 0]) / pw, (gt_boxes[..., 2] - cx) / pw], dim=-1)
        return tblr / tblr.new_tensor(self._norm)

    def decode(self, priors: Tensor, tblr: Tensor, max_shape: Sequence[int] | Tensor | None = None) -> Tensor:
        """Boxes (..., N, 4) x1, y1, x2, y2 from priors (..., N, 4) and targets (..., N, 4) (t, b, l, r).

        ``max_shape``: (h, w) to clip to (with ``clip_border``), or a tensor (..., 2) of per-batch-element (h, w).
        """
        if priors.shape[-1] != 4 or tblr.shape[-1] != 4:
            raise ValueError(f"decode expects priors (..., N, 4) and targets (..., N, 4), got {tuple(priors.shape)} "
                             f"and {tuple(tblr.shape)}")
        priors = priors.to(tblr.dtype)
        d = tblr * tblr.new_tensor(self._norm)
        cx = (priors[..., 0] + priors[..., 2]) * 0.5
        cy = (priors[..., 1] + priors[..., 3]) * 0.5
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        top, bottom, left, right = d[..., 0] * ph, d[..., 1] * ph, d[..., 2] * pw, d[..., 3] * pw
        boxes = torch.stack([cx - left, cy - top, cx + right, cy + bottom], dim=-1)
        if self.clip_border and max_shape is not None:
            if isinstance(max_shape, Tensor):
                hw = max_shape.to(device=boxes.device, dtype=boxes.dtype)[..., None, :]  # (..., 1, 2)
                upper = torch.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], dim=-1)
            else:
                h, w = float(max_shape[0]), float(max_shape[1])
                upper = boxes.new_tensor([w, h, w, h])
            boxes = torch.minimum(boxes.clamp(min=0), upper)
        return boxes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalizer={self.normalizer}, clip_border={self.clip_border})"
