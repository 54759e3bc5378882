"""Balanced L1 loss on encoded box deltas (Pang et al. 2019, Libra R-CNN)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from raydet.models.losses.utils import ElementwiseBoxLoss, Reduction
from raydet.registry import register

__all__ = ["BalancedL1Loss"]


@register
class BalancedL1Loss(ElementwiseBoxLoss):
    """Balanced L1 loss (Libra R-CNN, Pang et al. 2019), with ``b = e^(gamma / alpha) - 1``::

        |x| < beta:  alpha / b * (b |x| + 1) * log(b |x| / beta + 1) - alpha |x|
        otherwise:   gamma |x| + gamma / b - alpha * beta
    """

    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, reduction: Reduction = "mean",
                 loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"BalancedL1Loss: alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.beta = float(beta)

    def element_loss(self, diff: Tensor) -> Tensor:
        a, g, beta = self.alpha, self.gamma, self.beta
        b = math.exp(g / a) - 1
        inner = a / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - a * diff
        outer = g * diff + g / b - a * beta
        return torch.where(diff < beta, inner, outer)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, beta={self.beta}, {super().extra_repr()}"
