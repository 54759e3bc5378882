"""Points on every feature level: the priors of anchor-free heads (MMDetection's ``MlvlPointGenerator``).

The point of location (y, x) on a level with stride s is ``((x + offset) * s, (y + offset) * s)`` in input-image
pixels; ``offset`` 0.5 (MMDetection 3.x's default, FCOS's ``floor(s / 2) + x * s`` for even strides, Tian et al.
2019, Sec. 3.1) puts it at the centre of the input pixels the location covers. torchvision's FCOS places its points
at ``(x * s_x, y * s_y)`` (offset 0) with each level's stride taken from the padded input, ``s_y = H // h`` and
``s_x = W // w`` (its ``AnchorGenerator``): on P6 / P7 of an input whose side is not a multiple of 128 that is not
the nominal stride (``strides_from_input``). Points of a level are ordered row-major (y, then x), as
:func:`~raydet.models.dense_heads.anchor_head.flatten_levels` flattens a head's maps.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["MlvlPointGenerator"]


@register
class MlvlPointGenerator:
    """Points of a feature pyramid.

    Args:
        strides: stride of each level in pixels, one entry per level: an int, or (stride_w, stride_h).
        offset: position of a point inside its stride cell, in units of the stride, in [0, 1).
        strides_from_input: place the points of each level with the strides ``input_h // h`` and ``input_w // w``
            of the padded input (torchvision's anchor placement); ``grid_priors`` then needs ``input_shape``. The
            nominal ``strides`` are still the ones ``with_stride`` returns (the scale of a level's regression and
            of FCOS's centre region, as torchvision's anchor sizes).

    Raises:
        ValueError: no level, a stride <= 0, or an offset outside [0, 1).
    """

    def __init__(self, strides: list[int] | list[list[int]], offset: float = 0.5, strides_from_input: bool = False):
        if len(strides) == 0:
            raise ValueError("strides must name at least one level")
        pairs = []
        for s in strides:
            pair = (s, s) if isinstance(s, (int, float)) else tuple(s)
            if len(pair) != 2 or any(not v > 0 for v in pair):
                raise ValueError(f"each stride must be a positive number or a (w, h) pair, got {s!r}")
            pairs.append((int(pair[0]), int(pair[1])))
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"offset must be in [0, 1), got {offset}")
        self.strides = pairs  # (stride_w, stride_h) per level
        self.offset = float(offset)
        self.strides_from_input = bool(strides_from_input)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> int:
        """Priors per location: one point."""
        return 1

    def _check_sizes(self, featmap_sizes) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"got {len(featmap_sizes)} feature map sizes for {self.num_levels} point levels")

    def level_strides(self, featmap_sizes: list[tuple[int, int]],
                      input_shape: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """(stride_w, stride_h) placing each level's points: ``strides``, or with ``strides_from_input`` the padded
        input size ``input_shape`` (H, W) floor-divided by each level's size (h, w).

        Raises:
            ValueError: ``strides_from_input`` without ``input_shape``.
        """
        self._check_sizes(featmap_sizes)
        if not self.strides_from_input:
            return list(self.strides)
        if input_shape is None:
            raise ValueError("strides_from_input needs the padded input_shape (H, W) of the batch")
        return [(int(input_shape[1]) // int(w), int(input_shape[0]) // int(h)) for h, w in featmap_sizes]

    def grid_priors(self, featmap_sizes: list[tuple[int, int]], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, with_stride: bool = False,
                    input_shape: tuple[int, int] | None = None) -> list[Tensor]:
        """The points of every level for featmap_sizes [(h, w), ...].

        Args:
            input_shape: (H, W) of the padded batch; needed only with ``strides_from_input``.

        Returns:
            per level (h * w, 2) points (x, y) in pixels, or (h * w, 4) (x, y, stride_w, stride_h) with
            ``with_stride`` (the nominal strides).
        """
        out = []
        placing = self.level_strides(featmap_sizes, input_shape)
        for (stride_w, stride_h), (step_w, step_h), (h, w) in zip(self.strides, placing, featmap_sizes):
            xs = ((torch.arange(int(w), device=device) + self.offset) * step_w).to(dtype)
            ys = ((torch.arange(int(h), device=device) + self.offset) * step_h).to(dtype)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            cols = [xx.reshape(-1), yy.reshape(-1)]
            if with_stride:
                cols += [xx.new_full((xx.numel(),), stride_w), xx.new_full((xx.numel(),), stride_h)]
            out.append(torch.stack(cols, dim=-1))
        return out

    def valid_flags(self, featmap_sizes: list[tuple[int, int]], pad_shape: tuple[int, int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level a (h * w,) bool tensor: True where the location lies inside an image's own padded shape
        (H, W): ``x < ceil(W / stride_w)`` and ``y < ceil(H / stride_h)``."""
        self._check_sizes(featmap_sizes)
        pad_h, pad_w = int(pad_shape[0]), int(pad_shape[1])
        out = []
        for (stride_w, stride_h), (h, w) in zip(self.strides, featmap_sizes):
            valid_y = torch.arange(int(h), device=device) < min(math.ceil(pad_h / stride_h), int(h))
            valid_x = torch.arange(int(w), device=device) < min(math.ceil(pad_w / stride_w), int(w))
            out.append((valid_y[:, None] & valid_x[None, :]).reshape(-1))
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strides={self.strides}, offset={self.offset}, "
                f"strides_from_input={self.strides_from_input})")
