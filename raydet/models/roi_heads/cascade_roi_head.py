"""Cascade R-CNN's RoI stage (Cai and Vasconcelos 2018): a sequence of box heads trained at rising IoU thresholds.

Stage t assigns its proposals at its own IoU (0.5 / 0.6 / 0.7 in the paper, Sec. 4.2), samples them, and trains its
box head (targets encoded with the stage's own ``target_stds``, Sec. 4.3) with loss weight ``stage_loss_weights[t]``.
The boxes it regresses, without gradient and without the ground truths the sampler added as proposals, are the
next stage's proposals (MMDetection's ``BBoxHead.refine_bboxes``). At test time every stage classifies the RoIs the
previous one refined; the class logits are averaged over the stages (MMDetection's ``CascadeRoIHead``; Detectron2
averages the softmax probabilities instead) and the boxes are the last stage's. Cascade Mask R-CNN adds one mask
head per stage, trained on that stage's positives; test masks average the stages' mask probabilities at the final
boxes.
"""
from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch
from torch import nn

from raydet.models.head_configs import DetectionConfig
from raydet.models.postprocess import boxes_to_original, paste_masks
from raydet.models.roi_heads.roi_extractors import boxes_to_rois
from raydet.models.task_modules.samplers import SamplingContext
from raydet.registry import register

__all__ = ["CascadeRoIHead", "stage_targets", "refine_boxes", "paste_mask_probabilities"]


