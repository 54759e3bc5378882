"""Guided Anchoring (Wang et al. 2019, "Region Proposal by Guided Anchoring"): the shared machinery of GA heads.

Instead of A fixed anchors per location, a GA head predicts per location

* ``loc_pred`` (B, 1, H, W): the logit that an object centre lies there (Sec. 3.1, "anchor location prediction");
  at test time only locations with ``sigmoid(loc_pred) >= loc_filter_thr`` keep an anchor;
* ``shape_pred`` (B, 2, H, W): (dw, dh) of one anchor per location (Sec. 3.1, "anchor shape prediction"), decoded
  from the location's *square* anchor (side ``octave_base_scale * stride``) by ``anchor_coder`` with dx = dy = 0:
  ``w = side * exp(dw * std_w)``, ``h = side * exp(dh * std_h)``;

then classifies and regresses from the *guided anchors* on features adapted to the anchor shapes (Sec. 3.2: a
deformable 3x3 conv whose offsets a 1x1 conv computes from ``shape_pred``). Training targets (Sec. 3.3):

* location: per ground truth, on the FPN level its scale ``sqrt(w h)`` maps to, the centre region (``center_ratio``
  of the box) is positive (target 1, weight 1), the rest of the ``ignore_ratio`` region is ignored (weight 0), as is
  that region on the two adjacent levels; every other location is negative with weight 0.1 (MMDetection); the loss
  is averaged over ``(B * sum_l H_l W_l) / 200`` (MMDetection's ``loc_avg_factor``);
* shape: each location's square, assigned to a gt by the best IoU over its approximate anchors (``approxs``:
  ``approx_anchor_generator``'s A anchors of the location, see :class:`ApproxMaxIoUAssigner`), sampled by
  ``ga_sampler``; the bounded IoU loss between the predicted anchor and the gt;
* classification / regression: the guided anchors (detached) assigned by ``assigner`` and sampled by ``sampler``,
  as in an :class:`~raydet.models.dense_heads.anchor_head.AnchorHead`.

Defaults and semantics follow MMDetection's ``GuidedAnchorHead`` (configs/guided_anchoring/). Everything is
vectorised over the locations of all levels; the loops are over levels and images. MMDetection's test-time
``MaskedConv2d`` (convolutions computed at the kept locations only) is a speed-up with the same outputs at those
locations; here the heads convolve densely and the location filter drops the other locations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raydet.models.dense_heads.anchor_head import flatten_levels
from raydet.models.head_configs import DetectionConfig
from raydet.models.losses import CrossEntropyLoss
from raydet.models.postprocess import boxes_to_original, detection_nms
from raydet.models.task_modules.assigners import ApproxMaxIoUAssigner
from raydet.models.task_modules.prior_generators import AnchorGenerator, anchor_inside_flags
from raydet.models.task_modules.samplers import PseudoSampler
from raydet.ops import DeformConv2d
from raydet.registry import register

__all__ = ["FeatureAdaption", "GuidedAnchorHead", "ga_loc_targets", "binary_loss"]


def bias_for_prob(prob: float) -> float:
    """The logit bias with which a sigmoid output starts at ``prob`` (RetinaNet's prior)."""
    return -math.log((1 - prob) / prob)


def binary_loss(loss: nn.Module, logits: Tensor, positive: Tensor, weight: Tensor, avg_factor: float) -> Tensor:
    """A one-class sigmoid loss: ``logits`` (N,), ``positive`` (N,) bool, ``weight`` (N,).

    A sigmoid :class:`CrossEntropyLoss` takes the 0/1 label itself; a focal loss takes class indices (0 = the class,
    1 = background)."""
    if isinstance(loss, CrossEntropyLoss):
        return loss(logits, positive.to(logits.dtype), weight, avg_factor=avg_factor)
    return loss(logits[:, None], (~positive).long(), weight, avg_factor=avg_factor)


def _regions(boxes: Tensor, ratio: float, size: tuple[int, int]) -> Tensor:
    """(G, 4) boxes in feature cells -> (G, H, W) bool: the cells of each box's central region.

    The region keeps the centre and ``1 - 2 * ratio`` of the width and height; its corners are rounded to whole cells
    and clipped to [0, W] x [0, H], and both ends are included (MMDetection's ``calc_region``).
    """
    h, w = size
    x1 = torch.round((1 - ratio) * boxes[:, 0] + ratio * boxes[:, 2]).clamp(0, w)
    y1 = torch.round((1 - ratio) * boxes[:, 1] + ratio * boxes[:, 3]).clamp(0, h)
    x2 = torch.round(ratio * boxes[:, 0] + (1 - ratio) * boxes[:, 2]).clamp(0, w)
    y2 = torch.round(ratio * boxes[:, 1] + (1 - ratio) * boxes[:, 3]).clamp(0, h)
    ys = torch.arange(h, device=boxes.device, dtype=boxes.dtype)
    xs = torch.arange(w, device=boxes.device, dtype=boxes.dtype)
    in_y = (ys[None] >= y1[:, None]) & (ys[None] <= y2[:, None])  # (G, H)
    in_x = (xs[None] >= x1[:, None]) & (xs[None] <= x2[:, None])  # (G, W)
    return in_y[:, :, None] & in_x[:, None, :]


def ga_loc_targets(gt_boxes: list[Tensor], featmap_sizes: list[tuple[int, int]], strides: list[int],
                   anchor_scale: float, center_ratio: float = 0.2, ignore_ratio: float = 0.5
                   ) -> tuple[list[Tensor], list[Tensor], float]:
    """Anchor location targets (Guided Anchoring, Sec. 3.3; MMDetection's ``ga_loc_targets``).

    A gt box of scale s = sqrt(w h) goes to level ``floor(log2(s / (anchor_scale * strides[0])) + 0.5)`` (clipped
    to the levels). There, in feature cells (box / stride, cell (y, x) at pixel (y * stride, x * stride)), the
    centre region of ratio ``center_ratio`` is positive (target 1, weight 1) and the rest of the region of ratio
    ``ignore_ratio`` ignored (weight 0); where regions of several gts overlap, the last gt (in order) sets the weight.
    The ``ignore_ratio`` region on the two adjacent levels is ignored too, unless a gt of that level set a weight.
    Every other cell is negative: target 0, weight 0.1.

    Args:
        gt_boxes: per image (n_i, 4) boxes in input pixels.
        featmap_sizes: (H_l, W_l) per level; strides: the levels' strides in pixels.
        anchor_scale: the square anchor side in strides (``octave_base_scale``).

    Returns:
        targets, weights: per level (B, H_l, W_l) float; avg_factor = B * sum_l H_l W_l / 200.
    """
    r1 = (1 - center_ratio) / 2
    r2 = (1 - ignore_ratio) / 2
    num_levels = len(featmap_sizes)
    device = gt_boxes[0].device if gt_boxes else torch.device("cpu")
    targets = [torch.zeros((len(gt_boxes), h, w), device=device) for h, w in featmap_sizes]
    weights = [torch.full((len(gt_boxes), h, w), 0.1, device=device) for h, w in featmap_sizes]
    for i, boxes in enumerate(gt_boxes):
        boxes = boxes[:, :4].float().to(device)
        if boxes.shape[0] == 0:
            continue
        scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
        levels = torch.floor(torch.log2(scale) - math.log2(anchor_scale * strides[0]) + 0.5)
        levels = levels.clamp(0, num_levels - 1).long()
        for lvl, (size, stride) in enumerate(zip(featmap_sizes, strides)):
            own = boxes[levels == lvl] / stride
            near = boxes[(levels - lvl).abs() == 1] / stride
            if own.shape[0]:
                ctr = _regions(own, r1, size)
                cover = _regions(own, r2, size) | ctr  # (G, H, W)
                targets[lvl][i] = ctr.any(dim=0).float()
                touched = cover.any(dim=0)
                # the last gt covering a cell decides its weight: 1 inside its centre region, 0 elsewhere
                last = cover.shape[0] - 1 - cover.flip(0).to(torch.uint8).argmax(dim=0)
                in_ctr = ctr.gather(0, last[None]).squeeze(0)
                weights[lvl][i] = torch.where(touched, in_ctr.float(), weights[lvl][i])
            else:
                touched = torch.zeros(size, dtype=torch.bool, device=device)
            if near.shape[0]:
                ignored = _regions(near, r2, size).any(dim=0) & ~touched
                weights[lvl][i][ignored] = 0.0
    avg_factor = sum(len(gt_boxes) * h * w for h, w in featmap_sizes) / 200
    return targets, weights, avg_factor


class FeatureAdaption(nn.Module):
    """Feature adaption (Sec. 3.2): a 3x3 deformable conv (DCNv1, no bias) + ReLU whose offsets a 1x1 conv (no bias)
    computes from the (detached) anchor shape prediction, so that each location samples features matching its
    anchor's shape.

    ``forward(x (B, C_in, H, W), shape_pred (B, 2, H, W)) -> (B, C_out, H, W)``. The offset conv starts from
    N(0, 0.1), the deformable conv from N(0, 0.01) (MMDetection).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, deform_groups: int = 4):
        super().__init__()
        self.conv_offset = nn.Conv2d(2, deform_groups * 2 * kernel_size * kernel_size, 1, bias=False)
        self.conv_adaption = DeformConv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                          deform_groups=deform_groups, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.conv_offset.weight, std=0.1)
        nn.init.normal_(self.conv_adaption.weight, std=0.01)

    def forward(self, x: Tensor, shape_pred: Tensor) -> Tensor:
        offset = self.conv_offset(shape_pred.detach())
        return F.relu(self.conv_adaption(x, offset))


@register
class GuidedAnchorHead(nn.Module):
    """A guided-anchor head: 1x1 convs for location and shape, feature adaption, then 1x1 convs to C class logits
    and 4 deltas per location (MMDetection's ``GuidedAnchorHead``). GA-RetinaNet and GA-RPN subclass it.

    Args:
        num_classes: foreground classes (sigmoid outputs).
        in_channels, feat_channels: input channels and the adapted features' channels.
        approx_anchor_generator: the approximate anchors of each location (shape targets), e.g. octave_base_scale 8,
            scales_per_octave 3, ratios [0.5, 1, 2].
        square_anchor_generator: one square anchor per location (ratios [1], scales [octave_base_scale]) with the
            approx generator's strides: the base of the guided anchors.
        anchor_coder: decodes (0, 0, dw, dh) from the squares (``target_stds`` scale dw, dh).
        bbox_coder: the regression deltas of the guided anchors.
        loss_loc: location loss (a sigmoid focal loss); loss_shape: a loss on decoded boxes (bounded IoU).
        loss_cls, loss_bbox: classification and regression losses of the guided anchors.
        assigner, sampler: assign / sample guided anchors (``sampler`` None: no sampling).
        ga_assigner, ga_sampler: an :class:`ApproxMaxIoUAssigner` for the squares and its sampler.
        deform_groups: deformable conv groups of the feature adaption.
        loc_filter_thr: test-time location threshold on ``sigmoid(loc_pred)``.
        center_ratio, ignore_ratio: location target regions (see :func:`ga_loc_targets`).
        allowed_border: locations whose approxs all cross the image border by more than this are left out of the
            shape targets, and guided anchors that do out of the classification targets; -1 keeps all.
        pos_weight: classification weight of positives (-1 means 1).
        test: score threshold, per-level ``nms_pre`` (by the best class score), class-wise NMS, ``max_per_img``.

    Raises:
        ValueError: the square generator has more than one anchor per location or other strides / base size than
            the approx generator; ``ga_assigner`` is not an ApproxMaxIoUAssigner; a sampler adds gts as proposals;
            ``loss_shape`` does not compare decoded boxes; the ratios are not 0 < center_ratio <= ignore_ratio <= 1.
    """

    def __init__(self, num_classes: int, in_channels: int, approx_anchor_generator: AnchorGenerator,
                 square_anchor_generator: AnchorGenerator, anchor_coder, bbox_coder, loss_loc: nn.Module,
                 loss_shape: nn.Module, loss_cls: nn.Module, loss_bbox: nn.Module, assigner, ga_assigner,
                 sampler=None, ga_sampler=None, feat_channels: int = 256, deform_groups: int = 4,
                 loc_filter_thr: float = 0.01, center_ratio: float = 0.2, ignore_ratio: float = 0.5,
                 allowed_border: float = -1, pos_weight: float = -1, test: DetectionConfig = DetectionConfig()):
        super().__init__()
        approx, square = approx_anchor_generator, square_anchor_generator
        if square.num_base_anchors != 1:
            raise ValueError(f"square_anchor_generator must give one anchor per location (ratios [1.0], one scale), "
                             f"got {square.num_base_anchors}")
        if square.strides != approx.strides or square.base_sizes != approx.base_sizes:
            raise ValueError(f"square_anchor_generator and approx_anchor_generator need the same strides and base "
                             f"sizes, got {square.strides} / {square.base_sizes} and {approx.strides} / "
                             f"{approx.base_sizes}")
        if square.scales[0] != approx.scales[0] or square.center_offset != approx.center_offset:
            raise ValueError(f"the square anchors' scale ({square.scales[0]}) must be the approxs' octave_base_scale "
                             f"({approx.scales[0]}), at the same center_offset")
        if not isinstance(ga_assigner, ApproxMaxIoUAssigner):
            raise ValueError(f"ga_assigner must be an ApproxMaxIoUAssigner, got {type(ga_assigner).__name__}")
        if not 0 < center_ratio <= ignore_ratio <= 1:
            raise ValueError(f"need 0 < center_ratio <= ignore_ratio <= 1, got {center_ratio} and {ignore_ratio}")
        if not getattr(loss_shape, "takes_decoded_boxes", False):
            raise ValueError(f"loss_shape must compare decoded boxes (e.g. BoundedIoULoss), got "
                             f"{type(loss_shape).__name__}")
        if not getattr(loss_cls, "use_sigmoid", True):
            raise ValueError("guided anchor heads classify with sigmoid outputs: set loss_cls.use_sigmoid: true")
        self.sampler = sampler if sampler is not None else PseudoSampler()
        self.ga_sampler = ga_sampler if ga_sampler is not None else PseudoSampler()
        for name, s in (("sampler", self.sampler), ("ga_sampler", self.ga_sampler)):
            if getattr(s, "add_gt_as_proposals", False):
                raise ValueError(f"guided anchor heads sample anchors only: set {name}.add_gt_as_proposals to false")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes
        self.num_anchors = 1
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.deform_groups = deform_groups
        self.approx_anchor_generator = approx
        self.square_anchor_generator = square
        self.approxs_per_octave = approx.num_base_anchors
        self.anchor_coder = anchor_coder
        self.bbox_coder = bbox_coder
        self.loss_loc = loss_loc
        self.loss_shape = loss_shape
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.assigner = assigner
        self.ga_assigner = ga_assigner
        self.sampling = not isinstance(self.sampler, PseudoSampler)
        self.ga_sampling = not isinstance(self.ga_sampler, PseudoSampler)
        self.loc_filter_thr = float(loc_filter_thr)
        self.center_ratio = float(center_ratio)
        self.ignore_ratio = float(ignore_ratio)
        self.allowed_border = allowed_border
        self.pos_weight = pos_weight
        self.reg_decoded_bbox = bool(getattr(loss_bbox, "takes_decoded_boxes", False))
        self.test = test
        self._init_layers()
        self._init_weights()

    # ------------------------------------------------------------------------------------------------ layers
    def _init_layers(self) -> None:
        self.conv_loc = nn.Conv2d(self.in_channels, 1, 1)
        self.conv_shape = nn.Conv2d(self.in_channels, 2, 1)
        self.feature_adaption = FeatureAdaption(self.in_channels, self.feat_channels, 3, self.deform_groups)
        self.conv_cls = nn.Conv2d(self.feat_channels, self.cls_out_channels, 1)
        self.conv_reg = nn.Conv2d(self.feat_channels, 4, 1)

    def _init_weights(self) -> None:
        """Plain convs N(0, 0.01) with zero bias, the feature adaptions their own init, and the location logit starts
        at probability 0.01 (MMDetection)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, FeatureAdaption):
                m.init_weights()
        nn.init.constant_(self.conv_loc.bias, bias_for_prob(0.01))

    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, C_in, H, W) -> cls_score (B, C, H, W), bbox_pred (B, 4, H, W), shape_pred (B, 2, H, W),
        loc_pred (B, 1, H, W)."""
        loc_pred = self.conv_loc(x)
        shape_pred = self.conv_shape(x)
        x = self.feature_adaption(x, shape_pred)
        return self.conv_cls(x), self.conv_reg(x), shape_pred, loc_pred

    def forward(self, feats: tuple[Tensor, ...]) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Per-level features -> (cls_scores, bbox_preds, shape_preds, loc_preds), each a list over levels."""
        outs = [self.forward_single(x) for x in feats]
        return tuple([o[k] for o in outs] for k in range(4))

    # ------------------------------------------------------------------------------------------------ anchors
    def squares(self, featmap_sizes, device) -> list[Tensor]:
        """The square anchor of every location: per level (H_l * W_l, 4)."""
        return self.square_anchor_generator.grid_anchors(featmap_sizes, device=device)

    def guided_anchors(self, squares: Tensor, shape_pred: Tensor) -> Tensor:
        """Squares (N, 4) and (B, N, 2) predicted (dw, dh) -> (B, N, 4) anchors (no gradient).

        The centre stays; ``anchor_coder`` scales the side by exp(dw * std) and exp(dh * std), with dw, dh clamped to
        +-|log 1e-6| (MMDetection's ``wh_ratio_clip=1e-6``)."""
        shape_pred = shape_pred.detach()
        deltas = torch.cat([torch.zeros_like(shape_pred), shape_pred], dim=-1)
        return self.anchor_coder.decode(squares, deltas, wh_ratio_clip=1e-6)

    def inside_flags(self, featmap_sizes, approxs: Tensor, img_metas: list[dict]) -> Tensor:
        """(B, N) bool: a location takes part in training when one of its approxs is valid (inside the image's
        padded shape) and, with ``allowed_border`` >= 0, inside the image grown by allowed_border."""
        a = self.approxs_per_octave
        flags = []
        for meta in img_metas:
            valid = torch.cat(self.approx_anchor_generator.valid_flags(featmap_sizes, meta["pad_shape"],
                                                                       device=approxs.device))
            inside = anchor_inside_flags(approxs, valid, meta["img_shape"], self.allowed_border)
            flags.append(inside.reshape(-1, a).any(dim=1))
        return torch.stack(flags)

    # ------------------------------------------------------------------------------------------------ targets
    def shape_targets(self, squares: Tensor, approxs: Tensor, inside: Tensor, batch: dict
                      ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Assign (``ga_assigner``) and sample (``ga_sampler``) the squares of each image.

        Returns:
            anchors (B, N, 4) the positive squares, gts (B, N, 4) their gt boxes, weights (B, N) 1 at positives,
            avg_factor: sampled squares (positives + negatives) when sampling, else positives (at least 1).
        """
        b, n = inside.shape
        approxs = approxs.reshape(n, self.approxs_per_octave, 4)
        anchors, gts, weights = squares.new_zeros((b, n, 4)), squares.new_zeros((b, n, 4)), squares.new_zeros((b, n))
        ignores = batch.get("gt_boxes_ignore") or [None] * b
        total = 0
        for i in range(b):
            idx = torch.nonzero(inside[i], as_tuple=True)[0]
            gt_boxes = batch["gt_boxes"][i].to(squares.device)
            ignore = ignores[i]
            ignore = ignore.to(squares.device) if ignore is not None and ignore.numel() else None
            assign = self.ga_assigner.assign(squares[idx], approxs[idx], gt_boxes, None, ignore)
            res = self.ga_sampler.sample(assign, squares[idx], gt_boxes)
            pos = idx[res.pos_inds]
            anchors[i, pos] = res.pos_boxes
            gts[i, pos] = res.pos_gt_boxes
            weights[i, pos] = 1.0
            total += res.num_pos + res.num_neg if self.ga_sampling else res.num_pos
        return anchors, gts, weights, max(total, 1)

    def cls_reg_targets(self, anchors: Tensor, inside: Tensor, batch: dict, gt_labels: list[Tensor]):
        """Assign and sample the guided anchors (B, N, 4) of each image.

        Returns:
            labels (B, N) long (num_classes = background), label_weights (B, N), bbox_targets (B, N, 4) (deltas, or
            gt boxes with a decoded-box loss), bbox_weights (B, N), avg_factor (sampled anchors when sampling, else
            positives; at least 1).
        """
        b, n = inside.shape
        labels = anchors.new_full((b, n), self.num_classes, dtype=torch.long)
        label_w, targets, box_w = anchors.new_zeros((b, n)), anchors.new_zeros((b, n, 4)), anchors.new_zeros((b, n))
        ignores = batch.get("gt_boxes_ignore") or [None] * b
        num_pos = num_neg = 0
        for i, meta in enumerate(batch["img_metas"]):
            flags = anchor_inside_flags(anchors[i], inside[i], meta["img_shape"], self.allowed_border)
            idx = torch.nonzero(flags, as_tuple=True)[0]
            gt_boxes = batch["gt_boxes"][i].to(anchors.device)
            labels_i = gt_labels[i].to(anchors.device)
            ignore = ignores[i]
            ignore = ignore.to(anchors.device) if ignore is not None and ignore.numel() else None
            assign = self.assigner.assign(anchors[i, idx], gt_boxes, labels_i, ignore)
            res = self.sampler.sample(assign, anchors[i, idx], gt_boxes, labels_i)
            pos, neg = idx[res.pos_inds], idx[res.neg_inds]
            if pos.numel():
                targets[i, pos] = (res.pos_gt_boxes if self.reg_decoded_bbox
                                   else self.bbox_coder.encode(res.pos_boxes, res.pos_gt_boxes))
                box_w[i, pos] = 1.0
                labels[i, pos] = res.pos_gt_labels
                label_w[i, pos] = 1.0 if self.pos_weight <= 0 else self.pos_weight
            label_w[i, neg] = 1.0
            num_pos += int(pos.numel())
            num_neg += int(neg.numel())
        avg_factor = max(num_pos + num_neg if self.sampling else num_pos, 1)
        return labels, label_w, targets, box_w, avg_factor

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, feats: tuple[Tensor, ...], batch: dict, gt_labels: list[Tensor] | None = None,
             outputs=None) -> dict[str, Tensor]:
        """loss_cls, loss_bbox (guided anchors), loss_shape (anchor shapes) and loss_loc (anchor locations).

        ``gt_labels`` overrides ``batch["gt_labels"]`` (GA-RPN passes zeros); ``outputs`` reuses ``forward(feats)``.
        """
        outputs = outputs if outputs is not None else self(feats)
        # targets, decoding and losses in float32 under autocast (MMDetection's force_fp32)
        cls_scores, bbox_preds, shape_preds, loc_preds = ([t.float() for t in o] for o in outputs)
        device = cls_scores[0].device
        sizes = [tuple(int(s) for s in c.shape[-2:]) for c in cls_scores]
        gt_labels = gt_labels if gt_labels is not None else batch["gt_labels"]

        # location: dense targets on every level
        loc_t, loc_w, loc_avg = ga_loc_targets([g.to(device) for g in batch["gt_boxes"]], sizes,
                                               self.square_anchor_generator.strides,
                                               self.square_anchor_generator.scales[0], self.center_ratio,
                                               self.ignore_ratio)
        loc_logits = flatten_levels(loc_preds, 1).reshape(-1)
        loc_t = torch.cat([t.flatten(1) for t in loc_t], dim=1).reshape(-1)
        loc_w = torch.cat([w.flatten(1) for w in loc_w], dim=1).reshape(-1)
        loss_loc = binary_loss(self.loss_loc, loc_logits, loc_t > 0, loc_w, loc_avg)

        # shape: squares assigned through their approxs
        squares = torch.cat(self.squares(sizes, device))
        approxs = torch.cat(self.approx_anchor_generator.grid_anchors(sizes, device=device))
        inside = self.inside_flags(sizes, approxs, batch["img_metas"])
        shape = flatten_levels(shape_preds, 2)  # (B, N, 2)
        sq_anchors, sq_gts, sq_w, shape_avg = self.shape_targets(squares, approxs, inside, batch)
        pos = torch.nonzero(sq_w.reshape(-1) > 0, as_tuple=True)[0]
        if pos.numel():
            dwh = shape.reshape(-1, 2)[pos]
            pred_anchors = self.anchor_coder.decode(sq_anchors.reshape(-1, 4)[pos],
                                                    torch.cat([torch.zeros_like(dwh), dwh], dim=1),
                                                    wh_ratio_clip=1e-6)
            loss_shape = self.loss_shape(pred_anchors, sq_gts.reshape(-1, 4)[pos], sq_w.reshape(-1)[pos],
                                         avg_factor=shape_avg)
        else:  # keep the graph connected (DDP) with an exact zero
            loss_shape = shape.sum() * 0.0

        # classification and regression of the guided anchors
        anchors = self.guided_anchors(squares, shape)  # (B, N, 4)
        labels, label_w, targets, box_w, avg_factor = self.cls_reg_targets(anchors, inside, batch, gt_labels)
        cls = flatten_levels(cls_scores, self.cls_out_channels).reshape(-1, self.cls_out_channels)
        labels, label_w = labels.reshape(-1), label_w.reshape(-1)
        if self.cls_out_channels == 1:
            loss_cls = binary_loss(self.loss_cls, cls[:, 0], labels == 0, label_w, avg_factor)
        else:
            loss_cls = self.loss_cls(cls, labels, label_w, avg_factor=avg_factor)
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        pos = torch.nonzero(box_w.reshape(-1) > 0, as_tuple=True)[0]
        if pos.numel():
            pos_deltas = deltas[pos]
            if self.reg_decoded_bbox:
                pos_deltas = self.bbox_coder.decode(anchors.reshape(-1, 4)[pos], pos_deltas)
            loss_bbox = self.loss_bbox(pos_deltas, targets.reshape(-1, 4)[pos], box_w.reshape(-1)[pos],
                                       avg_factor=avg_factor)
        else:
            loss_bbox = deltas.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_shape": loss_shape, "loss_loc": loss_loc}

    # ------------------------------------------------------------------------------------------------ predict
    def level_outputs(self, outputs, featmap_sizes, use_loc_filter: bool):
        """Per level: (guided anchors (B, N_l, 4), location mask (B, N_l) bool, cls (B, N_l, C), deltas
        (B, N_l, 4)); the mask keeps every location unless ``use_loc_filter``."""
        cls_scores, bbox_preds, shape_preds, loc_preds = outputs
        squares = self.squares(featmap_sizes, cls_scores[0].device)
        out = []
        for cls, reg, shape, loc, sq in zip(cls_scores, bbox_preds, shape_preds, loc_preds, squares):
            cls, reg, shape, loc = cls.float(), reg.float(), shape.float(), loc.float()  # decode in float32
            b = cls.shape[0]
            anchors = self.guided_anchors(sq, shape.permute(0, 2, 3, 1).reshape(b, -1, 2))
            loc = loc.permute(0, 2, 3, 1).reshape(b, -1)
            mask = loc.sigmoid() >= self.loc_filter_thr if use_loc_filter else torch.ones_like(loc, dtype=torch.bool)
            out.append((anchors, mask, cls.permute(0, 2, 3, 1).reshape(b, -1, self.cls_out_channels),
                        reg.permute(0, 2, 3, 1).reshape(b, -1, 4)))
        return out

    @torch.no_grad()
    def predict(self, feats, img_metas) -> list[dict]:
        """Detections per image in original-image pixels: boxes (m, 4), scores (m,), labels (m,)."""
        return self.predict_by_feat(self(feats), img_metas)

    @torch.no_grad()
    def predict_by_feat(self, outputs, img_metas) -> list[dict]:
        """Detections from the head's ``forward`` outputs: per level, the locations with ``sigmoid(loc_pred) >=
        loc_filter_thr``, of which the ``nms_pre`` with the best class score; then the (anchor, class) pairs above
        ``score_thr``, class-wise NMS and the best ``max_per_img`` (MMDetection's ``predict_by_feat``)."""
        sizes = [tuple(int(s) for s in c.shape[-2:]) for c in outputs[0]]
        cfg = self.test
        shapes = torch.tensor([m["img_shape"][:2] for m in img_metas], device=outputs[0][0].device,
                              dtype=torch.float32)
        boxes_l, scores_l, mask_l = [], [], []
        for anchors, mask, cls, deltas in self.level_outputs(outputs, sizes, use_loc_filter=True):
            scores = cls.sigmoid()
            if 0 < cfg.nms_pre < scores.shape[1]:
                ranking = scores.max(dim=2).values.masked_fill(~mask, -1.0)
                idx = ranking.topk(cfg.nms_pre, dim=1).indices  # (B, k)
                scores = torch.gather(scores, 1, idx[..., None].expand(-1, -1, scores.shape[2]))
                mask = torch.gather(mask, 1, idx)
                anchors = torch.gather(anchors, 1, idx[..., None].expand(-1, -1, 4))
                deltas = torch.gather(deltas, 1, idx[..., None].expand(-1, -1, 4))
            boxes_l.append(self.bbox_coder.decode(anchors, deltas, max_shape=shapes))
            scores_l.append(scores)
            mask_l.append(mask)
        boxes, scores, mask = torch.cat(boxes_l, 1), torch.cat(scores_l, 1), torch.cat(mask_l, 1)
        results = []
        for i, meta in enumerate(img_metas):
            keep = mask[i][:, None] & (scores[i] > cfg.score_thr)  # (K, C)
            box_idx, labels = torch.nonzero(keep, as_tuple=True)
            b, s = boxes[i][box_idx], scores[i][box_idx, labels]
            if cfg.min_bbox_size > 0:
                large = ((b[:, 2:] - b[:, :2]) >= cfg.min_bbox_size).all(dim=1)
                b, s, labels = b[large], s[large], labels[large]
            keep, s = detection_nms(b, s, labels, cfg)
            results.append({"boxes": boxes_to_original(b[keep], meta), "scores": s, "labels": labels[keep]})
        return results
