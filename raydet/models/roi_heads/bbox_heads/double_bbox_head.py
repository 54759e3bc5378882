"""Double-Head R-CNN's box head (Wu et al. 2019, "Rethinking Classification and Localization for Object Detection",
Sec. 3.2): an fc head classifies, a conv head regresses.

Layer names follow MMDetection's ``DoubleConvFCBBoxHead`` (``res_block``, ``conv_branch``, ``fc_branch``, ``fc_cls``,
``fc_reg``), so its checkpoints load with the same keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.backbones.resnet import Bottleneck
from raydet.models.norm import build_norm_layer
from raydet.models.roi_heads.bbox_heads.convfc_bbox_head import ConvFCBBoxHead
from raydet.registry import register

__all__ = ["DoubleConvFCBBoxHead", "BasicResBlock"]


class _ConvNorm(nn.Module):
    """A bias-free conv and its norm, named as mmcv's ``ConvModule`` (``conv``, then ``bn`` or ``gn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_cfg: dict, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm_name = "gn" if norm_cfg["type"] == "GN" else "bn"
        self.add_module(self.norm_name, build_norm_layer(norm_cfg, out_channels))
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, self.norm_name)(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class BasicResBlock(nn.Module):
    """Widens the regression branch's RoI features: relu(conv1x1(relu(conv3x3(x))) + conv1x1(x)), each conv with a
    norm; (R, in, S, S) -> (R, out, S, S) (Double-Head's Fig. 4b: the first block of the conv head)."""

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: dict):
        super().__init__()
        self.conv1 = _ConvNorm(in_channels, in_channels, 3, norm_cfg, relu=True)
        self.conv2 = _ConvNorm(in_channels, out_channels, 1, norm_cfg, relu=False)
        self.conv_identity = _ConvNorm(in_channels, out_channels, 1, norm_cfg, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.conv_identity(x), inplace=True)


@register
class DoubleConvFCBBoxHead(ConvFCBBoxHead):
    """Two heads on two poolings of each RoI: ``fc_branch`` (``num_fcs`` FC layers on the flattened 7x7 features of
    the RoI) -> ``fc_cls``; ``res_block`` + ``num_convs`` ResNet bottlenecks (``conv_out_channels`` wide) on the
    features of the enlarged RoI, average-pooled -> ``fc_reg``.

    Inputs: x_cls, x_reg (R, in_channels, S, S). Outputs: cls_score (R, C + 1 + U), bbox_pred (R, 4C) or (R, 4)
    with ``reg_class_agnostic``. Losses, targets and decoding are ConvFCBBoxHead's; the pipeline weights the two
    (``loss_cls`` and ``loss_bbox`` loss_weight 2.0 in MMDetection's config).

    Args:
        num_convs: bottlenecks after the residual block (MMDetection: 4; the paper's K = 4, Sec. 4.2).
        num_fcs: FC layers of the classification branch (2).
        conv_out_channels, fc_out_channels: widths of the two branches (1024, 1024).
        norm_cfg: the conv branch's norm (BN, as MMDetection).
    """

    def __init__(self, num_classes: int, bbox_coder, loss_cls, loss_bbox, in_channels: int = 256,
                 roi_feat_size: int = 7, num_convs: int = 4, num_fcs: int = 2, conv_out_channels: int = 1024,
                 fc_out_channels: int = 1024, norm_cfg: dict | None = None, reg_class_agnostic: bool = False,
                 num_unused_classes: int = 0):
        if num_convs < 1 or num_fcs < 1:
            raise ValueError(f"DoubleConvFCBBoxHead needs num_convs >= 1 and num_fcs >= 1, got {num_convs}, "
                             f"{num_fcs}")
        if conv_out_channels % 4:
            raise ValueError(f"conv_out_channels must be a multiple of 4 (bottleneck width / 4), got "
                             f"{conv_out_channels}")
        norm_cfg = dict(norm_cfg or {"type": "BN"})
        # The base's loss / decoding / NMS; its own layers are replaced (no shared convs or FCs).
        super().__init__(num_classes, bbox_coder, loss_cls, loss_bbox, in_channels, roi_feat_size, 0, 0,
                         reg_class_agnostic=reg_class_agnostic, num_unused_classes=num_unused_classes)
        self.res_block = BasicResBlock(in_channels, conv_out_channels, norm_cfg)
        self.conv_branch = nn.ModuleList(Bottleneck(conv_out_channels, conv_out_channels // 4, norm_cfg=norm_cfg)
                                         for _ in range(num_convs))
        self.fc_branch = nn.ModuleList(
            nn.Linear(in_channels * roi_feat_size * roi_feat_size if i == 0 else fc_out_channels, fc_out_channels)
            for i in range(num_fcs))
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1 + num_unused_classes)
        self.fc_reg = nn.Linear(conv_out_channels, 4 if reg_class_agnostic else 4 * num_classes)
        for fc in self.fc_branch:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x_cls: torch.Tensor, x_reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C_in, S, S) features of the RoIs and of the enlarged RoIs -> (cls_score, bbox_pred)."""
        x = self.res_block(x_reg)
        for block in self.conv_branch:
            x = block(x)
        bbox_pred = self.fc_reg(x.mean(dim=(2, 3)))  # average pool over the S x S bins
        y = x_cls.flatten(1)
        for fc in self.fc_branch:
            y = F.relu(fc(y), inplace=True)
        return self.fc_cls(y), bbox_pred
