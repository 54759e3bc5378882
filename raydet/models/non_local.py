"""Non-local block, embedded Gaussian form (Wang et al. 2018, "Non-local Neural Networks", Sec. 3.2-3.3)."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NonLocal2d"]


class NonLocal2d(nn.Module):
    """``z = x + W_z(softmax(theta(x)^T phi(x)) g(x))``: every position attends to every other of the same map.

    Args:
        in_channels: C of the input (B, C, H, W).
        reduction: the embedding has ``max(C // reduction, 1)`` channels (the paper halves: 2; Libra's BFP: 1).
        use_scale: divide the pairwise logits by sqrt(embedding channels) (mmcv's default True; BFP uses False).

    Layers (MMDetection / mmcv names): ``g``, ``theta``, ``phi`` (1x1 convs C -> C'), ``conv_out`` (1x1 conv C' -> C).
    ``theta``, ``phi``, ``g`` start from N(0, 0.01) and ``conv_out`` from zeros, so the block starts as the identity
    (the paper's Sec. 4.1 zero-initialised ``W_z``; mmcv's ``zeros_init``).
    """

    def __init__(self, in_channels: int, reduction: int = 2, use_scale: bool = True):
        super().__init__()
        if in_channels < 1 or reduction < 1:
            raise ValueError(f"NonLocal2d needs in_channels >= 1 and reduction >= 1, got {in_channels}, {reduction}")
        self.in_channels = in_channels
        self.inter_channels = max(in_channels // reduction, 1)
        self.use_scale = use_scale
        self.g = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.theta = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, self.inter_channels, 1)
        self.conv_out = nn.Conv2d(self.inter_channels, in_channels, 1)
        self.init_weights()

    def init_weights(self) -> None:
        for conv in (self.g, self.theta, self.phi):
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)           # (B, HW, C')
        theta = self.theta(x).flatten(2).transpose(1, 2)   # (B, HW, C')
        phi = self.phi(x).flatten(2)                       # (B, C', HW)
        pairwise = theta @ phi                             # (B, HW, HW)
        if self.use_scale:
            pairwise = pairwise / math.sqrt(self.inter_channels)
        y = (pairwise.softmax(dim=-1) @ g).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.conv_out(y)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, inter_channels={self.inter_channels}, use_scale={self.use_scale}"
