"""The weight initialisation and train-mode rules the ResNet-style backbones share (ResNet / ResNeXt, RootResNet,
HRNet): Kaiming-normal convs, unit / zero norms, the zero-initialised last norm of each residual block (Goyal et al.
2017, section 5.1), and BatchNorms kept in eval mode (``norm_eval``)."""
from __future__ import annotations

from torch import nn

from raydet.models.norm import is_batchnorm

__all__ = ["init_convs_and_norms", "zero_init_last_norms", "keep_batchnorms_in_eval", "freeze"]


def init_convs_and_norms(module: nn.Module, skip: frozenset[int] | set[int] = frozenset()) -> None:
    """Kaiming-normal (fan_out, ReLU) weights for every ``nn.Conv2d``, weight 1 and bias 0 for every affine
    BatchNorm / GroupNorm of ``module``; sub-modules whose ``id`` is in ``skip`` keep their own init."""
    for m in module.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_init_last_norms(module: nn.Module, block_types: tuple[type, ...]) -> None:
    """Weight 0 for the trainable ``last_norm`` of every residual block of ``block_types`` in ``module``, so each
    block starts as the identity."""
    for m in module.modules():
        if isinstance(m, block_types):
            weight = getattr(m.last_norm, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.requires_grad:
                nn.init.zeros_(weight)


def keep_batchnorms_in_eval(module: nn.Module) -> None:
    """Every BatchNorm of ``module`` in eval mode (running statistics used, not updated)."""
    for m in module.modules():
        if is_batchnorm(m):
            m.eval()


def freeze(modules) -> None:
    """Each module of ``modules`` in eval mode with its parameters frozen (a backbone's ``frozen_stages``)."""
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
