"""Deformable RoI pooling: DCNv1's (Dai et al., ICCV 2017, Sec. 2.2) and the modulated variant of DCNv2 (Zhu et al.,
CVPR 2019, Sec. 3.1), with mmcv's semantics and parameter names (``DeformRoIPoolPack``, ``ModulatedDeformRoIPoolPack``).

Each RoI is split into ``h`` x ``w`` bins as RoIAlign does (aligned, Mask R-CNN with the half-pixel shift); bin
``(i, j)`` is moved by ``gamma * offset[:, :, i, j] * (roi_w, roi_h)`` (the paper's normalised offset, Eq. 6, scaled
by ``gamma`` = 0.1) and averages bilinear samples of the feature map inside the moved bin. With zero offsets this is
RoIAlign with ``aligned=True`` exactly (mmcv's kernel ``deform_roi_pool_forward``: the RoI is shifted by -0.5, not
stretched to 1 x 1, the adaptive grid is ``ceil(roi_size / bins)`` samples per bin side, and a sample outside
``[-1, size]`` reads 0). Plain PyTorch: the samples are read with :func:`torch.nn.functional.grid_sample`, so the
output is differentiable in the features and the offsets (not in the RoI corners, as mmcv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydet.registry import register

from ._utils import compute_dtype, pair

__all__ = ["deform_roi_pool", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"]


def _sample(feat: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear values of ``feat`` (C, H, W) at the points ``y``, ``x`` (K, P), in feature pixels -> (K, C, P).

    mmcv's / torchvision's RoIAlign interpolation: a coordinate within [-1, 0] reads the first row / column, one
    within [size - 1, size] the last, one outside [-1, size] reads 0 (``grid_sample`` with border padding clamps
    the coordinate to [0, size - 1]; the mask zeroes points outside).
    """
    _, h, w = feat.shape
    inside = ((y >= -1) & (y <= h) & (x >= -1) & (x <= w)).to(feat.dtype)
    # align_corners=True: -1 and 1 are the centres of the first and last pixel (coordinates 0 and size - 1)
    grid = torch.stack([x * (2 / max(w - 1, 1)) - 1, y * (2 / max(h - 1, 1)) - 1], dim=-1)
    out = F.grid_sample(feat[None], grid[None], mode="bilinear", padding_mode="border", align_corners=True)[0]
    return out.permute(1, 0, 2) * inside[:, None, :]  # (C, K, P) -> (K, C, P)


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Tensor | None, output_size: int | tuple[int, int],
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> Tensor:
    """Deformable RoI pooling (average of bilinear samples per moved bin); mmcv's ``deform_roi_pool``.

    Args:
        input: (N, C, H, W) features.
        rois: (K, 5) rows [batch_idx, x1, y1, x2, y2] in image pixels.
        offset: (K, 2, h, w) normalised bin offsets, channel 0 along x (times the RoI width), channel 1 along y
            (times its height); None = zero offsets (RoIAlign, aligned).
        output_size: h and w of the output (an int for square).
        spatial_scale: feature-map size / image size (1 / stride).
        sampling_ratio: samples per bin side; 0 = adaptive, ``ceil(roi_size / bins)`` per RoI (in feature pixels).
        gamma: scale of the offsets (0.1 in the paper and mmcv).
    Returns:
        (K, C, h, w) in the dtype of ``input`` (half inputs are computed in float32).
    Raises:
        ValueError: on wrong shapes.
    """
    if input.dim() != 4:
        raise ValueError(f"deform_roi_pool: input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"deform_roi_pool: rois must have shape (K, 5) [batch_idx, x1, y1, x2, y2], "
                         f"got {tuple(rois.shape)}")
    out_h, out_w = pair(output_size, "output_size")
    k = rois.shape[0]
    if offset is not None and tuple(offset.shape) != (k, 2, out_h, out_w):
        raise ValueError(f"deform_roi_pool: offset must have shape (K, 2, h, w) = {(k, 2, out_h, out_w)}, "
                         f"got {tuple(offset.shape)}")
    dtype = compute_dtype(input.dtype)
    feats = input.to(dtype)
    rois = rois.detach().to(dtype)
    out = feats.new_zeros((k, feats.shape[1], out_h, out_w))
    if k == 0:
        return out.to(input.dtype)

    start_x, start_y = rois[:, 1] * spatial_scale - 0.5, rois[:, 2] * spatial_scale - 0.5  # (K,)
    roi_w, roi_h = rois[:, 3] * spatial_scale - 0.5 - start_x, rois[:, 4] * spatial_scale - 0.5 - start_y
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    # bin corners (K, h, w): the RoIAlign grid, each bin moved by its own offset
    corner_x = start_x[:, None, None] + torch.arange(out_w, dtype=dtype, device=feats.device) * bin_w[:, None, None]
    corner_y = start_y[:, None, None] + torch.arange(out_h, dtype=dtype, device=feats.device)[:, None] \
        * bin_h[:, None, None]
    corner_x, corner_y = corner_x.expand(k, out_h, out_w), corner_y.expand(k, out_h, out_w)
    if offset is not None:
        offset = offset.to(dtype)
        corner_x = corner_x + gamma * roi_w[:, None, None] * offset[:, 0]
        corner_y = corner_y + gamma * roi_h[:, None, None] * offset[:, 1]

    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long, device=feats.device)
    else:  # an empty or inverted RoI has no samples and gives 0 (as mmcv and torchvision)
        grid_h, grid_w = torch.ceil(roi_h / out_h).long().clamp(min=0), torch.ceil(roi_w / out_w).long().clamp(min=0)
    gh_max, gw_max = int(grid_h.max()), int(grid_w.max())
    if gh_max == 0 or gw_max == 0:
        return out.to(input.dtype)
    # Every RoI gets the largest grid (gh_max x gw_max samples per bin); sample (a, b) of a RoI with a g_h x g_w grid
    # sits at the fractions ((a + 0.5) / g_h, (b + 0.5) / g_w) of its bin and weighs 1 / (g_h g_w) for a < g_h and
    # b < g_w, 0 beyond: the mean over its own grid, with one grid_sample call per image.
    steps_h = torch.arange(gh_max, device=feats.device)
    steps_w = torch.arange(gw_max, device=feats.device)
    frac_y = (steps_h + 0.5).to(dtype) / grid_h.clamp(min=1)[:, None].to(dtype)  # (K, gh_max)
    frac_x = (steps_w + 0.5).to(dtype) / grid_w.clamp(min=1)[:, None].to(dtype)  # (K, gw_max)
    weight = ((steps_h < grid_h[:, None])[:, :, None] & (steps_w < grid_w[:, None])[:, None, :]).to(dtype)
    weight = (weight / (grid_h * grid_w).clamp(min=1)[:, None, None].to(dtype)).flatten(1)  # (K, gh_max * gw_max)
    # sample coordinates (K, h, w, gh_max, gw_max)
    ys = corner_y[..., None, None] + (frac_y * bin_h[:, None])[:, None, None, :, None]
    xs = corner_x[..., None, None] + (frac_x * bin_w[:, None])[:, None, None, None, :]
    ys, xs = (t.reshape(k, -1) for t in torch.broadcast_tensors(ys, xs))
    batch = rois[:, 0].long()
    for n in torch.unique(batch).tolist():
        idx = torch.nonzero(batch == n, as_tuple=True)[0]
        vals = _sample(feats[n], ys[idx], xs[idx])  # (k_n, C, h * w * gh_max * gw_max)
        vals = vals.view(len(idx), -1, out_h, out_w, gh_max * gw_max)
        out[idx] = (vals * weight[idx][:, None, None, None, :]).sum(dim=-1)
    return out.to(input.dtype)


