"""Optimizer and learning-rate schedule from the pipeline's ``optimizer`` and ``lr_schedule`` sections."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raydet.registry import ConfigError, build_dataclass, closest, error

__all__ = ["OptimizerConfig", "LrScheduleConfig", "parse_optimizer", "parse_lr_schedule", "build_optimizer",
           "scaled_lr", "lr_at", "OPTIMIZERS", "param_groups"]

OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


@dataclass
class OptimizerConfig:
    """``optimizer:`` section. ``lr`` is for a total batch of ``base_batch_size`` images and scales linearly with the
    real total batch (Goyal et al. 2017), as in the paper (0.02 at 16 images for Faster R-CNN)."""

    type: str = "SGD"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0001
    base_batch_size: int = 16
    scale_lr: bool = True
    grad_clip: dict | None = None  # {max_norm: 35, norm_type: 2}
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # MMDetection's paramwise_cfg: {bias_lr_mult, bias_decay_mult, norm_decay_mult, dwconv_decay_mult}
    # (see build_optimizer), e.g. FCOS's {bias_lr_mult: 2.0, bias_decay_mult: 0.0}
    paramwise_cfg: dict | None = None


@dataclass
class LrScheduleConfig:
    """``lr_schedule:`` section: linear (or constant) warmup over ``warmup_iters`` iterations from
    ``warmup_ratio * lr``, then x``gamma`` at each epoch in ``steps`` (0-based epochs: [8, 11] decays before the 9th
    and the 12th epoch, MMDetection's 1x)."""

    warmup: str | None = "linear"
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    steps: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1


GRAD_CLIP_KEYS = ("max_norm", "norm_type", "error_if_nonfinite", "foreach")  # torch.nn.utils.clip_grad_norm_'s
PARAMWISE_KEYS = ("bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult")  # mmengine's


def parse_optimizer(cfg: dict | None, path: str = "optimizer") -> OptimizerConfig:
    """The ``optimizer:`` section, checked: unknown keys (with a "did you mean"), the type, value ranges and the
    ``grad_clip`` keys.

    Raises:
        ConfigError: naming the file (from the build context) and the dotted key.
    """
    opt = build_dataclass(OptimizerConfig, dict(cfg or {}), path)
    if opt.type not in OPTIMIZERS:
        raise error(f"{path}.type", f"unknown optimizer '{opt.type}'{closest(opt.type, OPTIMIZERS)} "
                                    f"(one of {', '.join(OPTIMIZERS)})")
    if not opt.lr >= 0:  # 0 is allowed: a frozen baseline (e.g. the worse arm of a study)
        raise error(f"{path}.lr", f"must be >= 0, got {opt.lr!r}")
    for key in ("momentum", "weight_decay"):
        if getattr(opt, key) < 0:
            raise error(f"{path}.{key}", f"must be >= 0, got {getattr(opt, key)!r}")
    if opt.base_batch_size < 1:
        raise error(f"{path}.base_batch_size", f"must be >= 1, got {opt.base_batch_size}")
    if len(opt.betas) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise error(f"{path}.betas", f"expected two numbers in [0, 1), got {opt.betas}")
    if opt.grad_clip is not None:
        for key in opt.grad_clip:
            if key not in GRAD_CLIP_KEYS:
                raise error(f"{path}.grad_clip.{key}", f"unknown key of grad_clip{closest(key, GRAD_CLIP_KEYS)} "
                                                       f"(valid: {', '.join(GRAD_CLIP_KEYS)})")
        max_norm = opt.grad_clip.get("max_norm")
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
            raise error(f"{path}.grad_clip.max_norm", f"expected a number > 0, got {max_norm!r}")
    for key, value in (opt.paramwise_cfg or {}).items():
        if key not in PARAMWISE_KEYS:
            raise error(f"{path}.paramwise_cfg.{key}", f"unknown key of paramwise_cfg{closest(key, PARAMWISE_KEYS)} "
                                                       f"(valid: {', '.join(PARAMWISE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise error(f"{path}.paramwise_cfg.{key}", f"expected a number >= 0, got {value!r}")
    return opt


def parse_lr_schedule(cfg: dict | None, path: str = "lr_schedule") -> LrScheduleConfig:
    """The ``lr_schedule:`` section, checked (unknown keys with a "did you mean", the warmup mode, value ranges).

    Raises:
        ConfigError: naming the file (from the build context) and the dotted key.
    """
    sched = build_dataclass(LrScheduleConfig, dict(cfg or {}), path)
    if sched.warmup not in (None, "linear", "constant"):
        raise error(f"{path}.warmup", f"must be linear, constant or null, got {sched.warmup!r}"
                                      f"{closest(str(sched.warmup), ('linear', 'constant'))}")
    if sched.warmup_iters < 0:
        raise error(f"{path}.warmup_iters", f"must be >= 0, got {sched.warmup_iters}")
    if not 0 <= sched.warmup_ratio <= 1:
        raise error(f"{path}.warmup_ratio", f"must be in [0, 1], got {sched.warmup_ratio}")
    if any(s < 0 for s in sched.steps):
        raise error(f"{path}.steps", f"epochs must be >= 0, got {sched.steps}")
    if sched.gamma <= 0:
        raise error(f"{path}.gamma", f"must be > 0, got {sched.gamma}")
    return sched


def scaled_lr(cfg: OptimizerConfig, total_batch_size: int) -> float:
    """The linear scaling rule: lr * total_batch / base_batch_size."""
    return cfg.lr * total_batch_size / cfg.base_batch_size if cfg.scale_lr else cfg.lr


def param_groups(model: nn.Module, lr: float, weight_decay: float, paramwise_cfg: dict | None) -> list[dict]:
    """The trainable parameters in groups of equal (lr, weight decay), MMDetection's (mmengine's
    ``DefaultOptimWrapperConstructor``) ``paramwise_cfg`` rules; every factor defaults to 1:

    * the bias of a layer that is not a norm or deformable conv: lr x ``bias_lr_mult``, decay x ``bias_decay_mult``;
    * the weight and bias of a norm layer (BN, GN, LN, IN): decay x ``norm_decay_mult``;
    * a depth-wise conv's weight (groups == in_channels): decay x ``dwconv_decay_mult``.

    Each group carries its ``lr_mult`` (lr / base lr) so that the lr schedule scales it (LrSchedulerHook).
    Without ``paramwise_cfg``: one group of every trainable parameter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not paramwise_cfg:
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0}]
    from raydet.ops import DeformConv2d

    cfg = {key: float(paramwise_cfg.get(key, 1.0)) for key in PARAMWISE_KEYS}
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    groups: dict[tuple[float, float], list] = {}
    seen: set[int] = set()
    in_dcn = {id(m) for d in model.modules() if isinstance(d, DeformConv2d) for m in d.modules()}
    for module in model.modules():
        is_norm = isinstance(module, norms)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            lr_mult = decay_mult = 1.0
            is_bias = name == "bias" and not is_norm and id(module) not in in_dcn
            if is_bias:
                lr_mult = cfg["bias_lr_mult"]
            if is_norm:
                decay_mult = cfg["norm_decay_mult"]
            elif is_dwconv:
                decay_mult = cfg["dwconv_decay_mult"]
            elif is_bias:
                decay_mult = cfg["bias_decay_mult"]
            groups.setdefault((lr_mult, decay_mult), []).append(p)
    return [{"params": ps, "lr": lr * lm, "weight_decay": weight_decay * dm, "lr_mult": lm}
            for (lm, dm), ps in groups.items()]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters, every one with weight decay (MMDetection's default), or the
    groups of ``paramwise_cfg`` (:func:`param_groups`)."""
    if cfg.type not in OPTIMIZERS:  # a config built in Python, not through parse_optimizer
        raise ConfigError(f"optimizer.type: unknown optimizer '{cfg.type}'{closest(cfg.type, OPTIMIZERS)}")
    params = param_groups(model, lr, cfg.weight_decay, cfg.paramwise_cfg)
    if cfg.type == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return OPTIMIZERS[cfg.type](params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_at(base_lr: float, sched: LrScheduleConfig, epoch: int, global_iter: int) -> float:
    """Learning rate at a 0-based epoch and 0-based global iteration."""
    lr = base_lr * sched.gamma ** sum(epoch >= s for s in sched.steps)
    if sched.warmup and global_iter < sched.warmup_iters:
        if sched.warmup == "constant":
            return lr * sched.warmup_ratio
        k = (1 - global_iter / sched.warmup_iters) * (1 - sched.warmup_ratio)
        return lr * (1 - k)
    return lr
