"""Region Proposal Network head (Ren et al. 2015): objectness and box deltas per anchor, then proposals."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.conv import build_conv_layer
from raydet.models.dense_heads.anchor_head import AnchorHead
from raydet.models.head_configs import ProposalConfig
from raydet.models.layers import conv_tower
from raydet.ops import batched_nms
from raydet.registry import register

__all__ = ["RPNHead"]


@register
class RPNHead(AnchorHead):
    """A shared 3x3 conv (``num_convs`` of them, each with a ReLU), then 1x1 convs for A objectness logits and
    A x 4 deltas per location.

    ``train_proposals`` / ``test_proposals`` set how proposals are selected for the RoI head in training and at test.
    The paper's Table 9 knobs are ``loss_bbox.beta`` (smoothl1_beta), ``allowed_border`` and ``sampler.neg_pos_ub``.
    ``padding_anchors``: see :class:`~raydet.models.dense_heads.anchor_head.AnchorHead`. With ``num_convs`` > 1
    (torchvision's v2 RPN, ``conv_depth=2``) ``rpn_conv`` is a Sequential of (conv, ReLU) pairs. ``conv_cfg``: the
    type of the shared conv(s) (:func:`~raydet.models.conv.build_conv_layer`, e.g. ``{type: ConvWS}``; None:
    ``nn.Conv2d``); the 1x1 output convs stay plain (mmcv's RPNHead).
    """

    def __init__(self, in_channels: int, anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner, sampler=None,
                 feat_channels: int = 256, allowed_border: float = -1, pos_weight: float = -1,
                 train_proposals: ProposalConfig = ProposalConfig(nms_pre=2000, max_per_img=1000),
                 test_proposals: ProposalConfig = ProposalConfig(nms_pre=1000, max_per_img=1000),
                 padding_anchors: bool = False, num_convs: int = 1, conv_cfg: dict | None = None):
        super().__init__(1, anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner, sampler,
                         allowed_border, pos_weight, padding_anchors=padding_anchors)
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        if num_convs == 1:
            self.rpn_conv = build_conv_layer(conv_cfg, in_channels, feat_channels, 3, padding=1)
        else:
            self.rpn_conv = conv_tower(in_channels, feat_channels, num_convs, None, conv_cfg)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_anchors * 4, 1)
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward_single(self, x):
        x = F.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def loss(self, feats, batch, outputs=None):
        labels = [torch.zeros_like(lab) for lab in batch["gt_labels"]]
        losses = super().loss(feats, batch, gt_labels=labels, outputs=outputs)
        return {"loss_rpn_cls": losses["loss_cls"], "loss_rpn_bbox": losses["loss_bbox"]}

    def loss_and_proposals(self, feats, batch) -> tuple[dict, list[torch.Tensor]]:
        """Training: RPN losses plus detached proposals for the RoI head (``train_proposals`` settings)."""
        outputs = self(feats)
        losses = self.loss(feats, batch, outputs=outputs)
        with torch.no_grad():
            proposals = self.proposals([c.detach() for c in outputs[0]], [b.detach() for b in outputs[1]],
                                       batch["img_metas"], self.train_proposals)
        return losses, [p[:, :4] for p in proposals]

    def predict(self, feats, img_metas) -> list[torch.Tensor]:
        """Test-time proposals: per image (k, 5) [x1, y1, x2, y2, score] in input-image pixels."""
        cls_scores, bbox_preds = self(feats)
        return self.proposals(cls_scores, bbox_preds, img_metas, self.test_proposals)

    @torch.no_grad()
    def proposals(self, cls_scores, bbox_preds, img_metas, cfg: ProposalConfig) -> list[torch.Tensor]:
        """Top ``nms_pre`` anchors per level, decoded and clipped, then NMS across levels (levels never suppress
        each other) and the best ``max_per_img``. Returns per image (k, 5) [x1, y1, x2, y2, objectness].

        Anchors are ranked by their logits, which keep the order that the float32 sigmoid loses above ~17 (where
        it rounds to 1): NMS then sees tied scores in the logits' order, as in torchvision and Detectron2."""
        _, anchors_per_level = self.anchors(cls_scores, img_metas)
        device = cls_scores[0].device
        shapes = torch.tensor([m["img_shape"][:2] for m in img_metas], device=device, dtype=torch.float32)
        boxes_l, scores_l, level_l = [], [], []
        for level, (cls, reg, anchors) in enumerate(zip(cls_scores, bbox_preds, anchors_per_level)):
            b = cls.shape[0]
            logits = cls.permute(0, 2, 3, 1).reshape(b, -1)  # (B, N_l)
            deltas = reg.permute(0, 2, 3, 1).reshape(b, -1, 4)
            # sorted even when all are kept, so that ties after the sigmoid reach NMS in the logits' order
            k = min(cfg.nms_pre, logits.shape[1]) if cfg.nms_pre > 0 else logits.shape[1]
            logits, idx = logits.topk(k, dim=1)
            scores = logits.sigmoid()
            deltas = torch.gather(deltas, 1, idx[..., None].expand(-1, -1, 4))
            boxes = self.bbox_coder.decode(anchors[idx], deltas)  # (B, k, 4)
            boxes = torch.stack([boxes[..., 0].clamp(min=0).minimum(shapes[:, 1:2]),
                                 boxes[..., 1].clamp(min=0).minimum(shapes[:, 0:1]),
                                 boxes[..., 2].clamp(min=0).minimum(shapes[:, 1:2]),
                                 boxes[..., 3].clamp(min=0).minimum(shapes[:, 0:1])], dim=-1)
            boxes_l.append(boxes)
            scores_l.append(scores)
            level_l.append(torch.full_like(scores, level, dtype=torch.long))
        boxes, scores, levels = torch.cat(boxes_l, 1), torch.cat(scores_l, 1), torch.cat(level_l, 1)
        results = []
        for i in range(boxes.shape[0]):
            b, s, lv = boxes[i], scores[i], levels[i]
            if cfg.min_bbox_size >= 0:
                wh = b[:, 2:] - b[:, :2]
                keep = (wh > cfg.min_bbox_size).all(dim=1)
                b, s, lv = b[keep], s[keep], lv[keep]
            keep = batched_nms(b, s, lv, cfg.nms_iou)[: cfg.max_per_img]
            results.append(torch.cat([b[keep], s[keep, None]], dim=1))
        return results
