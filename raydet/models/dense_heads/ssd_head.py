"""SSD head (Liu et al. 2016): one 3x3 conv classifier and one 3x3 conv regressor per level, a softmax over the
classes and the background, and hard negative mining (MMDetection's ``SSDHead``)."""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.dense_heads.anchor_head import AnchorHead, flatten_levels
from raydet.models.head_configs import DetectionConfig
from raydet.models.losses import CrossEntropyLoss, SmoothL1Loss
from raydet.models.norm import build_norm_layer
from raydet.models.postprocess import boxes_to_original, detection_nms
from raydet.models.task_modules.samplers import hard_negative_mining
from raydet.registry import register

__all__ = ["SSDHead"]


@register
class SSDHead(AnchorHead):
    """Per level l: a 3x3 conv to A_l * (C + 1 + U) class logits (``cls_convs.<l>.0``; U = ``num_unused_classes``,
    default 0) and a 3x3 conv to A_l * 4 deltas (``reg_convs.<l>.0``), with A_l priors per location (4 or 6) from an
    ``SSDAnchorGenerator``.

    Training (Sec. 2.2 of the paper, MMDetection's train_cfg): priors are matched by the ``assigner`` (SSD: max IoU,
    positives and negatives split at 0.5, every ground truth also taking its best prior); the classification loss is
    softmax cross-entropy (``loss_cls``, with ``use_sigmoid: false``; background is class index C) over the
    positives and, per image, the ``neg_pos_ratio`` x num_pos negatives of highest loss
    (:func:`~raydet.models.task_modules.samplers.hard_negative_mining`); the box loss (``loss_bbox``, smooth L1
    with beta 1) is over the positives' encoded deltas. Both are sums over the batch divided by its positives.

    Test: per level, the (prior, class) pairs with softmax score above ``test.score_thr``, at most ``test.nms_pre``
    of them; decoded, clipped to the image, class-wise NMS at ``test.nms_iou``, the best ``test.max_per_img``
    (SSD: 0.02, 1000, 0.45, 200 as MMDetection's test_cfg). With ``nms_pre_per: class`` the ``test.nms_pre``
    best priors of each class over all levels instead (torchvision's ``SSD.postprocess_detections``,
    ``topk_candidates``).

    Args:
        num_classes: foreground classes C.
        in_channels: channels of each input level, e.g. SSD300's (512, 1024, 512, 256, 256, 256).
        anchor_generator, bbox_coder, assigner, sampler: built components (an ``SSDAnchorGenerator``, or any
            generator with the same count of priors on every level; sampler: a PseudoSampler).
        loss_cls: default ``CrossEntropyLoss(use_sigmoid=False)``; loss_bbox: default ``SmoothL1Loss(beta=1.0)``.
        neg_pos_ratio: negatives trained per positive (3 in the paper).
        allowed_border, pos_weight: see :class:`~raydet.models.dense_heads.anchor_head.AnchorHead`.
        num_unused_classes: U class outputs per prior after the background that take part in the softmax (and its
            loss) but are no class, as :class:`~raydet.models.roi_heads.bbox_heads.ConvFCBBoxHead`'s: a converted
            torchvision COCO SSD keeps its 10 never-used category-id slots there (10), so that its scores equal
            torchvision's. Each prior then has C + 1 + U logits. Default 0.
        nms_pre_per: ``"level"`` (default, MMDetection): ``test.nms_pre`` is a budget of (prior, class) pairs per
            level; ``"class"`` (torchvision): of each class, the ``test.nms_pre`` best priors of all levels.
        norm_cfg: optional norm after each level's classifier and regressor conv (``cls_convs.<l>.1`` /
            ``reg_convs.<l>.1``; the convs then have no bias), ScratchDet's BN in the detection head (Zhu et al.
            2019, Sec. 3.2; the authors' ``SSDBNHead``). None (SSD): no norm.

    Convs start Xavier-uniform with zero bias (MMDetection's SSDHead init); norms with unit weight, zero bias.
    """

    use_sigmoid_cls = False

    def __init__(self, num_classes: int, in_channels: list[int], anchor_generator, bbox_coder, assigner,
                 sampler=None, loss_cls: nn.Module | None = None, loss_bbox: nn.Module | None = None,
                 neg_pos_ratio: float = 3.0, allowed_border: float = -1, pos_weight: float = -1,
                 test: DetectionConfig = DetectionConfig(nms_pre=1000, score_thr=0.02, nms_iou=0.45,
                                                         max_per_img=200),
                 num_unused_classes: int = 0, nms_pre_per: str = "level", norm_cfg: dict | None = None):
        loss_cls = loss_cls if loss_cls is not None else CrossEntropyLoss(use_sigmoid=False)
        loss_bbox = loss_bbox if loss_bbox is not None else SmoothL1Loss(beta=1.0)
        super().__init__(num_classes, anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner, sampler,
                         allowed_border, pos_weight)
        if self.sampling:
            raise ValueError("SSDHead picks its negatives by hard negative mining: use sampler {type: PseudoSampler}")
        if getattr(loss_cls, "use_mask", False):
            raise ValueError("SSDHead's loss_cls must be a softmax CrossEntropyLoss (use_mask: false)")
        if neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
        if num_unused_classes < 0:
            raise ValueError(f"num_unused_classes must be >= 0, got {num_unused_classes}")
        if nms_pre_per not in ("level", "class"):
            raise ValueError(f"nms_pre_per must be 'level' or 'class', got {nms_pre_per!r}")
        self.num_unused_classes = int(num_unused_classes)
        self.nms_pre_per = nms_pre_per
        self.cls_out_channels = num_classes + 1 + self.num_unused_classes
        num_priors = getattr(anchor_generator, "num_base_priors", None)  # per level (SSDAnchorGenerator)
        if num_priors is None:  # the same count on every level (AnchorGenerator)
            num_priors = [anchor_generator.num_base_anchors] * anchor_generator.num_levels
        num_priors = [int(a) for a in num_priors]
        if len(in_channels) != len(num_priors):
            raise ValueError(f"in_channels has {len(in_channels)} levels but the anchor generator has "
                             f"{len(num_priors)}")
        self.in_channels = [int(c) for c in in_channels]
        self.num_base_priors = num_priors
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.test = test
        def conv(c_in: int, c_out: int) -> nn.Sequential:  # entry 0 the conv, [entry 1 its norm]
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm_cfg is None)]
            return nn.Sequential(*layers, *([build_norm_layer(norm_cfg, c_out)] if norm_cfg is not None else []))

        self.cls_convs = nn.ModuleList(conv(c, a * self.cls_out_channels) for c, a in zip(in_channels, num_priors))
        self.reg_convs = nn.ModuleList(conv(c, a * 4) for c, a in zip(in_channels, num_priors))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_single(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Level ``level``'s features (B, C_in, H, W) -> (cls_score (B, A*(C+1+U), H, W), bbox_pred (B, A*4, H, W))."""
        return self.cls_convs[level](x), self.reg_convs[level](x)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if len(feats) != len(self.cls_convs):
            raise ValueError(f"SSDHead has {len(self.cls_convs)} levels but got {len(feats)} feature maps")
        outs = [self.forward_single(x, level) for level, x in enumerate(feats)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def loss(self, feats: tuple[torch.Tensor, ...], batch: dict, outputs=None) -> dict[str, torch.Tensor]:
        """Softmax cross-entropy with hard negative mining and smooth L1, each divided by the batch's positives."""
        cls_scores, bbox_preds = outputs if outputs is not None else self(feats)
        sizes, anchors_per_level = self.anchors(cls_scores, batch["img_metas"])
        anchors = torch.cat(anchors_per_level)
        labels, label_w, targets, box_w, num_pos, _ = self.get_targets(anchors, sizes, batch, batch["gt_labels"])
        b, n = labels.shape
        cls = flatten_levels(cls_scores, self.cls_out_channels)  # (B, N, C + 1 + U)
        losses = self.loss_cls(cls.reshape(b * n, -1), labels.reshape(-1), label_w.reshape(-1),
                               reduction_override="none").reshape(b, n)
        pos = box_w[..., 0] > 0
        neg = (labels == self.num_classes) & (label_w > 0) & ~pos
        hard = hard_negative_mining(losses, pos, neg, self.neg_pos_ratio)
        avg_factor = max(num_pos, 1)
        loss_cls = (losses * (pos | hard).to(losses.dtype)).sum() / avg_factor

        deltas = flatten_levels(bbox_preds, 4)  # (B, N, 4)
        pos_deltas = deltas[pos]
        if self.reg_decoded_bbox:
            pos_deltas = self.bbox_coder.decode(anchors[pos.nonzero(as_tuple=True)[1]], pos_deltas)
        loss_bbox = self.loss_bbox(pos_deltas, targets[pos], box_w[pos], avg_factor=avg_factor)
        if num_pos == 0:  # keep the graph connected (DDP) with an exact zero
            loss_bbox = deltas.sum() * 0.0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox}

    @torch.no_grad()
    def predict(self, feats, img_metas) -> list[dict]:
        """Detections per image in original-image pixels: boxes (m, 4), scores (m,), labels (m,)."""
        cls_scores, bbox_preds = self(feats)
        _, anchors_per_level = self.anchors(cls_scores, img_metas)
        cfg, c = self.test, self.num_classes
        # (B, N_l, C) foreground probabilities and (B, N_l, 4) deltas of each level, for the whole batch at once
        probs = [flatten_levels([s], self.cls_out_channels).softmax(dim=-1)[..., :c] for s in cls_scores]
        deltas = [flatten_levels([r], 4) for r in bbox_preds]
        if self.nms_pre_per == "class":  # all levels as one: the top-k runs over every prior of a class
            probs, deltas = [torch.cat(probs, dim=1)], [torch.cat(deltas, dim=1)]
            anchors_per_level = [torch.cat(anchors_per_level)]
        results = []
        for i, meta in enumerate(img_metas):
            boxes_l, scores_l, labels_l = [], [], []
            for prob, delta, anchors in zip(probs, deltas, anchors_per_level):
                if self.nms_pre_per == "class":
                    scores, prior, labels = _top_per_class(prob[i], cfg.score_thr, cfg.nms_pre)
                else:
                    scores = prob[i].reshape(-1)
                    keep = torch.nonzero(scores > cfg.score_thr, as_tuple=True)[0]
                    scores = scores[keep]
                    scores, top = scores.topk(min(cfg.nms_pre, scores.numel()) if cfg.nms_pre > 0 else scores.numel())
                    prior, labels = keep[top] // c, keep[top] % c
                boxes_l.append(self.bbox_coder.decode(anchors[prior], delta[i, prior], max_shape=meta["img_shape"][:2]))
                scores_l.append(scores)
                labels_l.append(labels)
            boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
            if cfg.min_bbox_size > 0:
                large = ((boxes[:, 2:] - boxes[:, :2]) >= cfg.min_bbox_size).all(dim=1)
                boxes, scores, labels = boxes[large], scores[large], labels[large]
            keep, scores = detection_nms(boxes, scores, labels, cfg)
            results.append({"boxes": boxes_to_original(boxes[keep], meta), "scores": scores, "labels": labels[keep]})
        return results


def _top_per_class(scores: torch.Tensor, score_thr: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each class, its ``k`` (<= 0: all) best priors with a score above ``score_thr``.

    Args:
        scores: (N, C) one image's class probabilities of all its priors.

    Returns:
        (scores (m,), prior indices (m,), labels (m,)), class by class, each class's by decreasing score.
    """
    n, c = scores.shape
    k = min(k, n) if k > 0 else n
    top, prior = scores.masked_fill(scores <= score_thr, -float("inf")).topk(k, dim=0)  # (k, C) each
    labels = torch.arange(c, device=scores.device).expand(k, c)
    keep = torch.isfinite(top).t()
    return top.t()[keep], prior.t()[keep], labels.t()[keep]
