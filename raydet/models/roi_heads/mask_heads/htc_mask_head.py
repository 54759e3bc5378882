"""HTC's mask head (Chen et al. 2019, Sec. 3.2 "Mask information flow"): an FCN mask head that also takes the
previous stage's mask features through a 1x1 conv (``conv_res``) and adds them to its RoI features."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead
from raydet.registry import register

__all__ = ["HTCMaskHead"]


@register
class HTCMaskHead(FCNMaskHead):
    """FCNMaskHead with mask information flow (MMDetection's ``HTCMaskHead``).

    ``features(x, res_feat)`` = convs(x + ReLU(conv_res(res_feat))), the (P, C, 14, 14) features the next stage
    takes; ``logits(feat)`` = the FCN head's upsample and 1x1 logits, (P, num_classes, 28, 28); ``forward`` returns
    both. ``with_conv_res`` is False for the first stage (nothing flows into it). Other arguments as FCNMaskHead.
    """

    def __init__(self, num_classes: int, loss_mask, with_conv_res: bool = True, num_convs: int = 4,
                 in_channels: int = 256, conv_out_channels: int = 256, roi_feat_size: int = 14,
                 upsample_ratio: int = 2, class_agnostic: bool = False, norm_cfg: dict | None = None,
                 target_aligned: bool = True, binarize_targets: bool = True):
        super().__init__(num_classes, loss_mask, num_convs, in_channels, conv_out_channels, roi_feat_size,
                         upsample_ratio, class_agnostic, norm_cfg, target_aligned, binarize_targets)
        if with_conv_res and num_convs and in_channels != conv_out_channels:
            raise ValueError(f"HTCMaskHead: conv_res adds the previous stage's {conv_out_channels}-channel features to "
                             f"the {in_channels}-channel RoI features; set in_channels = conv_out_channels")
        self.with_conv_res = with_conv_res
        # mmcv ConvModule(1x1, ReLU): MMDetection's conv_res.conv
        self.conv_res = nn.Sequential(nn.Conv2d(conv_out_channels, conv_out_channels, 1),
                                      nn.ReLU(inplace=True)) if with_conv_res else None

    def features(self, x: torch.Tensor, res_feat: torch.Tensor | None = None) -> torch.Tensor:
        """(P, C_in, S, S) RoI features (+ the previous stage's features) -> (P, C, S, S) after the conv tower."""
        if res_feat is not None:
            if self.conv_res is None:
                raise ValueError("HTCMaskHead: got the previous stage's features but with_conv_res is False")
            x = x + self.conv_res(res_feat)
        return self.convs(x)

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """(P, C, S, S) features -> (P, num_classes, 2S, 2S) mask logits."""
        return self.conv_logits(torch.relu(self.upsample(feat)))

    def forward(self, x: torch.Tensor, res_feat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mask logits (P, num_classes, 2S, 2S), features (P, C, S, S) for the next stage)."""
        feat = self.features(x, res_feat)
        return self.logits(feat), feat
