"""Box heads on pooled RoI features: classification over C + 1 classes and class-specific box deltas."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.head_configs import DetectionConfig
from raydet.models.layers import conv_tower
from raydet.ops import multiclass_nms
from raydet.registry import register

__all__ = ["ConvFCBBoxHead", "Shared2FCBBoxHead", "Shared4Conv1FCBBoxHead"]


@register
class ConvFCBBoxHead(nn.Module):
    """``num_shared_convs`` 3x3 convs (optional norm; ``conv_cfg`` their type, e.g. ``{type: ConvWS}``) then
    ``num_shared_fcs`` FC layers, then two linear outputs.

    Outputs: cls_score (R, C + 1 + U) with background at index C; bbox_pred (R, 4 * C), or (R, 4) when
    ``reg_class_agnostic``.

    ``num_unused_classes`` (U, default 0): classifier outputs after the background that take part in the softmax
    (and its loss) but are no class: never a target, never predicted. A converted torchvision COCO model keeps the
    logits of its 10 category-id slots that COCO never used (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) here, so that
    its softmax scores equal torchvision's.
    """

    def __init__(self, num_classes: int, bbox_coder, loss_cls, loss_bbox, in_channels: int = 256,
                 roi_feat_size: int = 7, num_shared_convs: int = 0, num_shared_fcs: int = 2,
                 conv_out_channels: int = 256, fc_out_channels: int = 1024, norm_cfg: dict | None = None,
                 reg_class_agnostic: bool = False, num_unused_classes: int = 0, conv_cfg: dict | None = None):
        super().__init__()
        if num_unused_classes < 0:
            raise ValueError(f"num_unused_classes must be >= 0, got {num_unused_classes}")
        self.num_classes = num_classes
        self.num_unused_classes = num_unused_classes
        self.bbox_coder = bbox_coder
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.reg_class_agnostic = reg_class_agnostic
        self.reg_decoded_bbox = bool(getattr(loss_bbox, "takes_decoded_boxes", False))

        self.shared_convs = conv_tower(in_channels, conv_out_channels, num_shared_convs, norm_cfg, conv_cfg)
        channels = conv_out_channels if num_shared_convs else in_channels
        fcs, features = [], channels * roi_feat_size * roi_feat_size
        for _ in range(num_shared_fcs):
            fcs += [nn.Linear(features, fc_out_channels), nn.ReLU(inplace=True)]
            features = fc_out_channels
        self.shared_fcs = nn.Sequential(*fcs)
        self.fc_cls = nn.Linear(features, num_classes + 1 + num_unused_classes)
        self.fc_reg = nn.Linear(features, 4 if reg_class_agnostic else 4 * num_classes)

        for m in self.shared_fcs:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C_in, S, S) pooled features -> (cls_score (R, C + 1 + U), bbox_pred (R, 4C or 4))."""
        x = self.shared_fcs(self.shared_convs(x).flatten(1))
        return self.fc_cls(x), self.fc_reg(x)

    def select_class_deltas(self, bbox_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(R, 4C) -> (R, 4): the deltas of each row's class."""
        if self.reg_class_agnostic:
            return bbox_pred
        return bbox_pred.view(bbox_pred.shape[0], -1, 4)[torch.arange(labels.numel(), device=labels.device), labels]

    def loss(self, cls_score, bbox_pred, rois, labels, bbox_targets) -> dict[str, torch.Tensor]:
        """Softmax CE over all sampled RoIs; box loss on positives, normalised by the number of sampled RoIs.

        labels: (R,) with num_classes for background; bbox_targets: (R, 4) (deltas, or boxes for IoU losses).
        """
        loss_cls = self.loss_cls(cls_score, labels, avg_factor=max(labels.numel(), 1))
        pos = torch.nonzero(labels < self.num_classes, as_tuple=True)[0]
        if pos.numel() == 0:
            return {"loss_cls": loss_cls, "loss_bbox": bbox_pred.sum() * 0.0}
        deltas = self.select_class_deltas(bbox_pred[pos], labels[pos])
        if self.reg_decoded_bbox:
            deltas = self.bbox_coder.decode(rois[pos, 1:], deltas)
        loss_bbox = self.loss_bbox(deltas, bbox_targets[pos], avg_factor=max(labels.numel(), 1))
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    @torch.no_grad()
    def predict_boxes(self, rois: torch.Tensor, cls_score: torch.Tensor, bbox_pred: torch.Tensor,
                      img_shape: tuple[int, int], cfg: DetectionConfig):
        """One image's RoIs (R, 5) -> (boxes (m, 4) in input pixels, scores (m,), labels (m,)) after NMS."""
        scores = F.softmax(cls_score, dim=1)[:, : self.num_classes]
        boxes = self.bbox_coder.decode(rois[:, 1:], bbox_pred, max_shape=img_shape)
        boxes = boxes.view(boxes.shape[0], bbox_pred.shape[1] // 4, 4)  # -1 is ambiguous with no RoIs
        if boxes.shape[1] == 1:
            boxes = boxes.expand(-1, self.num_classes, -1)
        if cfg.min_bbox_size > 0:  # torchvision's remove_small_boxes: keep w >= min and h >= min
            wh = boxes[..., 2:] - boxes[..., :2]
            small = (wh < cfg.min_bbox_size).any(dim=-1)
            scores = scores.masked_fill(small, float("-inf"))
        return multiclass_nms(boxes, scores, cfg.score_thr, cfg.nms_iou, cfg.max_per_img, soft=cfg.soft_nms_args())


@register
class Shared2FCBBoxHead(ConvFCBBoxHead):
    """Faster R-CNN's box head: two shared FC layers (1024 by default)."""

    def __init__(self, num_classes: int, bbox_coder, loss_cls, loss_bbox, in_channels: int = 256,
                 roi_feat_size: int = 7, fc_out_channels: int = 1024, reg_class_agnostic: bool = False,
                 num_unused_classes: int = 0):
        super().__init__(num_classes, bbox_coder, loss_cls, loss_bbox, in_channels, roi_feat_size, 0, 2,
                         fc_out_channels=fc_out_channels, reg_class_agnostic=reg_class_agnostic,
                         num_unused_classes=num_unused_classes)


@register
class Shared4Conv1FCBBoxHead(ConvFCBBoxHead):
    """Four shared 3x3 convs (usually with GN; ``conv_cfg`` their type, e.g. ``{type: ConvWS}``) and one FC layer."""

    def __init__(self, num_classes: int, bbox_coder, loss_cls, loss_bbox, in_channels: int = 256,
                 roi_feat_size: int = 7, conv_out_channels: int = 256, fc_out_channels: int = 1024,
                 norm_cfg: dict | None = None, reg_class_agnostic: bool = False, num_unused_classes: int = 0,
                 conv_cfg: dict | None = None):
        super().__init__(num_classes, bbox_coder, loss_cls, loss_bbox, in_channels, roi_feat_size, 4, 1,
                         conv_out_channels, fc_out_channels, norm_cfg, reg_class_agnostic, num_unused_classes,
                         conv_cfg)
