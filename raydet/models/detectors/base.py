"""Detector base: backbone + neck feature extraction and the loss / predict entry points."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from raydet.registry import current_path, error

__all__ = ["BaseDetector", "require_component"]


def require_component(owner: str, name: str, value, methods: tuple[str, ...], example: str) -> None:
    """Refuse, when the detector is built, a missing (``null``) component or one without the methods the detector
    calls, instead of failing at the first loss.

    Raises:
        ConfigError (a ValueError): naming the dotted key (``model.rpn_head`` when built from a pipeline).
    """
    missing = [m for m in methods if not callable(getattr(value, m, None))]
    if value is None:
        got = "null"
    elif not isinstance(value, nn.Module):
        got = f"a {type(value).__name__}, not a torch module"
    elif missing:
        got = f"{type(value).__name__}, which has no {', '.join(missing)}"
    else:
        return
    key = f"{current_path()}.{name}" if current_path() else name
    raise error(key, f"{owner} needs {example}; got {got}")


class BaseDetector(nn.Module, ABC):
    """``model(batch, mode="loss")`` -> dict of named losses; ``model(batch, mode="predict")`` -> per-image results.

    The batch format is documented in ``raydet.structures``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | list[nn.Module] | None = None):
        super().__init__()
        owner = type(self).__name__
        require_component(owner, "backbone", backbone, ("forward",), "a backbone (e.g. {type: ResNet, depth: 50})")
        if isinstance(neck, (list, tuple)):  # necks applied in turn (MMDetection's neck list, e.g. [FPN, BFP])
            for i, part in enumerate(neck):
                require_component(owner, f"neck[{i}]", part, ("forward",), "a neck module (e.g. {type: FPN, ...})")
            neck = nn.Sequential(*neck)
        if neck is not None:
            require_component(owner, "neck", neck, ("forward",), "a neck module (e.g. {type: FPN, ...}) or null")
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
