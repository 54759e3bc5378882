"""Small building blocks shared by heads."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.conv import build_conv_layer
from raydet.models.norm import build_norm_layer

__all__ = ["conv_tower", "Scale"]


def conv_tower(in_channels: int, channels: int, num_convs: int, norm_cfg: dict | None,
               conv_cfg: dict | None = None) -> nn.Sequential:
    """``num_convs`` x (3x3 conv [+ norm] + ReLU); the conv has a bias only without a norm. Empty when num_convs = 0.
    ``conv_cfg``: the conv type (:func:`~raydet.models.conv.build_conv_layer`; None: ``nn.Conv2d``)."""
    layers = []
    for i in range(num_convs):
        layers.append(build_conv_layer(conv_cfg, in_channels if i == 0 else channels, channels, 3, padding=1,
                                       bias=norm_cfg is None))
        if norm_cfg is not None:
            layers.append(build_norm_layer(norm_cfg, channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Scale(nn.Module):
    """A learnable scalar multiplier ``scale`` (init ``scale``), e.g. one per pyramid level of a head whose
    regression branch is shared across levels (FCOS, Tian et al. 2019, Sec. 3.3; mmcv's ``Scale``)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
