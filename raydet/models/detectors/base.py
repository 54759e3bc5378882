"""Detector base: backbone + neck feature extraction and the loss / predict entry points."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

__all__ = ["BaseDetector"]


class BaseDetector(nn.Module, ABC):
    """``model(batch, mode="loss")`` -> dict of named losses; ``model(batch, mode="predict")`` -> per-image results.

    The batch format is documented in ``raydet.structures``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck

    def extract_feat(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> per-level feature maps."""
        feats = self.backbone(images)
        return tuple(self.neck(feats)) if self.neck is not None else tuple(feats)

    @abstractmethod
    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named scalar losses (keys start with ``loss``)."""

    @abstractmethod
    def predict(self, batch: dict) -> list[dict]:
        """Per-image results in original-image pixels (see raydet.structures)."""

    def forward(self, batch: dict, mode: str = "loss"):
        if mode == "loss":
            return self.loss(batch)
        if mode == "predict":
            return self.predict(batch)
        raise ValueError(f"mode must be 'loss' or 'predict', got {mode!r}")
