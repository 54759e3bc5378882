"""Backbones: image (B, 3, H, W) -> tuple of multi-scale feature maps."""
from .hrnet import HRNet
from .resnet import ResNet, ResNeXt
from .root_resnet import RootResNet
from .ssd_vgg import SSDVGG

__all__ = ["ResNet", "ResNeXt", "SSDVGG", "HRNet", "RootResNet"]