def stage_targets(samples, bbox_head) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification labels and regression targets of one stage's sampled RoIs (all images, positives first).

    Args:
        samples: one ``SamplingResult`` per image.
        bbox_head: the stage's box head (its ``num_classes``, ``bbox_coder`` and ``reg_decoded_bbox``).

    Returns:
        labels (R,) long, ``num_classes`` for negatives; targets (R, 4): the positives' deltas encoded with the
        head's coder (its ``target_stds``), or their gt boxes for a decoded-box loss; zeros for negatives.
    """
    labels, targets = [], []
    for s in samples:
        lab = s.pos_boxes.new_full((s.num_pos + s.num_neg,), bbox_head.num_classes, dtype=torch.long)
        lab[: s.num_pos] = s.pos_gt_labels
        tgt = s.pos_boxes.new_zeros((s.num_pos + s.num_neg, 4))
        if s.num_pos:
            tgt[: s.num_pos] = (s.pos_gt_boxes if bbox_head.reg_decoded_bbox
                                else bbox_head.bbox_coder.encode(s.pos_boxes, s.pos_gt_boxes))
        labels.append(lab)
        targets.append(tgt)
    return torch.cat(labels), torch.cat(targets)


def _regress(bbox_head, boxes: torch.Tensor, labels: torch.Tensor, bbox_pred: torch.Tensor,
             img_shape: Sequence[int]) -> torch.Tensor:
    """(n, 4) boxes moved by the deltas of class ``labels`` (ignored by a class-agnostic head), clipped to the image."""
    deltas = bbox_head.select_class_deltas(bbox_pred, labels)
    return bbox_head.bbox_coder.decode(boxes, deltas, max_shape=img_shape[:2])


@torch.no_grad()
def refine_boxes(bbox_head, rois: torch.Tensor, cls_score: torch.Tensor, bbox_pred: torch.Tensor,
                 labels: torch.Tensor, pos_is_gt: list[torch.Tensor], img_shapes: list) -> list[torch.Tensor]:
    """One training stage's regressed boxes: the next stage's proposals (MMDetection's ``refine_bboxes``).

    Args:
        rois: (R, 5) the stage's sampled RoIs, each image's positives first.
        cls_score, bbox_pred: the stage's outputs for them.
        labels: (R,) their training labels (``num_classes`` for negatives): a positive regresses with its gt class,
            a negative with its highest-scoring foreground class (the same for a class-agnostic head).
        pos_is_gt: per image, (P_i,) 1 where a positive is a ground truth the sampler added; those are dropped.
        img_shapes: per image (h, w) of the network input, to clip to.

    Returns:
        per image, (k_i, 4) refined boxes, without gradient.
    """
    num_classes = bbox_head.num_classes
    labels = torch.where(labels == num_classes, cls_score[:, :num_classes].argmax(1), labels)
    out = []
    for i, (is_gt, shape) in enumerate(zip(pos_is_gt, img_shapes)):
        inds = torch.nonzero(rois[:, 0] == i, as_tuple=True)[0]
        boxes = _regress(bbox_head, rois[inds, 1:], labels[inds], bbox_pred[inds], shape)
        keep = torch.ones(inds.numel(), dtype=torch.bool, device=boxes.device)
        keep[: is_gt.numel()] = is_gt == 0
        out.append(boxes[keep].detach())
    return out


def paste_mask_probabilities(probs: torch.Tensor, results: list[dict], img_metas: list[dict],
                             test: DetectionConfig) -> None:
    """Add ``masks`` (m, h0, w0) to each result: (P, M, M) probabilities (all images, in order) pasted at the
    results' boxes in original-image pixels, binarised at ``test.mask_thr`` (as StandardRoIHead)."""
    for meta, res, p in zip(img_metas, results, probs.split([r["boxes"].shape[0] for r in results])):
        if meta.get("flip", False):
            p = p.flip(-1)
        h0, w0 = meta["ori_shape"][:2]
        if test.mask_paste == "torchvision":
            from torchvision.models.detection.roi_heads import paste_masks_in_image

            pasted = paste_masks_in_image(p[:, None], res["boxes"], (h0, w0))[:, 0]
            res["masks"] = pasted > test.mask_thr if test.mask_thr >= 0 else pasted
        else:
            res["masks"] = paste_masks(p, res["boxes"], h0, w0, test.mask_thr)


def _per_stage(value, num_stages: int, name: str) -> list:
    """A per-stage list: ``value`` itself when it is a list of ``num_stages``, else ``num_stages`` times ``value``."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f"{name} has {len(value)} entries but num_stages is {num_stages}")
        return list(value)
    return [value] * num_stages


@register
class CascadeRoIHead(nn.Module):
    """``num_stages`` box heads (and optional mask heads) in a cascade on one RoI extractor.

    Args:
        num_stages: cascade stages (3 in the paper).
        stage_loss_weights: weight of each stage's losses (1, 0.5, 0.25: MMDetection's config).
        bbox_roi_extractor: pools the RoI features of every stage (no parameters).
        bbox_head: a list of ``num_stages`` box heads (usually class-agnostic, each with its own ``target_stds``).
        assigner: a list of ``num_stages`` assigners (IoU 0.5 / 0.6 / 0.7), or one for all stages.
        sampler: one sampler for all stages, or a list of ``num_stages``.
        mask_roi_extractor, mask_head: Cascade Mask R-CNN: one extractor and a list of ``num_stages`` mask heads.
        test: score threshold, class-wise NMS, detections per image, mask threshold (as StandardRoIHead).

    Losses: ``loss_cls_s<t>``, ``loss_bbox_s<t>`` (and ``loss_mask_s<t>``) for stage t = 0, 1, ..., each already
    multiplied by its stage weight (MMDetection's ``s<t>.loss_cls`` ...).
    """

    def __init__(self, num_stages: int, stage_loss_weights: list[float], bbox_roi_extractor, bbox_head: list,
                 assigner, sampler, mask_roi_extractor=None, mask_head: list | None = None,
                 test: DetectionConfig = DetectionConfig()):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        if len(stage_loss_weights) != num_stages:
            raise ValueError(f"stage_loss_weights has {len(stage_loss_weights)} entries but num_stages is "
                             f"{num_stages}")
        if not isinstance(bbox_head, (list, tuple)) or len(bbox_head) != num_stages:
            raise ValueError(f"bbox_head must be a list of num_stages={num_stages} box heads")
        if (mask_head is None) != (mask_roi_extractor is None):
            raise ValueError("mask_head and mask_roi_extractor must be given together")
        if mask_head is not None and (not isinstance(mask_head, (list, tuple)) or len(mask_head) != num_stages):
            raise ValueError(f"mask_head must be a list of num_stages={num_stages} mask heads")
        if len({h.num_classes for h in bbox_head}) != 1:
            raise ValueError("every stage's bbox_head must have the same num_classes")
        self.num_stages = num_stages
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.bbox_roi_extractor = bbox_roi_extractor
        self.bbox_head = nn.ModuleList(bbox_head)
        self.mask_roi_extractor = mask_roi_extractor
        self.mask_head = nn.ModuleList(mask_head) if mask_head is not None else None
        self.assigner = _per_stage(assigner, num_stages, "assigner")
        self.sampler = _per_stage(sampler, num_stages, "sampler")
        self.test = test

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    @property
    def num_classes(self) -> int:
        return self.bbox_head[-1].num_classes

    # ------------------------------------------------------------------------------------------------ training

    def sample(self, stage: int, proposals: list[torch.Tensor], batch: dict, feats=None,
               forward_extra: dict | None = None):
        """Assign (with the stage's assigner) and sample each image's proposals; one SamplingResult per image.

        A sampler whose ``sample`` takes ``context`` (OHEM) gets a SamplingContext: the image's ``feats`` and this
        stage's box branch (``bbox_forward`` with the image's slice of the batched tensors in ``forward_extra``).
        """
        sampler = self.sampler[stage]
        wants_context = feats is not None and "context" in inspect.signature(sampler.sample).parameters
        results = []
        ignores = batch.get("gt_boxes_ignore") or [None] * len(proposals)
        for i, props in enumerate(proposals):
            gt_boxes = batch["gt_boxes"][i].to(props.device)
            gt_labels = batch["gt_labels"][i].to(props.device)
            ignore = ignores[i]
            ignore = ignore.to(props.device) if ignore is not None and ignore.numel() else None
            assign = self.assigner[stage].assign(props, gt_boxes, gt_labels, ignore)
            extra = {}
            if wants_context:
                image_extra = {k: v[i:i + 1] for k, v in (forward_extra or {}).items() if v is not None}
                forward = functools.partial(self.bbox_forward, stage, **image_extra)
                extra["context"] = SamplingContext(tuple(f[i:i + 1] for f in feats), forward, self.bbox_head[stage])
            results.append(sampler.sample(assign, props, gt_boxes, gt_labels, **extra))
        return results

    def bbox_forward(self, stage: int, feats, rois: torch.Tensor, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, 5) RoIs -> the stage's (cls_score, bbox_pred)."""
        return self.bbox_head[stage](self.bbox_roi_extractor(feats, rois))

    def loss(self, feats, proposals: list[torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Every stage's weighted losses; proposals are per image (k_i, 4) in input pixels, without gradient."""
        losses: dict[str, torch.Tensor] = {}
        img_shapes = [m["img_shape"] for m in batch["img_metas"]]
        boxes = proposals
        for t in range(self.num_stages):
            samples = self.sample(t, boxes, batch, feats)
            rois = boxes_to_rois([s.boxes for s in samples])
            cls_score, bbox_pred = self.bbox_forward(t, feats, rois)
            labels, targets = stage_targets(samples, self.bbox_head[t])
            stage = self.bbox_head[t].loss(cls_score, bbox_pred, rois, labels, targets)
            if self.with_mask:
                stage.update(self.mask_loss(t, feats, samples, batch))
            for name, value in stage.items():
                losses[f"{name}_s{t}"] = value * self.stage_loss_weights[t] if name.startswith("loss") else value
            if t < self.num_stages - 1:
                boxes = refine_boxes(self.bbox_head[t], rois, cls_score.detach(), bbox_pred.detach(), labels,
                                     [s.pos_is_gt for s in samples], img_shapes)
        return losses

    def mask_loss(self, stage: int, feats, samples, batch) -> dict[str, torch.Tensor]:
        """The stage's mask loss on its positive RoIs."""
        head = self.mask_head[stage]
        pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
        mask_pred = head(self.mask_roi_extractor(feats, pos_rois))
        targets = torch.cat([head.targets(s.pos_boxes, s.pos_assigned_gt_inds, batch["gt_masks"][i])
                             for i, s in enumerate(samples)])
        labels = torch.cat([s.pos_gt_labels for s in samples])
        return head.loss(mask_pred, targets, labels)

    # ------------------------------------------------------------------------------------------------ inference

    def refine_rois(self, feats, proposals: list[torch.Tensor], img_metas: list[dict], **extra):
        """Run the cascade on the proposals: (last stage's RoIs (R, 5), stage-averaged cls logits, last bbox_pred)."""
        rois = boxes_to_rois(proposals)
        counts = [p.shape[0] for p in proposals]
        scores = []
        for t in range(self.num_stages):
            cls_score, bbox_pred = self.bbox_forward(t, feats, rois, **extra)
            scores.append(cls_score)
            if t < self.num_stages - 1:
                head = self.bbox_head[t]
                labels = cls_score[:, :head.num_classes].argmax(1)
                refined = [_regress(head, r[:, 1:], lab, b, meta["img_shape"]) for r, lab, b, meta in
                           zip(rois.split(counts), labels.split(counts), bbox_pred.split(counts), img_metas)]
                rois = boxes_to_rois(refined) if refined else rois
        return rois, sum(scores) / len(scores), bbox_pred

    @torch.no_grad()
    def predict(self, feats, proposals: list[torch.Tensor], img_metas: list[dict]) -> list[dict]:
        """Detections per image in original-image pixels (boxes, scores, labels, and masks with mask heads)."""
        extra = self.predict_context(feats)
        rois, cls_score, bbox_pred = self.refine_rois(feats, proposals, img_metas, **extra)
        counts = [p.shape[0] for p in proposals]
        results, det_boxes = [], []
        for meta, r, c, b in zip(img_metas, rois.split(counts), cls_score.split(counts), bbox_pred.split(counts)):
            boxes, scores, labels = self.bbox_head[-1].predict_boxes(r, c, b, meta["img_shape"][:2], self.test)
            det_boxes.append(boxes)
            results.append({"boxes": boxes_to_original(boxes, meta), "scores": scores, "labels": labels})
        if self.with_mask:
            self.predict_masks(feats, det_boxes, results, img_metas, **extra)
        return results

    def predict_context(self, feats) -> dict:
        """Keyword arguments a subclass's box and mask forwards need at test time (HTC: its semantic features)."""
        return {}

    def mask_probabilities(self, feats, rois: torch.Tensor, labels: torch.Tensor, **extra) -> torch.Tensor:
        """(P, M, M) mask probabilities of the RoIs' classes, averaged over the stages' mask heads."""
        mask_feats = self.mask_roi_extractor(feats, rois)
        probs = [head.probabilities(head(mask_feats), labels) for head in self.mask_head]
        return sum(probs) / len(probs)

    def predict_masks(self, feats, det_boxes: list[torch.Tensor], results: list[dict], img_metas: list[dict],
                      **extra) -> None:
        """Adds ``masks`` (m, h0, w0) bool to each result, pasted at the boxes in original-image pixels."""
        rois = boxes_to_rois(det_boxes)
        labels = torch.cat([r["labels"] for r in results])
        paste_mask_probabilities(self.mask_probabilities(feats, rois, labels, **extra), results, img_metas,
                                 self.test)
