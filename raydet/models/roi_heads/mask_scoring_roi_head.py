"""Mask Scoring R-CNN's RoI head (Huang et al. 2019): Mask R-CNN's branches plus a MaskIoU head that rescores masks.

Training adds the MaskIoU loss on the positive RoIs; at test each detection's mask is scored by its classification
score times the predicted IoU of its mask (paper Sec. 3.2). Results carry that score as ``mask_scores``; the boxes
keep their classification scores, and COCO ``segm`` evaluation ranks masks by ``mask_scores``
(:func:`raydet.evaluation.predictions_to_coco_results`).
"""
from __future__ import annotations

import torch

from raydet.models.head_configs import DetectionConfig
from raydet.models.roi_heads.roi_extractors import boxes_to_rois
from raydet.models.roi_heads.standard_roi_head import StandardRoIHead
from raydet.registry import register

__all__ = ["MaskScoringRoIHead"]


@register
class MaskScoringRoIHead(StandardRoIHead):
    """:class:`StandardRoIHead` with a mask branch and ``mask_iou_head``
    (:class:`~raydet.models.roi_heads.mask_heads.MaskIoUHead`) on the mask branch's RoI features.

    ``predicts_mask_scores``: its results carry ``mask_scores`` (``raydet infer`` writes them as ``mask_score``).
    """

    predicts_mask_scores = True

    def __init__(self, bbox_roi_extractor, bbox_head, assigner, sampler, mask_roi_extractor, mask_head,
                 mask_iou_head, test: DetectionConfig = DetectionConfig()):
        super().__init__(bbox_roi_extractor, bbox_head, assigner, sampler, mask_roi_extractor, mask_head, test)
        if mask_head is None or mask_iou_head is None:
            raise ValueError("MaskScoringRoIHead needs mask_roi_extractor, mask_head and mask_iou_head")
        if mask_iou_head.num_classes != mask_head.num_classes:
            raise ValueError(f"mask_iou_head.num_classes ({mask_iou_head.num_classes}) must equal "
                             f"mask_head.num_classes ({mask_head.num_classes})")
        self.mask_iou_head = mask_iou_head

    def _class_logits(self, mask_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(P, C, M, M) -> (P, M, M) the mask logits of each RoI's class (channel 0 of a class-agnostic head)."""
        channel = torch.zeros_like(labels) if self.mask_head.class_agnostic else labels
        return mask_pred[torch.arange(labels.numel(), device=labels.device), channel]

    def mask_loss(self, feats, samples, batch) -> dict[str, torch.Tensor]:
        """``loss_mask`` as Mask R-CNN, and ``loss_mask_iou`` on the positives (their mask logits keep gradient)."""
        mask_feats = self.mask_roi_extractor(feats, boxes_to_rois([s.pos_boxes for s in samples]))
        mask_pred = self.mask_head(mask_feats)
        targets = [self.mask_head.targets(s.pos_boxes, s.pos_assigned_gt_inds, batch["gt_masks"][i])
                   for i, s in enumerate(samples)]
        labels = torch.cat([s.pos_gt_labels for s in samples])
        losses = self.mask_head.loss(mask_pred, torch.cat(targets), labels)
        logits = self._class_logits(mask_pred, labels)
        iou_pred = self.mask_iou_head(mask_feats, logits)
        iou_pred = iou_pred[torch.arange(labels.numel(), device=labels.device), labels]
        iou_targets = [self.mask_iou_head.targets(s.pos_boxes, s.pos_assigned_gt_inds, batch["gt_masks"][i], lg, t)
                       for i, (s, lg, t) in enumerate(zip(samples, logits.split([s.num_pos for s in samples]),
                                                           targets))]
        losses.update(self.mask_iou_head.loss(iou_pred, torch.cat(iou_targets)))
        return losses

    def predict_masks(self, feats, det_boxes: list[torch.Tensor], results: list[dict], img_metas: list[dict]):
        """Adds ``masks`` (as Mask R-CNN) and ``mask_scores`` (m,) = score x predicted MaskIoU to each result."""
        labels = torch.cat([r["labels"] for r in results])
        mask_feats = self.mask_roi_extractor(feats, boxes_to_rois(det_boxes))
        mask_pred = self.mask_head(mask_feats)
        iou_pred = self.mask_iou_head(mask_feats, self._class_logits(mask_pred, labels))
        scores = self.mask_iou_head.mask_scores(iou_pred, labels, torch.cat([r["scores"] for r in results]))
        for res, s in zip(results, scores.split([b.shape[0] for b in det_boxes])):
            res["mask_scores"] = s
        self.paste_mask_probabilities(self.mask_head.probabilities(mask_pred, labels), det_boxes, results, img_metas)
