"""Assign priors by where they sit in a box: its central "effective" region or its "ignoring" ring (FSAF, Zhu et al.
2019, Sec. 3.3; MMDetection's ``CenterRegionAssigner``).

For a gt box b and a scale s, ``b * s`` is the box of the same centre with s times its width and height. A prior is:

- **positive** for b when its centre lies strictly inside b and its overlap with the effective region
  ``b * pos_scale`` exceeds ``min_pos_iof`` of the prior's own area (IoF). Where a prior qualifies for several gts,
  the smallest gt (by area) takes it;
- **shadowed** by b when it is not one of b's own positives (b's effective-region candidates that a smaller gt took
  count too) and it overlaps ``b * neg_scale`` by more than ``min_pos_iof`` of its area. A shadowed prior is trained
  as background for every class except b's, whose classification is ignored (the paper's ignoring region; the
  prior's other classes stay negatives). Where a prior would be positive for class c and shadowed by another gt of
  class c, ``foreground_dominate`` keeps it positive; otherwise (the default) it becomes background with c ignored;
- **ignored** (every class and the box) when its centre lies strictly inside an ignore box (crowd / difficult) scaled
  by ``ignore_gt_scale``;
- **negative** otherwise.

The paper's ignoring region is ``b * 0.5`` and is also propagated to the two adjacent pyramid levels; MMDetection's
FSAF config uses ``neg_scale = pos_scale = 0.2`` and does not propagate it. This module follows MMDetection.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.ops import bbox_overlaps
from raydet.registry import register

__all__ = ["CenterRegionAssigner", "CenterRegionAssignResult", "scale_boxes"]


def scale_boxes(boxes: Tensor, scale: float) -> Tensor:
    """(K, 4) boxes (x1, y1, x2, y2) -> the boxes of the same centres with ``scale`` x their width and height."""
    ctr = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * (0.5 * scale)
    return torch.cat([ctr - half, ctr + half], dim=1)


def _centres_inside(points: Tensor, boxes: Tensor) -> Tensor:
    """(N, 2) points, (K, 4) boxes -> (N, K) bool: the point lies strictly inside the box."""
    x, y = points[:, 0:1], points[:, 1:2]
    return (x > boxes[:, 0]) & (x < boxes[:, 2]) & (y > boxes[:, 1]) & (y < boxes[:, 3])


@dataclass
class CenterRegionAssignResult(AssignResult):
    """An ``AssignResult`` with the priors' shadowed classes.

    Attributes:
        shadowed_labels: (S, 2) long rows (prior index, class): that prior's classification of that class is
            ignored (the ignoring region of a gt of that class).
    """

    shadowed_labels: Tensor = dataclasses.field(default_factory=lambda: torch.zeros((0, 2), dtype=torch.long))

    def clone(self) -> "CenterRegionAssignResult":
        return dataclasses.replace(super().clone(), shadowed_labels=self.shadowed_labels.clone())

    def add_gt_(self, gt_labels: Tensor) -> None:
        """Prepend the gts as priors (see ``AssignResult.add_gt_``); the shadowed prior indices shift by K."""
        super().add_gt_(gt_labels)
        shift = torch.tensor([int(gt_labels.numel()), 0], dtype=torch.long, device=self.shadowed_labels.device)
        self.shadowed_labels = self.shadowed_labels + shift

    def to(self, device: torch.device | str) -> "CenterRegionAssignResult":
        return dataclasses.replace(super().to(device), shadowed_labels=self.shadowed_labels.to(device))


@register
class CenterRegionAssigner:
    """Assign priors to gts by their effective and ignoring regions (see the module docstring).

    Args:
        pos_scale: relative size of the effective region (the paper's epsilon_e; MMDetection's FSAF: 0.2).
        neg_scale: relative size of the region whose remaining priors are shadowed (MMDetection's FSAF: 0.2; the
            paper's ignoring region epsilon_i: 0.5).
        min_pos_iof: least overlap, as a fraction of the prior's area, with a region (MMDetection: 0.01).
        ignore_gt_scale: ignore boxes are scaled by this before testing prior centres (MMDetection: 0.5).
        foreground_dominate: a prior both positive for class c and shadowed for class c stays positive
            (MMDetection's default: False, it becomes background with c ignored).

    ``assign(priors, gt_boxes, gt_labels, gt_boxes_ignore)`` returns a :class:`CenterRegionAssignResult`:
    ``gt_inds`` 0 negative, -1 ignored, k + 1 gt k; ``max_overlaps`` each prior's best IoU with a gt.
    """

    def __init__(self, pos_scale: float, neg_scale: float, min_pos_iof: float = 0.01, ignore_gt_scale: float = 0.5,
                 foreground_dominate: bool = False):
        for name, value in (("pos_scale", pos_scale), ("neg_scale", neg_scale), ("ignore_gt_scale", ignore_gt_scale)):
            if not value > 0:
                raise ValueError(f"CenterRegionAssigner: {name} must be > 0, got {value}")
        if not 0 <= min_pos_iof < 1:
            raise ValueError(f"CenterRegionAssigner: min_pos_iof must be in [0, 1), got {min_pos_iof}")
        self.pos_scale = float(pos_scale)
        self.neg_scale = float(neg_scale)
        self.min_pos_iof = float(min_pos_iof)
        self.ignore_gt_scale = float(ignore_gt_scale)
        self.foreground_dominate = bool(foreground_dominate)

    def assign(self, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               gt_boxes_ignore: Tensor | None = None) -> CenterRegionAssignResult:
        """Assign N priors (N, 4) to K gts (K, 4) with labels (K,) (None: class 0); ignore boxes (G, 4) optional."""
        priors = priors[:, :4].float()
        device = priors.device
        gt_boxes = gt_boxes.reshape(-1, 4).to(device=device, dtype=torch.float32)
        n, k = priors.shape[0], gt_boxes.shape[0]
        if gt_labels is None:
            gt_labels = torch.zeros(k, dtype=torch.long, device=device)
        gt_labels = gt_labels.to(device=device, dtype=torch.long)
        centres = (priors[:, :2] + priors[:, 2:]) * 0.5

        gt_inds = torch.zeros(n, dtype=torch.long, device=device)
        max_overlaps = priors.new_zeros(n)
        shadowed = torch.zeros((0, 2), dtype=torch.long, device=device)  # (prior, gt) pairs
        if n and k:
            in_core = _centres_inside(centres, gt_boxes) & (
                bbox_overlaps(priors, scale_boxes(gt_boxes, self.pos_scale), mode="iof") > self.min_pos_iof)
            in_shadow = (bbox_overlaps(priors, scale_boxes(gt_boxes, self.neg_scale), mode="iof") > self.min_pos_iof
                         ) & ~in_core
            # priority: rank by area, the smallest gt highest (ties: the later gt)
            areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
            priority = torch.argsort(torch.argsort(areas, descending=True, stable=True))
            pair_priority = torch.where(in_core, priority[None, :], priority.new_tensor(-1))
            best_priority, best_gt = pair_priority.max(dim=1)
            matched = best_priority >= 0
            gt_inds[matched] = best_gt[matched] + 1
            # the other gts whose effective region holds a matched prior shadow it
            lost = in_core.clone()
            lost[matched, best_gt[matched]] = False
            shadowed = torch.cat([torch.nonzero(in_shadow), torch.nonzero(lost)])
            max_overlaps = bbox_overlaps(priors, gt_boxes).max(dim=1).values

        if gt_boxes_ignore is not None and gt_boxes_ignore.numel() and n:
            ignore = scale_boxes(gt_boxes_ignore.reshape(-1, 4).to(device=device, dtype=torch.float32),
                                 self.ignore_gt_scale)
            gt_inds[_centres_inside(centres, ignore).any(dim=1)] = -1

        labels = torch.full((n,), -1, dtype=torch.long, device=device)
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1]
        shadowed_labels = torch.stack([shadowed[:, 0], gt_labels[shadowed[:, 1]]], dim=1)
        clash = labels[shadowed_labels[:, 0]] == shadowed_labels[:, 1]  # positive and shadowed for one class
        if self.foreground_dominate:
            shadowed_labels = shadowed_labels[~clash]
        else:
            clashing = shadowed_labels[clash, 0]
            labels[clashing] = -1
            gt_inds[clashing] = 0
        return CenterRegionAssignResult(num_gts=k, gt_inds=gt_inds, max_overlaps=max_overlaps, labels=labels,
                                        shadowed_labels=shadowed_labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pos_scale={self.pos_scale}, neg_scale={self.neg_scale}, "
                f"min_pos_iof={self.min_pos_iof}, ignore_gt_scale={self.ignore_gt_scale}, "
                f"foreground_dominate={self.foreground_dominate})")
