"""Backbones: image (B, 3, H, W) -> tuple of multi-scale feature maps."""
from .resnet import ResNet, ResNeXt
from .ssd_vgg import SSDVGG

__all__ = ["ResNet", "ResNeXt", "SSDVGG"]
