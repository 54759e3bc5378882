"""Necks: tuple of backbone maps -> tuple of pyramid maps."""
from .bfp import BFP
from .fpn import FPN
from .hrfpn import HRFPN
from .mlfpn import MLFPN
from .ssd_neck import L2Norm, SSDNeck

__all__ = ["FPN", "BFP", "HRFPN", "MLFPN", "SSDNeck", "L2Norm"]
