"""FSAF (Zhu et al. 2019): a single-stage detector whose dense head is the anchor-free FSAF branch
(:class:`~raydet.models.dense_heads.fsaf_head.FSAFHead`) on FPN P3-P7; MMDetection's ``FSAF`` detector."""
from __future__ import annotations

from raydet.models.detectors.detectors import SingleStageDetector
from raydet.registry import register

__all__ = ["FSAF"]


@register
class FSAF(SingleStageDetector):
    """Backbone, FPN and an FSAF head; training and inference are the single-stage ones."""
