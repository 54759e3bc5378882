"""The second stage of Faster / Mask R-CNN: sample proposals, pool RoI features, classify, refine, segment."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.head_configs import DetectionConfig
from raydet.models.postprocess import boxes_to_original, paste_masks
from raydet.models.roi_heads.roi_extractors import boxes_to_rois
from raydet.models.task_modules.samplers import SamplingContext
from raydet.registry import register

__all__ = ["StandardRoIHead"]


@register
class StandardRoIHead(nn.Module):
    """Box branch (extractor + box head) and an optional mask branch (extractor + FCN mask head).

    Args:
        bbox_roi_extractor, bbox_head: the box branch.
        assigner, sampler: match proposals to ground truth (IoU 0.5) and sample 512 RoIs at 25% positives, adding
            the ground-truth boxes as proposals.
        mask_roi_extractor, mask_head: the mask branch (Mask R-CNN); trained on the positive RoIs only.
        test: score threshold, class-wise NMS and detections per image; ``mask_thr`` binarises pasted masks.
    """

    def __init__(self, bbox_roi_extractor, bbox_head, assigner, sampler, mask_roi_extractor=None, mask_head=None,
                 test: DetectionConfig = DetectionConfig()):
        super().__init__()
        if (mask_head is None) != (mask_roi_extractor is None):
            raise ValueError("mask_head and mask_roi_extractor must be given together")
        self.bbox_roi_extractor = bbox_roi_extractor
        self.bbox_head = bbox_head
        self.mask_roi_extractor = mask_roi_extractor
        self.mask_head = mask_head
        self.assigner = assigner
        self.sampler = sampler
        self.test = test

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    def sample(self, proposals: list[torch.Tensor], batch: dict, feats=None):
        """Assign and sample each image's proposals; returns one SamplingResult per image.

        With ``feats`` (the batch's pyramid maps), each image's sampler call gets ``context=``
        :class:`~raydet.models.task_modules.samplers.SamplingContext` (that image's maps, ``bbox_forward``, the box
        head), which a loss-ranking sampler (``OHEMSampler``) needs and other samplers ignore.
        """
        results = []
        ignores = batch.get("gt_boxes_ignore") or [None] * len(proposals)
        for i, props in enumerate(proposals):
            gt_boxes = batch["gt_boxes"][i].to(props.device)
            gt_labels = batch["gt_labels"][i].to(props.device)
            ignore = ignores[i]
            ignore = ignore.to(props.device) if ignore is not None and ignore.numel() else None
            assign = self.assigner.assign(props, gt_boxes, gt_labels, ignore)
            context = None if feats is None else SamplingContext(tuple(f[i:i + 1] for f in feats), self.bbox_forward,
                                                                 self.bbox_head)
            results.append(self.sampler.sample(assign, props, gt_boxes, gt_labels, context=context))
        return results

    def bbox_forward(self, feats, rois: torch.Tensor):
        """(R, 5) RoIs -> the box head's (cls_score, bbox_pred); a subclass changes how its features are pooled."""
        return self.bbox_head(self.bbox_roi_extractor(feats, rois))

    def loss(self, feats, proposals: list[torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Box (and mask) losses; proposals are per image (k_i, 4) in input pixels, without gradient."""
        samples = self.sample(proposals, batch, feats)
        rois = boxes_to_rois([s.boxes for s in samples])
        cls_score, bbox_pred = self.bbox_forward(feats, rois)
        num_classes = self.bbox_head.num_classes
        labels, targets = [], []
        for s in samples:
            lab = s.pos_boxes.new_full((s.num_pos + s.num_neg,), num_classes, dtype=torch.long)
            lab[: s.num_pos] = s.pos_gt_labels
            tgt = s.pos_boxes.new_zeros((s.num_pos + s.num_neg, 4))
            if s.num_pos:
                tgt[: s.num_pos] = (s.pos_gt_boxes if self.bbox_head.reg_decoded_bbox
                                    else self.bbox_head.bbox_coder.encode(s.pos_boxes, s.pos_gt_boxes))
            labels.append(lab)
            targets.append(tgt)
        losses = self.bbox_head.loss(cls_score, bbox_pred, rois, torch.cat(labels), torch.cat(targets))
        if self.with_mask:
            losses.update(self.mask_loss(feats, samples, batch))
        return losses

    def mask_loss(self, feats, samples, batch) -> dict[str, torch.Tensor]:
        pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
        mask_pred = self.mask_head(self.mask_roi_extractor(feats, pos_rois))
        targets = torch.cat([self.mask_head.targets(s.pos_boxes, s.pos_assigned_gt_inds, batch["gt_masks"][i])
                             for i, s in enumerate(samples)])
        labels = torch.cat([s.pos_gt_labels for s in samples])
        return self.mask_head.loss(mask_pred, targets, labels)

    @torch.no_grad()
    def predict(self, feats, proposals: list[torch.Tensor], img_metas: list[dict]) -> list[dict]:
        """Detections per image in original-image pixels (boxes, scores, labels, and masks with a mask head)."""
        rois = boxes_to_rois(proposals)
        cls_score, bbox_pred = self.bbox_forward(feats, rois)
        counts = [p.shape[0] for p in proposals]
        results, det_boxes_input = [], []
        for meta, r, c, b in zip(img_metas, rois.split(counts), cls_score.split(counts), bbox_pred.split(counts)):
            boxes, scores, labels = self.bbox_head.predict_boxes(r, c, b, meta["img_shape"][:2], self.test)
            det_boxes_input.append(boxes)
            results.append({"boxes": boxes_to_original(boxes, meta), "scores": scores, "labels": labels})
        if self.with_mask:
            self.predict_masks(feats, det_boxes_input, results, img_metas)
        return results

    def predict_masks(self, feats, det_boxes: list[torch.Tensor], results: list[dict], img_metas: list[dict]):
        """Adds ``masks`` (m, h0, w0) bool to each result, pasted at the boxes in original-image pixels."""
        rois = boxes_to_rois(det_boxes)
        labels = torch.cat([r["labels"] for r in results])
        probs = self.mask_head.probabilities(self.mask_head(self.mask_roi_extractor(feats, rois)), labels)
        self.paste_mask_probabilities(probs, det_boxes, results, img_metas)

    def paste_mask_probabilities(self, probs: torch.Tensor, det_boxes: list[torch.Tensor], results: list[dict],
                                 img_metas: list[dict]):
        """(sum m_i, M, M) mask probabilities of the detections -> ``masks`` of each result (see predict_masks)."""
        for meta, res, p in zip(img_metas, results, probs.split([b.shape[0] for b in det_boxes])):
            if meta.get("flip", False):
                p = p.flip(-1)
            h0, w0 = meta["ori_shape"][:2]
            if self.test.mask_paste == "torchvision":
                from torchvision.models.detection.roi_heads import paste_masks_in_image

                pasted = paste_masks_in_image(p[:, None], res["boxes"], (h0, w0))[:, 0]
                res["masks"] = pasted > self.test.mask_thr if self.test.mask_thr >= 0 else pasted
            else:
                res["masks"] = paste_masks(p, res["boxes"], h0, w0, self.test.mask_thr)
