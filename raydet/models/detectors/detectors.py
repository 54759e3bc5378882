"""The detectors: RPN, Faster R-CNN, Mask R-CNN (two-stage) and RetinaNet (single-stage)."""
from __future__ import annotations

import torch

from raydet.models.detectors.base import BaseDetector, require_component
from raydet.models.postprocess import boxes_to_original
from raydet.registry import register

__all__ = ["RPN", "TwoStageDetector", "FasterRCNN", "MaskRCNN", "SingleStageDetector", "RetinaNet"]


@register
class RPN(BaseDetector):
    """A region proposal network alone; ``predict`` returns class-agnostic proposals scored by objectness."""

    def __init__(self, backbone, neck, rpn_head):
        super().__init__(backbone, neck)
        require_component(type(self).__name__, "rpn_head", rpn_head, ("loss_and_proposals", "predict"),
                          "an rpn_head (e.g. {type: RPNHead, ...})")
        self.rpn_head = rpn_head

    def loss(self, batch):
        return self.rpn_head.loss(self.extract_feat(batch["images"]), batch)

    @torch.no_grad()
    def predict(self, batch):
        proposals = self.rpn_head.predict(self.extract_feat(batch["images"]), batch["img_metas"])
        return [{"boxes": boxes_to_original(p[:, :4], meta), "scores": p[:, 4],
                 "labels": torch.zeros(p.shape[0], dtype=torch.long, device=p.device)}
                for p, meta in zip(proposals, batch["img_metas"])]


@register
class TwoStageDetector(BaseDetector):
    """RPN proposals refined by an RoI head."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        super().__init__(backbone, neck)
        require_component(type(self).__name__, "rpn_head", rpn_head, ("loss_and_proposals", "predict"),
                          "an rpn_head (e.g. {type: RPNHead, ...})")
        require_component(type(self).__name__, "roi_head", roi_head, ("loss", "predict"),
                          "a roi_head (e.g. {type: StandardRoIHead, ...})")
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    def loss(self, batch):
        feats = self.extract_feat(batch["images"])
        losses, proposals = self.rpn_head.loss_and_proposals(feats, batch)
        losses.update(self.roi_head.loss(feats, proposals, batch))
        return losses

    @torch.no_grad()
    def predict(self, batch):
        feats = self.extract_feat(batch["images"])
        proposals = self.rpn_head.predict(feats, batch["img_metas"])
        return self.roi_head.predict(feats, [p[:, :4] for p in proposals], batch["img_metas"])


@register
class FasterRCNN(TwoStageDetector):
    """Faster R-CNN (Ren et al. 2015) with an FPN (Lin et al. 2017)."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        super().__init__(backbone, neck, rpn_head, roi_head)
        if roi_head.with_mask:
            raise ValueError("FasterRCNN's roi_head has a mask branch; use type MaskRCNN")


@register
class MaskRCNN(TwoStageDetector):
    """Mask R-CNN (He et al. 2017): Faster R-CNN plus an FCN mask branch; the batch needs ``gt_masks``."""

    def __init__(self, backbone, neck, rpn_head, roi_head):
        super().__init__(backbone, neck, rpn_head, roi_head)
        if not roi_head.with_mask:
            raise ValueError("MaskRCNN needs roi_head.mask_roi_extractor and roi_head.mask_head")

    def loss(self, batch):
        if "gt_masks" not in batch:
            raise ValueError("MaskRCNN training needs 'gt_masks' in the batch (annotations with masks)")
        return super().loss(batch)


@register
class SingleStageDetector(BaseDetector):
    """A dense head on the pyramid features, no second stage."""

    def __init__(self, backbone, neck, bbox_head):
        super().__init__(backbone, neck)
        require_component(type(self).__name__, "bbox_head", bbox_head, ("loss", "predict"),
                          "a bbox_head (a dense head, e.g. {type: RetinaHead, ...})")
        self.bbox_head = bbox_head

    def loss(self, batch):
        return self.bbox_head.loss(self.extract_feat(batch["images"]), batch)

    @torch.no_grad()
    def predict(self, batch):
        return self.bbox_head.predict(self.extract_feat(batch["images"]), batch["img_metas"])


@register
class RetinaNet(SingleStageDetector):
    """RetinaNet (Lin et al. 2017): FPN P3-P7 with a focal-loss dense head."""
