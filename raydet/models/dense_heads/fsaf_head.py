"""FSAF head (Zhu et al. 2019, "Feature Selective Anchor-Free Module for Single-Shot Object Detection").

The anchor-free branch of FSAF on RetinaNet's towers (MMDetection's ``FSAFHead``): one prior per location, a square
of side ``stride`` that only stands for the location; a (B, C, H, W) class map and a (B, 4, H, W) map of
non-negative (top, bottom, left, right) distances (``TBLRBBoxCoder``), trained with focal loss and IoU loss on the
decoded boxes. Targets come from the effective / ignoring regions of each gt (``CenterRegionAssigner``) on every
level; **online feature selection** (Sec. 3.4) then trains each gt on one level only: the level where the mean,
over its positive locations, of the summed classification (all classes) and regression losses is smallest.
Positives of the other levels keep only their negatives' classification (their own class and box are dropped).

Both losses are sums over the batch divided by the number of positives that remain (all negatives' count when none
does), as MMDetection. Test time is RetinaNet's (``RetinaHead.predict``) with the TBLR decoder.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from raydet.models.dense_heads.anchor_head import flatten_levels
from raydet.models.dense_heads.retina_head import RetinaHead
from raydet.models.head_configs import DetectionConfig
from raydet.registry import register

__all__ = ["FSAFHead", "FSAFTargets", "select_levels"]

# MMDetection's FSAFHead init: the regression bias starts at 0.25 so that no predicted box starts with zero area.
_REG_BIAS = 0.25
# mean loss of a (level, gt) pair without positives: never the minimum (MMDetection's 1e6)
_NO_POSITIVE = 1e6


class FSAFTargets(NamedTuple):
    """Training targets of a batch of B images and N priors (all levels), C classes.

    labels (B, N) long (C = background); label_weights (B, N, C); bbox_targets (B, N, 4): gt boxes (decoded-box
    losses) or encoded targets; pos_gt_inds (B, N) long: the batch-wide index of each positive's gt (the gts of
    image 0, then image 1, ...), -1 elsewhere; num_gts; num_neg: negatives in the batch.
    """

    labels: torch.Tensor
    label_weights: torch.Tensor
    bbox_targets: torch.Tensor
    pos_gt_inds: torch.Tensor
    num_gts: int
    num_neg: int


def select_levels(anchor_losses: torch.Tensor, anchor_levels: torch.Tensor, anchor_gts: torch.Tensor,
                  num_levels: int, num_gts: int) -> torch.Tensor:
    """Online feature selection: the level of each gt with the smallest mean loss over its positives there.

    Args:
        anchor_losses: (P,) each positive's loss (classification summed over classes + regression).
        anchor_levels: (P,) long, each positive's pyramid level.
        anchor_gts: (P,) long, each positive's gt index in [0, num_gts).

    Returns:
        (num_gts,) long: the selected level of each gt (0 for a gt without positives on any level).
    """
    key = anchor_levels * num_gts + anchor_gts
    sums = anchor_losses.new_zeros(num_levels * num_gts).index_add_(0, key, anchor_losses)
    counts = anchor_losses.new_zeros(num_levels * num_gts).index_add_(0, key, torch.ones_like(anchor_losses))
    means = torch.where(counts > 0, sums / counts.clamp(min=1), anchor_losses.new_tensor(_NO_POSITIVE))
    return means.view(num_levels, num_gts).argmin(dim=0)


@register
class FSAFHead(RetinaHead):
    """RetinaNet's towers with one prior per location, ReLU on the distances, and online level selection.

    Args: as :class:`~raydet.models.dense_heads.retina_head.RetinaHead`, plus
        score_threshold: the least score a positive's top class needs to count in the logged ``pos_recall``
            (MMDetection's ``score_threshold``; None: any score).

    ``loss`` returns ``loss_cls``, ``loss_bbox`` and, for the log, ``num_pos`` (selected positives per image) and
    ``pos_recall`` (% of selected positives whose top-scoring class is their gt's).

    Raises:
        ValueError: an anchor generator with more than one prior per location.
    """

    def __init__(self, num_classes: int, in_channels: int, anchor_generator, bbox_coder, loss_cls, loss_bbox,
                 assigner, sampler=None, feat_channels: int = 256, stacked_convs: int = 4,
                 norm_cfg: dict | None = None, prior_prob: float = 0.01, allowed_border: float = -1,
                 pos_weight: float = -1, score_threshold: float | None = None,
                 test: DetectionConfig = DetectionConfig(), padding_anchors: bool = False):
        super().__init__(num_classes, in_channels, anchor_generator, bbox_coder, loss_cls, loss_bbox, assigner,
                         sampler=sampler, feat_channels=feat_channels, stacked_convs=stacked_convs,
                         norm_cfg=norm_cfg, prior_prob=prior_prob, allowed_border=allowed_border,
                         pos_weight=pos_weight, test=test, padding_anchors=padding_anchors)
        if self.num_anchors != 1:
            raise ValueError(f"FSAFHead: the anchor-free branch has 1 prior per location, the anchor generator makes "
                             f"{self.num_anchors}: set octave_base_scale: 1, scales_per_octave: 1, ratios: [1.0]")
        self.score_threshold = score_threshold
        nn.init.constant_(self.retina_reg.bias, _REG_BIAS)

    def forward_single(self, x):
        cls_score, bbox_pred = super().forward_single(x)
        return cls_score, bbox_pred.relu()  # distances to the sides are >= 0

    # ------------------------------------------------------------------------------------------------ training
    def get_targets(self, anchors: torch.Tensor, featmap_sizes, batch: dict,
                    gt_labels: list[torch.Tensor]) -> FSAFTargets:
        """Assign and sample the priors of every image; ``anchors`` (N, 4) are all levels' priors."""
        device = anchors.device
        n, c = anchors.shape[0], self.cls_out_channels
        labels_l, label_w_l, targets_l, gt_inds_l = [], [], [], []
        num_gts = num_neg = 0
        ignores = batch.get("gt_boxes_ignore") or [None] * len(gt_labels)
        for i, meta in enumerate(batch["img_metas"]):
            inside = self.inside_flags(anchors, featmap_sizes, meta)
            cand = anchors[inside]
            gt_boxes = batch["gt_boxes"][i].to(device)
            labels_i = gt_labels[i].to(device)
            ignore = ignores[i]
            ignore = ignore.to(device) if ignore is not None and ignore.numel() else None
            assign = self.assigner.assign(cand, gt_boxes, labels_i, ignore)
            res = self.sampler.sample(assign, cand, gt_boxes, labels_i)

            labels = anchors.new_full((n,), c, dtype=torch.long)
            label_w = anchors.new_zeros((n, c))
            targets = anchors.new_zeros((n, 4))
            gt_inds = anchors.new_full((n,), -1, dtype=torch.long)
            idx = torch.nonzero(inside, as_tuple=True)[0]  # candidate index -> prior index
            pos, neg = idx[res.pos_inds], idx[res.neg_inds]
            if pos.numel():
                targets[pos] = (res.pos_gt_boxes if self.reg_decoded_bbox
                                else self.bbox_coder.encode(res.pos_boxes, res.pos_gt_boxes))
                labels[pos] = res.pos_gt_labels
                label_w[pos] = 1.0 if self.pos_weight <= 0 else self.pos_weight
                gt_inds[pos] = res.pos_assigned_gt_inds + num_gts
            label_w[neg] = 1.0
            shadowed = getattr(assign, "shadowed_labels", None)
            if shadowed is not None and shadowed.numel():  # ignoring regions: that class only
                label_w[idx[shadowed[:, 0]], shadowed[:, 1]] = 0.0
            num_gts += int(gt_boxes.reshape(-1, 4).shape[0])
            num_neg += int(neg.numel())
            labels_l.append(labels)
            label_w_l.append(label_w)
            targets_l.append(targets)
            gt_inds_l.append(gt_inds)
        return FSAFTargets(torch.stack(labels_l), torch.stack(label_w_l), torch.stack(targets_l),
                           torch.stack(gt_inds_l), num_gts, num_neg)

    def loss(self, feats: tuple[torch.Tensor, ...], batch: dict, gt_labels: list[torch.Tensor] | None = None,
             outputs=None) -> dict[str, torch.Tensor]:
        """Focal and IoU losses of each gt on its selected level; ``outputs`` reuses a computed ``forward``."""
        cls_scores, bbox_preds = outputs if outputs is not None else self(feats)
        sizes, anchors_per_level = self.anchors(cls_scores, batch["img_metas"])
        anchors = torch.cat(anchors_per_level)
        n, c = anchors.shape[0], self.cls_out_channels
        prior_levels = torch.cat([torch.full((a.shape[0],), lvl, dtype=torch.long, device=anchors.device)
                                  for lvl, a in enumerate(anchors_per_level)])
        gt_labels = gt_labels if gt_labels is not None else batch["gt_labels"]
        t = self.get_targets(anchors, sizes, batch, gt_labels)

        cls = flatten_levels(cls_scores, c).reshape(-1, c)
        preds = flatten_levels(bbox_preds, 4).reshape(-1, 4).clamp(min=1e-4)  # no zero-area box (MMDetection)
        labels = t.labels.reshape(-1)
        cls_loss = self.loss_cls(cls, labels, t.label_weights.reshape(-1, c), reduction_override="none")  # (B*N, C)

        pos = torch.nonzero(t.pos_gt_inds.reshape(-1) >= 0, as_tuple=True)[0]
        pos_gts = t.pos_gt_inds.reshape(-1)[pos]
        pos_levels = prior_levels[pos % n]
        if pos.numel():
            pos_preds = preds[pos]
            if self.reg_decoded_bbox:
                pos_preds = self.bbox_coder.decode(anchors[pos % n], pos_preds)
            reg_loss = self.loss_bbox(pos_preds, t.bbox_targets.reshape(-1, 4)[pos], reduction_override="none")
            reg_loss = reg_loss.sum(dim=-1) if reg_loss.dim() == 2 else reg_loss  # (P,)
            with torch.no_grad():
                best = select_levels((cls_loss[pos].sum(dim=1) + reg_loss).float(), pos_levels, pos_gts,
                                     len(anchors_per_level), t.num_gts)
            selected = best[pos_gts] == pos_levels
            # positives off their gt's level: drop their box and their own class (other classes stay negatives)
            dropped = pos[~selected]
            cls_loss = cls_loss.index_put((dropped, labels[dropped]), cls_loss.new_zeros(dropped.numel()))
            loss_bbox = reg_loss[selected].sum()
        else:
            selected = pos.new_zeros(0, dtype=torch.bool)
            loss_bbox = preds.sum() * 0.0  # keep the graph connected (DDP) with an exact zero
        num_pos = int(selected.sum())
        avg_factor = float(num_pos if num_pos > 0 else max(t.num_neg, 1))
        return {"loss_cls": cls_loss.sum() / avg_factor, "loss_bbox": loss_bbox / avg_factor,
                "num_pos": cls.new_tensor(num_pos / len(batch["img_metas"])),
                "pos_recall": self.pos_recall(cls.detach()[pos[selected]], labels[pos[selected]])}

    @torch.no_grad()
    def pos_recall(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """% of positives (P, C) whose top-scoring class is ``labels`` (P,) (and scores > ``score_threshold``)."""
        if logits.shape[0] == 0:
            return logits.new_tensor(0.0)
        scores, top = logits.sigmoid().max(dim=1)
        correct = top == labels
        if self.score_threshold is not None:
            correct &= scores > self.score_threshold
        return correct.float().mean() * 100.0
