"""Hybrid Task Cascade's RoI stage (Chen et al. 2019): a cascade whose box and mask branches interleave.

Per stage t (Sec. 3.1-3.3): the box head trains on the stage's samples; with ``interleaved`` the mask head then
trains on the boxes that box head just regressed (re-assigned and re-sampled with the stage's assigner and sampler,
MMDetection's ``HybridTaskCascadeRoIHead``), and those boxes are the next stage's proposals. With
``mask_info_flow`` each stage's mask head adds the previous stages' mask features (recomputed in a chain through
heads 0..t-1) through its ``conv_res``. With a ``semantic_head`` (FusedSemanticHead) the fused semantic features
are RoI-pooled and added to the box and mask branches' RoI features (``semantic_fusion``), and the semantic logits
are trained on the batch's ``gt_semantic_seg`` (``loss_semantic_seg``). At test time the stages' mask probabilities
are averaged at the final boxes (the paper's Sec. 3.2 ensemble; MMDetection 2.x averages every stage, 3.x's
``_mask_forward`` keeps only the last).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydet.models.head_configs import DetectionConfig
from raydet.models.roi_heads.cascade_roi_head import CascadeRoIHead, refine_boxes, stage_targets
from raydet.models.roi_heads.roi_extractors import boxes_to_rois
from raydet.registry import register

__all__ = ["HybridTaskCascadeRoIHead"]


@register
class HybridTaskCascadeRoIHead(CascadeRoIHead):
    """CascadeRoIHead with HTC's interleaved mask branch, mask information flow and optional semantic branch.

    Args (beyond CascadeRoIHead's; mask heads are required, HTCMaskHead for ``mask_info_flow``):
        semantic_roi_extractor, semantic_head: the semantic branch (both or neither); the extractor pools the
            fused semantic map (one level, e.g. ``featmap_strides: [8]``).
        semantic_fusion: which branches add the pooled semantic features: any of ``bbox``, ``mask``.
        interleaved: train each stage's mask head on its box head's regressed boxes (Sec. 3.1).
        mask_info_flow: chain the mask heads' features across stages (Sec. 3.2).
    """

    def __init__(self, num_stages: int, stage_loss_weights: list[float], bbox_roi_extractor, bbox_head: list,
                 assigner, sampler, mask_roi_extractor, mask_head: list, semantic_roi_extractor=None,
                 semantic_head=None, semantic_fusion: list[str] = ("bbox", "mask"), interleaved: bool = True,
                 mask_info_flow: bool = True, test: DetectionConfig = DetectionConfig()):
        super().__init__(num_stages, stage_loss_weights, bbox_roi_extractor, bbox_head, assigner, sampler,
                         mask_roi_extractor, mask_head, test)
        if (semantic_head is None) != (semantic_roi_extractor is None):
            raise ValueError("semantic_head and semantic_roi_extractor must be given together")
        unknown = sorted(set(semantic_fusion) - {"bbox", "mask"})
        if unknown:
            raise ValueError(f"semantic_fusion: unknown branch {unknown[0]!r} (one of bbox, mask)")
        if mask_info_flow and any(not hasattr(h, "features") for h in self.mask_head):
            raise ValueError("mask_info_flow needs mask heads with features / logits (type HTCMaskHead)")
        if mask_info_flow and any(getattr(h, "conv_res", None) is None for h in self.mask_head[1:]):
            raise ValueError("mask_info_flow: the mask heads after the first need with_conv_res: true")
        self.semantic_roi_extractor = semantic_roi_extractor
        self.semantic_head = semantic_head
        self.semantic_fusion = tuple(semantic_fusion)
        self.interleaved = interleaved
        self.mask_info_flow = mask_info_flow

    @property
    def with_semantic(self) -> bool:
        return self.semantic_head is not None

    def _fuse(self, branch: str, roi_feats: torch.Tensor, rois: torch.Tensor, semantic_feat) -> torch.Tensor:
        """RoI features plus the RoI-pooled semantic features (average-pooled to their size) when fused here."""
        if semantic_feat is None or branch not in self.semantic_fusion:
            return roi_feats
        pooled = self.semantic_roi_extractor((semantic_feat,), rois)
        if pooled.shape[-2:] != roi_feats.shape[-2:]:
            pooled = F.adaptive_avg_pool2d(pooled, roi_feats.shape[-2:])
        return roi_feats + pooled

    def bbox_forward(self, stage: int, feats, rois: torch.Tensor, semantic_feat=None, **extra):
        feats_ = self._fuse("bbox", self.bbox_roi_extractor(feats, rois), rois, semantic_feat)
        return self.bbox_head[stage](feats_)

    def _mask_feats(self, feats, rois: torch.Tensor, semantic_feat) -> torch.Tensor:
        return self._fuse("mask", self.mask_roi_extractor(feats, rois), rois, semantic_feat)

    def loss(self, feats, proposals: list[torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """Every stage's weighted box and mask losses, and ``loss_semantic_seg`` with a semantic branch."""
        losses: dict[str, torch.Tensor] = {}
        semantic_feat = None
        if self.with_semantic:
            if batch.get("gt_semantic_seg") is None:
                raise ValueError("HTC with a semantic_head needs 'gt_semantic_seg' (B, H, W) in the batch (semantic "
                                 "maps, e.g. COCO-stuff); use a pipeline without semantic_head otherwise")
            logits, semantic_feat = self.semantic_head(feats)
            losses["loss_semantic_seg"] = self.semantic_head.loss(logits, batch["gt_semantic_seg"])
        img_shapes = [m["img_shape"] for m in batch["img_metas"]]
        boxes = proposals
        for t in range(self.num_stages):
            samples = self.sample(t, boxes, batch, feats, {"semantic_feat": semantic_feat})
            rois = boxes_to_rois([s.boxes for s in samples])
            cls_score, bbox_pred = self.bbox_forward(t, feats, rois, semantic_feat=semantic_feat)
            labels, targets = stage_targets(samples, self.bbox_head[t])
            stage = self.bbox_head[t].loss(cls_score, bbox_pred, rois, labels, targets)
            refined = None
            if self.interleaved or t < self.num_stages - 1:
                refined = refine_boxes(self.bbox_head[t], rois, cls_score.detach(), bbox_pred.detach(), labels,
                                       [s.pos_is_gt for s in samples], img_shapes)
            mask_samples = (self.sample(t, refined, batch, feats, {"semantic_feat": semantic_feat})
                            if self.interleaved else samples)
            stage.update(self.mask_loss(t, feats, mask_samples, batch, semantic_feat))
            for name, value in stage.items():
                losses[f"{name}_s{t}"] = value * self.stage_loss_weights[t] if name.startswith("loss") else value
            boxes = refined
        return losses

    def mask_loss(self, stage: int, feats, samples, batch, semantic_feat=None) -> dict[str, torch.Tensor]:
        """The stage's mask loss on its positives, its head fed the chain of earlier heads' features."""
        head = self.mask_head[stage]
        pos_rois = boxes_to_rois([s.pos_boxes for s in samples])
        mask_feats = self._mask_feats(feats, pos_rois, semantic_feat)
        if self.mask_info_flow:
            last = None
            for i in range(stage):
                last = self.mask_head[i].features(mask_feats, last)
            mask_pred = head.logits(head.features(mask_feats, last))
        else:
            mask_pred = head(mask_feats)
            mask_pred = mask_pred[0] if isinstance(mask_pred, tuple) else mask_pred
        targets = torch.cat([head.targets(s.pos_boxes, s.pos_assigned_gt_inds, batch["gt_masks"][i])
                             for i, s in enumerate(samples)])
        labels = torch.cat([s.pos_gt_labels for s in samples])
        return head.loss(mask_pred, targets, labels)

    def predict_context(self, feats) -> dict:
        return {"semantic_feat": self.semantic_head(feats)[1] if self.with_semantic else None}

    def mask_probabilities(self, feats, rois: torch.Tensor, labels: torch.Tensor, semantic_feat=None,
                           **extra) -> torch.Tensor:
        """(P, M, M) probabilities of the RoIs' classes, averaged over the stages (features chained with
        ``mask_info_flow``)."""
        mask_feats = self._mask_feats(feats, rois, semantic_feat)
        probs, last = [], None
        for head in self.mask_head:
            if self.mask_info_flow:
                last = head.features(mask_feats, last)
                logits = head.logits(last)
            else:
                logits = head(mask_feats)
                logits = logits[0] if isinstance(logits, tuple) else logits
            probs.append(head.probabilities(logits, labels))
        return sum(probs) / len(probs)
