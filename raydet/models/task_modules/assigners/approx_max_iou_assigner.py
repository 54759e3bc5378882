"""Assign square anchors by the best IoU over each square's approximate anchors (Guided Anchoring, Wang et al. 2019,
Sec. 3.3 "Anchor shape target"; MMDetection's ``ApproxMaxIoUAssigner``).

The best shape for a location is not known in advance, so its IoU with a ground truth is approximated by the best
IoU among a set of sampled anchor shapes at that location (the "approxs": RetinaNet's 9 scale x ratio anchors). The
square anchor of the location then takes that approximate IoU, and the usual max-IoU rules apply.
"""
from __future__ import annotations

import torch
from torch import Tensor

from raydet.models.task_modules.assigners.assign_result import AssignResult
from raydet.models.task_modules.assigners.max_iou_assigner import MaxIoUAssigner
from raydet.ops import bbox_overlaps
from raydet.registry import register

__all__ = ["ApproxMaxIoUAssigner"]


@register
class ApproxMaxIoUAssigner(MaxIoUAssigner):
    """:class:`MaxIoUAssigner` on the IoU ``max_a IoU(approxs[n, a], gt_k)`` of each square n and gt k.

    Arguments as :class:`~raydet.models.task_modules.assigners.MaxIoUAssigner` (MMDetection's
    ``ApproxMaxIoUAssigner`` takes the same). Ignore boxes are matched against the squares themselves (IoF).
    """

    def assign(self, squares: Tensor, approxs: Tensor, gt_boxes: Tensor, gt_labels: Tensor | None = None,
               gt_boxes_ignore: Tensor | None = None) -> AssignResult:
        """Assign N squares (N, 4), each with A approxs (N, A, 4), to K gts (K, 4) with labels (K,).

        Raises:
            ValueError: ``approxs`` is not (N, A, 4) for the N squares.
        """
        if approxs.dim() != 3 or approxs.shape[0] != squares.shape[0] or approxs.shape[-1] != 4:
            raise ValueError(f"ApproxMaxIoUAssigner: approxs must be (N, A, 4) for {squares.shape[0]} squares, got "
                             f"{tuple(approxs.shape)}")
        device = squares.device
        on_cpu = self.gpu_assign_thr > 0 and gt_boxes.shape[0] > self.gpu_assign_thr
        if on_cpu:
            squares, approxs, gt_boxes = squares.cpu(), approxs.cpu(), gt_boxes.cpu()
            gt_labels = gt_labels.cpu() if gt_labels is not None else None
            gt_boxes_ignore = gt_boxes_ignore.cpu() if gt_boxes_ignore is not None else None
        squares = squares[:, :4].float()
        gt_boxes = gt_boxes[:, :4].to(device=squares.device, dtype=torch.float32)
        n, a = approxs.shape[:2]
        num_gts = gt_boxes.shape[0]
        if n == 0 or num_gts == 0:
            overlaps = squares.new_zeros((num_gts, n))
        else:
            all_overlaps = bbox_overlaps(gt_boxes, approxs.reshape(-1, 4).float())  # (K, N * A)
            overlaps = all_overlaps.reshape(num_gts, n, a).max(dim=2).values  # (K, N)
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and n > 0):
            ignore = gt_boxes_ignore[:, :4].to(device=squares.device, dtype=torch.float32)
            if self.ignore_wrt_candidates:
                ignore_max = bbox_overlaps(squares, ignore, mode="iof").max(dim=1).values
            else:
                ignore_max = bbox_overlaps(ignore, squares, mode="iof").max(dim=0).values
            overlaps[:, ignore_max > self.ignore_iof_thr] = -1
        result = self.assign_wrt_overlaps(overlaps, gt_labels)
        return result.to(device) if on_cpu else result
