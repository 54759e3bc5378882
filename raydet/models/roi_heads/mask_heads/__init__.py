"""Mask heads of the RoI stage: pooled RoI features -> per-class mask logits, one module per kind."""
from raydet.models.roi_heads.mask_heads.fcn_mask_head import FCNMaskHead, mask_targets

__all__ = ["FCNMaskHead", "mask_targets"]
