"""SSD (Liu et al. 2016): a single-stage detector on VGG-16 with extra feature levels (MMDetection builds it as a
``SingleStageDetector``)."""
from __future__ import annotations

from raydet.models.detectors.detectors import SingleStageDetector
from raydet.registry import register

__all__ = ["SSD"]


@register
class SSD(SingleStageDetector):
    """SSD300 / SSD512: an ``SSDVGG`` backbone, an ``SSDNeck`` (L2Norm on conv4_3, extra levels) and an ``SSDHead``.
    M2Det (Zhao et al. 2019) is this detector with an ``MLFPN`` neck (``pipelines/m2det*_vgg16_coco.yaml``)."""
