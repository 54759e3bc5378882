"""Necks: tuple of backbone maps -> tuple of pyramid maps."""
from .bfp import BFP
from .fpn import FPN
from .ssd_neck import L2Norm, SSDNeck

__all__ = ["FPN", "BFP", "SSDNeck", "L2Norm"]
