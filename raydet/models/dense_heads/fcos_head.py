"""FCOS head (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection"), MMDetection's FCOSHead.

Every location of every level predicts C class logits, the (l, t, r, b) distances from its point to the sides of a
box, and a centre-ness logit. Training targets (Sec. 3.1-3.2): a point is positive for the ground-truth boxes it
lies in (or, with ``center_sampling``, in the box's central square of side 2 * radius * stride, clipped to the box),
whose largest distance max(l, t, r, b) falls in its level's ``regress_ranges`` (both ends inclusive, MMDetection;
both exclusive with ``regress_range_bounds: open``, torchvision); among several such boxes it takes the one of minimal
area. Centre-ness (Sec. 3.3) is
``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``. Losses (MMDetection 3.x):

* classification: ``loss_cls`` (focal loss) over all points, divided by the positive count (at least 1);
* box: ``loss_bbox`` (IoU or GIoU loss) of the decoded boxes of the positives, each weighted by its centre-ness
  target and divided by the sum of those targets (``bbox_loss_weight: centerness``; torchvision's FCOS weighs every
  positive 1 and divides by the positive count, ``uniform``);
* centre-ness: ``loss_centerness`` (sigmoid cross-entropy against the centre-ness target) of the positives, divided
  by the positive count.

Counts and sums are averaged over the DDP workers first. Crowd / ignored boxes play no part (MMDetection's FCOSHead
does not read them). Test time: the scores are sigmoid(cls) x sigmoid(centre-ness) (MMDetection; the threshold and
``nms_pre`` apply to sigmoid(cls) alone), or their square root with ``score_factor_mode: sqrt_multiply``
(torchvision; the threshold and ``nms_pre`` apply to it).

``pipelines/fcos_*`` are MMDetection's configs; ``pipelines/zoo/torchvision/fcos_resnet50_fpn.yaml`` is torchvision's
``fcos_resnet50_fpn`` (centre sampling, normalised GIoU regression, points at offset 0 placed with the padded
input's strides, and the options above).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from raydet.models.dense_heads.anchor_free_head import AnchorFreeHead, reduce_mean
from raydet.models.dense_heads.anchor_head import flatten_levels
from raydet.models.head_configs import DetectionConfig
from raydet.models.layers import Scale
from raydet.registry import register

__all__ = ["FCOSHead", "centerness_target"]

INF = 1e8  # MMDetection's "no upper bound" of the last regress range

# MMDetection FCOSHead's defaults: regress ranges of P3-P7, GN in the towers.
_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))
_GN = {"type": "GN", "num_groups": 32, "requires_grad": True}


def centerness_target(distances: Tensor) -> Tensor:
    """Centre-ness (n,) of (n, 4) positive distances (l, t, r, b): sqrt(min(l, r) / max(l, r) * min(t, b) /
    max(t, b)) (Tian et al. 2019, Eq. 3)."""
    lr, tb = distances[:, [0, 2]], distances[:, [1, 3]]
    if lr.numel() == 0:
        return lr[:, 0]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
    return ratio.sqrt()


@register
class FCOSHead(AnchorFreeHead):
    """FCOS head; see the module docstring.

    Args (beyond :class:`~raydet.models.dense_heads.anchor_free_head.AnchorFreeHead`):
        loss_centerness: a built sigmoid cross-entropy (``{type: CrossEntropyLoss, use_sigmoid: true}``).
        regress_ranges: per level, the (min, max) of a positive's largest distance max(l, t, r, b) in pixels.
        center_sampling: positives only inside each box's central region (FCOS's "center sampling" improvement).
        center_sample_radius: that region's half-side in strides (1.5).
        norm_on_bbox: regress distances divided by the level's stride, through a ReLU instead of exp (FCOS's
            "normalized regression targets").
        centerness_on_reg: the centre-ness branch sits on the regression tower instead of the classification tower.
        regress_range_bounds: ``"closed"``: ``lo <= max(l, t, r, b) <= hi`` (MMDetection); ``"open"``: ``lo <
            max(l, t, r, b) < hi`` (torchvision's ``FCOS.compute_loss``).
        bbox_loss_weight: ``"centerness"``: each positive's box loss weighted by its centre-ness target, divided by
            their sum (MMDetection); ``"uniform"``: weight 1, divided by the positive count (torchvision).
        prior_generator, score_factor_mode: see :class:`AnchorFreeHead`.

    Per level, ``bbox_pred = exp(scale_l * conv_reg)`` (or ``relu(scale_l * conv_reg)`` with ``norm_on_bbox``,
    times the stride at test time) with a learnable ``scale_l`` initialised to 1 (Sec. 3.2).
    """

    def __init__(self, num_classes: int, in_channels: int, loss_cls: nn.Module, loss_bbox: nn.Module,
                 loss_centerness: nn.Module, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: list[int] = (4, 8, 16, 32, 64),
                 regress_ranges: list[list[float]] = _REGRESS_RANGES, center_sampling: bool = False,
                 center_sample_radius: float = 1.5, norm_on_bbox: bool = False, centerness_on_reg: bool = False,
                 regress_range_bounds: str = "closed", bbox_loss_weight: str = "centerness",
                 dcn_on_last_conv: bool = False, conv_bias: bool | str = "auto", norm_cfg: dict | None = _GN,
                 bbox_coder=None, prior_generator=None, score_factor_mode: str = "multiply",
                 prior_prob: float = 0.01, test: DetectionConfig = DetectionConfig()):
        if len(regress_ranges) != len(strides) or any(len(r) != 2 or r[0] >= r[1] for r in regress_ranges):
            raise ValueError(f"regress_ranges needs one (min, max) pair with min < max per level ({len(strides)} "
                             f"strides), got {[list(r) for r in regress_ranges]}")
        if regress_range_bounds not in ("closed", "open"):
            raise ValueError(f"regress_range_bounds must be 'closed' or 'open', got {regress_range_bounds!r}")
        if bbox_loss_weight not in ("centerness", "uniform"):
            raise ValueError(f"bbox_loss_weight must be 'centerness' or 'uniform', got {bbox_loss_weight!r}")
        if center_sample_radius <= 0:
            raise ValueError(f"center_sample_radius must be > 0, got {center_sample_radius}")
        if not getattr(loss_bbox, "takes_decoded_boxes", False):
            raise ValueError(f"FCOS's loss_bbox compares decoded boxes (IoULoss, GIoULoss), got "
                             f"{type(loss_bbox).__name__}")
        self.regress_ranges = [(float(lo), float(hi)) for lo, hi in regress_ranges]
        self.center_sampling = bool(center_sampling)
        self.center_sample_radius = float(center_sample_radius)
        self.norm_on_bbox = bool(norm_on_bbox)
        self.centerness_on_reg = bool(centerness_on_reg)
        self.regress_range_bounds = regress_range_bounds
        self.bbox_loss_weight = bbox_loss_weight
        super().__init__(num_classes, in_channels, loss_cls, loss_bbox, feat_channels, stacked_convs, strides,
                         dcn_on_last_conv, conv_bias, norm_cfg, bbox_coder, prior_generator, score_factor_mode,
                         prior_prob, test)
        self.loss_centerness = loss_centerness

    def _init_layers(self) -> None:
        super()._init_layers()
        self.conv_centerness = nn.Conv2d(self.feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per-level features -> (cls_scores (B, C, H, W), bbox_preds (B, 4, H, W) float32 distances,
        centernesses (B, 1, H, W) logits), each a list over levels."""
        self._check_levels(feats)
        cls_scores, bbox_preds, centernesses = [], [], []
        for level, x in enumerate(feats):
            cls_score, bbox_pred, cls_feat, reg_feat = self.forward_single(x)
            centernesses.append(self.conv_centerness(reg_feat if self.centerness_on_reg else cls_feat))
            bbox_pred = self.scales[level](bbox_pred).float()  # float32: exp overflows in fp16
            if self.norm_on_bbox:
                bbox_pred = bbox_pred.clamp(min=0)
                if not self.training:
                    bbox_pred = bbox_pred * self.strides[level]
            else:
                bbox_pred = bbox_pred.exp()
            cls_scores.append(cls_score)
            bbox_preds.append(bbox_pred)
        return cls_scores, bbox_preds, centernesses

    # ------------------------------------------------------------------------------------------------ training
    def get_targets(self, points: Tensor, num_per_level: list[int], gt_boxes: list[Tensor],
                    gt_labels: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Targets of all points of all images at once.

        Args:
            points: (P, 4) points of all levels (x, y, stride, stride), levels concatenated in order.
            num_per_level: the point count of each level.
            gt_boxes: per image (n_i, 4) boxes in input pixels. gt_labels: per image (n_i,) labels in [0, C).

        Returns:
            labels (B, P) long (C = background) and bbox_targets (B, P, 4) distances (l, t, r, b) to the assigned
            box, in pixels, or in strides with ``norm_on_bbox``.
        """
        device = points.device
        num_images, num_points = len(gt_boxes), points.shape[0]
        num_gts = max([int(b.shape[0]) for b in gt_boxes] + [1])
        # the images' boxes padded to one (B, G) batch; padding boxes never match
        boxes = points.new_zeros((num_images, num_gts, 4))
        labels = torch.full((num_images, num_gts), self.num_classes, dtype=torch.long, device=device)
        real = torch.zeros((num_images, num_gts), dtype=torch.bool, device=device)
        for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels)):
            boxes[i, : b.shape[0]] = b.to(device=device, dtype=boxes.dtype)
            labels[i, : b.shape[0]] = lab.to(device)
            real[i, : b.shape[0]] = True

        ranges = torch.cat([points.new_tensor(r).expand(n, 2) for r, n in zip(self.regress_ranges, num_per_level)])
        xs, ys = points[None, :, 0, None], points[None, :, 1, None]  # (1, P, 1)
        b = boxes[:, None]  # (B, 1, G, 4)
        dist = torch.stack([xs - b[..., 0], ys - b[..., 1], b[..., 2] - xs, b[..., 3] - ys], dim=-1)  # (B, P, G, 4)

        if self.center_sampling:
            radius = (points[:, 2] * self.center_sample_radius)[None, :, None]  # (1, P, 1)
            cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2  # (B, 1, G)
            x1, y1 = torch.maximum(cx - radius, b[..., 0]), torch.maximum(cy - radius, b[..., 1])
            x2, y2 = torch.minimum(cx + radius, b[..., 2]), torch.minimum(cy + radius, b[..., 3])
            inside = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], dim=-1).min(dim=-1).values > 0
        else:
            inside = dist.min(dim=-1).values > 0  # (B, P, G)
        largest = dist.max(dim=-1).values
        lo, hi = ranges[None, :, None, 0], ranges[None, :, None, 1]
        in_range = (largest >= lo) & (largest <= hi) if self.regress_range_bounds == "closed" else (
            (largest > lo) & (largest < hi))

        areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[:, None, :]  # (B, 1, G)
        areas = areas.expand(-1, num_points, -1).masked_fill(~(inside & in_range & real[:, None]), INF)
        min_area, best = areas.min(dim=2)  # (B, P): the smallest box a point may regress
        point_labels = labels.gather(1, best)
        point_labels[min_area == INF] = self.num_classes
        targets = dist.gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2)  # (B, P, 4)
        if self.norm_on_bbox:
            targets = targets / points[None, :, 2, None]
        return point_labels, targets

    def loss(self, feats: tuple[Tensor, ...], batch: dict, outputs=None) -> dict[str, Tensor]:
        """loss_cls, loss_bbox and loss_centerness over all points of the batch (see the module docstring).
        ``outputs`` reuses an already computed ``forward(feats)``."""
        cls_scores, bbox_preds, centernesses = outputs if outputs is not None else self(feats)
        points_per_level = self.points(cls_scores, with_stride=True, img_metas=batch.get("img_metas"))
        points = torch.cat(points_per_level)  # (P, 4)
        labels, targets = self.get_targets(points, [p.shape[0] for p in points_per_level], batch["gt_boxes"],
                                           batch["gt_labels"])
        num_images = labels.shape[0]

        cls = flatten_levels(cls_scores, self.cls_out_channels).reshape(-1, self.cls_out_channels)
        dists = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        ctr = flatten_levels(centernesses, 1).reshape(-1)
        labels, targets = labels.reshape(-1), targets.reshape(-1, 4)

        pos = torch.nonzero(labels < self.num_classes, as_tuple=True)[0]
        num_pos = max(float(reduce_mean(torch.tensor(float(pos.numel()), device=cls.device))), 1.0)
        loss_cls = self.loss_cls(cls, labels, avg_factor=num_pos)

        pos_targets = targets[pos]
        ctr_targets = centerness_target(pos_targets)
        if self.bbox_loss_weight == "centerness":  # every worker joins this mean, with or without positives
            bbox_weight, bbox_denorm = ctr_targets, max(float(reduce_mean(ctr_targets.sum().detach().float())), 1e-6)
        else:
            bbox_weight, bbox_denorm = None, num_pos
        if pos.numel() == 0:  # keep the graph connected (DDP) with exact zeros
            return {"loss_cls": loss_cls, "loss_bbox": dists.sum() * 0.0, "loss_centerness": ctr.sum() * 0.0}
        pos_points = points[:, :2].repeat(num_images, 1)[pos]
        loss_bbox = self.loss_bbox(self.bbox_coder.decode(pos_points, dists[pos]),
                                   self.bbox_coder.decode(pos_points, pos_targets),
                                   weight=bbox_weight, avg_factor=bbox_denorm)
        loss_centerness = self.loss_centerness(ctr[pos], ctr_targets, avg_factor=num_pos)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness}
