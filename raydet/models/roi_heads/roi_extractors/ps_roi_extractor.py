"""Position-sensitive RoI pooling (R-FCN, Dai et al. 2016, Sec. 2, Eq. 1): raydet's ``ps_roi_pool`` (torchvision's
binning without its border error, see :mod:`raydet.ops.ps_roi_pool`) or torchvision's ``ps_roi_align``."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import ps_roi_align

from raydet.ops import ps_roi_pool
from raydet.registry import register

__all__ = ["PSRoIExtractor"]


@register
class PSRoIExtractor(nn.Module):
    """Pool each RoI's k x k bins from k x k groups of score maps of one stride.

    ``forward(maps, rois)``: maps (B, D * k * k, H, W) at ``featmap_stride``; rois (R, 5) [image index, x1, y1, x2,
    y2] in input pixels -> (R, D, k, k). Bin (i, j) of output channel d reads only input channel (d k + i) k + j
    (the d-th score map of bin (i, j), torchvision's and the paper's layout).

    Args:
        output_size: k, the bins per side.
        featmap_stride: input pixels per map cell (16 for ResNet C5 with a dilated conv5).
        roi_type: ``"PSRoIPool"`` averages the cells of each bin (the paper's Eq. 1); ``"PSRoIAlign"`` averages
            bilinear samples (``sampling_ratio`` per bin side, 0 = adaptive) with the half-pixel offset.
    """

    def __init__(self, output_size: int = 7, featmap_stride: int = 16, roi_type: str = "PSRoIPool",
                 sampling_ratio: int = 0):
        super().__init__()
        if roi_type not in ("PSRoIPool", "PSRoIAlign"):
            raise ValueError(f"roi_type must be 'PSRoIPool' or 'PSRoIAlign', got {roi_type!r}")
        if output_size < 1 or featmap_stride <= 0:
            raise ValueError(f"output_size must be >= 1 and featmap_stride > 0, got {output_size}, {featmap_stride}")
        self.output_size = output_size
        self.featmap_stride = featmap_stride
        self.roi_type = roi_type
        self.sampling_ratio = sampling_ratio

    def forward(self, maps: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        k = self.output_size
        if maps.shape[1] % (k * k):
            raise ValueError(f"PSRoIExtractor: {maps.shape[1]} score maps are not a multiple of k x k = {k * k}")
        rois = rois.to(maps.dtype)
        if self.roi_type == "PSRoIPool":
            return ps_roi_pool(maps, rois, k, 1.0 / self.featmap_stride)
        return ps_roi_align(maps, rois, k, 1.0 / self.featmap_stride, self.sampling_ratio if self.sampling_ratio > 0
                            else -1)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, featmap_stride={self.featmap_stride}, roi_type={self.roi_type}"
