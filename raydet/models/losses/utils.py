"""What every loss shares (MMDetection semantics): reduction, ``avg_factor`` and the base classes.

Every loss is an ``nn.Module`` with ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``
and constructor arguments ``reduction`` ("none" | "mean" | "sum") and ``loss_weight``. Element losses are multiplied
by ``weight`` and reduced by :func:`weight_reduce_loss`; "mean" with an ``avg_factor`` is ``sum / avg_factor``
(e.g. the number of positive samples).

Losses whose class attribute ``takes_decoded_boxes`` is True (IoU, GIoU, bounded IoU) compare decoded boxes
(x1, y1, x2, y2); the other box losses compare the encoded deltas.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Reduction", "reduce_loss", "weight_reduce_loss", "check_reduction", "per_box_weight", "BaseLoss",
           "ElementwiseBoxLoss", "DecodedBoxLoss"]

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")
_EPS = torch.finfo(torch.float32).eps


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """'none' -> loss, 'mean' -> loss.mean(), 'sum' -> loss.sum()."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def weight_reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | Tensor | None = None) -> Tensor:
    """Multiply element losses by ``weight`` (broadcast) and reduce.

    With ``avg_factor``, 'mean' is ``loss.sum() / (avg_factor + eps)``, 'none' returns the weighted losses and
    'sum' is an error.
    """
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        return loss.sum() / (avg_factor + _EPS)
    if reduction == "none":
        return loss
    raise ValueError(f"avg_factor can not be used with reduction={reduction!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def per_box_weight(weight: Tensor | None, loss: Tensor) -> Tensor | None:
    """A per-box weight (N,) becomes (N, 1) against (N, 4) element losses."""
    if weight is not None and weight.dim() == loss.dim() - 1:
        weight = weight.unsqueeze(-1)
    return weight


class BaseLoss(nn.Module):
    takes_decoded_boxes = False

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)

    def _reduction(self, override: str | None) -> str:
        if override is None:
            return self.reduction
        check_reduction(override)
        return override

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"


class ElementwiseBoxLoss(BaseLoss, ABC):
    """Element loss on (N, 4) pred / target; weight (N,) or (N, 4). A subclass defines ``element_loss``."""

    @abstractmethod
    def element_loss(self, diff: Tensor) -> Tensor:
        """(N, 4) element losses of ``diff = |pred - target|``."""

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "differ in shape")
        if target.numel() == 0:
            return pred.sum() * 0
        loss = self.element_loss((pred - target.to(pred.dtype)).abs())
        return self.loss_weight * weight_reduce_loss(loss, per_box_weight(weight, loss), reduction, avg_factor)


class DecodedBoxLoss(BaseLoss, ABC):
    """pred / target (N, 4) boxes x1, y1, x2, y2; weight (N,) or (N, 4) (the latter is averaged to (N,)). A subclass
    defines ``box_loss``."""

    takes_decoded_boxes = True

    @abstractmethod
    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """(N,) or (N, 4) losses of the (N, 4) predicted boxes against the target boxes."""

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape or pred.shape[-1] != 4:
            raise ValueError(f"{type(self).__name__}: pred and target must both be (N, 4) boxes, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if weight is not None and reduction != "none" and not bool(torch.any(weight > 0)):
            # Nothing to learn from: a zero that keeps the graph (and avoids NaN from degenerate boxes).
            return (pred * per_box_weight(weight, pred)).sum() * 0
        if target.numel() == 0:
            return pred.sum() * 0
        loss = self.box_loss(pred, target.to(pred.dtype))
        if weight is not None and weight.dim() == loss.dim() + 1:
            weight = weight.mean(-1)
        if weight is not None and weight.dim() == loss.dim() - 1:
            weight = weight.unsqueeze(-1)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
