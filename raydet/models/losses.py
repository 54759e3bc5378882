"""Classification and box regression losses (MMDetection semantics).

Every loss is an ``nn.Module`` with ``forward(pred, target, weight=None, avg_factor=None, reduction_override=None)``
and constructor arguments ``reduction`` ("none" | "mean" | "sum") and ``loss_weight``. Element losses are multiplied
by ``weight`` and reduced by :func:`weight_reduce_loss`; "mean" with an ``avg_factor`` is ``sum / avg_factor``
(e.g. the number of positive samples).

Losses whose class attribute ``takes_decoded_boxes`` is True (IoU, GIoU, bounded IoU) compare decoded boxes
(x1, y1, x2, y2); the other box losses compare the encoded deltas.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydet.ops import bbox_overlaps, sigmoid_focal_loss
from raydet.registry import register

__all__ = [
    "reduce_loss", "weight_reduce_loss", "CrossEntropyLoss", "FocalLoss", "SmoothL1Loss", "L1Loss", "BalancedL1Loss",
    "IoULoss", "GIoULoss", "BoundedIoULoss",
]

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


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _box_weight(weight: Tensor | None, loss: Tensor) -> Tensor | None:
    """A per-box weight (N,) becomes (N, 1) against (N, 4) element losses."""
    if weight is not None and weight.dim() == loss.dim() - 1:
        weight = weight.unsqueeze(-1)
    return weight


class _Loss(nn.Module):
    takes_decoded_boxes = False

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)

    def _reduction(self, override: str | None) -> str:
        if override is None:
            return self.reduction
        _check_reduction(override)
        return override

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"


# ----------------------------------------------------------------------------------------------------------------
# Classification


@register
class CrossEntropyLoss(_Loss):
    """Cross-entropy in three forms.

    * softmax (default): pred (N, C) logits, target (N,) int class indices; entries equal to ``ignore_index``
      (default -100) contribute 0 (and still count in the plain mean, as in MMDetection).
    * ``use_sigmoid``: per-class binary CE with logits. pred (N, C) with target (N,) class indices, where an index
      of C (or any index outside [0, C)) is background (all-zero row) and negative indices / ``ignore_index`` get
      weight 0; or target of pred's shape with 0/1 (or soft) labels. For pred (N,) or (N, 1) (RPN objectness)
      target (N,) is the 0/1 label itself (1 = object).
    * ``use_mask``: pred (N, C, h, w) mask logits, target (N, h, w) binary masks, ``label=`` (N,) selects each
      row's class channel; binary CE is averaged over pixels, giving one loss per row, then reduced over N.

    Args:
        class_weight: per-class weights (softmax: the ``weight`` of ``F.cross_entropy``; sigmoid: the positive-term
            weight ``pos_weight`` of ``F.binary_cross_entropy_with_logits``; mask: per-class weight of each row).
        ignore_index: the target value to ignore (softmax and sigmoid).
    """

    def __init__(self, use_sigmoid: bool = False, use_mask: bool = False, class_weight: list[float] | None = None,
                 ignore_index: int | None = None, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        if use_sigmoid and use_mask:
            raise ValueError("CrossEntropyLoss: use_sigmoid and use_mask are exclusive")
        self.use_sigmoid = use_sigmoid
        self.use_mask = use_mask
        self.class_weight = None if class_weight is None else [float(w) for w in class_weight]
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None,
                label: Tensor | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        cw = None if self.class_weight is None else pred.new_tensor(self.class_weight)
        if self.use_mask:
            loss = self._mask(pred, target, label, cw)
        elif self.use_sigmoid:
            loss, weight = self._sigmoid(pred, target, weight, cw)
        else:
            ignore = -100 if self.ignore_index is None else self.ignore_index
            loss = F.cross_entropy(pred, target.long(), weight=cw, reduction="none", ignore_index=ignore)
        if weight is not None:
            weight = weight.to(loss.dtype)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def _sigmoid(self, pred: Tensor, target: Tensor, weight: Tensor | None, cw: Tensor | None):
        ignore = self.ignore_index
        if pred.dim() == 1 or (pred.dim() == 2 and pred.shape[1] == 1 and target.dim() == 1):
            target = target.reshape(pred.shape)  # binary objectness: target is the 0/1 label itself
            if weight is not None:
                weight = weight.reshape(pred.shape)
        if target.shape == pred.shape:
            valid = target >= 0
            if ignore is not None:
                valid &= target != ignore
            bin_target = target.to(pred.dtype) * valid
        else:
            if target.dim() != 1 or pred.dim() != 2 or target.shape[0] != pred.shape[0]:
                raise ValueError(f"CrossEntropyLoss(use_sigmoid): target must be (N,) class indices or pred's "
                                 f"shape, got pred {tuple(pred.shape)} and target {tuple(target.shape)}")
            num_classes = pred.shape[1]
            target = target.long()
            valid = target >= 0
            if ignore is not None:
                valid &= target != ignore
            fg = valid & (target < num_classes)
            # One column more for the background index; any index >= C lands there and is dropped.
            bin_target = F.one_hot(torch.where(fg, target, torch.full_like(target, num_classes)),
                                   num_classes + 1)[:, :num_classes].to(pred.dtype)
            valid = valid[:, None].expand_as(pred)
            if weight is not None and weight.dim() == 1:
                weight = weight[:, None].expand_as(pred)
        weight = valid.to(pred.dtype) if weight is None else weight * valid
        loss = F.binary_cross_entropy_with_logits(pred, bin_target, pos_weight=cw, reduction="none")
        return loss, weight

    @staticmethod
    def _mask(pred: Tensor, target: Tensor, label: Tensor | None, cw: Tensor | None) -> Tensor:
        if pred.dim() != 4:
            raise ValueError(f"CrossEntropyLoss(use_mask): pred must be (N, C, h, w), got {tuple(pred.shape)}")
        n = pred.shape[0]
        if label is None:
            if pred.shape[1] != 1:
                raise ValueError("CrossEntropyLoss(use_mask): pass label= (N,) to pick the class channel")
            label = pred.new_zeros(n, dtype=torch.long)
        label = label.long()
        sliced = pred[torch.arange(n, device=pred.device), label]  # (N, h, w)
        loss = F.binary_cross_entropy_with_logits(sliced, target.to(sliced.dtype), reduction="none")
        loss = loss.flatten(1).mean(dim=1)  # (N,)
        if cw is not None:
            loss = loss * cw[label]
        return loss

    def extra_repr(self) -> str:
        return (f"use_sigmoid={self.use_sigmoid}, use_mask={self.use_mask}, class_weight={self.class_weight}, "
                f"ignore_index={self.ignore_index}, {super().extra_repr()}")


@register
class FocalLoss(_Loss):
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
            weight = _box_weight(weight, loss).to(loss.dtype)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, {super().extra_repr()}"


# ----------------------------------------------------------------------------------------------------------------
# Regression on deltas


class _ElementwiseBoxLoss(_Loss):
    """Element loss on (N, 4) pred / target; weight (N,) or (N, 4)."""

    def element_loss(self, diff: Tensor) -> Tensor:  # |pred - target|
        raise NotImplementedError

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                             "differ in shape")
        if target.numel() == 0:
            return pred.sum() * 0
        loss = self.element_loss((pred - target.to(pred.dtype)).abs())
        return self.loss_weight * weight_reduce_loss(loss, _box_weight(weight, loss), reduction, avg_factor)


@register
class SmoothL1Loss(_ElementwiseBoxLoss):
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
class L1Loss(_ElementwiseBoxLoss):
    """``|pred - target|``."""

    def __init__(self, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)

    def element_loss(self, diff: Tensor) -> Tensor:
        return diff


@register
class BalancedL1Loss(_ElementwiseBoxLoss):
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


# ----------------------------------------------------------------------------------------------------------------
# Regression on decoded boxes


class _DecodedBoxLoss(_Loss):
    """pred / target (N, 4) boxes x1, y1, x2, y2; weight (N,) or (N, 4) (the latter is averaged to (N,))."""

    takes_decoded_boxes = True

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape or pred.shape[-1] != 4:
            raise ValueError(f"{type(self).__name__}: pred and target must both be (N, 4) boxes, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        if weight is not None and reduction != "none" and not bool(torch.any(weight > 0)):
            # Nothing to learn from: a zero that keeps the graph (and avoids NaN from degenerate boxes).
            return (pred * _box_weight(weight, pred)).sum() * 0
        if target.numel() == 0:
            return pred.sum() * 0
        loss = self.box_loss(pred, target.to(pred.dtype))
        if weight is not None and weight.dim() == loss.dim() + 1:
            weight = weight.mean(-1)
        if weight is not None and weight.dim() == loss.dim() - 1:
            weight = weight.unsqueeze(-1)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)


@register
class IoULoss(_DecodedBoxLoss):
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
class GIoULoss(_DecodedBoxLoss):
    """Generalised IoU loss ``1 - GIoU`` (Rezatofighi et al. 2019)."""

    def __init__(self, eps: float = 1e-7, reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(reduction, loss_weight)
        self.eps = float(eps)

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, {super().extra_repr()}"


@register
class BoundedIoULoss(_DecodedBoxLoss):
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
