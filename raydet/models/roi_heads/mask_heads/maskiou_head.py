"""MaskIoU head (Mask Scoring R-CNN, Huang et al. 2019): regress the IoU of each predicted mask with its object.

The head sees the RoI's mask features concatenated with its predicted mask of the class (max-pooled to the
features' size), and predicts one MaskIoU per class (paper Sec. 3.2, Fig. 3; MMDetection's ``MaskIoUHead``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.registry import register

__all__ = ["MaskIoUHead", "mask_area_ratios", "mask_iou_targets"]


def mask_area_ratios(pos_boxes: torch.Tensor, pos_gt_inds: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Share of each positive's ground-truth mask that lies inside the positive's box.

    The box is cut to whole pixels as MMDetection's ``BitmapMasks.crop`` does: corners truncated to integers and
    clipped to the image, at least one pixel wide and high; the area inside is that of rows [y1, y1 + h) and columns
    [x1, x1 + w).

    Args:
        pos_boxes: (P, 4) positive RoIs (x1, y1, x2, y2) in input-image pixels.
        pos_gt_inds: (P,) 0-based index of each RoI's ground truth.
        gt_masks: (n, h, w) uint8 bitmaps of the image's ground truths (the whole instances).

    Returns:
        (P,) float: mask area inside the box / the mask's whole area (0 for an empty mask).
    """
    if pos_boxes.shape[0] == 0:
        return pos_boxes.new_zeros((0,))
    used, local = torch.unique(pos_gt_inds.long(), return_inverse=True)
    masks = gt_masks[used.to(gt_masks.device)].to(pos_boxes.device)
    _, h, w = masks.shape
    # summed-area tables with a zero first row and column: area of [y0, y1) x [x0, x1) in four lookups
    sat = F.pad(masks.to(torch.int32).cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32), (1, 0, 1, 0))
    box = pos_boxes.trunc().long()
    x1, x2 = box[:, 0].clamp(0, w), box[:, 2].clamp(0, w)
    y1, y2 = box[:, 1].clamp(0, h), box[:, 3].clamp(0, h)
    xe = torch.minimum(x1 + (x2 - x1).clamp(min=1), torch.full_like(x1, w))
    ye = torch.minimum(y1 + (y2 - y1).clamp(min=1), torch.full_like(y1, h))
    flat, gi = sat.flatten(), local * (h + 1) * (w + 1)

    def at(y, x):
        return flat[gi + y * (w + 1) + x]

    inside = at(ye, xe) - at(y1, xe) - at(ye, x1) + at(y1, x1)
    full = at(torch.full_like(y1, h), torch.full_like(x1, w))
    return (inside.double() / full.clamp(min=1).double()).to(pos_boxes.dtype)


def mask_iou_targets(mask_probs: torch.Tensor, mask_targets: torch.Tensor, area_ratios: torch.Tensor,
                     mask_thr: float = 0.5) -> torch.Tensor:
    """MaskIoU targets: IoU of each binarised predicted mask with its whole ground-truth instance.

    Intersections are counted on the M x M RoI grid; the instance's area is its area in the RoI's target divided by
    the share of the instance inside the RoI (``area_ratios``), so that parts outside the RoI count too (paper Sec.
    3.2; MMDetection's ``MaskIoUHead.get_targets``).

    Args:
        mask_probs: (P, M, M) predicted mask probabilities of each RoI's class; binarised at ``> mask_thr``.
        mask_targets: (P, M, M) binary mask targets of the RoIs
            (:func:`~raydet.models.roi_heads.mask_heads.mask_targets`).
        area_ratios: (P,) from :func:`mask_area_ratios`.

    Returns:
        (P,) IoUs in [0, 1] (0 where both masks are empty).
    """
    pred = (mask_probs > mask_thr).to(mask_targets.dtype)
    overlap = (pred * mask_targets).sum((-1, -2))
    full = mask_targets.sum((-1, -2)) / (area_ratios + 1e-7)
    union = pred.sum((-1, -2)) + full - overlap
    return torch.where(union > 0, overlap / union.clamp(min=1e-7), torch.zeros_like(union))


