"""Box regression targets as (dx, dy, dw, dh) deltas (R-CNN parameterisation, MMDetection's DeltaXYWHBBoxCoder).

For a reference box with centre (px, py) and size (pw, ph) and a target with (gx, gy, gw, gh)::

    dx = (gx - px) / pw    dy = (gy - py) / ph    dw = log(gw / pw)    dh = log(gh / ph)

normalised as ``(d - target_means) / target_stds``. Widths are x2 - x1 (no +1).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["DeltaXYWHBBoxCoder"]


@register
class DeltaXYWHBBoxCoder:
    """Encode boxes against reference boxes as normalised deltas and decode them back.

    Args:
        target_means, target_stds: normalisation of the four deltas.
        clip_border: clip decoded boxes to ``max_shape`` when it is given.
        add_ctr_clamp: clamp the centre shift (in pixels) to +-ctr_clamp and only cap dw/dh from above.
        ctr_clamp: the centre shift bound in pixels.
        clamp_dwh: ``"both"`` clamps dw, dh to +-|log(wh_ratio_clip)|; ``"max"`` only caps them from above
            (torchvision's ``BoxCoder`` with ``bbox_xform_clip = log(1000 / 16)``, Detectron2's ``scale_clamp``).

    torchvision's ``BoxCoder(weights=(wx, wy, ww, wh))`` divides the deltas by its weights: it equals
    ``target_stds = (1 / wx, 1 / wy, 1 / ww, 1 / wh)``, e.g. (10, 10, 5, 5) -> (0.1, 0.1, 0.2, 0.2).
    """

    def __init__(self, target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
                 target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clip_border: bool = True, add_ctr_clamp: bool = False, ctr_clamp: float = 32.0,
                 clamp_dwh: str = "both"):
        if len(target_means) != 4 or len(target_stds) != 4:
            raise ValueError(f"target_means and target_stds need 4 values, got {target_means} and {target_stds}")
        if any(s <= 0 for s in target_stds):
            raise ValueError(f"target_stds must be positive, got {target_stds}")
        self.means = tuple(float(m) for m in target_means)
        self.stds = tuple(float(s) for s in target_stds)
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = float(ctr_clamp)
        if clamp_dwh not in ("both", "max"):
            raise ValueError(f"clamp_dwh must be 'both' or 'max', got {clamp_dwh!r}")
        self.clamp_dwh = clamp_dwh

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """Deltas (..., 4) that map ``boxes`` (..., 4) onto ``gt_boxes`` (..., 4)."""
        if boxes.shape[-1] != 4 or gt_boxes.shape[-1] != 4:
            raise ValueError(f"encode expects (..., 4) boxes, got {tuple(boxes.shape)} and {tuple(gt_boxes.shape)}")
        dtype = torch.promote_types(boxes.dtype, gt_boxes.dtype)
        dtype = dtype if dtype.is_floating_point else torch.float32
        boxes, gt_boxes = boxes.to(dtype), gt_boxes.to(dtype)
        pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
        pwh = boxes[..., 2:] - boxes[..., :2]
        gxy = (gt_boxes[..., :2] + gt_boxes[..., 2:]) * 0.5
        gwh = gt_boxes[..., 2:] - gt_boxes[..., :2]
        deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
        means = deltas.new_tensor(self.means)
        stds = deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: Sequence[int] | Tensor | None = None,
               wh_ratio_clip: float = 16 / 1000) -> Tensor:
        """Apply deltas to boxes.

        Args:
            boxes: (..., N, 4) reference boxes; broadcast against the leading dims of ``deltas``.
            deltas: (..., N, 4k) deltas, k >= 1 (k boxes per reference box, e.g. class-specific regression).
            max_shape: (h, w) to clip to (when clip_border), or a tensor (..., 2) of per-batch-element (h, w).
            wh_ratio_clip: dw and dh are clamped to +-|log(wh_ratio_clip)|.

        Returns:
            (..., N, 4k) decoded boxes x1, y1, x2, y2.
        """
        if boxes.shape[-1] != 4 or deltas.shape[-1] % 4 != 0 or deltas.shape[-1] == 0:
            raise ValueError(f"decode expects boxes (..., N, 4) and deltas (..., N, 4k), got {tuple(boxes.shape)} "
                             f"and {tuple(deltas.shape)}")
        out_shape = torch.broadcast_shapes(boxes.shape[:-1], deltas.shape[:-1]) + (deltas.shape[-1],)
        k = deltas.shape[-1] // 4
        d = deltas.reshape(*deltas.shape[:-1], k, 4)
        ref = boxes.to(d.dtype).unsqueeze(-2)  # (..., N, 1, 4)
        means = d.new_tensor(self.means)
        stds = d.new_tensor(self.stds)
        d = d * stds + means
        dxy, dwh = d[..., :2], d[..., 2:]
        pxy = (ref[..., :2] + ref[..., 2:]) * 0.5
        pwh = ref[..., 2:] - ref[..., :2]
        shift = pwh * dxy
        max_ratio = abs(math.log(wh_ratio_clip))
        if self.add_ctr_clamp:
            shift = shift.clamp(min=-self.ctr_clamp, max=self.ctr_clamp)
            dwh = dwh.clamp(max=max_ratio)
        elif self.clamp_dwh == "max":
            dwh = dwh.clamp(max=max_ratio)
        else:
            dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
        gxy = pxy + shift
        gwh = pwh * dwh.exp()
        out = torch.cat([gxy - 0.5 * gwh, gxy + 0.5 * gwh], dim=-1)  # (..., N, k, 4)
        if self.clip_border and max_shape is not None:
            out = _clip(out, max_shape)
        return out.reshape(out_shape)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target_means={self.means}, target_stds={self.stds}, "
                f"clip_border={self.clip_border}, add_ctr_clamp={self.add_ctr_clamp}, ctr_clamp={self.ctr_clamp}, "
                f"clamp_dwh={self.clamp_dwh!r})")


def _clip(boxes: Tensor, max_shape) -> Tensor:
    """Clip (..., N, k, 4) boxes to [0, w] x [0, h]."""
    if isinstance(max_shape, Tensor):
        # (..., 2) per batch element -> broadcast over the N and k dims.
        hw = max_shape.to(device=boxes.device, dtype=boxes.dtype)[..., None, None, :]
        h, w = hw[..., 0], hw[..., 1]
        zero = torch.zeros((), device=boxes.device, dtype=boxes.dtype)
        x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
        y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
        x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
        y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
        return torch.stack([x1, y1, x2, y2], dim=-1)
    h, w = float(max_shape[0]), float(max_shape[1])
    xs = boxes[..., 0::2].clamp(min=0, max=w)
    ys = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)
