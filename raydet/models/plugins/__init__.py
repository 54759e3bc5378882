"""Plugins: modules a backbone inserts into its blocks at configured points (B, C, H, W) -> (B, C, H, W)."""
from .builder import build_plugin_layer, plugin_name
from .context_block import ContextBlock
from .generalized_attention import GeneralizedAttention

__all__ = ["ContextBlock", "GeneralizedAttention", "build_plugin_layer", "plugin_name"]
