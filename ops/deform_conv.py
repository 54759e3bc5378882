"""Deformable convolution: DCNv1 (Dai et al., ICCV 2017) and modulated DCNv2 (Zhu et al., CVPR 2019).

Offsets have ``2 * deform_groups * kh * kw`` channels, ordered per deform group, per kernel position
(row-major), as a (dy, dx) pair; masks have ``deform_groups * kh * kw`` channels in the same order.
"""
from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor, nn

from raydet.registry import register

from ._utils import compute_dtype, pair

__all__ = ["deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack"]

IntOrPair = int | tuple[int, int]


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                  mask: Tensor | None = None) -> Tensor:
    """Deformable 2-D convolution (torchvision kernel); ``mask`` given = DCNv2.

    Args:
        input: (B, C_in, H, W).
        offset: (B, 2 * G * kh * kw, H_out, W_out), in input pixels; the number of deform groups G is inferred.
        weight: (C_out, C_in / groups, kh, kw); the convolution groups are inferred from C_in.
        bias: optional (C_out,).
        mask: optional (B, G * kh * kw, H_out, W_out) modulation scalars.
    Returns:
        (B, C_out, H_out, W_out) in the dtype of ``input`` (half inputs are computed in float32).
    """
    if input.dim() != 4 or weight.dim() != 4 or offset.dim() != 4:
        raise ValueError("deform_conv2d: input, offset and weight must be 4-D, got "
                         f"{tuple(input.shape)}, {tuple(offset.shape)}, {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    if offset.shape[1] == 0 or offset.shape[1] % (2 * kh * kw):
        raise ValueError(f"deform_conv2d: offset channels ({offset.shape[1]}) must be a positive multiple of "
                         f"2 * kh * kw = {2 * kh * kw}")
    groups = offset.shape[1] // (2 * kh * kw)
    if input.shape[1] % groups:
        raise ValueError(f"deform_conv2d: input channels ({input.shape[1]}) must be divisible by the "
                         f"{groups} deform groups inferred from the offset")
    if mask is not None and mask.shape[1] != groups * kh * kw:
        raise ValueError(f"deform_conv2d: mask must have {groups * kh * kw} channels, got {mask.shape[1]}")
    dtype = compute_dtype(input.dtype)
    cast = (lambda t: None if t is None else t.to(dtype))
    out = torchvision.ops.deform_conv2d(cast(input), cast(offset), cast(weight), cast(bias),
                                        stride=pair(stride, "stride"), padding=pair(padding, "padding"),
                                        dilation=pair(dilation, "dilation"), mask=cast(mask))
    return out.to(input.dtype)


@register
class DeformConv2d(nn.Module):
    """DCNv1 layer holding the convolution weight; ``forward(x, offset)`` takes the offsets from outside.

    Args mirror :class:`torch.nn.Conv2d`, plus ``deform_groups`` (channel groups with their own offsets).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = True):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if deform_groups < 1 or in_channels % deform_groups:
            raise ValueError(f"{type(self).__name__}: in_channels ({in_channels}) must be divisible by "
                             f"deform_groups ({deform_groups})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The nn.Conv2d initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _offset_conv(self, channels_per_position: int) -> nn.Conv2d:
        """A zero-initialised conv predicting ``channels_per_position`` values per deform group and kernel tap."""
        kh, kw = self.kernel_size
        conv = nn.Conv2d(self.in_channels, self.deform_groups * channels_per_position * kh * kw, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")


@register
class DeformConv2dPack(DeformConv2d):
    """DCNv1 with its own offset conv (same kernel / stride / padding / dilation as the main conv), initialised
    to zero, so the layer starts as a plain convolution. ``forward(x)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias)
        self.conv_offset = self._offset_conv(2)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x, self.conv_offset(x))


@register
class ModulatedDeformConv2dPack(DeformConv2d):
    """DCNv2 with its own conv predicting offsets and modulation masks (``mask = sigmoid``), initialised to zero:
    the layer starts with zero offsets and masks of 0.5, i.e. as a plain convolution with half the weight (plus
    bias), as in the paper. ``forward(x)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
                 padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, deform_groups: int = 1,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups,
                         bias)
        self.conv_offset = self._offset_conv(3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_offset(x)
        n = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = out[:, : 2 * n], out[:, 2 * n:]
        return super().forward(x, offset, mask.sigmoid())
