"""The outcome of assigning candidate boxes to ground truths, shared by every assigner."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AssignResult"]


@dataclass
class AssignResult:
    """The assignment of N boxes to K gts.

    Attributes:
        num_gts: K.
        gt_inds: (N,) long: 0 = negative (background), -1 = ignored, k + 1 = assigned to gt k.
        max_overlaps: (N,) float: each box's best IoU with any gt (-1 for boxes ignored via ignore boxes).
        labels: (N,) long: the assigned gt's label where positive, -1 elsewhere.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    @property
    def num_boxes(self) -> int:
        return int(self.gt_inds.numel())

    def clone(self) -> "AssignResult":
        """A copy whose tensors can be changed without touching this one."""
        return dataclasses.replace(self, gt_inds=self.gt_inds.clone(), max_overlaps=self.max_overlaps.clone(),
                                   labels=self.labels.clone())

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Prepend the K gts as boxes assigned to themselves (IoU 1), in place (gts added as proposals)."""
        k = int(gt_labels.numel())
        if k != self.num_gts:
            raise ValueError(f"add_gt_ got {k} gt labels for an assignment with {self.num_gts} gts")
        device = self.gt_inds.device
        self_inds = torch.arange(1, k + 1, dtype=torch.long, device=device)
        self.gt_inds = torch.cat([self_inds, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(k), self.max_overlaps])
        self.labels = torch.cat([gt_labels.to(device=device, dtype=torch.long), self.labels])

    def to(self, device: torch.device | str) -> "AssignResult":
        return dataclasses.replace(self, gt_inds=self.gt_inds.to(device), max_overlaps=self.max_overlaps.to(device),
                                   labels=self.labels.to(device))
