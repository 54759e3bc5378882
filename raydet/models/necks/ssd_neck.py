"""SSD's neck (Liu et al. 2016, Sec. 2.1 and 3.1): the L2-normalised conv4_3 map with a learned per-channel scale
(from ParseNet, Liu et al. 2015), and the extra feature layers that add coarser levels after fc7; MMDetection's
``SSDNeck`` and ``L2Norm``, with the same module names (``l2_norm``, ``extra_layers.<i>.<0|1>.conv``).
"""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.norm import build_norm_layer
from raydet.registry import register

__all__ = ["SSDNeck", "L2Norm", "ConvReLU"]


class L2Norm(nn.Module):
    """``weight[c] * x[:, c] / (||x[:, :]||_2 + eps)``: each location's channel vector scaled to unit L2 norm, then
    by a learned per-channel weight (initialised to ``scale``; SSD: 20). Computed in float32, returned in x's dtype.

    ``forward(x)``: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10):
        super().__init__()
        self.channels = int(channels)
        self.scale = float(scale)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.full((self.channels,), self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (self.weight.float()[None, :, None, None] * x32 / norm).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, scale={self.scale}, eps={self.eps}"


class ConvReLU(nn.Module):
    """A conv followed by ReLU; the conv is ``.conv`` (MMDetection's ``ConvModule``). With ``norm_cfg`` a norm sits
    between them, named as mmcv's ``ConvModule`` names it (``.gn`` for GN, else ``.bn``), and the conv has no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm_cfg: dict | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=norm_cfg is None)
        self.norm_name = None
        if norm_cfg is not None:
            self.norm_name = "gn" if isinstance(norm_cfg, dict) and norm_cfg.get("type") == "GN" else "bn"
            self.add_module(self.norm_name, build_norm_layer(norm_cfg, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        return torch.relu(x)


@register
class SSDNeck(nn.Module):
    """The backbone's maps (the first one L2-normalised) followed by extra levels.

    Extra level i is a 1x1 conv to ``out_channels[k] // 2`` then a conv to ``out_channels[k]`` (3x3, or
    ``last_kernel_size`` for the last level) with ``level_strides[i]`` and ``level_paddings[i]``, each with ReLU, on
    the previous level (k = len(in_channels) + i).

    Args:
        in_channels: channels of the backbone maps, e.g. (512, 1024) for VGG-16's conv4_3 and fc7.
        out_channels: channels of every output level; starts with ``in_channels``. SSD300: (512, 1024, 512, 256,
            256, 256); SSD512: (512, 1024, 512, 256, 256, 256, 256).
        level_strides, level_paddings: of each extra level's second conv. SSD300: (2, 2, 1, 1) and (1, 1, 0, 0)
            (19 -> 10 -> 5 -> 3 -> 1); SSD512: (2, 2, 2, 2, 1) and (1, 1, 1, 1, 1) with ``last_kernel_size`` 4.
        l2_norm_scale: initial L2Norm weight of the first map (SSD: 20); None applies no L2Norm.
        last_kernel_size: kernel of the last extra level's second conv (SSD300: 3, SSD512: 4).
        norm_cfg: optional norm after every extra conv (:func:`~raydet.models.norm.build_norm_layer`; the convs then
            have no bias); ScratchDet (Zhu et al. 2019, Sec. 3) puts BN on every conv of a detector trained from
            scratch. None (SSD): no norm.

    Convs start Xavier-uniform with zero bias (MMDetection's SSDNeck init).

    ``forward(inputs)``: tuple of backbone maps -> tuple of ``len(out_channels)`` maps, finest first.
    """

    def __init__(self, in_channels: list[int], out_channels: list[int], level_strides: list[int],
                 level_paddings: list[int], l2_norm_scale: float | None = 20.0, last_kernel_size: int = 3,
                 norm_cfg: dict | None = None):
        super().__init__()
        in_channels, out_channels = [int(c) for c in in_channels], [int(c) for c in out_channels]
        if len(out_channels) <= len(in_channels) or out_channels[:len(in_channels)] != in_channels:
            raise ValueError(f"out_channels {out_channels} must start with in_channels {in_channels} and add at "
                             f"least one extra level")
        num_extra = len(out_channels) - len(in_channels)
        if len(level_strides) != num_extra or len(level_paddings) != num_extra:
            raise ValueError(f"level_strides ({len(level_strides)}) and level_paddings ({len(level_paddings)}) need "
                             f"one entry per extra level ({num_extra})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.l2_norm = L2Norm(in_channels[0], l2_norm_scale) if l2_norm_scale else None
        self.extra_layers = nn.ModuleList()
        for i, (stride, padding) in enumerate(zip(level_strides, level_paddings)):
            k = len(in_channels) + i
            kernel = last_kernel_size if i == num_extra - 1 else 3
            self.extra_layers.append(nn.Sequential(
                ConvReLU(out_channels[k - 1], out_channels[k] // 2, 1, norm_cfg=norm_cfg),
                ConvReLU(out_channels[k] // 2, out_channels[k], kernel, stride=int(stride), padding=int(padding),
                         norm_cfg=norm_cfg)))
        for m in self.extra_layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"SSDNeck expects {len(self.in_channels)} backbone maps, got {len(inputs)}")
        outs = list(inputs)
        if self.l2_norm is not None:
            outs[0] = self.l2_norm(outs[0])
        x = outs[-1]
        for layer in self.extra_layers:
            x = layer(x)
            outs.append(x)
        return tuple(outs)
