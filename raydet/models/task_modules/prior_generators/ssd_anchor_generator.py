"""SSD's default boxes (Liu et al. 2016, Sec. 2.2 "Choosing scales and aspect ratios"), MMDetection's
``SSDAnchorGenerator``.

Each level has one square box of side ``min_size`` per aspect ratio, plus one square of side
``sqrt(min_size * max_size)``: the ratios of a level are ``[1, 1/r1, r1, 1/r2, r2, ...]`` for its ``ratios``
``[r1, r2, ...]`` (``ratio = h / w``; a ratio already listed is skipped), so ``ratios [2]`` gives 4 priors per
location and ``[2, 3]`` gives 6. Boxes are (x1, y1, x2, y2) in input-image pixels, centred on their cell:
location (y, x) of a level with stride s is centred at ``((x + 0.5) s, (y + 0.5) s)``; they are not clipped to the
image (as MMDetection). Grid order: row-major locations, the priors of a location innermost, in the order
``[min_size x each ratio ..., sqrt(min_size * max_size)]`` (MMDetection and torchvision put the
``sqrt(min_size * max_size)`` square second: :mod:`raydet.interop` reorders the head channels of their checkpoints,
see ``raydet.interop.mmdet.ssd_prior_order``). With ``clip`` (torchvision's ``DefaultBoxGenerator``
``clip=True``) each prior's width and height are capped at ``input_size`` before its corners are computed, so that
it stays centred on its cell.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from raydet.registry import register

__all__ = ["SSDAnchorGenerator", "ssd_prior_sizes"]

# The first level of MMDetection's SSD configs has its own sizes, given in percent of the input size by the
# (input_size, basesize_ratio_range[0]) of the config: SSD300 COCO, SSD300 VOC, SSD512 COCO, SSD512 VOC.
_FIRST_LEVEL_PERCENT = {(300, 0.15): (7, 15), (300, 0.2): (10, 20), (512, 0.1): (4, 10), (512, 0.15): (7, 15)}


def ssd_prior_sizes(input_size: int, basesize_ratio_range: Sequence[float], num_levels: int
                    ) -> tuple[list[int], list[int]]:
    """Per-level (min_sizes, max_sizes) in pixels from the ratio range, MMDetection's rule (the paper's
    ``s_k = s_min + (s_max - s_min)(k - 1)/(m - 1)`` on integer percents).

    Levels 2..L: ratios from ``int(100 r_min)`` to ``int(100 r_max)`` in steps of ``int((r_max - r_min) 100 /
    (L - 2))``; level k has ``min = int(input_size * ratio_k / 100)``, ``max = int(input_size * (ratio_k + step) /
    100)``. Level 1 is fixed per configuration (``_FIRST_LEVEL_PERCENT``). SSD300 COCO, (0.15, 0.9), 6 levels:
    min [21, 45, 99, 153, 207, 261], max [45, 99, 153, 207, 261, 315].

    Raises:
        ValueError: an (input_size, basesize_ratio_range[0]) pair other than 300 with 0.15 / 0.2 or 512 with 0.1 /
            0.15 (give ``min_sizes`` and ``max_sizes`` instead), or fewer than 3 levels.
    """
    lo, hi = float(basesize_ratio_range[0]), float(basesize_ratio_range[1])
    first = _FIRST_LEVEL_PERCENT.get((int(input_size), lo))
    if first is None:
        known = ", ".join(f"{s} with {r}" for s, r in _FIRST_LEVEL_PERCENT)
        raise ValueError(f"SSDAnchorGenerator derives sizes from basesize_ratio_range only for input_size / "
                         f"basesize_ratio_range[0] {known} (MMDetection's SSD configs), got {input_size} with {lo}; "
                         f"give min_sizes and max_sizes instead")
    if num_levels < 3:
        raise ValueError(f"basesize_ratio_range needs at least 3 levels, got {num_levels}")
    min_ratio, max_ratio = int(lo * 100), int(hi * 100)
    step = int(math.floor(max_ratio - min_ratio) / (num_levels - 2))
    min_sizes = [int(input_size * first[0] / 100)]
    max_sizes = [int(input_size * first[1] / 100)]
    for ratio in range(min_ratio, max_ratio + 1, step):
        min_sizes.append(int(input_size * ratio / 100))
        max_sizes.append(int(input_size * (ratio + step) / 100))
    if len(min_sizes) != num_levels:
        raise ValueError(f"basesize_ratio_range {tuple(basesize_ratio_range)} gives {len(min_sizes)} levels of sizes "
                         f"for {num_levels} strides")
    return min_sizes, max_sizes


def _per_level(values, name: str, num_levels: int) -> list[list[float]]:
    if len(values) != num_levels:
        raise ValueError(f"{name} has {len(values)} entries for {num_levels} levels (strides)")
    out = [[float(v) for v in level] if isinstance(level, (list, tuple)) else [float(level)] for level in values]
    if any(len(level) == 0 or min(level) <= 0 for level in out):
        raise ValueError(f"{name} must be positive sizes (one number or a list per level), got {list(values)}")
    return out


@register
class SSDAnchorGenerator:
    """The SSD prior boxes of every level.

    Args:
        strides: stride of each level in pixels, e.g. SSD300's [8, 16, 32, 64, 100, 300].
        ratios: per level the aspect ratios besides 1, e.g. ``[[2], [2, 3], [2, 3], [2, 3], [2], [2]]``.
        min_sizes, max_sizes: per level the prior sizes in pixels (a number or a list of numbers, each max > its
            min); give both, or neither to derive them from ``basesize_ratio_range`` (:func:`ssd_prior_sizes`).
        basesize_ratio_range: (s_min, s_max), the smallest and largest sizes in units of ``input_size``; MMDetection:
            (0.15, 0.9) SSD300 COCO, (0.2, 0.9) SSD300 VOC, (0.1, 0.9) SSD512 COCO, (0.15, 0.9) SSD512 VOC.
        input_size: the network's square input size, 300 or 512, for ``basesize_ratio_range`` and ``clip``.
        clip: cap each prior's width and height at ``input_size`` (torchvision's ``DefaultBoxGenerator(clip=True)``
            clamps the (cx, cy, w, h) priors' w, h to [0, 1] of the image); False (MMDetection) keeps them whole.

    ``num_base_priors`` (also ``num_base_anchors``): priors per location of each level (a list).
    """

    def __init__(self, strides: list[int], ratios: list[list[float]],
                 min_sizes: list[float | list[float]] | None = None,
                 max_sizes: list[float | list[float]] | None = None,
                 basesize_ratio_range: tuple[float, float] = (0.15, 0.9), input_size: int = 300,
                 clip: bool = False):
        if len(strides) == 0 or any(s <= 0 for s in strides):
            raise ValueError(f"strides must be a non-empty list of positive numbers, got {list(strides)}")
        if len(ratios) != len(strides):
            raise ValueError(f"ratios has {len(ratios)} levels but strides has {len(strides)}")
        if any(r <= 0 for level in ratios for r in level):
            raise ValueError(f"ratios must be positive, got {ratios}")
        if (min_sizes is None) != (max_sizes is None):
            raise ValueError("give both min_sizes and max_sizes, or neither (sizes from basesize_ratio_range)")
        if len(basesize_ratio_range) != 2 or not 0 < basesize_ratio_range[0] < basesize_ratio_range[1]:
            raise ValueError(f"basesize_ratio_range must be (s_min, s_max) with 0 < s_min < s_max, got "
                             f"{tuple(basesize_ratio_range)}")
        num_levels = len(strides)
        if min_sizes is None:
            min_sizes, max_sizes = ssd_prior_sizes(input_size, basesize_ratio_range, num_levels)
        self.min_sizes = _per_level(min_sizes, "min_sizes", num_levels)
        self.max_sizes = _per_level(max_sizes, "max_sizes", num_levels)
        for lo, hi in zip(self.min_sizes, self.max_sizes):
            if len(lo) != len(hi) or any(b <= a for a, b in zip(lo, hi)):
                raise ValueError(f"each level needs as many max_sizes as min_sizes, each larger than its min: got "
                                 f"min_sizes {self.min_sizes} and max_sizes {self.max_sizes}")
        self.strides = [int(s) for s in strides]
        self.input_size = int(input_size)
        self.clip = bool(clip)
        self.basesize_ratio_range = (float(basesize_ratio_range[0]), float(basesize_ratio_range[1]))
        self.ratios = []
        for level in ratios:
            level_ratios = [1.0]
            for r in level:
                if all(abs(float(r) - a) >= 1e-6 for a in level_ratios):
                    level_ratios += [1.0 / float(r), float(r)]
            self.ratios.append(level_ratios)
        self.base_anchors = [self._base_anchors(i) for i in range(num_levels)]  # (A_l, 4) float32, CPU

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        """Priors per location of each level: len(min_sizes) * len(ratios) + len(max_sizes)."""
        return [int(b.shape[0]) for b in self.base_anchors]

    num_base_anchors = num_base_priors

    def _base_anchors(self, level: int) -> Tensor:
        """(A, 4) priors of location (0, 0): min sizes x ratios (size-major), then the sqrt(min * max) squares."""
        c = self.strides[level] / 2.0
        mins = torch.tensor(self.min_sizes[level], dtype=torch.float64)
        ratios = torch.tensor(self.ratios[level], dtype=torch.float64)
        h_ratios = ratios.sqrt()
        ws = torch.cat([(mins[:, None] / h_ratios[None, :]).reshape(-1),
                        (mins * torch.tensor(self.max_sizes[level], dtype=torch.float64)).sqrt()])
        hs = torch.cat([(mins[:, None] * h_ratios[None, :]).reshape(-1),
                        (mins * torch.tensor(self.max_sizes[level], dtype=torch.float64)).sqrt()])
        if self.clip:
            ws, hs = ws.clamp(max=self.input_size), hs.clamp(max=self.input_size)
        return torch.stack([c - 0.5 * ws, c - 0.5 * hs, c + 0.5 * ws, c + 0.5 * hs], dim=-1).float()

    def _check_sizes(self, featmap_sizes) -> None:
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"got {len(featmap_sizes)} feature map sizes for {self.num_levels} SSD prior levels")

    def grid_anchors(self, featmap_sizes: list[tuple[int, int]], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, input_shape: tuple[int, int] | None = None) -> list[Tensor]:
        """Priors of every level: a list of (h * w * A_l, 4) tensors for featmap_sizes [(h, w), ...].

        ``input_shape`` is accepted for the dense heads' common call and not used: SSD's strides are fixed.
        """
        self._check_sizes(featmap_sizes)
        out = []
        for base, stride, (h, w) in zip(self.base_anchors, self.strides, featmap_sizes):
            shift_x = torch.arange(int(w), device=device, dtype=dtype) * stride
            shift_y = torch.arange(int(h), device=device, dtype=dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            out.append((shifts + base.to(device=device, dtype=dtype)[None]).reshape(-1, 4))
        return out

    def valid_flags(self, featmap_sizes: list[tuple[int, int]], pad_shape: tuple[int, int],
                    device: torch.device | str = "cpu") -> list[Tensor]:
        """Per level a (h * w * A_l,) bool tensor: location (y, x) is valid when ``x < ceil(W / stride)`` and
        ``y < ceil(H / stride)`` for the image's padded size ``pad_shape`` (H, W) (MMDetection's valid flags)."""
        self._check_sizes(featmap_sizes)
        out = []
        for stride, num, (h, w) in zip(self.strides, self.num_base_priors, featmap_sizes):
            valid_y = torch.arange(int(h), device=device) < min(math.ceil(int(pad_shape[0]) / stride), int(h))
            valid_x = torch.arange(int(w), device=device) < min(math.ceil(int(pad_shape[1]) / stride), int(w))
            valid = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
            out.append(valid[:, None].expand(-1, num).reshape(-1))
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strides={self.strides}, ratios={self.ratios}, min_sizes={self.min_sizes}, "
                f"max_sizes={self.max_sizes}" + (", clip=True)" if self.clip else ")"))