@register
class MaskIoUHead(nn.Module):
    """``num_convs`` 3x3 convs (the last with stride 2), ``num_fcs`` FC layers and a linear MaskIoU per class.

    ``forward(mask_feats, mask_pred)``: mask_feats (P, in_channels, S, S) RoI features (S = ``roi_feat_size``),
    mask_pred (P, 2S, 2S) mask logits of each RoI's class -> (P, num_classes) predicted MaskIoUs.

    Args:
        num_classes: object classes (no background).
        loss_iou: regression loss on the positives' MaskIoUs (MSELoss).
        mask_thr_binary: probability above which a predicted mask pixel counts as foreground in the targets (the
            paper's binarisation; MMDetection compares the logits with it).
    """

    def __init__(self, num_classes: int, loss_iou, num_convs: int = 4, num_fcs: int = 2, roi_feat_size: int = 14,
                 in_channels: int = 256, conv_out_channels: int = 256, fc_out_channels: int = 1024,
                 mask_thr_binary: float = 0.5):
        super().__init__()
        if num_convs < 1 or num_fcs < 1:
            raise ValueError(f"MaskIoUHead needs num_convs >= 1 and num_fcs >= 1, got {num_convs}, {num_fcs}")
        if roi_feat_size % 2:
            raise ValueError(f"MaskIoUHead: roi_feat_size must be even (the last conv halves it), got {roi_feat_size}")
        self.num_classes = num_classes
        self.loss_iou = loss_iou
        self.mask_thr_binary = mask_thr_binary
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels + 1 if i == 0 else conv_out_channels, conv_out_channels, 3,
                      stride=2 if i == num_convs - 1 else 1, padding=1)
            for i in range(num_convs))
        features = conv_out_channels * (roi_feat_size // 2) ** 2
        self.fcs = nn.ModuleList(nn.Linear(features if i == 0 else fc_out_channels, fc_out_channels)
                                 for i in range(num_fcs))
        self.fc_mask_iou = nn.Linear(fc_out_channels, num_classes)
        # MMDetection's init_cfg: Kaiming (fan_out, normal) convs, Caffe2Xavier FCs, N(0, 0.01) output; zero biases
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for fc in self.fcs:
            nn.init.kaiming_uniform_(fc.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, mask_feats: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(mask_pred.sigmoid()[:, None], 2, 2)
        x = torch.cat([mask_feats, pooled.to(mask_feats.dtype)], dim=1)
        for conv in self.convs:
            x = F.relu(conv(x))
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        return self.fc_mask_iou(x)

    def targets(self, pos_boxes: torch.Tensor, pos_gt_inds: torch.Tensor, gt_masks: torch.Tensor,
                mask_pred: torch.Tensor, mask_targets: torch.Tensor) -> torch.Tensor:
        """(P,) MaskIoU targets of one image's positives; mask_pred (P, M, M) logits of their classes."""
        ratios = mask_area_ratios(pos_boxes, pos_gt_inds, gt_masks)
        return mask_iou_targets(mask_pred.detach().sigmoid(), mask_targets, ratios, self.mask_thr_binary)

    def loss(self, iou_pred: torch.Tensor, iou_targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_iou`` on the RoIs whose target is above 0 (MMDetection); iou_pred, iou_targets (P,)."""
        pos = iou_targets > 0
        if not bool(pos.any()):
            return {"loss_mask_iou": iou_pred.sum() * 0.0}
        return {"loss_mask_iou": self.loss_iou(iou_pred[pos], iou_targets[pos])}

    @staticmethod
    def mask_scores(iou_pred: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Mask score = classification score x the predicted MaskIoU of the detection's class (paper Sec. 3.2);
        iou_pred (m, C), labels (m,), scores (m,) -> (m,)."""
        return scores * iou_pred[torch.arange(labels.numel(), device=labels.device), labels]
