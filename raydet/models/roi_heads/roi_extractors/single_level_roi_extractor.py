"""Pool fixed-size features for each RoI from the FPN level that matches its size."""
from __future__ import annotations

import math

import torch
from torch import nn

from raydet.ops import roi_align, roi_pool
from raydet.registry import register

__all__ = ["SingleRoIExtractor", "map_roi_levels", "boxes_to_rois", "rescale_rois"]


def boxes_to_rois(boxes_per_image: list[torch.Tensor]) -> torch.Tensor:
    """Per-image (k_i, >=4) boxes -> (sum k_i, 5) rois [image_index, x1, y1, x2, y2]."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), i), b[:, :4]], dim=1) for i, b in enumerate(boxes_per_image)]
    return torch.cat(rois) if rois else torch.zeros((0, 5))


def rescale_rois(rois: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """(R, 5) rois [index, x1, y1, x2, y2] -> the same rois with width and height times ``scale_factor``, about
    their centres (MMDetection's ``BaseRoIExtractor.roi_rescale``; Double-Head R-CNN's enlarged regression RoIs)."""
    centre = (rois[:, 1:3] + rois[:, 3:5]) * 0.5
    half = (rois[:, 3:5] - rois[:, 1:3]) * (0.5 * scale_factor)
    return torch.cat([rois[:, :1], centre - half, centre + half], dim=1)


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0, mapping: str = "mmdetection",
                   first_level: int = 2) -> torch.Tensor:
    """FPN level (0-based) of each RoI from its scale sqrt(w * h), clamped to [0, num_levels - 1].

    ``mapping="mmdetection"``: floor(log2(scale / finest_scale + 1e-6)); with finest_scale 56: scale < 112 -> level 0
    (P2), [112, 224) -> 1, [224, 448) -> 2, >= 448 -> 3. ``"detectron2"``: Detectron2's ROIPooler (FPN paper Eq. 1,
    canonical box 224 px at level 4): floor(4 + log2(scale / 224 + 1e-8)) - first_level, where ``first_level`` is the
    pyramid level of the finest map (2 for P2); the same thresholds, except for RoIs within a few float32 steps of them.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    if mapping == "detectron2":
        levels = torch.floor(4 + torch.log2(scale / 224 + 1e-8)) - first_level
    elif mapping == "mmdetection":
        levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    else:
        raise ValueError(f"mapping must be 'mmdetection' or 'detectron2', got {mapping!r}")
    return levels.clamp(0, num_levels - 1).long()


@register
class SingleRoIExtractor(nn.Module):
    """RoIAlign (or RoIPool) each RoI on one pyramid level chosen by ``map_roi_levels``.

    Args:
        output_size: pooled size (7 for boxes, 14 for masks).
        featmap_strides: strides of the levels used (e.g. [4, 8, 16, 32] for P2-P5).
        sampling_ratio: RoIAlign samples per bin side (0 = adaptive).
        aligned: RoIAlign with the half-pixel offset (MMDetection / Detectron2 default).
        roi_type: "RoIAlign" or "RoIPool".
        finest_scale, level_mapping: how an RoI's level is chosen (:func:`map_roi_levels`): ``"mmdetection"`` (with
            ``finest_scale``) or ``"detectron2"`` (Detectron2's ROIPooler; the finest level is log2 of the first
            stride).
    """

    def __init__(self, output_size: int, featmap_strides: list[int], sampling_ratio: int = 0, aligned: bool = True,
                 finest_scale: float = 56.0, roi_type: str = "RoIAlign", level_mapping: str = "mmdetection"):
        super().__init__()
        if roi_type not in ("RoIAlign", "RoIPool"):
            raise ValueError(f"roi_type must be 'RoIAlign' or 'RoIPool', got {roi_type!r}")
        self.output_size = output_size
        self.featmap_strides = list(featmap_strides)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale
        self.roi_type = roi_type
        if level_mapping not in ("mmdetection", "detectron2"):
            raise ValueError(f"level_mapping must be 'mmdetection' or 'detectron2', got {level_mapping!r}")
        if level_mapping == "detectron2" and any(s != 2 ** round(math.log2(s)) for s in featmap_strides):
            raise ValueError(f"level_mapping 'detectron2' needs power-of-2 featmap_strides, got "
                             f"{list(featmap_strides)}")
        self.level_mapping = level_mapping

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def pool(self, feat: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
        if self.roi_type == "RoIPool":
            return roi_pool(feat, rois, self.output_size, 1.0 / stride)
        return roi_align(feat, rois, self.output_size, 1.0 / stride, self.sampling_ratio, self.aligned)

    def forward(self, feats: tuple[torch.Tensor, ...], rois: torch.Tensor,
                roi_scale_factor: float | None = None) -> torch.Tensor:
        """feats: per-level (B, C, H, W); rois: (K, 5) in input pixels -> (K, C, output_size, output_size).

        ``roi_scale_factor``: pool each RoI enlarged by this factor about its centre (:func:`rescale_rois`), on the
        level its original size maps to (as MMDetection).
        """
        feats = feats[: self.num_inputs]
        c = feats[0].shape[1]
        out = feats[0].new_zeros((rois.shape[0], c, self.output_size, self.output_size))
        if len(feats) == 1:
            rois = rois if roi_scale_factor is None else rescale_rois(rois, roi_scale_factor)
            return self.pool(feats[0], rois, self.featmap_strides[0])
        levels = map_roi_levels(rois, len(feats), self.finest_scale, self.level_mapping,
                                round(math.log2(self.featmap_strides[0])))
        if roi_scale_factor is not None:
            rois = rescale_rois(rois, roi_scale_factor)
        unused = None
        for level, (feat, stride) in enumerate(zip(feats, self.featmap_strides)):
            idx = torch.nonzero(levels == level, as_tuple=True)[0]
            if idx.numel():
                out[idx] = self.pool(feat, rois[idx], stride).to(out.dtype)
            elif torch.is_grad_enabled():  # keep every level in the graph so DDP sees a gradient for it
                unused = feat.sum() * 0.0 if unused is None else unused + feat.sum() * 0.0
        return out if unused is None else out + unused
