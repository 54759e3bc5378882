"""Classification and box regression losses, one module per kind (MMDetection semantics, see ``utils``)."""
from raydet.models.losses.balanced_l1_loss import BalancedL1Loss
from raydet.models.losses.cross_entropy_loss import CrossEntropyLoss
from raydet.models.losses.focal_loss import FocalLoss
from raydet.models.losses.ghm_loss import GHMC, GHMR
from raydet.models.losses.iou_loss import BoundedIoULoss, GIoULoss, IoULoss
from raydet.models.losses.mse_loss import MSELoss
from raydet.models.losses.smooth_l1_loss import L1Loss, SmoothL1Loss
from raydet.models.losses.utils import reduce_loss, weight_reduce_loss

__all__ = [
    "reduce_loss", "weight_reduce_loss", "CrossEntropyLoss", "FocalLoss", "SmoothL1Loss", "L1Loss", "BalancedL1Loss",
    "IoULoss", "GIoULoss", "BoundedIoULoss", "GHMC", "GHMR", "MSELoss",
]
