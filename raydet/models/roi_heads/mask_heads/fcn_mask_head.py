"""FCN mask head (Mask R-CNN): per-RoI class-specific 28x28 mask logits, and its training targets."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.layers import conv_tower
from raydet.ops import roi_align
from raydet.registry import register

__all__ = ["FCNMaskHead", "mask_targets"]


def mask_targets(pos_boxes: torch.Tensor, pos_gt_inds: torch.Tensor, gt_masks: torch.Tensor,
                 size: int, aligned: bool = True, binarize: bool = True) -> torch.Tensor:
    """Crop each positive RoI out of its ground-truth mask and resize it to ``size`` x ``size``.

    Args:
        pos_boxes: (P, 4) positive RoIs in input-image pixels.
        pos_gt_inds: (P,) index of each RoI's ground truth (0-based).
        gt_masks: (n, h, w) uint8 bitmaps of this image's ground truths.
        aligned: RoIAlign with the half-pixel offset (MMDetection, Detectron2); False as torchvision's
            ``project_masks_on_boxes``.
        binarize: threshold the targets at 0.5 (MMDetection, Detectron2); False keeps the soft RoIAlign values
            (torchvision).

    Returns:
        (P, size, size) float targets: in {0, 1}, or in [0, 1] without ``binarize`` (RoIAlign of the bitmap with
        adaptive sampling).
    """
    if pos_boxes.shape[0] == 0:
        return pos_boxes.new_zeros((0, size, size))
    used, local = torch.unique(pos_gt_inds, return_inverse=True)
    masks = gt_masks[used].to(device=pos_boxes.device, dtype=pos_boxes.dtype)[:, None]
    rois = torch.cat([local[:, None].to(pos_boxes.dtype), pos_boxes], dim=1)
    crops = roi_align(masks, rois, size, 1.0, 0, aligned)[:, 0]
    return (crops >= 0.5).to(pos_boxes.dtype) if binarize else crops


@register
class FCNMaskHead(nn.Module):
    """``num_convs`` 3x3 convs, a stride-2 deconvolution, and a 1x1 conv to one mask logit map per class.

    (P, in_channels, 14, 14) -> (P, C, 28, 28) with the defaults. ``target_aligned`` and ``binarize_targets``
    set how training targets are cut from the ground-truth masks (see :func:`mask_targets`). ``conv_cfg``: the type
    of the ``num_convs`` 3x3 convs (e.g. ``{type: ConvWS}``; None: ``nn.Conv2d``); upsample and logits stay plain.
    """

    def __init__(self, num_classes: int, loss_mask, num_convs: int = 4, in_channels: int = 256,
                 conv_out_channels: int = 256, roi_feat_size: int = 14, upsample_ratio: int = 2,
                 class_agnostic: bool = False, norm_cfg: dict | None = None, target_aligned: bool = True,
                 binarize_targets: bool = True, conv_cfg: dict | None = None):
        super().__init__()
        self.target_aligned = target_aligned
        self.binarize_targets = binarize_targets
        self.num_classes = num_classes
        self.loss_mask = loss_mask
        self.class_agnostic = class_agnostic
        self.mask_size = roi_feat_size * upsample_ratio
        self.convs = conv_tower(in_channels, conv_out_channels, num_convs, norm_cfg, conv_cfg)
        channels = conv_out_channels if num_convs else in_channels
        self.upsample = nn.ConvTranspose2d(channels, conv_out_channels, upsample_ratio, stride=upsample_ratio)
        self.conv_logits = nn.Conv2d(conv_out_channels, 1 if class_agnostic else num_classes, 1)
        for m in [*self.convs, self.upsample, self.conv_logits]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_logits(torch.relu(self.upsample(self.convs(x))))

    def targets(self, pos_boxes: torch.Tensor, pos_gt_inds: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
        """(P, M, M) training targets of one image's positive RoIs, by this head's target settings."""
        return mask_targets(pos_boxes, pos_gt_inds, gt_masks, self.mask_size, aligned=self.target_aligned,
                            binarize=self.binarize_targets)

    def loss(self, mask_pred: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel sigmoid CE on each RoI's own class channel; mask_pred (P, C, M, M), targets (P, M, M)."""
        if mask_pred.shape[0] == 0:
            return {"loss_mask": mask_pred.sum() * 0.0}
        if self.class_agnostic:
            labels = torch.zeros_like(labels)
        return {"loss_mask": self.loss_mask(mask_pred, targets, label=labels)}

    def probabilities(self, mask_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(P, C, M, M) logits -> (P, M, M) probabilities of each RoI's predicted class."""
        idx = torch.zeros_like(labels) if self.class_agnostic else labels
        return mask_pred[torch.arange(labels.numel(), device=labels.device), idx].sigmoid()
