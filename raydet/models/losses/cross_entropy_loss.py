"""Cross-entropy: softmax, per-class sigmoid and per-pixel mask forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raydet.models.losses.utils import BaseLoss, Reduction, weight_reduce_loss
from raydet.registry import register

__all__ = ["CrossEntropyLoss"]


@register
class CrossEntropyLoss(BaseLoss):
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
