"""IoU-based losses on decoded boxes (x1, y1, x2, y2): IoU, GIoU and bounded IoU."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from raydet.models.losses.utils import DecodedBoxLoss, Reduction
from raydet.ops import bbox_overlaps
from raydet.registry import register

__all__ = ["IoULoss", "GIoULoss", "BoundedIoULoss"]


@register
class IoULoss(DecodedBoxLoss):
    """IoU loss: mode "log" ``-log(IoU)`` (UnitBox), "linear" ``1 - IoU``, "square" ``1 - IoU^2``; IoU >= eps.

    ``linear=True`` is the older spelling of ``mode="linear"``.
    """

    def __init__(self, linear: bool = False, mode: Literal["log", "linear", "square"] = "log", eps: float = 1e-6,
                 reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if mode not in ("log", "linear", "square"):
            raise ValueError(f"IoULoss: mode must be 'log', 'linear' or 'square', got {mode!r}")
        self.mode = "linear" if linear else mode
        self.eps = float(eps)

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        ious = bbox_overlaps(pred, target, is_aligned=True).clamp(min=self.eps)
        if self.mode == "linear":
            return 1 - ious
        if self.mode == "square":
            return 1 - ious ** 2
        return -ious.log()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}, {super().extra_repr()}"


@register
class GIoULoss(DecodedBoxLoss):
    """Generalised IoU loss ``1 - GIoU`` (Rezatofighi et al. 2019)."""

    def __init__(self, eps: float = 1e-7, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        self.eps = float(eps)

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, {super().extra_repr()}"


@register
class BoundedIoULoss(DecodedBoxLoss):
    """Bounded IoU loss (Tychsen-Smith & Petersson 2018): a smooth L1 (threshold beta) on four per-coordinate
    costs ``1 - IoU_B``, each the best IoU reachable when only that coordinate of pred differs from the target::

        cost_x = 1 - max(0, (w_t - 2 |dx|) / (w_t + 2 |dx|))      cost_w = 1 - min(w / w_t, w_t / w)

    (likewise y and h); the target is not differentiated. Element loss (N, 4).
    """

    def __init__(self, beta: float = 0.2, eps: float = 1e-3, reduction: Reduction = "mean",
                 loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if beta <= 0:
            raise ValueError(f"BoundedIoULoss: beta must be > 0, got {beta}")
        self.beta = float(beta)
        self.eps = float(eps)

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        eps = self.eps
        pred_ctr = (pred[:, :2] + pred[:, 2:]) * 0.5
        pred_wh = pred[:, 2:] - pred[:, :2]
        target = target.detach()
        target_ctr = (target[:, :2] + target[:, 2:]) * 0.5
        target_wh = target[:, 2:] - target[:, :2]
        d = (target_ctr - pred_ctr).abs()
        cost_ctr = 1 - torch.clamp((target_wh - 2 * d) / (target_wh + 2 * d + eps), min=0)
        cost_wh = 1 - torch.minimum(target_wh / (pred_wh + eps), pred_wh / (target_wh + eps))
        cost = torch.cat([cost_ctr, cost_wh], dim=-1)  # (N, 4): x, y, w, h
        return torch.where(cost < self.beta, 0.5 * cost * cost / self.beta, cost - 0.5 * self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, eps={self.eps}, {super().extra_repr()}"
