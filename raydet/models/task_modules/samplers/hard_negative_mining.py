"""Online hard negative mining (SSD, Liu et al. 2016, Sec. 2.2 "Hard negative mining"): of each image's negative
priors, train only those with the highest classification loss, at most ``neg_pos_ratio`` per positive.

Unlike a sampler, it needs the losses, so a head calls it inside its loss, after computing the per-prior loss of
every prior (MMDetection's ``SSDHead.loss_by_feat_single``, torchvision's ``SSD.compute_loss``).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hard_negative_mining"]


def hard_negative_mining(losses: Tensor, pos_mask: Tensor, neg_mask: Tensor, neg_pos_ratio: float) -> Tensor:
    """The hardest negatives of each image.

    Args:
        losses: (B, N) per-prior classification loss (only the negatives' values matter; not differentiated).
        pos_mask: (B, N) bool, the positives.
        neg_mask: (B, N) bool, the candidate negatives (disjoint from the positives).
        neg_pos_ratio: negatives kept per positive.

    Returns:
        (B, N) bool: in image b, the ``k_b = min(int(neg_pos_ratio * num_pos_b), num_neg_b)`` candidate negatives
        of highest loss (an image without positives keeps none). Among equal losses the lower index wins.

    Raises:
        ValueError: shapes differ or ``neg_pos_ratio`` < 0.
    """
    if losses.dim() != 2 or pos_mask.shape != losses.shape or neg_mask.shape != losses.shape:
        raise ValueError(f"hard_negative_mining expects (B, N) losses and masks, got {tuple(losses.shape)}, "
                         f"{tuple(pos_mask.shape)} and {tuple(neg_mask.shape)}")
    if neg_pos_ratio < 0:
        raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
    neg_mask = neg_mask.bool()
    num_neg = (pos_mask.bool().sum(dim=1).to(torch.float64) * float(neg_pos_ratio)).floor().long()
    num_neg = torch.minimum(num_neg, neg_mask.sum(dim=1))
    ranked = torch.where(neg_mask, losses.detach(), torch.full_like(losses, -float("inf"), dtype=losses.dtype))
    order = ranked.sort(dim=1, descending=True, stable=True).indices  # (B, N): negatives first, hardest first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return neg_mask & (rank < num_neg[:, None])
