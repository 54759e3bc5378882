"""FCOS (Tian et al. 2019): a single-stage anchor-free detector, an FPN (P3-P7) with an FCOS head."""
from __future__ import annotations

from raydet.models.detectors.detectors import SingleStageDetector
from raydet.registry import register

__all__ = ["FCOS"]


@register
class FCOS(SingleStageDetector):
    """FCOS: ``backbone`` -> ``neck`` -> ``bbox_head`` (an :class:`~raydet.models.dense_heads.fcos_head.FCOSHead`);
    training and inference are :class:`~raydet.models.detectors.detectors.SingleStageDetector`'s."""
