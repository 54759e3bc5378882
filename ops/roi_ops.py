"""RoIAlign and RoIPool on (N, C, H, W) feature maps (torchvision kernels, CPU and CUDA)."""
from __future__ import annotations

import torchvision
from torch import Tensor, nn

from raydet.registry import register

from ._utils import compute_dtype, pair

__all__ = ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]


def _check(fn: str, input: Tensor, rois: Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f"{fn}: input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"{fn}: rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], got {tuple(rois.shape)}")


def roi_align(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """Bilinear RoI feature extraction (He et al., Mask R-CNN 2017).

    The RoI ``[x1, x2] * spatial_scale`` is split into ``w`` bins; each bin averages ``sampling_ratio`` x
    ``sampling_ratio`` bilinear samples at the sub-bin centres (adaptive ``ceil(roi_size / bins)`` when
    ``sampling_ratio <= 0``).

    Args:
        input: (N, C, H, W) features. rois: (K, 5) rows [batch_idx, x1, y1, x2, y2] in image pixels.
        output_size: h and w of the output (an int for square).
        spatial_scale: feature-map size / image size (1 / stride).
        aligned: True (Detectron2 / MMDetection default): shift the scaled RoI by -0.5 so that a pixel's value
            sits at its centre (continuous coordinate x + 0.5). False (legacy): no shift, and RoIs are
            stretched to at least 1 x 1 feature pixels.
    Returns:
        (K, C, h, w) in the dtype of ``input`` (half inputs are computed in float32).
    """
    _check("roi_align", input, rois)
    out_h, out_w = pair(output_size, "output_size")
    dtype = compute_dtype(input.dtype)
    out = torchvision.ops.roi_align(input.to(dtype), rois.to(dtype), (out_h, out_w), float(spatial_scale),
                                    int(sampling_ratio), bool(aligned))
    return out.to(input.dtype)


def roi_pool(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> Tensor:
    """Max RoI pooling (Girshick, Fast R-CNN 2015).

    The scaled RoI is rounded to whole feature pixels ``round(x1 * s) .. round(x2 * s)`` (both inclusive), split
    into ``h`` x ``w`` bins with floor / ceil bounds, and each bin takes its maximum (0 for an empty bin).

    Args and returns as :func:`roi_align`.
    """
    _check("roi_pool", input, rois)
    out_h, out_w = pair(output_size, "output_size")
    dtype = compute_dtype(input.dtype)
    out = torchvision.ops.roi_pool(input.to(dtype), rois.to(dtype), (out_h, out_w), float(spatial_scale))
    return out.to(input.dtype)


@register
class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`; ``forward(input (N, C, H, W), rois (K, 5)) -> (K, C, h, w)``."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 aligned: bool = True):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


@register
class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`; ``forward(input (N, C, H, W), rois (K, 5)) -> (K, C, h, w)``."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
