"""R-FCN's box head (Dai et al. 2016, Sec. 2): position-sensitive score maps over the whole image, then voting."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.roi_heads.bbox_heads.convfc_bbox_head import ConvFCBBoxHead
from raydet.registry import register

__all__ = ["RFCNBBoxHead"]


@register
class RFCNBBoxHead(nn.Module):
    """A 1x1 conv (``conv_new``, ReLU) to ``feat_channels``, then 1x1 convs to k^2 (C + 1) class score maps
    (``rfcn_cls``) and k^2 x 4 box maps (``rfcn_reg``; k^2 x 4C when not ``reg_class_agnostic``).

    ``score_maps(x)``: (B, in_channels, H, W) -> (cls maps (B, (C + 1) k^2, H, W), box maps (B, 4 k^2, H, W)),
    channels ordered (class, bin row, bin column) as :class:`~raydet.models.roi_heads.roi_extractors.PSRoIExtractor`
    reads them. ``forward(cls_pooled, reg_pooled)``: (R, C + 1, k, k), (R, 4, k, k) PS-pooled -> cls_score (R, C + 1)
    with background at index C, bbox_pred (R, 4) (or (R, 4C)): each RoI's k x k bins vote by averaging (Eq. 2).

    Training and test-time decoding are Faster R-CNN's (:class:`ConvFCBBoxHead`'s ``loss`` and ``predict_boxes``).
    """

    def __init__(self, num_classes: int, bbox_coder, loss_cls, loss_bbox, in_channels: int = 2048,
                 feat_channels: int = 1024, roi_feat_size: int = 7, reg_class_agnostic: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.bbox_coder = bbox_coder
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.reg_class_agnostic = reg_class_agnostic
        self.reg_decoded_bbox = bool(getattr(loss_bbox, "takes_decoded_boxes", False))
        self.roi_feat_size = roi_feat_size
        bins = roi_feat_size * roi_feat_size
        self.conv_new = nn.Conv2d(in_channels, feat_channels, 1)
        self.rfcn_cls = nn.Conv2d(feat_channels, (num_classes + 1) * bins, 1)
        self.rfcn_reg = nn.Conv2d(feat_channels, (4 if reg_class_agnostic else 4 * num_classes) * bins, 1)
        for conv in (self.conv_new, self.rfcn_cls, self.rfcn_reg):  # py-R-FCN's fillers: N(0, 0.01), zero bias
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def score_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.conv_new(x))
        return self.rfcn_cls(x), self.rfcn_reg(x)

    def forward(self, cls_pooled: torch.Tensor, reg_pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cls_pooled.mean((-2, -1)), reg_pooled.mean((-2, -1))

    # The same training targets, losses and decoding as Faster R-CNN's box head (they read num_classes, bbox_coder,
    # loss_cls, loss_bbox, reg_class_agnostic and reg_decoded_bbox).
    select_class_deltas = ConvFCBBoxHead.select_class_deltas
    loss = ConvFCBBoxHead.loss
    predict_boxes = ConvFCBBoxHead.predict_boxes
