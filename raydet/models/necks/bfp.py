"""Balanced Feature Pyramid (Libra R-CNN, Pang et al. 2019, Sec. 3.2): integrate, refine, strengthen."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.non_local import NonLocal2d
from raydet.registry import closest, register

__all__ = ["BFP"]

_REFINE_TYPES = (None, "conv", "non_local")


@register
class BFP(nn.Module):
    """Balances a pyramid's levels with one shared, refined semantic map; goes after an FPN (``neck: [FPN, BFP]``).

    1. Integrate: every level is resized to the ``refine_level`` map's size (finer levels by adaptive max pooling,
       coarser ones by nearest upsampling) and the resized maps are averaged.
    2. Refine: ``"non_local"`` an embedded-Gaussian non-local block (the paper's choice, reduction 1, no scaling),
       ``"conv"`` a 3x3 conv + ReLU, ``None`` nothing.
    3. Strengthen: the refined map is resized back to each level (finer levels by nearest upsampling, coarser by
       adaptive max pooling) and added to that level's input.

    Args:
        in_channels: C of every level.
        num_levels: number of input maps.
        refine_level: index (finest = 0) of the level whose size the integration uses (Libra Faster R-CNN: 2, C4's
            stride-16 map of P2-P6; Libra RetinaNet: 1, of P3-P7).
        refine_type: None, "conv" or "non_local" (MMDetection's ``refine_type``).

    ``forward(inputs)``: ``num_levels`` maps (B, C, H_i, W_i), finest first -> the same shapes.
    Parameter names follow MMDetection: ``refine.{g,theta,phi,conv_out}`` (non-local), ``refine.0`` (conv).
    """

    def __init__(self, in_channels: int, num_levels: int, refine_level: int = 2, refine_type: str | None = None):
        super().__init__()
        if refine_type not in _REFINE_TYPES:
            raise ValueError(f"refine_type must be null, 'conv' or 'non_local', got {refine_type!r}"
                             f"{closest(refine_type, ['conv', 'non_local'])}")
        if not 0 <= refine_level < num_levels:
            raise ValueError(f"refine_level must be in 0..{num_levels - 1} (num_levels {num_levels}), "
                             f"got {refine_level}")
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.refine_level = refine_level
        self.refine_type = refine_type
        if refine_type == "conv":
            self.refine = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
            nn.init.xavier_uniform_(self.refine[0].weight)
            nn.init.zeros_(self.refine[0].bias)
        elif refine_type == "non_local":
            self.refine = NonLocal2d(in_channels, reduction=1, use_scale=False)
        else:
            self.refine = None

    def forward(self, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_levels:
            raise ValueError(f"BFP expects {self.num_levels} maps (num_levels), got {len(inputs)}")
        size = inputs[self.refine_level].shape[-2:]
        gathered = [F.adaptive_max_pool2d(x, size) if i < self.refine_level else F.interpolate(x, size=size)
                    for i, x in enumerate(inputs)]
        bsf = torch.stack(gathered).mean(dim=0)
        if self.refine is not None:
            bsf = self.refine(bsf)
        return tuple(x + (F.interpolate(bsf, size=x.shape[-2:]) if i < self.refine_level
                          else F.adaptive_max_pool2d(bsf, x.shape[-2:]))
                     for i, x in enumerate(inputs))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_levels={self.num_levels}, refine_level={self.refine_level}, "
                f"refine_type={self.refine_type!r}")
