"""The shared machinery of dense anchor-based heads (RPN, RetinaNet): targets, losses and decoding.

A subclass builds its convolutions and implements ``forward_single(x) -> (cls_score, bbox_pred)`` for one level, with
``cls_score`` (B, A * C, H, W) logits and ``bbox_pred`` (B, A * 4, H, W) deltas, A anchors per location and C =
``cls_out_channels`` sigmoid classes. Everything below works on all anchors of all levels at once; the only Python
loops are over feature levels and images.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from raydet.models.task_modules.prior_generators import AnchorGenerator, anchor_inside_flags
from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
from raydet.models.losses import CrossEntropyLoss
from raydet.models.task_modules.samplers import PseudoSampler

__all__ = ["AnchorHead", "flatten_levels"]


def flatten_levels(maps: list[torch.Tensor], channels: int) -> torch.Tensor:
    """Per-level (B, A * channels, H, W) maps -> (B, sum_l H_l * W_l * A, channels).

    The anchor order matches ``AnchorGenerator.grid_anchors``: row-major locations, anchors innermost.
    """
    flat = [m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, channels) for m in maps]
    return torch.cat(flat, dim=1)


class AnchorHead(nn.Module, ABC):
    """Base class: assigns anchors to ground truth, computes the classification and regression losses.

    Args:
        num_classes: foreground classes (1 for the RPN's objectness).
        anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner, sampler: built components.
        allowed_border: anchors crossing the image border by more than this many pixels are ignored in training;
            -1 keeps all anchors (the paper's ``allowed_border`` study, Table 9).
        pos_weight: classification weight of positives (-1 means 1).
        padding_anchors: whether anchors at locations in the batch padding beyond an image's own padded size
            (``pad_shape``) take part in training: False ignores them (MMDetection's valid flags); True assigns
            them like every other anchor (torchvision, Detectron2).
        loss_avg: ``"batch"``: each loss is its sum over the batch divided by the batch's positives (or sampled
            anchors when sampling; MMDetection); ``"image"``: each image's sum divided by its own positives
            (at least 1), then the mean over images (torchvision's RetinaNet).

    ``use_sigmoid_cls`` (class attribute): True, C sigmoid outputs per anchor (RPN, RetinaNet); a subclass that
    sets it False classifies with a softmax over C + 1 outputs, background last (SSD), and its ``loss_cls`` must
    have ``use_sigmoid: false``.
    """

    use_sigmoid_cls: bool = True

    def __init__(self, num_classes: int, anchor_generator: AnchorGenerator, bbox_coder: DeltaXYWHBBoxCoder,
                 loss_cls: nn.Module, loss_bbox: nn.Module, assigner, sampler=None, allowed_border: float = -1,
                 pos_weight: float = -1, padding_anchors: bool = False, loss_avg: str = "batch"):
        super().__init__()
        if bool(getattr(loss_cls, "use_sigmoid", True)) != self.use_sigmoid_cls:
            kind = "sigmoid" if self.use_sigmoid_cls else "softmax"
            raise ValueError(f"{type(self).__name__} classifies with {kind} outputs: set loss_cls.use_sigmoid: "
                             f"{str(self.use_sigmoid_cls).lower()}")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes if self.use_sigmoid_cls else num_classes + 1
        self.anchor_generator = anchor_generator
        self.num_anchors = anchor_generator.num_base_anchors
        self.bbox_coder = bbox_coder
        self.loss_cls = loss_cls
        self.loss_bbox = loss_bbox
        self.assigner = assigner
        self.sampler = sampler if sampler is not None else PseudoSampler()
        if getattr(self.sampler, "add_gt_as_proposals", False):
            # get_targets maps sampled indices back to anchors; gts prepended as candidates have no anchor.
            raise ValueError("dense heads sample anchors only: set sampler.add_gt_as_proposals to false")
        self.sampling = not isinstance(self.sampler, PseudoSampler)
        if loss_avg not in ("batch", "image"):
            raise ValueError(f"loss_avg must be 'batch' or 'image', got {loss_avg!r}")
        if loss_avg == "image" and self.sampling:
            raise ValueError("loss_avg 'image' (torchvision's RetinaNet) needs no sampling (a PseudoSampler)")
        self.allowed_border = allowed_border
        self.pos_weight = pos_weight
        self.padding_anchors = padding_anchors
        self.loss_avg = loss_avg
        self.reg_decoded_bbox = bool(getattr(loss_bbox, "takes_decoded_boxes", False))

    # ------------------------------------------------------------------------------------------------ forward
    @abstractmethod
    def forward_single(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One level's features (B, C_in, H, W) -> (cls_score (B, A*C, H, W), bbox_pred (B, A*4, H, W))."""

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level features -> (cls_scores, bbox_preds), each a list over levels."""
        outs = [self.forward_single(x) for x in feats]
        return [o[0] for o in outs], [o[1] for o in outs]

    def anchors(self, cls_scores: list[torch.Tensor], img_metas: list[dict] | None = None
                ) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
        """Feature map sizes and the anchors of each level (N_l, 4). ``img_metas`` give the padded batch size
        (``batch_input_shape``) to an anchor generator with ``strides_from_input``."""
        sizes = [tuple(int(s) for s in c.shape[-2:]) for c in cls_scores]
        input_shape = None
        if img_metas and "batch_input_shape" in img_metas[0]:
            input_shape = tuple(img_metas[0]["batch_input_shape"])
        return sizes, self.anchor_generator.grid_anchors(sizes, device=cls_scores[0].device, input_shape=input_shape)

    # ------------------------------------------------------------------------------------------------ training
    def inside_flags(self, anchors: torch.Tensor, featmap_sizes, meta: dict) -> torch.Tensor:
        """(N,) bool: the anchors of all levels that one image trains on: valid (inside its own padded shape, or
        everywhere with ``padding_anchors``) and inside its ``img_shape`` up to ``allowed_border``."""
        if self.padding_anchors:
            valid = torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
        else:
            valid = torch.cat(self.anchor_generator.valid_flags(featmap_sizes, meta["pad_shape"],
                                                                device=anchors.device))
        return anchor_inside_flags(anchors, valid, meta["img_shape"], self.allowed_border)

    def get_targets(self, anchors: torch.Tensor, featmap_sizes, batch: dict, gt_labels: list[torch.Tensor]):
        """Assign and sample anchors of every image.

        Args:
            anchors: (N, 4) all levels' anchors, identical for every image.
            gt_labels: per image (n_i,) labels in [0, num_classes).

        Returns:
            labels (B, N) long (num_classes = background), label_weights (B, N), bbox_targets (B, N, 4),
            bbox_weights (B, N, 4), num_pos, num_neg.
        """
        device = anchors.device
        n = anchors.shape[0]
        all_labels, all_label_w, all_targets, all_box_w = [], [], [], []
        num_pos = num_neg = 0
        ignores = batch.get("gt_boxes_ignore") or [None] * len(gt_labels)
        for i, meta in enumerate(batch["img_metas"]):
            inside = self.inside_flags(anchors, featmap_sizes, meta)
            cand = anchors[inside]
            gt_boxes = batch["gt_boxes"][i].to(device)
            ignore = ignores[i]
            ignore = ignore.to(device) if ignore is not None and ignore.numel() else None
            assign = self.assigner.assign(cand, gt_boxes, gt_labels[i].to(device), ignore)
            res = self.sampler.sample(assign, cand, gt_boxes, gt_labels[i].to(device))

            labels = anchors.new_full((n,), self.num_classes, dtype=torch.long)
            label_w = anchors.new_zeros(n)
            targets = anchors.new_zeros((n, 4))
            box_w = anchors.new_zeros((n, 4))
            idx = torch.nonzero(inside, as_tuple=True)[0]  # candidate index -> anchor index
            pos, neg = idx[res.pos_inds], idx[res.neg_inds]
            if pos.numel():
                if self.reg_decoded_bbox:
                    targets[pos] = res.pos_gt_boxes
                else:
                    targets[pos] = self.bbox_coder.encode(res.pos_boxes, res.pos_gt_boxes)
                box_w[pos] = 1.0
                labels[pos] = res.pos_gt_labels
                label_w[pos] = 1.0 if self.pos_weight <= 0 else self.pos_weight
            label_w[neg] = 1.0
            num_pos += int(pos.numel())
            num_neg += int(neg.numel())
            all_labels.append(labels)
            all_label_w.append(label_w)
            all_targets.append(targets)
            all_box_w.append(box_w)
        return (torch.stack(all_labels), torch.stack(all_label_w), torch.stack(all_targets),
                torch.stack(all_box_w), num_pos, num_neg)

    def loss(self, feats: tuple[torch.Tensor, ...], batch: dict, gt_labels: list[torch.Tensor] | None = None,
             outputs=None) -> dict[str, torch.Tensor]:
        """Classification and regression losses over all anchors of the batch.

        ``gt_labels`` overrides ``batch["gt_labels"]`` (the RPN passes zeros: one objectness class). ``outputs``
        reuses an already computed ``forward(feats)``.
        """
        cls_scores, bbox_preds = outputs if outputs is not None else self(feats)
        sizes, anchors_per_level = self.anchors(cls_scores, batch["img_metas"])
        anchors = torch.cat(anchors_per_level)
        gt_labels = gt_labels if gt_labels is not None else batch["gt_labels"]
        labels, label_w, targets, box_w, num_pos, num_neg = self.get_targets(anchors, sizes, batch, gt_labels)
        avg_factor = max(num_pos + num_neg if self.sampling else num_pos, 1)
        if self.loss_avg == "image":
            # each image's terms weighted by 1 / (B * its positives): the sum is the mean over images of the
            # per-image normalised losses (torchvision's RetinaNet)
            pos_per_image = (box_w[..., 0] > 0).sum(dim=1).clamp(min=1).to(label_w.dtype)
            scale = 1.0 / (pos_per_image * labels.shape[0])
            label_w = label_w * scale[:, None]
            box_w = box_w * scale[:, None, None]
            avg_factor = 1.0

        cls = flatten_levels(cls_scores, self.cls_out_channels).reshape(-1, self.cls_out_channels)
        deltas = flatten_levels(bbox_preds, 4).reshape(-1, 4)
        labels, label_w = labels.reshape(-1), label_w.reshape(-1)
        if self.cls_out_channels == 1 and isinstance(self.loss_cls, CrossEntropyLoss):
            # binary objectness: one logit per anchor, target 1 for foreground (label 0), 0 for background
            loss_cls = self.loss_cls(cls[:, 0], (labels == 0).to(cls.dtype), label_w, avg_factor=avg_factor)
        else:
            loss_cls = self.loss_cls(cls, labels, label_w, avg_factor=avg_factor)

        pos = torch.nonzero(box_w.reshape(-1, 4)[:, 0] > 0, as_tuple=True)[0]
        pos_deltas = deltas[pos]
        pos_targets = targets.reshape(-1, 4)[pos]
        if self.reg_decoded_bbox:
            pos_anchors = anchors.repeat(len(batch["img_metas"]), 1)[pos]
            pos_deltas = self.bbox_coder.decode(pos_anchors, pos_deltas)
        loss_bbox = self.loss_bbox(pos_deltas, pos_targets, box_w.reshape(-1, 4)[pos], avg_factor=avg_factor)
        if pos.numel() == 0:  # keep the graph connected (DDP) with an exact zero
            loss_bbox = deltas.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}
