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
    """RoIAlign (or RoIPool, or a configured RoI layer) each RoI on one pyramid level chosen by ``map_roi_levels``.

    Args:
        output_size: pooled size (7 for boxes, 14 for masks).
        featmap_strides: strides of the levels used (e.g. [4, 8, 16, 32] for P2-P5).
        sampling_ratio: RoIAlign samples per bin side (0 = adaptive, the default).
        aligned: RoIAlign with the half-pixel offset (MMDetection / Detectron2 default, True).
        roi_type: "RoIAlign" (default) or "RoIPool".
        roi_layer: an RoI layer config instead of ``roi_type`` / ``sampling_ratio`` / ``aligned`` (MMDetection's
            ``roi_layer``), e.g. ``{type: DeformRoIPoolPack, output_size: 7, output_channels: 256}``: one layer per
            level in ``roi_layers`` (each with its own parameters, as MMDetection), built with ``spatial_scale`` =
            1 / stride and the extractor's ``output_size`` (which it may repeat); any registered layer whose
            ``forward(feat (B, C, H, W), rois (K, 5))`` gives (K, C, output_size, output_size).
        finest_scale, level_mapping: how an RoI's level is chosen (:func:`map_roi_levels`): ``"mmdetection"`` (with
            ``finest_scale``) or ``"detectron2"`` (Detectron2's ROIPooler; the finest level is log2 of the first
            stride).
    Raises:
        ValueError: an unknown ``roi_type``; ``roi_layer`` together with ``roi_type`` / ``sampling_ratio`` /
            ``aligned``, setting ``spatial_scale``, or an ``output_size`` other than the extractor's.
    """

    config_args = ("roi_layer",)  # built here, once per level (raydet.registry)

    def __init__(self, output_size: int, featmap_strides: list[int], sampling_ratio: int | None = None,
                 aligned: bool | None = None, finest_scale: float = 56.0, roi_type: str | None = None,
                 level_mapping: str = "mmdetection", roi_layer: dict | None = None):
        super().__init__()
        self.roi_layers = None
        if roi_layer is not None:
            self._build_roi_layers(roi_layer, output_size, featmap_strides,
                                   dict(roi_type=roi_type, sampling_ratio=sampling_ratio, aligned=aligned))
        roi_type = "RoIAlign" if roi_type is None else roi_type
        if roi_type not in ("RoIAlign", "RoIPool"):
            raise ValueError(f"roi_type must be 'RoIAlign' or 'RoIPool', got {roi_type!r}")
        self.output_size = output_size
        self.featmap_strides = list(featmap_strides)
        self.sampling_ratio = 0 if sampling_ratio is None else sampling_ratio
        self.aligned = True if aligned is None else aligned
        self.finest_scale = finest_scale
        self.roi_type = roi_type if self.roi_layers is None else type(self.roi_layers[0]).__name__
        if level_mapping not in ("mmdetection", "detectron2"):
            raise ValueError(f"level_mapping must be 'mmdetection' or 'detectron2', got {level_mapping!r}")
        if level_mapping == "detectron2" and any(s != 2 ** round(math.log2(s)) for s in featmap_strides):
            raise ValueError(f"level_mapping 'detectron2' needs power-of-2 featmap_strides, got "
                             f"{list(featmap_strides)}")
        self.level_mapping = level_mapping

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def _build_roi_layers(self, cfg: dict, output_size: int, strides, unused: dict) -> None:
        """``self.roi_layers``: the ``roi_layer`` config built once per level."""
        from raydet.registry import build, current_path

        import raydet.ops  # noqa: F401  (registers the RoI layer types)

        if not isinstance(cfg, dict) or "type" not in cfg:
            raise ValueError(f"roi_layer must be a dict with a 'type' (e.g. DeformRoIPoolPack), got {cfg!r}")
        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise ValueError(f"roi_layer replaces {', '.join(given)}: set them inside roi_layer")
        if "spatial_scale" in cfg:
            raise ValueError("roi_layer must not set spatial_scale: each level's is 1 / its featmap stride")
        if cfg.get("output_size", output_size) != output_size:
            raise ValueError(f"roi_layer.output_size ({cfg['output_size']}) differs from the extractor's "
                             f"({output_size})")
        base = current_path()
        path = f"{base}.roi_layer" if base else "roi_layer"
        self.roi_layers = nn.ModuleList(build(cfg, path, output_size=output_size, spatial_scale=1.0 / s)
                                        for s in strides)

    def pool(self, feat: torch.Tensor, rois: torch.Tensor, stride: int) -> torch.Tensor:
        if self.roi_layers is not None:
            return self.roi_layers[self.featmap_strides.index(stride)](feat, rois)
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
