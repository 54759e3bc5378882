"""A box head that only classifies: the RoIs are the boxes (Grid R-CNN's box head, whose grid head localises)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raydet.models.head_configs import DetectionConfig
from raydet.models.roi_heads.bbox_heads.convfc_bbox_head import Shared2FCBBoxHead
from raydet.ops import multiclass_nms
from raydet.registry import register

__all__ = ["Shared2FCClsOnlyBBoxHead"]


@register
class Shared2FCClsOnlyBBoxHead(Shared2FCBBoxHead):
    """Faster R-CNN's two-FC box head without its regressor (MMDetection's ``Shared2FCBBoxHead`` with
    ``with_reg=False``, as its Grid R-CNN configs): ``shared_fcs`` -> ``fc_cls`` only.

    Outputs: cls_score (R, C + 1 + U) and None for the box deltas. Loss: ``loss_cls`` over all sampled RoIs.
    At test time the boxes are the RoIs themselves (clipped to the image), shared by all classes.
    """

    def __init__(self, num_classes: int, loss_cls, in_channels: int = 256, roi_feat_size: int = 7,
                 fc_out_channels: int = 1024, num_unused_classes: int = 0):
        super().__init__(num_classes, None, loss_cls, None, in_channels, roi_feat_size, fc_out_channels,
                         num_unused_classes=num_unused_classes)
        del self.fc_reg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(R, C_in, S, S) pooled features -> (cls_score (R, C + 1 + U), None)."""
        return self.fc_cls(self.shared_fcs(x.flatten(1))), None

    def loss(self, cls_score, bbox_pred, rois, labels, bbox_targets) -> dict[str, torch.Tensor]:
        """Softmax CE over all sampled RoIs (labels (R,), num_classes for background); the box arguments are unused."""
        return {"loss_cls": self.loss_cls(cls_score, labels, avg_factor=max(labels.numel(), 1))}

    @torch.no_grad()
    def predict_boxes(self, rois: torch.Tensor, cls_score: torch.Tensor, bbox_pred: None,
                      img_shape: tuple[int, int], cfg: DetectionConfig):
        """One image's RoIs (R, 5) -> (boxes (m, 4) in input pixels, scores (m,), labels (m,)) after class-wise NMS."""
        scores = F.softmax(cls_score, dim=1)[:, : self.num_classes]
        h, w = img_shape
        boxes = torch.stack([rois[:, 1].clamp(0, w), rois[:, 2].clamp(0, h), rois[:, 3].clamp(0, w),
                             rois[:, 4].clamp(0, h)], dim=1)
        if cfg.min_bbox_size > 0:  # torchvision's remove_small_boxes: keep w >= min and h >= min
            small = ((boxes[:, 2:] - boxes[:, :2]) < cfg.min_bbox_size).any(dim=1)
            scores = scores.masked_fill(small[:, None], float("-inf"))
        return multiclass_nms(boxes, scores, cfg.score_thr, cfg.nms_iou, cfg.max_per_img, soft=cfg.soft_nms_args())
