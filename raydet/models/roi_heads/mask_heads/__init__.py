"""Mask heads of the RoI stage: pooled RoI features -> per-class mask logits, one module per kind."""
from raydet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead, mask_targets
from raydet.models.roi_heads.mask_heads.htc_mask_head import HTCMaskHead
from raydet.models.roi_heads.mask_heads.fused_semantic_head import FusedSemanticHead
from raydet.models.roi_heads.mask_heads.grid_head import GridHead
from raydet.models.roi_heads.mask_heads.maskiou_head import MaskIoUHead, mask_area_ratios, mask_iou_targets

__all__ = ["FCNMaskHead", "mask_targets", "HTCMaskHead", "FusedSemanticHead", "GridHead", "MaskIoUHead",
           "mask_area_ratios", "mask_iou_targets"]
