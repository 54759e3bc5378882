"""Global context block of GCNet (Cao et al. 2019, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
Beyond", 2019)."""
from __future__ import annotations

import torch
from torch import nn

from raydet.registry import closest, register

__all__ = ["ContextBlock"]

_POOLING = ("att", "avg")
_FUSIONS = ("channel_add", "channel_mul")


def _transform(channels: int, planes: int) -> nn.Sequential:
    """The bottleneck transform: 1x1 conv C -> C', LayerNorm over (C', 1, 1), ReLU, 1x1 conv C' -> C (the paper's
    choice: the LayerNorm eases optimising the two-layer bottleneck)."""
    return nn.Sequential(nn.Conv2d(channels, planes, 1), nn.LayerNorm([planes, 1, 1]), nn.ReLU(inplace=True),
                         nn.Conv2d(planes, channels, 1))


@register
class ContextBlock(nn.Module):
    """``z_i = F(x_i, delta(sum_j alpha_j x_j))``: one global context vector per image, transformed and fused into
    every position.

    1. Context modelling: ``pooling_type="att"`` weights the positions by ``alpha = softmax_j(W_k x_j)`` (a 1x1 conv
       to one channel, softmax over the H x W positions: the paper's simplified, query-independent non-local
       block); ``"avg"`` takes the plain spatial mean (SENet's squeeze; one of the paper's pooling ablations).
    2. Transform ``delta``: 1x1 conv to ``C' = int(C * ratio)`` channels, LayerNorm([C', 1, 1]), ReLU, 1x1 conv back
       to C (the LayerNorm eases the optimisation of the two-layer bottleneck).
    3. Fusion: ``"channel_add"`` broadcasts the transformed context onto every position (the paper's choice);
       ``"channel_mul"`` scales each channel by its sigmoid (SE-like; the paper's fusion ablation). Both may be
       listed: multiply, then add (mmcv's order).

    Args:
        in_channels: C of the input (B, C, H, W).
        ratio: bottleneck ratio C' / C (the paper's r = 16 is ``ratio: 0.0625``, r = 4 is ``0.25``).
        pooling_type: ``"att"`` or ``"avg"``.
        fusion_types: a non-empty list of ``"channel_add"`` / ``"channel_mul"``.

    Layers carry mmcv's names (``conv_mask``; ``channel_add_conv`` / ``channel_mul_conv`` entries 0, 1 (LayerNorm),
    3), so MMDetection's GCNet checkpoints load unchanged. Initialisation as mmcv's: ``conv_mask`` Kaiming-normal
    (fan_in) with zero bias, the last conv of each transform zero, so the block starts as the identity (add) or as
    x * 1/2 (mul).

    ``forward(x)``: (B, C, H, W) -> (B, C, H, W).

    Raises:
        ValueError: an unknown pooling / fusion type (with the closest name), an empty ``fusion_types``, or a ratio
            that leaves no bottleneck channel.
    """

    _abbr_ = "context_block"  # the module name a ResNet block gives it (MMDetection's plugin naming)

    def __init__(self, in_channels: int, ratio: float, pooling_type: str = "att",
                 fusion_types: list[str] | tuple[str, ...] = ("channel_add",)):
        super().__init__()
        if pooling_type not in _POOLING:
            raise ValueError(f"ContextBlock pooling_type must be 'att' or 'avg', got {pooling_type!r}"
                             f"{closest(pooling_type, _POOLING)}")
        if not fusion_types:
            raise ValueError("ContextBlock fusion_types must list at least one of 'channel_add', 'channel_mul'")
        for kind in fusion_types:
            if kind not in _FUSIONS:
                raise ValueError(f"ContextBlock fusion_types: unknown fusion {kind!r}{closest(kind, _FUSIONS)} "
                                 f"(valid: {', '.join(_FUSIONS)})")
        planes = int(in_channels * ratio)
        if planes < 1:
            raise ValueError(f"ContextBlock ratio {ratio} leaves int({in_channels} x {ratio}) = {planes} bottleneck "
                             f"channels; it needs at least 1")
        self.in_channels, self.ratio, self.planes = in_channels, ratio, planes
        self.pooling_type, self.fusion_types = pooling_type, tuple(fusion_types)
        if pooling_type == "att":
            self.conv_mask = nn.Conv2d(in_channels, 1, 1)
        self.channel_add_conv = _transform(in_channels, planes) if "channel_add" in fusion_types else None
        self.channel_mul_conv = _transform(in_channels, planes) if "channel_mul" in fusion_types else None
        self.init_weights()

    def init_weights(self) -> None:
        if self.pooling_type == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for transform in (self.channel_add_conv, self.channel_mul_conv):
            if transform is not None:
                nn.init.zeros_(transform[-1].weight)
                nn.init.zeros_(transform[-1].bias)

    def spatial_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The context vector (B, C, 1, 1) of x (B, C, H, W)."""
        if self.pooling_type == "avg":
            return x.mean(dim=(2, 3), keepdim=True)
        b, c = x.shape[:2]
        weights = self.conv_mask(x).flatten(2).softmax(dim=-1)      # (B, 1, HW): alpha_j
        context = x.flatten(2) @ weights.transpose(1, 2)             # (B, C, 1): sum_j alpha_j x_j
        return context.view(b, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.spatial_pool(x)
        out = x
        if self.channel_mul_conv is not None:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            out = out + self.channel_add_conv(context)
        return out

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, planes={self.planes}, pooling_type={self.pooling_type!r}, "
                f"fusion_types={self.fusion_types}")
