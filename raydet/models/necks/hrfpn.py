"""HRFPN, the feature pyramid of HRNetV2p (Sun et al. 2019, "High-Resolution Representations for Labeling Pixels
and Regions", Sec. 3 and Fig. 4 (c)): all branches concatenated at the highest resolution, then pooled into levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.norm import build_norm_layer
from raydet.registry import closest, register

__all__ = ["HRFPN"]

_POOLING = {"AVG": F.avg_pool2d, "MAX": F.max_pool2d}


def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, norm_cfg: dict | None) -> nn.Sequential:
    """conv (with bias unless followed by a norm) [+ norm], as ``Sequential`` entries 0 [, 1]; no activation."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=norm_cfg is None)]
    if norm_cfg is not None:
        layers.append(build_norm_layer(norm_cfg, out_ch))
    return nn.Sequential(*layers)


@register
class HRFPN(nn.Module):
    """High-resolution feature pyramid.

    1. Every branch i > 0 is upsampled bilinearly to branch 0's size (x 2**i for HRNet's outputs) and the branches
       are concatenated: sum(in_channels) channels at branch 0's resolution.
    2. ``reduction_conv``: a 1x1 conv to ``out_channels``.
    3. Level l (0 .. num_outs - 1) is that map pooled with kernel and stride 2**l (``pooling_type`` ``"AVG"``, the
       paper's and MMDetection's default, or ``"MAX"``); level 0 is the map itself.
    4. ``fpn_convs.l``: a 3x3 conv (stride ``stride``) per level. No activation anywhere (MMDetection's HRFPN).

    Args:
        in_channels: channels of each backbone branch, highest resolution first (HRNetV2-W18: [18, 36, 72, 144]).
        out_channels: channels of every level.
        num_outs: number of levels (5: strides 4-64 on HRNet, as an FPN's P2-P6).
        pooling_type: ``"AVG"`` or ``"MAX"``.
        norm_cfg: optional norm after each conv (the convs then have no bias); MMDetection's default None.
        stride: stride of the 3x3 convs (1 keeps the pooled sizes).

    ``forward(inputs)``: ``len(in_channels)`` maps (B, in_channels[i], H_i, W_i), highest resolution first -> tuple
    of ``num_outs`` maps, level l of size floor(H_0 / 2**l) (then / ``stride``), ``out_channels`` channels.
    Parameter names follow MMDetection (``reduction_conv``, ``fpn_convs.l``), the conv as entry 0 of a Sequential
    (``.conv`` of mmcv's ConvModule; see :mod:`raydet.interop.mmdet`).

    Raises:
        ValueError: empty ``in_channels``, ``num_outs`` < 1, ``stride`` < 1, an unknown ``pooling_type``; at forward,
            a different number of inputs.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int = 5, pooling_type: str = "AVG",
                 norm_cfg: dict | None = None, stride: int = 1):
        super().__init__()
        if not in_channels:
            raise ValueError("in_channels must list at least one channel count")
        if pooling_type not in _POOLING:
            raise ValueError(f"pooling_type must be 'AVG' or 'MAX', got {pooling_type!r}"
                             f"{closest(pooling_type, _POOLING)}")
        if num_outs < 1:
            raise ValueError(f"num_outs must be at least 1, got {num_outs}")
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.pooling_type = pooling_type
        self.stride = stride
        self.reduction_conv = _conv_norm(sum(in_channels), out_channels, 1, 1, norm_cfg)
        self.fpn_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, stride, norm_cfg)
                                       for _ in range(num_outs))
        self.init_weights()

    def init_weights(self) -> None:
        """MMDetection's ``caffe2_xavier_init`` of every conv: Kaiming-uniform, fan_in, a = 1 (U(+-sqrt(3 / fan_in)));
        zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"HRFPN expects {len(self.in_channels)} maps (in_channels), got {len(inputs)}")
        size = inputs[0].shape[-2:]
        merged = torch.cat([inputs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                          for x in inputs[1:]], dim=1)
        out = self.reduction_conv(merged)
        pool = _POOLING[self.pooling_type]
        levels = [out] + [pool(out, kernel_size=2 ** i, stride=2 ** i) for i in range(1, self.num_outs)]
        return tuple(conv(level) for conv, level in zip(self.fpn_convs, levels))

    def extra_repr(self) -> str:
        return f"num_outs={self.num_outs}, pooling_type={self.pooling_type!r}, stride={self.stride}"
