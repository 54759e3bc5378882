"""HTC's semantic segmentation branch (Chen et al. 2019, Sec. 3.3 "Fusing contextual information"; MMDetection's
``FusedSemanticHead``): all pyramid levels are fused at one level, segmented into stuff + thing classes, and the
fused features are pooled for every RoI of the box and mask branches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.layers import conv_tower
from raydet.registry import register

__all__ = ["FusedSemanticHead"]


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """mmcv's ConvModule(1x1, ReLU) (its ``.conv`` is our ``.0``)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))


@register
class FusedSemanticHead(nn.Module):
    """Pyramid levels -> (semantic logits, fused semantic features), both at level ``fusion_level``.

    Each level goes through its own 1x1 conv (+ ReLU) and is resized bilinearly (align_corners) to the fusion level's
    size, the sum passes ``num_convs`` 3x3 convs, then a 1x1 conv gives ``num_classes`` logits and another 1x1 conv
    (+ ReLU) the features the RoI heads pool.

    Args:
        num_ins: pyramid levels taken (5: P2-P6). fusion_level: the level fused at (1: P3, stride 8).
        seg_scale_factor: the logits' size relative to the padded input (1/8 for P3); the ground-truth map
            (B, H, W) is scaled by it (nearest neighbour) to the logits' size.
        num_classes: semantic classes (COCO-stuff: 183 = 80 things + 91 stuff + unused ids, with 255 ignored).
        loss_seg: per-pixel softmax CE with ``ignore_index`` 255, weight 0.2 ([mmdet] htc_r50_fpn_1x_coco.py).

    Input: a tuple of ``num_ins`` maps (B, in_channels, H_l, W_l).
    """

    def __init__(self, loss_seg, num_ins: int = 5, fusion_level: int = 1, seg_scale_factor: float = 0.125,
                 num_convs: int = 4, in_channels: int = 256, conv_out_channels: int = 256, num_classes: int = 183,
                 norm_cfg: dict | None = None):
        super().__init__()
        if not 0 <= fusion_level < num_ins:
            raise ValueError(f"fusion_level must be in [0, num_ins={num_ins}), got {fusion_level}")
        self.num_ins = num_ins
        self.fusion_level = fusion_level
        self.seg_scale_factor = float(seg_scale_factor)
        self.num_classes = num_classes
        self.loss_seg = loss_seg
        self.lateral_convs = nn.ModuleList(_conv_relu(in_channels, in_channels) for _ in range(num_ins))
        self.convs = conv_tower(in_channels, conv_out_channels, num_convs, norm_cfg)
        channels = conv_out_channels if num_convs else in_channels
        self.conv_embedding = _conv_relu(channels, conv_out_channels)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (B, num_classes, h, w), fused features (B, conv_out_channels, h, w)) at the fusion level."""
        if len(feats) < self.num_ins:
            raise ValueError(f"FusedSemanticHead takes {self.num_ins} feature levels, got {len(feats)}")
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = tuple(x.shape[-2:])
        for i in range(self.num_ins):
            if i != self.fusion_level:
                resized = F.interpolate(feats[i], size=size, mode="bilinear", align_corners=True)
                x = x + self.lateral_convs[i](resized)
        x = self.convs(x)
        return self.conv_logits(x), self.conv_embedding(x)

    def loss(self, logits: torch.Tensor, gt_semantic_seg: torch.Tensor) -> torch.Tensor:
        """Softmax CE of (B, K, h, w) logits against (B, H, W) class maps of the padded batch (``ignore_index``
        pixels: padding, unlabeled), scaled by ``seg_scale_factor`` (nearest); a mean over all h x w pixels, as
        MMDetection's CrossEntropyLoss without ``avg_non_ignore``."""
        if gt_semantic_seg.dim() != 3 or gt_semantic_seg.shape[0] != logits.shape[0]:
            raise ValueError(f"gt_semantic_seg must be (B, H, W) with B={logits.shape[0]}, got "
                             f"{tuple(gt_semantic_seg.shape)}")
        labels = F.interpolate(gt_semantic_seg[:, None].to(device=logits.device, dtype=torch.float32),
                               scale_factor=self.seg_scale_factor, mode="nearest")[:, 0].long()
        if labels.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"gt_semantic_seg {tuple(gt_semantic_seg.shape[-2:])} x seg_scale_factor "
                             f"{self.seg_scale_factor} is {tuple(labels.shape[-2:])}, not the semantic logits' "
                             f"{tuple(logits.shape[-2:])} (the map must cover the padded batch)")
        return self.loss_seg(logits, labels)
