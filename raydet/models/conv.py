"""Conv layers built from a small config dict (mmcv's ``conv_cfg``), the counterpart of ``norm_cfg``
(:mod:`raydet.models.norm`): a component that takes ``conv_cfg`` builds each of its convs with
:func:`build_conv_layer`, so one pipeline line swaps the conv type everywhere it is set.

Supported types::

    null / {"type": "Conv"}              nn.Conv2d
    {"type": "ConvWS", "eps": 1e-5}      raydet.models.conv_ws.ConvWS (Weight Standardization, Qiao et al. 2019)

Both keep ``nn.Conv2d``'s parameter names (``weight`` / ``bias``), so a checkpoint converts whatever the type.
"""
from __future__ import annotations

from torch import nn

from raydet.models.conv_ws import ConvWS
from raydet.registry import closest

__all__ = ["build_conv_layer", "CONV_TYPES"]

# type -> (class, keys it accepts besides ``type``)
CONV_TYPES: dict[str, tuple[type, tuple[str, ...]]] = {
    "Conv": (nn.Conv2d, ()),
    "ConvWS": (ConvWS, ("eps",)),
}


def build_conv_layer(cfg: dict | None, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                     dilation=1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """One 2-D conv of the type ``cfg`` names (None: ``nn.Conv2d``), with ``nn.Conv2d``'s arguments.

    Raises:
        ValueError: ``cfg`` not a mapping with a ``type``, an unknown type or key (with the closest valid name).
    """
    if cfg is None:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"conv_cfg must be null or a dict with a 'type' (one of {', '.join(CONV_TYPES)}), "
                         f"got {cfg!r}")
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind not in CONV_TYPES:
        raise ValueError(f"unknown conv type '{kind}'{closest(kind, CONV_TYPES)} (valid: {', '.join(CONV_TYPES)})")
    cls, allowed = CONV_TYPES[kind]
    for key in cfg:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise ValueError(f"unknown key '{key}' of conv type {kind}{closest(key, allowed)} (valid: {valid})")
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=bias, **cfg)
