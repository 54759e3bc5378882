"""Normalisation layers built from a small config dict.

``norm_cfg`` picks the layer type and two training switches studied in the MMDetection report (Table 6):

* ``norm_cfg.requires_grad`` -- whether the affine weight / bias (gamma, beta) are trained;
* the backbone's ``norm_eval`` -- whether BatchNorm statistics are frozen (layers kept in eval mode during training).

Supported types::

    {"type": "BN"}                       nn.BatchNorm2d
    {"type": "SyncBN"}                   nn.SyncBatchNorm (statistics shared across DDP workers)
    {"type": "FrozenBN"}                 torchvision.ops.FrozenBatchNorm2d (statistics and affine fixed; buffers only)
    {"type": "GN", "num_groups": 32}     nn.GroupNorm

Optional keys: ``requires_grad`` (default True), ``eps``, ``momentum`` (BN / SyncBN only).
"""
from __future__ import annotations

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from raydet.registry import closest

__all__ = ["build_norm_layer", "convert_sync_batchnorm", "NORM_TYPES", "is_batchnorm"]

# type -> keys it accepts besides ``type`` and ``requires_grad``.
NORM_TYPES: dict[str, tuple[str, ...]] = {
    "BN": ("eps", "momentum"),
    "SyncBN": ("eps", "momentum"),
    "FrozenBN": ("eps",),
    "GN": ("num_groups", "eps"),
}


def build_norm_layer(cfg: dict, num_features: int) -> nn.Module:
    """One normalisation layer over ``num_features`` channels of a (B, C, H, W) tensor.

    Raises:
        ValueError: unknown ``type`` or key (with the closest valid name), a missing ``num_groups`` for GN, or a
            channel count GN cannot split.
    """
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"norm_cfg must be a dict with a 'type' (one of {', '.join(NORM_TYPES)}), got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in NORM_TYPES:
        raise ValueError(f"unknown norm type '{kind}'{closest(kind, NORM_TYPES)} (valid: {', '.join(NORM_TYPES)})")
    requires_grad = cfg.pop("requires_grad", True)
    if not isinstance(requires_grad, bool):
        raise ValueError(f"norm_cfg.requires_grad must be true or false, got {requires_grad!r}")
    allowed = NORM_TYPES[kind]
    for key in cfg:
        if key not in allowed:
            valid = ("requires_grad",) + allowed
            raise ValueError(f"unknown key '{key}' of norm type {kind}{closest(key, valid)} "
                             f"(valid: {', '.join(valid)})")

    if kind == "BN":
        layer = nn.BatchNorm2d(num_features, **cfg)
    elif kind == "SyncBN":
        layer = nn.SyncBatchNorm(num_features, **cfg)
    elif kind == "FrozenBN":
        layer = FrozenBatchNorm2d(num_features, **cfg)
    else:
        if "num_groups" not in cfg:
            raise ValueError("norm type GN needs 'num_groups' (e.g. 32)")
        num_groups = cfg.pop("num_groups")
        if not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups:
            raise ValueError(f"GN num_groups={num_groups!r} must be a positive divisor of {num_features} channels")
        layer = nn.GroupNorm(num_groups, num_features, **cfg)

    for p in layer.parameters():
        p.requires_grad_(requires_grad)
    return layer


def is_batchnorm(module: nn.Module) -> bool:
    """True for layers whose statistics change in train mode (BatchNorm*d and SyncBatchNorm)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm*d of ``module`` with SyncBatchNorm (for DDP), keeping weights, buffers,
    ``requires_grad`` and train/eval state."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
