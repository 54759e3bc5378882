"""Grid R-CNN's grid head (Lu et al. 2019, "Grid R-CNN", Sec. 3; Grid R-CNN Plus, Lu et al. 2019b, Sec. 3.1):
per-RoI heatmaps of G = g x g grid points of the box, from which the box is voted at test time.

Like the mask head it is a fully convolutional head on 14 x 14 RoI features with pixel-wise (sigmoid) targets, and
MMDetection keeps it among its mask heads; so does raydet. Layer names are MMDetection's ``GridHead``'s.

Coordinates: the heatmaps cover the RoI enlarged 2x about its centre (the "whole map", ``4 x roi_feat_size`` = 56
pixels a side for 14 x 14 features), so that points of a ground-truth box larger than the RoI still fall on it.
Grid R-CNN Plus predicts for each point only the half of that map (28 x 28) where the point can lie, its
``sub_region``. Grid points are numbered column-major: point ``p`` has x index ``p // g`` and y index ``p % g``
(point 0 is the top-left corner, g - 1 the bottom-left, G - 1 the bottom-right).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.norm import build_norm_layer
from raydet.registry import register

__all__ = ["GridHead", "grid_sub_regions", "grid_targets", "grid_points_to_boxes"]


def grid_sub_regions(grid_size: int, whole_map_size: int) -> list[tuple[int, int, int, int]]:
    """(x1, y1, x2, y2) of each point's half-size sub-region in the whole map (Grid R-CNN Plus, Sec. 3.1).

    Each side is ``whole_map_size // 4 * 2``; a region starts at 0 for the first row / column of points, at the
    half for the last, and at ``int((i / (g - 1) - 0.25) * whole_map_size)`` (at least 0) for the others
    (0, 14 and 28 for g = 3 on a 56 map).
    """
    half = whole_map_size // 4 * 2

    def start(i: int) -> int:
        if i == 0:
            return 0
        if i == grid_size - 1:
            return half
        return max(int((i / (grid_size - 1) - 0.25) * whole_map_size), 0)

    regions = []
    for p in range(grid_size * grid_size):
        x1, y1 = start(p // grid_size), start(p % grid_size)
        regions.append((x1, y1, x1 + half, y1 + half))
    return regions


def _expand(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) boxes -> the boxes enlarged 2x about their centres: the frame of the whole heatmap."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([boxes[:, :2] - wh / 2, boxes[:, 2:] + wh / 2], dim=1)


def grid_targets(boxes: torch.Tensor, gt_boxes: torch.Tensor, grid_size: int = 3, map_size: int = 56,
                 pos_radius: int = 1) -> torch.Tensor:
    """Whole-map heatmap targets of the grid points of each RoI's ground-truth box (Grid R-CNN, Sec. 3.1).

    Point ``p`` of a box (x1, y1, x2, y2) is at ``(x1 + (p // g) / (g - 1) (x2 - x1), y1 + (p % g) / (g - 1)
    (y2 - y1))``. On the RoI's 2x-enlarged frame sampled ``map_size`` times a side, it falls on pixel
    ``(cx, cy) = trunc((point - frame origin) / frame size x map_size)``; the pixels within ``pos_radius`` of it
    (Euclidean, the "cross" of 5 pixels for radius 1) are 1, all others 0. RoIs whose enlarged frame is at most
    ``grid_size`` pixels wide or high get no positive pixel (as MMDetection).

    Args:
        boxes: (n, 4) RoIs (x1, y1, x2, y2) in pixels; gt_boxes: (n, 4) the ground truth of each.
    Returns:
        (n, grid_size^2, map_size, map_size) float 0/1.
    """
    frame = _expand(boxes.float())
    size = frame[:, 2:] - frame[:, :2]  # (n, 2)
    idx = torch.arange(grid_size * grid_size, device=boxes.device)
    fx = 1 - (idx // grid_size).float() / (grid_size - 1)  # weight of x1 (1 on the left column)
    fy = 1 - (idx % grid_size).float() / (grid_size - 1)
    gt = gt_boxes.float()
    px = fx * gt[:, None, 0] + (1 - fx) * gt[:, None, 2]  # (n, G)
    py = fy * gt[:, None, 1] + (1 - fy) * gt[:, None, 3]
    cx = torch.trunc((px - frame[:, None, 0]) / size[:, None, 0] * map_size)
    cy = torch.trunc((py - frame[:, None, 1]) / size[:, None, 1] * map_size)
    pixels = torch.arange(map_size, device=boxes.device, dtype=torch.float32)
    dx2 = (pixels - cx[..., None]) ** 2  # (n, G, map) over x
    dy2 = (pixels - cy[..., None]) ** 2  # (n, G, map) over y
    targets = (dy2[..., :, None] + dx2[..., None, :]) <= pos_radius ** 2  # (n, G, y, x)
    valid = (size > grid_size).all(dim=1)
    return (targets & valid[:, None, None, None]).float()


def grid_points_to_boxes(heatmaps: torch.Tensor, boxes: torch.Tensor, sub_regions, grid_size: int) -> torch.Tensor:
    """Grid-guided box correction (Grid R-CNN, Sec. 3.3): the box from each point's heatmap peak.

    Each point is placed at the centre of its most probable pixel (on the whole map of the RoI's 2x frame); each
    box side is the probability-weighted mean of the points on it (x1: the left column of points, y1: the top row,
    x2: the right column, y2: the bottom row).

    Args:
        heatmaps: (n, G, h, h) probabilities on each point's sub-region (h = half the whole map).
        boxes: (n, 4) the RoIs the heatmaps were pooled from (pixels).
        sub_regions: G (x1, y1, x2, y2) of :func:`grid_sub_regions`.
    Returns:
        (n, 4) boxes in pixels (not clipped).
    """
    _, g2, h, w = heatmaps.shape
    scores, where = heatmaps.flatten(2).max(dim=2)  # (n, G)
    offsets = heatmaps.new_tensor([r[:2] for r in sub_regions])  # (G, 2)
    xs = (where % w).to(heatmaps.dtype) + offsets[:, 0]
    ys = torch.div(where, w, rounding_mode="floor").to(heatmaps.dtype) + offsets[:, 1]
    wh = boxes[:, 2:] - boxes[:, :2]
    origin = boxes[:, :2] - wh / 2
    # the whole map is 2 h pixels over the 2x frame: one pixel is wh / h
    abs_x = (xs + 0.5) / w * wh[:, :1] + origin[:, :1]
    abs_y = (ys + 0.5) / h * wh[:, 1:] + origin[:, 1:]
    idx = torch.arange(g2, device=heatmaps.device)
    col, row = idx // grid_size, idx % grid_size

    def vote(coord, on_side):
        s = scores[:, on_side]
        return (coord[:, on_side] * s).sum(dim=1) / s.sum(dim=1)

    return torch.stack([vote(abs_x, col == 0), vote(abs_y, row == 0), vote(abs_x, col == grid_size - 1),
                        vote(abs_y, row == grid_size - 1)], dim=1)


class _ConvNormReLU(nn.Module):
    """conv (with bias) -> norm -> ReLU, named as mmcv's ``ConvModule`` (``conv``, then ``gn`` or ``bn``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, dilation: int,
                 norm_cfg: dict):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=dilation * (kernel_size - 1) // 2, dilation=dilation)
        self.norm_name = "gn" if norm_cfg["type"] == "GN" else "bn"
        self.add_module(self.norm_name, build_norm_layer(norm_cfg, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, self.norm_name)(self.conv(x)), inplace=True)


def _neighbours(grid_size: int) -> list[tuple[int, ...]]:
    """The 4-neighbours of each grid point (left, up, down, right, where they exist)."""
    out = []
    for i in range(grid_size):  # x index
        for j in range(grid_size):  # y index
            near = []
            if i > 0:
                near.append((i - 1) * grid_size + j)
            if j > 0:
                near.append(i * grid_size + j - 1)
            if j < grid_size - 1:
                near.append(i * grid_size + j + 1)
            if i < grid_size - 1:
                near.append((i + 1) * grid_size + j)
            out.append(tuple(near))
    return out


def _transition(channels: int) -> nn.Sequential:
    """A feature-fusion transition: 5x5 depth-wise conv then 1x1 conv (Grid R-CNN, Sec. 3.2)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 5, padding=2, groups=channels), nn.Conv2d(channels, channels, 1))


@register
class GridHead(nn.Module):
    """Grid point heatmaps from (R, in_channels, S, S) RoI features (S = ``roi_feat_size``, 14).

    ``num_convs`` 3x3 convs (the first of stride 2) with GN give G groups of ``point_feat_channels`` features, one
    per point; each point's features are fused with its neighbours' through two orders of transitions (Sec. 3.2);
    two grouped 4x4 deconvolutions (stride 2) bring the S/2 map to the 2S x 2S heatmap of each point's sub-region.
    Training also supervises the heatmaps of the unfused features (as MMDetection).

    Args:
        grid_points: G, a square (9: 3 x 3, the paper's best, Table 1).
        num_convs, conv_kernel_size, point_feat_channels, deconv_kernel_size: 8, 3, 64, 4 (MMDetection).
        dilation: of the convs after the first; the paper's convs are dilated (Sec. 3.1), MMDetection's (and so its
            checkpoints') are not: 1 by default.
        norm_cfg: the convs' norm ({type: GN, num_groups: 36}).
        loss_grid: the per-pixel loss (MMDetection: sigmoid CrossEntropyLoss, loss_weight 15), summed over the
            fused and unfused heatmaps.
        pos_radius: radius (pixels of the whole map) of each point's positive disk (1).
    """

    def __init__(self, loss_grid, grid_points: int = 9, num_convs: int = 8, roi_feat_size: int = 14,
                 in_channels: int = 256, conv_kernel_size: int = 3, point_feat_channels: int = 64,
                 deconv_kernel_size: int = 4, dilation: int = 1, norm_cfg: dict | None = None, pos_radius: int = 1):
        super().__init__()
        grid_size = math.isqrt(grid_points)
        if grid_points < 4 or grid_size * grid_size != grid_points:
            raise ValueError(f"grid_points must be a square >= 4, got {grid_points}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        norm_cfg = dict(norm_cfg or {"type": "GN", "num_groups": 36})
        self.grid_points = grid_points
        self.grid_size = grid_size
        self.roi_feat_size = roi_feat_size
        self.point_feat_channels = point_feat_channels
        self.whole_map_size = roi_feat_size * 4
        self.sub_regions = grid_sub_regions(grid_size, self.whole_map_size)
        self.pos_radius = pos_radius
        self.loss_grid = loss_grid
        channels = point_feat_channels * grid_points
        self.convs = nn.Sequential(*[
            _ConvNormReLU(in_channels if i == 0 else channels, channels, conv_kernel_size, 2 if i == 0 else 1,
                          1 if i == 0 else dilation, norm_cfg) for i in range(num_convs)])
        pad = (deconv_kernel_size - 2) // 2
        self.deconv1 = nn.ConvTranspose2d(channels, channels, deconv_kernel_size, stride=2, padding=pad,
                                          groups=grid_points)
        self.norm1 = nn.GroupNorm(grid_points, channels)
        self.deconv2 = nn.ConvTranspose2d(channels, grid_points, deconv_kernel_size, stride=2, padding=pad,
                                          groups=grid_points)
        self.neighbour_points = _neighbours(grid_size)
        self.forder_trans = nn.ModuleList(nn.ModuleList(_transition(point_feat_channels) for _ in near)
                                          for near in self.neighbour_points)
        self.sorder_trans = nn.ModuleList(nn.ModuleList(_transition(point_feat_channels) for _ in near)
                                          for near in self.neighbour_points)
        for m in self.modules():  # MMDetection's init_cfg: Kaiming convs, N(0, 0.001) deconvs, prior 0.01
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.deconv2.bias, -math.log(0.99 / 0.01))

    def _heatmap(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv2(F.relu(self.norm1(self.deconv1(x)), inplace=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(R, C, S, S) -> (fused heatmap logits (R, G, 2S, 2S), unfused ones in training, else None)."""
        if x.shape[-2:] != (self.roi_feat_size, self.roi_feat_size):
            raise ValueError(f"GridHead expects {self.roi_feat_size}x{self.roi_feat_size} RoI features, got "
                             f"{tuple(x.shape[-2:])} (the grid_roi_extractor's output_size)")
        x = self.convs(x)
        points = list(x.split(self.point_feat_channels, dim=1))
        first = [p + sum(t(points[n]) for t, n in zip(trans, near))
                 for p, trans, near in zip(points, self.forder_trans, self.neighbour_points)]
        second = [p + sum(t(first[n]) for t, n in zip(trans, near))
                  for p, trans, near in zip(points, self.sorder_trans, self.neighbour_points)]
        fused = self._heatmap(torch.cat(second, dim=1))
        return fused, (self._heatmap(x) if self.training else None)

    def targets(self, boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """(n, 4) RoIs and their gt boxes -> (n, G, 2S, 2S) targets: :func:`grid_targets` on each sub-region."""
        whole = grid_targets(boxes, gt_boxes, self.grid_size, self.whole_map_size, self.pos_radius)
        return torch.stack([whole[:, p, y1:y2, x1:x2] for p, (x1, y1, x2, y2) in enumerate(self.sub_regions)], 1)

    def loss(self, fused: torch.Tensor, unfused: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """loss_grid on the fused plus on the unfused heatmap logits, (n, G, 2S, 2S) each."""
        return self.loss_grid(fused, targets) + self.loss_grid(unfused, targets)

    @torch.no_grad()
    def predict_boxes(self, fused: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Heatmap logits (n, G, 2S, 2S) of the detections (n, 4) -> corrected boxes (n, 4), not clipped."""
        return grid_points_to_boxes(fused.sigmoid(), boxes, self.sub_regions, self.grid_size)
