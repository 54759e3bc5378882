"""GA-RPN head (Wang et al. 2019, Sec. 3.5): region proposals from guided anchors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydet.models.dense_heads.guided_anchor_head import FeatureAdaption, GuidedAnchorHead
from raydet.models.head_configs import ProposalConfig
from raydet.ops import batched_nms
from raydet.registry import register

__all__ = ["GARPNHead", "GAProposalConfig"]


@dataclass
class GAProposalConfig(ProposalConfig):
    """How GA-RPN selects proposals (per image, MMDetection's ``GARPNHead``): on each level, the locations that pass
    the location filter (at test time), of which the top ``nms_pre`` by objectness, decoded and clipped; boxes with
    width or height <= ``min_bbox_size`` dropped; NMS at ``nms_iou`` within the level and its best ``nms_post``
    kept; then the best ``max_per_img`` of all levels (no NMS across levels)."""

    nms_post: int = 1000

    def __post_init__(self):
        if self.nms_post < 1 or self.max_per_img < 1:
            raise ValueError(f"nms_post and max_per_img must be >= 1, got {self.nms_post} and {self.max_per_img}")


@register
class GARPNHead(GuidedAnchorHead):
    """A shared 3x3 conv + ReLU, then :class:`GuidedAnchorHead`'s location / shape convs, feature adaption and 1x1
    convs to one objectness logit and 4 deltas per location (MMDetection's ``GARPNHead``).

    ``train_proposals`` / ``test_proposals``: see :class:`GAProposalConfig`; training proposals (for the RoI head of
    GA-Faster R-CNN) skip the location filter, as MMDetection's. Other arguments: see
    :class:`~raydet.models.dense_heads.guided_anchor_head.GuidedAnchorHead`.
    """

    def __init__(self, in_channels: int, approx_anchor_generator, square_anchor_generator, anchor_coder, bbox_coder,
                 loss_loc, loss_shape, loss_cls, loss_bbox, assigner, ga_assigner, sampler=None, ga_sampler=None,
                 feat_channels: int = 256, deform_groups: int = 4, loc_filter_thr: float = 0.01,
                 center_ratio: float = 0.2, ignore_ratio: float = 0.5, allowed_border: float = -1,
                 pos_weight: float = -1,
                 train_proposals: GAProposalConfig = GAProposalConfig(nms_pre=2000, max_per_img=1000, nms_post=1000),
                 test_proposals: GAProposalConfig = GAProposalConfig(nms_pre=1000, max_per_img=1000, nms_post=1000)):
        super().__init__(1, in_channels, approx_anchor_generator, square_anchor_generator, anchor_coder, bbox_coder,
                         loss_loc, loss_shape, loss_cls, loss_bbox, assigner, ga_assigner, sampler, ga_sampler,
                         feat_channels=feat_channels, deform_groups=deform_groups, loc_filter_thr=loc_filter_thr,
                         center_ratio=center_ratio, ignore_ratio=ignore_ratio, allowed_border=allowed_border,
                         pos_weight=pos_weight)
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals

    def _init_layers(self) -> None:
        self.rpn_conv = nn.Conv2d(self.in_channels, self.feat_channels, 3, padding=1)
        c = self.feat_channels
        self.conv_loc = nn.Conv2d(c, 1, 1)
        self.conv_shape = nn.Conv2d(c, 2, 1)
        self.feature_adaption = FeatureAdaption(c, c, 3, self.deform_groups)
        self.conv_cls = nn.Conv2d(c, 1, 1)
        self.conv_reg = nn.Conv2d(c, 4, 1)

    def forward_single(self, x):
        return super().forward_single(F.relu(self.rpn_conv(x)))

    def loss(self, feats, batch, outputs=None) -> dict[str, Tensor]:
        labels = [torch.zeros_like(lab) for lab in batch["gt_labels"]]
        losses = super().loss(feats, batch, gt_labels=labels, outputs=outputs)
        return {"loss_rpn_cls": losses["loss_cls"], "loss_rpn_bbox": losses["loss_bbox"],
                "loss_anchor_shape": losses["loss_shape"], "loss_anchor_loc": losses["loss_loc"]}

    def loss_and_proposals(self, feats, batch) -> tuple[dict, list[Tensor]]:
        """Training: GA-RPN losses plus detached proposals for the RoI head (``train_proposals``)."""
        outputs = self(feats)
        losses = self.loss(feats, batch, outputs=outputs)
        with torch.no_grad():
            proposals = self.proposals([[t.detach() for t in o] for o in outputs], batch["img_metas"],
                                       self.train_proposals, use_loc_filter=False)
        return losses, [p[:, :4] for p in proposals]

    def predict(self, feats, img_metas) -> list[Tensor]:
        """Test-time proposals: per image (k, 5) [x1, y1, x2, y2, objectness] in input-image pixels."""
        return self.proposals(self(feats), img_metas, self.test_proposals, use_loc_filter=True)

    @torch.no_grad()
    def proposals(self, outputs, img_metas, cfg: GAProposalConfig, use_loc_filter: bool) -> list[Tensor]:
        """Proposals per image (k, 5) [x1, y1, x2, y2, objectness], as :class:`GAProposalConfig` describes.

        Locations are ranked by their logits, which keep the order that the float32 sigmoid loses above ~17."""
        sizes = [tuple(int(s) for s in c.shape[-2:]) for c in outputs[0]]
        device = outputs[0][0].device
        shapes = torch.tensor([m["img_shape"][:2] for m in img_metas], device=device, dtype=torch.float32)
        boxes_l, logits_l, valid_l, level_l = [], [], [], []
        for level, (anchors, mask, cls, deltas) in enumerate(self.level_outputs(outputs, sizes, use_loc_filter)):
            logits = cls[..., 0].masked_fill(~mask, float("-inf"))  # (B, N_l)
            k = min(cfg.nms_pre, logits.shape[1]) if cfg.nms_pre > 0 else logits.shape[1]
            logits, idx = logits.topk(k, dim=1)
            anchors = torch.gather(anchors, 1, idx[..., None].expand(-1, -1, 4))
            deltas = torch.gather(deltas, 1, idx[..., None].expand(-1, -1, 4))
            boxes_l.append(self.bbox_coder.decode(anchors, deltas, max_shape=shapes))
            logits_l.append(logits)
            valid_l.append(torch.gather(mask, 1, idx))
            level_l.append(torch.full_like(idx, level))
        boxes, logits = torch.cat(boxes_l, 1), torch.cat(logits_l, 1)
        valid, levels = torch.cat(valid_l, 1), torch.cat(level_l, 1)
        if cfg.min_bbox_size >= 0:
            valid &= ((boxes[..., 2:] - boxes[..., :2]) > cfg.min_bbox_size).all(dim=-1)
        results = []
        for i in range(boxes.shape[0]):
            b, s, lv = boxes[i][valid[i]], logits[i][valid[i]], levels[i][valid[i]]
            keep = batched_nms(b, s, lv, cfg.nms_iou)  # by decreasing score; levels never suppress each other
            # the best nms_post of each level: the rank of each kept box within its level
            onehot = F.one_hot(lv[keep], len(sizes))
            rank = (onehot.cumsum(0) * onehot).sum(1) - 1
            keep = keep[rank < cfg.nms_post][: cfg.max_per_img]
            results.append(torch.cat([b[keep], s[keep, None].sigmoid()], dim=1))
        return results
