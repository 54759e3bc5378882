"""RetinaNet head (Lin et al. 2017): separate conv towers for classification and regression, focal loss."""
from __future__ import annotations

import math

import torch
from torch import nn

from raydet.models.dense_heads.anchor_head import AnchorHead
from raydet.models.head_configs import DetectionConfig
from raydet.models.layers import conv_tower
from raydet.models.postprocess import boxes_to_original, detection_nms
from raydet.registry import register

__all__ = ["RetinaHead"]


@register
class RetinaHead(AnchorHead):
    """Per level: 4 x (3x3 conv, ReLU) then a 3x3 conv to A * C class logits; likewise to A * 4 deltas.

    The classification bias starts at -log((1 - prior) / prior) so that every anchor begins with probability
    ``prior_prob`` of being foreground (0.01 in the paper). ``padding_anchors`` and ``loss_avg``: see
    :class:`~raydet.models.dense_heads.anchor_head.AnchorHead`.
    """

    def __init__(self, num_classes: int, in_channels: int, anchor_generator, bbox_coder, loss_cls, loss_bbox,
                 assigner, sampler=None, feat_channels: int = 256, stacked_convs: int = 4,
                 norm_cfg: dict | None = None, prior_prob: float = 0.01, allowed_border: float = -1,
                 pos_weight: float = -1, test: DetectionConfig = DetectionConfig(), padding_anchors: bool = False,
                 loss_avg: str = "batch"):
        super().__init__(num_classes, anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner, sampler,
                         allowed_border, pos_weight, padding_anchors=padding_anchors, loss_avg=loss_avg)
        self.cls_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm_cfg)
        self.reg_convs = conv_tower(in_channels, feat_channels, stacked_convs, norm_cfg)
        self.retina_cls = nn.Conv2d(feat_channels, self.num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 3, padding=1)
        self.test = test
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_single(self, x):
        return self.retina_cls(self.cls_convs(x)), self.retina_reg(self.reg_convs(x))

    @torch.no_grad()
    def predict(self, feats, img_metas) -> list[dict]:
        """Detections per image in original-image pixels: boxes (m, 4), scores (m,), labels (m,)."""
        cls_scores, bbox_preds = self(feats)
        _, anchors_per_level = self.anchors(cls_scores, img_metas)
        cfg = self.test
        results = []
        for i, meta in enumerate(img_metas):
            boxes_l, scores_l, labels_l = [], [], []
            for cls, reg, anchors in zip(cls_scores, bbox_preds, anchors_per_level):
                # threshold, then the top nms_pre (anchor, class) pairs of this level (torchvision / MMDetection 3.x),
                # sorted even when all are kept so that tied scores reach NMS in torchvision's order
                scores = cls[i].permute(1, 2, 0).reshape(-1).sigmoid()
                keep = torch.nonzero(scores > cfg.score_thr, as_tuple=True)[0]
                scores = scores[keep]
                scores, top = scores.topk(min(cfg.nms_pre, scores.numel()) if cfg.nms_pre > 0 else scores.numel())
                keep = keep[top]
                anchor_idx = keep // self.num_classes
                deltas = reg[i].permute(1, 2, 0).reshape(-1, 4)[anchor_idx]
                boxes_l.append(self.bbox_coder.decode(anchors[anchor_idx], deltas, max_shape=meta["img_shape"][:2]))
                scores_l.append(scores)
                labels_l.append(keep % self.num_classes)
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            if cfg.min_bbox_size > 0:  # keep w >= min and h >= min (torchvision's remove_small_boxes)
                large = ((boxes[:, 2:] - boxes[:, :2]) >= cfg.min_bbox_size).all(dim=1)
                boxes, scores, labels = boxes[large], scores[large], labels[large]
            keep, scores = detection_nms(boxes, scores, labels, cfg)
            boxes, labels = boxes[keep], labels[keep]
            results.append({"boxes": boxes_to_original(boxes, meta), "scores": scores, "labels": labels})
        return results
