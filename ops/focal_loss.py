"""Sigmoid focal loss (Lin et al., RetinaNet, ICCV 2017) with class-index targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from ._utils import upcast

__all__ = ["sigmoid_focal_loss"]

_REDUCTIONS = ("none", "mean", "sum")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25,
                       weight: Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | Tensor | None = None) -> Tensor:
    """Per-class binary focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    ``p = sigmoid(logit)``; for the target class of a sample ``p_t = p`` and ``alpha_t = alpha``, for every
    other class ``p_t = 1 - p`` and ``alpha_t = 1 - alpha``. ``alpha < 0`` disables the alpha weighting.

    Args:
        logits: (N, C) raw scores of the C foreground classes.
        targets: int64 (N,) in [0, C]; C is background (every class negative).
        weight: None, (N,) per-sample or (N, C) per-element weights.
        reduction: "none" -> (N, C); "sum"; "mean" -> sum / ``avg_factor`` if given (e.g. the number of positive
            anchors in RetinaNet) else the mean over the N * C elements.
    Returns:
        The loss, float32 for half logits, otherwise in the logits' dtype.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"sigmoid_focal_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"sigmoid_focal_loss: logits must have shape (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"sigmoid_focal_loss: targets must have shape ({n},), got {tuple(targets.shape)}")
    if avg_factor is not None and reduction != "mean":
        raise ValueError("sigmoid_focal_loss: avg_factor needs reduction='mean'")
    logits = upcast(logits)
    # One column more for the background index C, dropped: background rows are all-negative.
    onehot = F.one_hot(targets.long(), c + 1)[:, :c].to(logits.dtype)
    loss = torchvision.ops.sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    if weight is not None:
        if weight.shape == (n,):
            weight = weight[:, None]
        elif weight.shape != (n, c):
            raise ValueError(f"sigmoid_focal_loss: weight must have shape ({n},) or ({n}, {c}), "
                             f"got {tuple(weight.shape)}")
        loss = loss * weight.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if avg_factor is not None:
        # eps keeps an avg_factor of 0 (no positives in the batch) finite, as MMDetection does.
        return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    return loss.mean()
