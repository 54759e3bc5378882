"""RoI feature extractors: (R, 5) RoIs + feature maps -> (R, C, S, S) pooled features, one module per kind."""
from raydet.models.roi_heads.roi_extractors.single_level_roi_extractor import (SingleRoIExtractor, boxes_to_rois,
                                                                               map_roi_levels, rescale_rois)
from raydet.models.roi_heads.roi_extractors.ps_roi_extractor import PSRoIExtractor

__all__ = ["SingleRoIExtractor", "boxes_to_rois", "map_roi_levels", "rescale_rois", "PSRoIExtractor"]
