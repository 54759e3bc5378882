"""Building a plugin layer from its config inside a host block (MMDetection / mmcv's ``build_plugin_layer``)."""
from __future__ import annotations

import re

from torch import nn

from raydet.registry import build

__all__ = ["build_plugin_layer", "plugin_name"]


def plugin_name(cfg: dict) -> str:
    """The module name a host block gives the plugin: the class's ``_abbr_`` (``context_block``,
    ``gen_attention_block``; else its name in snake case) followed by the config's ``postfix`` (default '')."""
    from raydet.registry import REGISTRY

    cls = REGISTRY.get(cfg.get("type"))
    abbr = getattr(cls, "_abbr_", None) or re.sub(r"(?<!^)(?=[A-Z])", "_", getattr(cls, "__name__", "plugin")).lower()
    return f"{abbr}{cfg.get('postfix', '')}"


def build_plugin_layer(cfg: dict, in_channels: int, path: str) -> tuple[str, nn.Module]:
    """``(name, module)`` of a plugin config such as ``{type: ContextBlock, ratio: 0.0625}`` for a host whose
    feature map at that point has ``in_channels`` channels.

    Args:
        cfg: a registered type and its arguments, except ``in_channels`` (set by the host); ``postfix`` (optional,
            not passed on) tells apart two plugins of one type at one position.
        in_channels: C of the (B, C, H, W) map the plugin transforms (it must return the same shape).
        path: dotted key path of ``cfg`` in the pipeline, for error messages.

    Raises:
        ValueError: ``cfg`` is not a dict with a ``type``, or sets ``in_channels``.
        raydet.registry.ConfigError: an unknown type or argument (named with its key path).
    """
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ValueError(f"{path} must be a dict with a 'type' (e.g. ContextBlock), got {cfg!r}")
    if "in_channels" in cfg:
        raise ValueError(f"{path} must not set in_channels: the backbone sets it from the block's channels there")
    args = {k: v for k, v in cfg.items() if k != "postfix"}
    return plugin_name(cfg), build(args, path, in_channels=in_channels)
