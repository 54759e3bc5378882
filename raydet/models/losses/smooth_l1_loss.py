"""Smooth L1 and L1 losses on encoded box deltas."""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.losses.utils import ElementwiseBoxLoss, Reduction
from raydet.registry import register

__all__ = ["SmoothL1Loss", "L1Loss"]


@register
class SmoothL1Loss(ElementwiseBoxLoss):
    """``0.5 x^2 / beta`` for ``|x| < beta``, ``|x| - 0.5 beta`` otherwise (beta = 0 is L1)."""

    def __init__(self, beta: float = 1.0, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if beta < 0:
            raise ValueError(f"SmoothL1Loss: beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def element_loss(self, diff: Tensor) -> Tensor:
        if self.beta == 0:
            return diff
        return torch.where(diff < self.beta, 0.5 * diff * diff / self.beta, diff - 0.5 * self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {super().extra_repr()}"


@register
class L1Loss(ElementwiseBoxLoss):
    """``|pred - target|``."""

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)

    def element_loss(self, diff: Tensor) -> Tensor:
        return diff
