"""Mean squared error (MMDetection's ``MSELoss``): Mask Scoring R-CNN's MaskIoU regression."""
from __future__ import annotations

from torch import Tensor

from raydet.models.losses.utils import BaseLoss, Reduction, weight_reduce_loss
from raydet.registry import register

__all__ = ["MSELoss"]


@register
class MSELoss(BaseLoss):
    """``loss_weight x (pred - target)^2``, weighted by ``weight`` and reduced (see ``losses.utils``).

    pred, target: the same shape (e.g. (P,) predicted and target MaskIoUs); weight broadcasts against them.
    """

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape:
            raise ValueError(f"MSELoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if target.numel() == 0:
            return pred.sum() * 0
        loss = (pred - target.to(pred.dtype)) ** 2
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
