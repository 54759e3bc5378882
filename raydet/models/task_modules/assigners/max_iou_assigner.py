"""Assign each candidate box (anchor or proposal) to a ground-truth box, to the background, or to "ignore".

``MaxIoUAssigner`` follows MMDetection's semantics exactly (see its docstring); everything is vectorised over boxes
and gts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.ops import bbox_overlaps
from raydet.registry import register

__all__ = ["MaxIoUAssigner"]


@register
class MaxIoUAssigner:
    """Assign boxes to gts by IoU (MMDetection's ``MaxIoUAssigner``).

    1. Every box starts as ignored (-1).
    2. Boxes whose best IoU is in [0, neg_iou_thr) (or in [lo, hi) for a tuple) become negatives (0).
    3. Boxes whose best IoU is >= pos_iou_thr are assigned to that best gt.
    4. With match_low_quality, every gt whose best IoU is >= min_pos_iou claims the box(es) that reach that best IoU
       (all of them with gt_max_assign_all, else the first); a later gt overrides an earlier one on a shared box.
    Boxes whose IoF with an ignore box exceeds ignore_iof_thr (when > 0) get IoU -1 with every gt, so they end
    ignored unless a low-quality match claims them.

    Args:
        pos_iou_thr: IoU threshold for positives.
        neg_iou_thr: IoU threshold for negatives, or a (lo, hi) band.
        min_pos_iou: the least IoU for a low-quality match.
        gt_max_assign_all: give a gt all boxes tied at its best IoU, not only the first.
        ignore_iof_thr: IoF threshold with ignore boxes (<= 0 turns ignoring off).
        ignore_wrt_candidates: IoF as overlap area / candidate box area (else / ignore box area).
        match_low_quality: enable step 4.
        gpu_assign_thr: when > 0 and there are more gts than this, compute on the CPU to save accelerator memory.
        low_quality_assign: which gt a low-quality match (step 4) assigns the box to: ``"claiming_gt"``, the gt
            whose best box it is (MMDetection); ``"best_gt"``, the box's own highest-IoU gt (first on ties), as
            torchvision's and Detectron2's ``Matcher(allow_low_quality_matches=True)`` (which has no
            ``min_pos_iou``: set it to 0 to match).
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: float | tuple[float, float], min_pos_iou: float = 0.0,
                 gt_max_assign_all: bool = True, ignore_iof_thr: float = -1, ignore_wrt_candidates: bool = True,
                 match_low_quality: bool = True, gpu_assign_thr: int = -1, low_quality_assign: str = "claiming_gt"):
        if low_quality_assign not in ("claiming_gt", "best_gt"):
            raise ValueError(f"low_quality_assign must be 'claiming_gt' or 'best_gt', got {low_quality_assign!r}")
        if isinstance(neg_iou_thr, (list, tuple)):
            if len(neg_iou_thr) != 2 or neg_iou_thr[0] > neg_iou_thr[1]:
                raise ValueError(f"neg_iou_thr as a band must be (lo, hi) with lo <= hi, got {neg_iou_thr}")
            neg_iou_thr = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        else:
            neg_iou_thr = float(neg_iou_thr)
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = float(min_pos_iou)
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = float(ignore_iof_thr)
        self.ignore_wrt_candidates = ignore_wrt_candidates
        self.match_low_quality = match_low_quality
        self.gpu_assign_thr = int(gpu_assign_thr)
        self.low_quality_assign = low_quality_assign

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               gt_boxes_ignore: Tensor | None = None) -> AssignResult:
        """Assign N boxes (N, 4) to K gts (K, 4) with labels (K,); ignore boxes (G, 4) are optional.

        Without gt_labels, positives get label 0 (class-agnostic, as for the RPN).
        """
        device = boxes.device
        on_cpu = self.gpu_assign_thr > 0 and gt_boxes.shape[0] > self.gpu_assign_thr
        if on_cpu:
            boxes, gt_boxes = boxes.cpu(), gt_boxes.cpu()
            gt_labels = gt_labels.cpu() if gt_labels is not None else None
            gt_boxes_ignore = gt_boxes_ignore.cpu() if gt_boxes_ignore is not None else None
        boxes = boxes[:, :4].float()
        gt_boxes = gt_boxes[:, :4].to(device=boxes.device, dtype=torch.float32)

        overlaps = bbox_overlaps(gt_boxes, boxes)  # (K, N)
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and boxes.numel() > 0):
            ignore = gt_boxes_ignore[:, :4].to(device=boxes.device, dtype=torch.float32)
            if self.ignore_wrt_candidates:
                ignore_max = bbox_overlaps(boxes, ignore, mode="iof").max(dim=1).values
            else:
                ignore_max = bbox_overlaps(ignore, boxes, mode="iof").max(dim=0).values
            overlaps[:, ignore_max > self.ignore_iof_thr] = -1
        result = self.assign_wrt_overlaps(overlaps, gt_labels)
        return result.to(device) if on_cpu else result

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor | None = None) -> AssignResult:
        """Assign from a (K, N) gt-by-box IoU matrix."""
        num_gts, num_boxes = overlaps.shape
        device = overlaps.device
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        labels = torch.full((num_boxes,), -1, dtype=torch.long, device=device)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds.fill_(0)
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros((num_boxes,)), labels)

        max_overlaps, argmax = overlaps.max(dim=0)  # per box
        if isinstance(self.neg_iou_thr, tuple):
            lo, hi = self.neg_iou_thr
            neg = (max_overlaps >= lo) & (max_overlaps < hi)
        else:
            neg = (max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)
        gt_inds[neg] = 0
        pos = max_overlaps >= self.pos_iou_thr
        gt_inds = torch.where(pos, argmax + 1, gt_inds)

        if self.match_low_quality:
            gt_max, gt_argmax = overlaps.max(dim=1)  # per gt
            eligible = gt_max >= self.min_pos_iou  # (K,)
            if self.gt_max_assign_all:
                claims = overlaps == gt_max[:, None]
            else:
                claims = torch.zeros_like(overlaps, dtype=torch.bool)
                claims[torch.arange(num_gts, device=device), gt_argmax] = True
            claims &= eligible[:, None]  # (K, N)
            if self.low_quality_assign == "best_gt":  # the box keeps its own best gt (torchvision's Matcher)
                gt_inds = torch.where(claims.any(dim=0), argmax + 1, gt_inds)
            else:
                # The last gt claiming a box wins, as in the reference's loop over gts: argmax returns the first
                # maximum, so search the gts in reverse order.
                last = num_gts - 1 - claims.flip(0).to(torch.uint8).argmax(dim=0)  # (N,)
                gt_inds = torch.where(claims.any(dim=0), last + 1, gt_inds)

        positive = gt_inds > 0
        if gt_labels is None:
            labels = torch.where(positive, torch.zeros_like(labels), labels)
        else:
            gt_labels = gt_labels.to(device=device, dtype=torch.long)
            labels = torch.where(positive, gt_labels[(gt_inds - 1).clamp(min=0)], labels)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pos_iou_thr={self.pos_iou_thr}, neg_iou_thr={self.neg_iou_thr}, "
                f"min_pos_iou={self.min_pos_iou}, match_low_quality={self.match_low_quality})")
