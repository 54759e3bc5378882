"""Necks: tuple of backbone maps -> tuple of pyramid maps."""
from .fpn import FPN
from .ssd_neck import L2Norm, SSDNeck

__all__ = ["FPN", "SSDNeck", "L2Norm"]
