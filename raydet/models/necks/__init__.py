"""Necks: tuple of backbone maps -> tuple of pyramid maps."""
from .fpn import FPN

__all__ = ["FPN"]
