"""Detection ops (``raydet.ops``): NMS variants, RoI feature extraction, box overlaps, focal loss,
deformable convolution and deformable RoI pooling. torchvision kernels where it has the op, vectorised torch
otherwise; every op runs on CPU and CUDA tensors."""
from .bbox_overlaps import bbox_overlaps
from .deform_conv import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2dPack, deform_conv2d
from .deform_roi_pool import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from .focal_loss import sigmoid_focal_loss
from .nms import batched_nms, batched_soft_nms, multiclass_nms, nms, soft_nms
from .ps_roi_pool import ps_roi_pool
from .roi_ops import RoIAlign, RoIPool, roi_align, roi_pool

__all__ = [
    "nms", "batched_nms", "soft_nms", "batched_soft_nms", "multiclass_nms",
    "roi_align", "roi_pool", "RoIAlign", "RoIPool", "ps_roi_pool",
    "bbox_overlaps",
    "sigmoid_focal_loss",
    "deform_conv2d", "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack",
    "deform_roi_pool", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack",
]
