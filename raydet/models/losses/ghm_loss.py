"""Gradient harmonizing losses (Li et al. 2019, "Gradient Harmonized Single-stage Detector"): GHM-C and GHM-R.

Each sample's loss is weighted by the inverse density of its gradient norm g, so that the many easy examples
(g near 0) and the few outliers (g near 1) no longer dominate training (Sec. 3). The density is counted in ``bins``
equal unit regions of g (Sec. 3.3), optionally as an exponential moving average over iterations
(``momentum``, Eq. 12). MMDetection's semantics (``GHMC``, ``GHMR``): over the ``tot`` valid elements (weight > 0),
an element in a region holding ``count`` valid elements gets the weight ``tot / (count * n)``, n the number of
non-empty regions (with momentum, ``count`` is the region's running average, updated only when it is non-empty);
the loss is the weighted sum divided by ``tot``. ``avg_factor`` (the head's normaliser) is not used.

Both take the arguments heads pass every loss: ``loss(pred, target, weight, avg_factor=...)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raydet.models.losses.utils import BaseLoss, Reduction, weight_reduce_loss
from raydet.registry import register

__all__ = ["GHMC", "GHMR"]


class _GradientDensity(BaseLoss):
    """The unit regions of g, the running counts and the harmonising weights shared by GHM-C and GHM-R.

    Buffers as MMDetection's (so that its checkpoints load): ``edges`` (bins + 1,), the region edges, and with
    ``momentum`` > 0 ``acc_sum`` (bins,), the running count of each region.
    """

    last_edge: float  # the upper edge of the last region (g never exceeds it)

    def __init__(self, bins: int, momentum: float, reduction: str, loss_weight: float):
        super().__init__(reduction, loss_weight)
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"{type(self).__name__}: bins must be a positive integer, got {bins!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1), got {momentum}")
        self.bins = bins
        self.momentum = float(momentum)
        edges = torch.arange(bins + 1, dtype=torch.float32) / bins
        edges[-1] = self.last_edge
        self.register_buffer("edges", edges)  # region i: edges[i] <= g < edges[i + 1]
        if self.momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))

    def harmonizing_weights(self, g: Tensor, valid: Tensor, tot: Tensor) -> Tensor:
        """Weights of g's shape: ``tot / (count * n)`` for valid elements, 0 for the others. With momentum, first
        updates the running count of every non-empty region: ``acc = momentum * acc + (1 - momentum) * count``."""
        region = torch.bucketize(g.float().contiguous(), self.edges[1:-1].contiguous(), right=True)
        counts = torch.bincount(region[valid], minlength=self.bins).float()
        nonempty = counts > 0
        if self.momentum > 0:
            with torch.no_grad():
                updated = self.momentum * self.acc_sum + (1 - self.momentum) * counts
                self.acc_sum.copy_(torch.where(nonempty, updated, self.acc_sum))
            counts = self.acc_sum
        n = nonempty.sum().clamp(min=1)
        per_region = torch.where(nonempty, tot.float() / (counts.clamp(min=1e-12) * n), torch.zeros_like(counts))
        weights = per_region[region].to(g.dtype)
        return torch.where(valid, weights, torch.zeros_like(weights))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, {super().extra_repr()}"


@register
class GHMC(_GradientDensity):
    """GHM-C: sigmoid binary cross-entropy weighted by the inverse density of g = |sigmoid(x) - target| (Eq. 7-8).

    ``forward(pred (N, C) logits, target, weight, ...)``: target is (N,) class indices in [0, C] (C or any index
    outside [0, C) is the background: an all-zero row) with ``weight`` (N,) per sample, or (N, C) binary labels
    with ``weight`` (N, C). Elements with weight 0 are ignored (without ``weight``, none); the value of a positive
    weight plays no other part, and ``tot`` is the count of valid elements (MMDetection).
    """

    last_edge = 1.0 + 1e-6  # g = |p - y| reaches 1: the last region takes it (MMDetection's edge)

    def __init__(self, bins: int = 10, momentum: float = 0.0, use_sigmoid: bool = True,
                 reduction: Reduction = "mean", loss_weight: float = 1.0):
        super().__init__(bins, momentum, reduction, loss_weight)
        if not use_sigmoid:
            raise ValueError("GHMC: only the sigmoid form is defined (use_sigmoid=True)")
        self.use_sigmoid = use_sigmoid

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.dim() != 2:
            raise ValueError(f"GHMC: pred must be (N, C) logits, got {tuple(pred.shape)}")
        if target.dim() == 1:  # class indices -> binary rows
            num_classes = pred.shape[1]
            target = target.long()
            fg = (target >= 0) & (target < num_classes)
            onehot = F.one_hot(torch.where(fg, target, torch.full_like(target, num_classes)), num_classes + 1)
            target = onehot[:, :num_classes]
            if weight is not None and weight.dim() == 1:
                weight = weight[:, None].expand_as(pred)
        if target.shape != pred.shape:
            raise ValueError(f"GHMC: target must be (N,) class indices or pred's shape {tuple(pred.shape)}, got "
                             f"{tuple(target.shape)}")
        target = target.to(pred.dtype)
        valid = torch.ones_like(pred, dtype=torch.bool) if weight is None else (weight > 0).expand_as(pred)
        g = (pred.detach().sigmoid() - target).abs()
        tot = valid.sum().clamp(min=1).to(pred.dtype)
        weights = self.harmonizing_weights(g, valid, tot)
        loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        return self.loss_weight * weight_reduce_loss(loss, weights, reduction, avg_factor=tot)


@register
class GHMR(_GradientDensity):
    """GHM-R: the authentic smooth L1 ``ASL1(d) = sqrt(d^2 + mu^2) - mu`` of d = pred - target (Eq. 14), weighted by
    the inverse density of its gradient norm ``g = |d| / sqrt(d^2 + mu^2)`` (Eq. 16).

    ``forward(pred (N, 4), target (N, 4), weight (N, 4) or (N,), ...)`` on encoded deltas; elements with weight 0
    are ignored, and ``tot`` is the sum of the weights (MMDetection).
    """

    last_edge = 1e3  # g = |d| / sqrt(d^2 + mu^2) < 1 (MMDetection's edge)

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0.0, reduction: Reduction = "mean",
                 loss_weight: float = 1.0):
        super().__init__(bins, momentum, reduction, loss_weight)
        if mu <= 0:
            raise ValueError(f"GHMR: mu must be > 0, got {mu}")
        self.mu = float(mu)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self._reduction(reduction_override)
        if pred.shape != target.shape:
            raise ValueError(f"GHMR: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if weight is None:
            weight = torch.ones_like(pred)
        elif weight.dim() == pred.dim() - 1:
            weight = weight[..., None].expand_as(pred)
        diff = pred - target.to(pred.dtype)
        root = torch.sqrt(diff * diff + self.mu * self.mu)
        loss = root - self.mu
        g = (diff / root).abs().detach()
        tot = weight.float().sum().clamp(min=1).to(pred.dtype)
        weights = self.harmonizing_weights(g, weight > 0, tot)
        return self.loss_weight * weight_reduce_loss(loss, weights, reduction, avg_factor=tot)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, {super().extra_repr()}"