@register
class DeformRoIPool(nn.Module):
    """Module form of :func:`deform_roi_pool` with offsets given from outside: ``forward(input (N, C, H, W),
    rois (K, 5), offset (K, 2, h, w) or None) -> (K, C, h, w)``. Args as :func:`deform_roi_pool`."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = 0,
                 gamma: float = 0.1):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _offset_fc(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    """``layers`` Linear layers with ReLUs between (mmcv's ``offset_fc`` / ``mask_fc`` nesting); the last one zeroed,
    so that a Pack layer starts with zero offsets (and masks of sigmoid(0) = 0.5)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(in_features if i == 0 else hidden, out_features if last else hidden))
        if not last:
            mods.append(nn.ReLU(inplace=True))
    nn.init.zeros_(mods[-1].weight)
    nn.init.zeros_(mods[-1].bias)
    return nn.Sequential(*mods)


@register
class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its own offsets (DCNv1 Sec. 2.2): RoIAlign (zero offsets) -> ``offset_fc``
    (3 FC layers, ``deform_fc_channels`` wide, the last zero-initialised) -> (K, 2, h, w) offsets -> pooling again
    at the moved bins.

    Args:
        output_size, spatial_scale, sampling_ratio, gamma: as :func:`deform_roi_pool`.
        output_channels: channels C of the input features (the first FC takes C * h * w inputs).
        deform_fc_channels: width of the offset FCs (1024, mmcv).
    ``forward(input (N, C, H, W), rois (K, 5)) -> (K, C, h, w)``.
    """

    def __init__(self, output_size: int | tuple[int, int], output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = int(output_channels)
        self.deform_fc_channels = int(deform_fc_channels)
        h, w = self.output_size
        self.offset_fc = _offset_fc(h * w * self.output_channels, self.deform_fc_channels, h * w * 2, layers=3)

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(f"{type(self).__name__}: input must have shape (N, output_channels="
                             f"{self.output_channels}, H, W), got {tuple(input.shape)}")

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        self._check_channels(input)
        x = super().forward(input, rois)
        offset = self.offset_fc(x.flatten(1)).view(rois.shape[0], 2, *self.output_size)
        return super().forward(input, rois, offset)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, output_channels={self.output_channels}, "
                f"deform_fc_channels={self.deform_fc_channels}")


@register
class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Modulated deformable RoI pooling (DCNv2 Sec. 3.1, Eq. 4): as :class:`DeformRoIPoolPack`, and each bin is scaled
    by a modulation scalar in [0, 1] from ``mask_fc`` (2 FC layers + sigmoid, the last FC zero-initialised, so every
    bin starts at sigmoid(0) = 0.5). Args as :class:`DeformRoIPoolPack`.
    ``forward(input (N, C, H, W), rois (K, 5)) -> (K, C, h, w)``.
    """

    def __init__(self, output_size: int | tuple[int, int], output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        h, w = self.output_size
        self.mask_fc = nn.Sequential(*_offset_fc(h * w * self.output_channels, self.deform_fc_channels, h * w,
                                                 layers=2), nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        self._check_channels(input)
        x = DeformRoIPool.forward(self, input, rois).flatten(1)
        offset = self.offset_fc(x).view(rois.shape[0], 2, *self.output_size)
        mask = self.mask_fc(x).view(rois.shape[0], 1, *self.output_size)
        return DeformRoIPool.forward(self, input, rois, offset) * mask.to(input.dtype)
