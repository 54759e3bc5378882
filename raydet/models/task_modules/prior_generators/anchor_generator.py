"""Dense anchors on every feature level (MMDetection's ``AnchorGenerator``).

Anchors are (x1, y1, x2, y2) in input-image pixels. Each level has ``A = len(ratios) * len(scales)`` base anchors
centred at ``center_offset * stride``, ordered ratio-major (for each ratio, all scales), ``ratio = h / w``, not rounded.
Grid anchors of a level are ordered row-major over locations (y, then x) with the A base anchors innermost, i.e. the
anchor of location (y, x) and base anchor a sits at row ``(y * w + x) * A + a``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["AnchorGenerator", "anchor_inside_flags"]


@register
class AnchorGenerator:
    """Anchors for a feature pyramid.

    Args:
        strides: stride of each level in pixels (one entry per level).
        ratios: anchor aspect ratios h / w.
        scales: anchor scales, multiplied by the base size. Mutually exclusive with the octave arguments.
        base_sizes: base anchor size of each level in pixels (default: the strides).
        octave_base_scale, scales_per_octave: scales ``octave_base_scale * 2 ** (i / scales_per_octave)``
            for i in [0, scales_per_octave) (RetinaNet).
        center_offset: anchor centre of location (0, 0) in units of the stride, in [0, 1).
        sizes: per level, the anchor sizes in pixels (the side of the ratio-1 anchor), e.g. torchvision
            RetinaNet's ``[[32, 40, 50], [64, 80, 101], ...]``; replaces ``scales`` x ``base_sizes`` where sizes are
            not proportional across levels. Every level needs the same number of sizes.
        round_base_anchors: round the base anchors' corners to whole pixels (torchvision's
            ``AnchorGenerator.generate_anchors``: ``base_anchors.round()``, computed in float32).
        strides_from_input: take each level's stride along y and x as ``input_h // h`` and ``input_w // w`` of the
            padded batch (torchvision's ``AnchorGenerator.forward``) instead of ``strides``; they differ on levels
            whose size was rounded up (e.g. P6 of a 160-pixel-high input: 3 rows, stride 160 // 3 = 53, not 64).
            ``grid_anchors`` then needs ``input_shape``. ``strides`` still serve the training valid flags.
    """

    def __init__(self, strides: list[int], ratios: list[float], scales: list[float] | None = None,
                 base_sizes: list[int] | None = None, octave_base_scale: float | None = None,
                 scales_per_octave: int | None = None, center_offset: float = 0.0,
                 sizes: list[list[float]] | None = None, round_base_anchors: bool = False,
                 strides_from_input: bool = False):
        if len(strides) == 0:
            raise ValueError("strides must name at least one level")
        if any(s <= 0 for s in strides):
            raise ValueError(f"strides must be positive, got {list(strides)}")
        if len(ratios) == 0 or any(r <= 0 for r in ratios):
            raise ValueError(f"ratios must be a non-empty list of positive numbers, got {list(ratios)}")
        octave = octave_base_scale is not None or scales_per_octave is not None
        if sizes is not None:
            if scales is not None or octave or base_sizes is not None:
                raise ValueError("give either sizes (per level, in pixels) or scales / octave scales with base_sizes")
            if len(sizes) != len(strides) or any(len(s) != len(sizes[0]) or len(s) == 0 for s in sizes):
                raise ValueError(f"sizes needs one non-empty list per level ({len(strides)} levels), all of the same "
                                 f"length, got {sizes}")
            if any(v <= 0 for s in sizes for v in s):
                raise ValueError(f"sizes must be positive, got {sizes}")
            base_sizes = [1.0] * len(strides)
            scales = [1.0] * len(sizes[0])  # the count of anchors per ratio; the per-level sizes set the sizes
        if scales is not None and octave:
            raise ValueError("give either scales or (octave_base_scale, scales_per_octave), not both")
        if scales is None:
            if octave_base_scale is None or scales_per_octave is None:
                raise ValueError("give scales, or both octave_base_scale and scales_per_octave")
            if scales_per_octave < 1:
                raise ValueError(f"scales_per_octave must be >= 1, got {scales_per_octave}")
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        if len(scales) == 0 or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
        if base_sizes is None:
            base_sizes = list(strides)
        if len(base_sizes) != len(strides):
            raise ValueError(f"base_sizes has {len(base_sizes)} entries but strides has {len(strides)}")
        if not 0.0 <= center_offset < 1.0:
            raise ValueError(f"center_offset must be in [0, 1), got {center_offset}")

        self.strides = [int(s) for s in strides]
        self.ratios = [float(r) for r in ratios]
        self.scales = [float(s) for s in scales]
        self.base_sizes = [float(b) for b in base_sizes]
        self.center_offset = float(center_offset)
        self.sizes = None if sizes is None else [[float(v) for v in s] for s in sizes]
        self.round_base_anchors = bool(round_base_anchors)
        self.strides_from_input = bool(strides_from_input)
        # (A, 4) float32 CPU tensor per level.
        self.base_anchors = [self._base_anchors(b, s, None if self.sizes is None else self.sizes[i])
                             for i, (b, s) in enumerate(zip(self.base_sizes, self.strides))]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per location (the same on every level)."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: float, stride: int, sizes: list[float] | None = None) -> Tensor:
        """(A, 4) anchors of location (0, 0); ``sizes`` (per-level sizes in pixels) replace ``self.scales``."""
        scale_list = self.scales if sizes is None else sizes
        if self.round_base_anchors:
            # torchvision's generate_anchors, in float32 as there, so that the same numbers round to the same pixels
            ratios = torch.tensor(self.ratios, dtype=torch.float32)
            h_ratios = torch.sqrt(ratios)
            w_ratios = 1 / h_ratios
            size = torch.tensor([base_size * s for s in scale_list], dtype=torch.float32)
            ws = (w_ratios[:, None] * size[None, :]).reshape(-1)  # ratio-major
            hs = (h_ratios[:, None] * size[None, :]).reshape(-1)
            half = (torch.stack([-ws, -hs, ws, hs], dim=-1) / 2).round()
            return half + self.center_offset * stride
        ratios = torch.tensor(self.ratios, dtype=torch.float64)
        scales = torch.tensor(scale_list, dtype=torch.float64)
        h_ratios = ratios.sqrt()
        w_ratios = 1.0 / h_ratios
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)  # ratio-major
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        c = self.center_offset * stride
        anchors = torch.stack([c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs], dim=-1)
        return anchors.float()

    def _check_sizes(self, featmap_sizes) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"got {len(featmap_sizes)} feature map sizes for {self.num_levels} anchor levels")

    def level_strides(self, featmap_sizes: list[tuple[int, int]],
                      input_shape: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """(stride_y, stride_x) of each level: ``strides``, or with ``strides_from_input`` the padded input size
        ``input_shape`` (H, W) floor-divided by each level's size."""
        if not self.strides_from_input:
            return [(s, s) for s in self.strides]
        if input_shape is None:
            raise ValueError("strides_from_input needs the padded input_shape (H, W) of the batch")
        return [(int(input_shape[0]) // int(h), int(input_shape[1]) // int(w)) for h, w in featmap_sizes]

    def grid_anchors(self, featmap_sizes: list[tuple[int, int]], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, input_shape: tuple[int, int] | None = None) -> list[Tensor]:
        """Anchors of every level: a list of (h * w * A, 4) tensors for featmap_sizes [(h, w), ...].

        ``input_shape``: (H, W) of the padded batch; needed only with ``strides_from_input``.
        """
        self._check_sizes(featmap_sizes)
        out = []
        for base, (stride_y, stride_x), (h, w) in zip(self.base_anchors, self.level_strides(featmap_sizes, input_shape),
                                                      featmap_sizes):
            shift_x = torch.arange(int(w), device=device, dtype=dtype) * stride_x
            shift_y = torch.arange(int(h), device=device, dtype=dtype) * stride_y
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            xx, yy = xx.reshape(-1), yy.reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)  # (h*w, 4), row-major over y then x
            anchors = shifts[:, None, :] + base.to(device=device, dtype=dtype)[None, :, :]
            out.append(anchors.reshape(-1, 4))
        return out

    def valid_flags(self, featmap_sizes: list[tuple[int, int]], pad_shape: tuple[int, int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level a (h * w * A,) bool tensor: True where the location lies inside this image's padded shape.

        ``pad_shape`` is (H, W) of the image's own padded size (before padding to the batch size); location (y, x) is
        valid when ``x < ceil(W / stride)`` and ``y < ceil(H / stride)``.
        """
        self._check_sizes(featmap_sizes)
        pad_h, pad_w = int(pad_shape[0]), int(pad_shape[1])
        out = []
        for stride, (h, w) in zip(self.strides, featmap_sizes):
            valid_h = min(math.ceil(pad_h / stride), int(h))
            valid_w = min(math.ceil(pad_w / stride), int(w))
            valid_y = torch.arange(int(h), device=device) < valid_h
            valid_x = torch.arange(int(w), device=device) < valid_w
            valid = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
            out.append(valid[:, None].expand(-1, self.num_base_anchors).reshape(-1))
        return out

    def __repr__(self) -> str:
        sizes = (f"sizes={self.sizes}" if self.sizes is not None
                 else f"scales={self.scales}, base_sizes={self.base_sizes}")
        return (f"{type(self).__name__}(strides={self.strides}, ratios={self.ratios}, {sizes}, "
                f"center_offset={self.center_offset}, round_base_anchors={self.round_base_anchors}, "
                f"strides_from_input={self.strides_from_input})")


def anchor_inside_flags(anchors: Tensor, valid: Tensor, img_shape: tuple[int, int],
                        allowed_border: float = 0.0) -> Tensor:
    """(N,) bool: ``valid`` and, when allowed_border >= 0, the anchor lies inside the image grown by allowed_border.

    Args:
        anchors: (N, 4) x1, y1, x2, y2.
        valid: (N,) bool valid flags (see ``AnchorGenerator.valid_flags``).
        img_shape: (h, w) of the image (after resize, before padding).
        allowed_border: pixels an anchor may cross the border by; negative keeps every valid anchor.
    """
    valid = valid.bool()
    if allowed_border < 0:
        return valid
    h, w = img_shape[0], img_shape[1]
    b = allowed_border
    return (valid & (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
            & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b))
