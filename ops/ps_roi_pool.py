"""Position-sensitive RoI pooling (R-FCN, Dai et al. 2016, Sec. 2, Eq. 1) in plain torch ops.

torchvision's ``ps_roi_pool`` (0.29, CPU and CUDA kernels) clips each bin to rows ``[0, H - 1)`` and columns
``[0, W - 1)`` in its forward, so the feature map's last row and column are never read (a bin there is empty and
pools 0), while its backward clips to ``[0, H)`` / ``[0, W)`` and sends gradient to cells the forward never read
(through the row-major index even to the next row's first cell). On a stride-16 map of a 128 px image that is a
quarter of the cells. This op pools every bin over the cells it covers inside the map, and its gradient is
autograd's of the same sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import compute_dtype, pair

__all__ = ["ps_roi_pool"]


def _round_half_away(v: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def ps_roi_pool(input: Tensor, rois: Tensor, output_size: int | tuple[int, int],
                spatial_scale: float = 1.0) -> Tensor:
    """Average each RoI's k_h x k_w bins, bin (i, j) of output channel d from input channel (d k_h + i) k_w + j.

    The RoI is snapped to whole cells, ``round(x1 * s) .. round(x2 * s)`` (at least one cell wide and high), split
    into bins with floor / ceil bounds (bin i covers rows ``floor(i h / k_h) .. ceil((i + 1) h / k_h)`` past the
    RoI's first row), each bin clipped to the map; a bin with no cell inside the map pools 0. This is torchvision's
    binning (and py-R-FCN's for boxes whose x2 is exclusive) without its border clipping error (see the module doc).

    Args:
        input: (N, D * k_h * k_w, H, W) score maps. rois: (R, 5) rows [batch_idx, x1, y1, x2, y2] in input pixels.
        output_size: k (int) or (k_h, k_w).
        spatial_scale: map cells per input pixel (1 / stride).

    Returns:
        (R, D, k_h, k_w) in the dtype of ``input`` (sums over cells in float64, through a summed-area table).

    Raises:
        ValueError: input not 4-D, rois not (R, 5), or channels not a multiple of k_h x k_w.
    """
    if input.dim() != 4:
        raise ValueError(f"ps_roi_pool: input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"ps_roi_pool: rois must have shape (R, 5) [batch_idx, x1, y1, x2, y2], got "
                         f"{tuple(rois.shape)}")
    k_h, k_w = pair(output_size, "output_size")
    n, c, h, w = input.shape
    if c % (k_h * k_w):
        raise ValueError(f"ps_roi_pool: {c} input channels are not a multiple of k_h x k_w = {k_h * k_w}")
    d = c // (k_h * k_w)
    if rois.shape[0] == 0:
        return input.new_zeros((0, d, k_h, k_w))
    # box arithmetic in the kernel's precision (float32 for float32 maps), so that bins match torchvision's
    dtype = compute_dtype(input.dtype)
    scaled = _round_half_away(rois[:, 1:].to(dtype) * torch.tensor(spatial_scale, dtype=dtype))
    x1, y1, x2, y2 = scaled.unbind(1)
    bin_w = (x2 - x1).clamp(min=1) / k_w
    bin_h = (y2 - y1).clamp(min=1) / k_h

    def edges(start: Tensor, size: Tensor, k: int, limit: int) -> tuple[Tensor, Tensor]:
        steps = torch.arange(k + 1, device=input.device, dtype=dtype)
        lo = torch.floor(steps[None, :-1] * size[:, None]).long() + start.long()[:, None]
        hi = torch.ceil(steps[None, 1:] * size[:, None]).long() + start.long()[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    ys, ye = edges(y1, bin_h, k_h, h)  # (R, k_h) each
    xs, xe = edges(x1, bin_w, k_w, w)  # (R, k_w)
    # summed-area table with a zero first row and column: the sum over [y0, y1) x [x0, x1) in four lookups
    table = F.pad(input.cumsum(2, dtype=torch.float64).cumsum(3), (1, 0, 1, 0)).reshape(-1)
    c_in = torch.arange(c, device=input.device).view(1, d, k_h, k_w)
    base = (rois[:, 0].long().view(-1, 1, 1, 1) * c + c_in) * (h + 1)  # (R, D, k_h, k_w)

    def at(y: Tensor, x: Tensor) -> Tensor:
        return table[(base + y[:, None, :, None]) * (w + 1) + x[:, None, None, :]]

    sums = at(ye, xe) - at(ys, xe) - at(ye, xs) + at(ys, xs)
    area = ((ye - ys)[:, :, None] * (xe - xs)[:, None, :])[:, None]  # (R, 1, k_h, k_w)
    out = torch.where(area > 0, sums / area.clamp(min=1), torch.zeros_like(sums))
    return out.to(input.dtype)
