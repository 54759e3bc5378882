"""Sigmoid focal loss (Lin et al. 2017, RetinaNet)."""
from __future__ import annotations

from torch import Tensor

from raydet.models.losses.utils import BaseLoss, Reduction, per_box_weight, weight_reduce_loss
from raydet.ops import sigmoid_focal_loss
from raydet.registry import register

__all__ = ["FocalLoss"]


@register
class FocalLoss(BaseLoss):
    """Sigmoid focal loss (RetinaNet): pred (N, C) logits, target (N,) class indices in [0, C], C = background.

    ``weight`` is (N,) per sample or (N, C) per element.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25,
                 reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if not use_sigmoid:
            raise ValueError("FocalLoss: only the sigmoid form is implemented (use_sigmoid=True)")
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.use_sigmoid = use_sigmoid
        self.gamma = float(gamma)
        self.alpha = float(alpha)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        loss = sigmoid_focal_loss(pred, target.long(), gamma=self.gamma, alpha=self.alpha, reduction="none")
        if weight is not None:
            weight = per_box_weight(weight, loss).to(loss.dtype)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, {super().extra_repr()}"
