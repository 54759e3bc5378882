"""HRNet backbone (Sun et al. 2019, "High-Resolution Representations for Labeling Pixels and Regions").

The network keeps a high-resolution branch from the stem to the end and adds one lower-resolution branch per stage
(strides 4, 8, 16, 32; paper Sec. 3, Fig. 2); inside a stage, HR modules run their branches in parallel and then
exchange information between every pair of resolutions (the fuse layers, paper Fig. 3). HRNetV2 (Sec. 3,
"HRNetV2p" for detection with the HRFPN neck, :mod:`raydet.models.necks.hrfpn`) outputs all four branches.

Module and parameter names follow MMDetection's ``HRNet`` (``mmdet/models/backbones/hrnet.py``) exactly: ``conv1``,
``bn1``, ``conv2``, ``bn2`` (stem), ``layer1`` (stage 1), ``transition{1,2,3}``, ``stage{2,3,4}.<module>.branches
.<branch>.<block>`` and ``stage{k}.<module>.fuse_layers.<i>.<j>``, so MMDetection detector checkpoints and the official
HRNet ImageNet checkpoints (HRNet-Image-Classification; MMDetection's ``open-mmlab://msra/hrnetv2_w18`` etc.) map
one to one; :func:`load_hrnet_imagenet` drops the classification head of the latter.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from raydet.models.backbones.weight_init import (init_convs_and_norms, keep_batchnorms_in_eval,
                                                 zero_init_last_norms)
from raydet.models.norm import build_norm_layer
from raydet.models.pretrained import read_state_dict
from raydet.registry import closest, register

__all__ = ["HRNet", "HRModule", "load_hrnet_imagenet", "CLASSIFIER_PREFIXES"]

logger = logging.getLogger(__name__)

_DEFAULT_NORM = {"type": "BN", "requires_grad": True}
_BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}
_STAGE_KEYS = ("num_modules", "num_branches", "block", "num_blocks", "num_channels")
# The classification head of the official ImageNet HRNet (HRNet-Image-Classification's cls_hrnet.py): the
# per-branch bottlenecks, the stride-2 convs merging them, the 1x1 conv to 2048 channels and the linear classifier.
CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, norm_cfg: dict, relu: bool) -> nn.Sequential:
    """conv (no bias) + norm [+ ReLU] as ``Sequential`` entries 0, 1 [, 2] (MMDetection's nesting)."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
              build_norm_layer(norm_cfg, out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _make_blocks(block, inplanes: int, planes: int, num_blocks: int, norm_cfg: dict) -> nn.Sequential:
    """``num_blocks`` residual blocks at stride 1; the first gets a 1x1 conv + norm shortcut (``downsample.0/1``)
    when its input channels differ from ``planes * expansion``."""
    downsample = None
    if inplanes != planes * block.expansion:
        downsample = _conv_norm(inplanes, planes * block.expansion, 1, 1, norm_cfg, relu=False)
    layers = [block(inplanes, planes, 1, downsample=downsample, norm_cfg=norm_cfg)]
    layers += [block(planes * block.expansion, planes, 1, norm_cfg=norm_cfg) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class HRModule(nn.Module):
    """One high-resolution module: parallel branches of residual blocks, then the multi-resolution fusion.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: blocks per branch.
        in_channels: input channels per branch.
        num_channels: block widths per branch (output channels ``num_channels[i] * block.expansion``).
        multiscale_output: fuse into every branch (True) or into the highest-resolution branch only.
        norm_cfg: norm after every conv.

    Fusion (paper Sec. 3, Fig. 3): output i = ReLU(sum over branches j of f_ij(x_j)) with f_ii the identity,
    f_ij for j > i (lower resolution) a 1x1 conv + norm to branch i's channels, then nearest upsampling to branch i's
    size (``fuse_layers.i.j.0/1``), and for j < i (higher resolution) i - j stride-2 3x3 convs + norm, the first
    i - j - 1 keeping branch j's channels and followed by a ReLU, the last one going to branch i's channels without
    a ReLU (``fuse_layers.i.j.k.0/1``).

    ``forward(xs)``: list of (B, in_channels[i], H / 2**i, W / 2**i) -> list of (B, out_channels[i], same size) for
    the fused branches (all, or only branch 0 without ``multiscale_output``).
    """

    def __init__(self, block, num_blocks: list[int], in_channels: list[int], num_channels: list[int],
                 multiscale_output: bool = True, norm_cfg: dict = _DEFAULT_NORM):
        super().__init__()
        num_branches = len(in_channels)
        if not len(num_blocks) == len(num_channels) == num_branches:
            raise ValueError(f"num_blocks {list(num_blocks)}, num_channels {list(num_channels)} and in_channels "
                             f"{list(in_channels)} must have one entry per branch")
        self.num_branches = num_branches
        self.multiscale_output = multiscale_output
        self.branches = nn.ModuleList(_make_blocks(block, in_channels[i], num_channels[i], num_blocks[i], norm_cfg)
                                      for i in range(num_branches))
        channels = [c * block.expansion for c in num_channels]
        self.out_channels = channels if multiscale_output else channels[:1]
        self.fuse_layers = self._make_fuse_layers(channels, norm_cfg) if num_branches > 1 else None
        self.relu = nn.ReLU(inplace=False)

    def _make_fuse_layers(self, channels: list[int], norm_cfg: dict) -> nn.ModuleList:
        fuse_layers = nn.ModuleList()
        for i in range(len(self.out_channels)):
            row = nn.ModuleList()
            for j in range(self.num_branches):
                if j > i:
                    row.append(_conv_norm(channels[j], channels[i], 1, 1, norm_cfg, relu=False))
                elif j == i:
                    row.append(None)
                else:
                    steps = [_conv_norm(channels[j], channels[j], 3, 2, norm_cfg, relu=True) for _ in range(i - j - 1)]
                    steps.append(_conv_norm(channels[j], channels[i], 3, 2, norm_cfg, relu=False))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(row)
        return fuse_layers

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(xs) != self.num_branches:
            raise ValueError(f"HRModule expects {self.num_branches} branch inputs, got {len(xs)}")
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j in range(self.num_branches):
                if j > i:  # nearest upsampling to branch i's exact size (x 2**(j - i) when the input is divisible)
                    y = y + F.interpolate(row[j](xs[j]), size=xs[i].shape[-2:], mode="nearest")
                elif j < i:
                    y = y + row[j](xs[j])
            outs.append(self.relu(y))
        return outs


def _check_extra(extra: dict) -> list[dict]:
    """The four stage dicts of ``extra``, checked (keys, block names, one entry per branch)."""
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a mapping with stage1..stage4, got {type(extra).__name__}")
    stages = [f"stage{k}" for k in range(1, 5)]
    for key in extra:
        if key not in stages:
            raise ValueError(f"unknown key 'extra.{key}'{closest(key, stages)} (valid: {', '.join(stages)})")
    cfgs = []
    previous = 1
    for name in stages:
        cfg = extra.get(name)
        if not isinstance(cfg, dict):
            raise ValueError(f"extra.{name} is missing or not a mapping (keys: {', '.join(_STAGE_KEYS)})")
        for key in cfg:
            if key not in _STAGE_KEYS:
                raise ValueError(f"unknown key 'extra.{name}.{key}'{closest(key, _STAGE_KEYS)} "
                                 f"(valid: {', '.join(_STAGE_KEYS)})")
        for key in _STAGE_KEYS:
            if key not in cfg:
                raise ValueError(f"extra.{name}.{key} is missing")
        if cfg["block"] not in _BLOCKS:
            raise ValueError(f"extra.{name}.block must be one of {', '.join(_BLOCKS)}, got {cfg['block']!r}"
                             f"{closest(cfg['block'], _BLOCKS)}")
        branches = cfg["num_branches"]
        if not isinstance(branches, int) or branches < 1:
            raise ValueError(f"extra.{name}.num_branches must be a positive integer, got {branches!r}")
        if name == "stage1" and (branches != 1 or cfg["num_modules"] != 1):
            raise ValueError(f"extra.stage1 must have num_branches 1 and num_modules 1 (stage 1 is one branch of "
                             f"blocks, layer1), got {branches} and {cfg['num_modules']}")
        if branches < previous:
            raise ValueError(f"extra.{name}.num_branches {branches} is fewer than the previous stage's {previous}")
        previous = branches
        for key in ("num_blocks", "num_channels"):
            value = cfg[key]
            if not isinstance(value, (list, tuple)) or len(value) != branches \
                    or not all(isinstance(v, int) and v > 0 for v in value):
                raise ValueError(f"extra.{name}.{key} must list {branches} positive integers (num_branches), "
                                 f"got {value!r}")
        if not isinstance(cfg["num_modules"], int) or cfg["num_modules"] < 1:
            raise ValueError(f"extra.{name}.num_modules must be a positive integer, got {cfg['num_modules']!r}")
        cfgs.append(cfg)
    return cfgs


@register
class HRNet(nn.Module):
    """HRNet backbone with MMDetection's ``extra`` layout.

    Args:
        extra: ``{stage1: ..., stage4: ...}``, each ``{num_modules, num_branches, block: BASIC | BOTTLENECK,
            num_blocks: [per branch], num_channels: [per branch]}``. Stage 1 is one branch (``layer1``, from the
            64-channel stem); stage k > 1 has ``num_modules`` HR modules. HRNetV2-W18 / W32 / W40 (paper Sec. 4,
            MMDetection's configs/hrnet): stage 1 one module of 4 bottlenecks of width 64; stages 2-4 with 1 / 4 / 3
            modules of 4 basic blocks per branch, widths (C, 2C), (C, 2C, 4C), (C, 2C, 4C, 8C) for C = 18, 32, 40.
        in_channels: channels of the input image.
        norm_cfg: see :func:`raydet.models.norm.build_norm_layer`.
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) while training (MMDetection's default).
        zero_init_residual: the last norm of each residual block starts at gamma 0 (MMDetection's default False).
        multiscale_output: the last module fuses into every branch and the backbone returns the four branches
            (True, HRNetV2) or only the highest-resolution one (False).
        init_cfg: ``{type: Pretrained, checkpoint: PATH, prefix: optional}`` loads a local state dict after the
            random init with :func:`load_hrnet_imagenet` (an official ImageNet HRNet: its classification head is
            dropped and reported; every other tensor must fit, exactly); None keeps the random (Kaiming) init.

    Stem: two 3x3 stride-2 convs of 64 channels, each with a norm and ReLU (``conv1 bn1 conv2 bn2``): stride 4.
    Between stages, ``transition{k}`` maps the previous branches to the next stage's: a 3x3 conv + norm + ReLU where
    a kept branch changes width (None otherwise), and for each new branch, stride-2 3x3 convs + norm + ReLU from the
    previous stage's lowest-resolution output (one per resolution step).

    ``forward(x)``: x (B, in_channels, H, W) -> tuple of the last stage's branches, branch i of shape
    (B, out_channels[i], H / 2**(i + 2), W / 2**(i + 2)) (rounded up per stride-2 step when H, W are not multiples
    of 32). ``out_channels``: stage 4's ``num_channels`` times its block's expansion.

    Raises:
        ValueError: a malformed ``extra`` (the key is named) or ``init_cfg``.
    """

    def __init__(self, extra: dict, in_channels: int = 3, norm_cfg: dict = _DEFAULT_NORM, norm_eval: bool = True,
                 zero_init_residual: bool = False, multiscale_output: bool = True, init_cfg: dict | None = None):
        super().__init__()
        stage_cfgs = _check_extra(extra)
        ResNet._check_init_cfg(init_cfg)  # the same Pretrained init_cfg as ResNet's
        self.extra = extra
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.init_cfg = init_cfg

        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, 64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = build_norm_layer(norm_cfg, 64)
        self.relu = nn.ReLU(inplace=True)

        cfg1 = stage_cfgs[0]
        block1 = _BLOCKS[cfg1["block"]]
        self.layer1 = _make_blocks(block1, 64, cfg1["num_channels"][0], cfg1["num_blocks"][0], norm_cfg)
        channels = [cfg1["num_channels"][0] * block1.expansion]

        for k, cfg in enumerate(stage_cfgs[1:], start=1):
            block = _BLOCKS[cfg["block"]]
            widths = [c * block.expansion for c in cfg["num_channels"]]
            self.add_module(f"transition{k}", self._make_transition(channels, widths, norm_cfg))
            last = k == 3
            modules = []
            for m in range(cfg["num_modules"]):
                multiscale = multiscale_output or not (last and m == cfg["num_modules"] - 1)
                module = HRModule(block, list(cfg["num_blocks"]), widths, list(cfg["num_channels"]), multiscale,
                                  norm_cfg)
                modules.append(module)
                widths = module.out_channels
            self.add_module(f"stage{k + 1}", nn.Sequential(*modules))
            channels = widths
        self.out_channels = list(channels)

        self.init_weights()
        self.train()

    @staticmethod
    def _make_transition(pre: list[int], cur: list[int], norm_cfg: dict) -> nn.ModuleList:
        layers = nn.ModuleList()
        for i, width in enumerate(cur):
            if i < len(pre):
                layers.append(_conv_norm(pre[i], width, 3, 1, norm_cfg, relu=True) if pre[i] != width else None)
            else:
                steps = i + 1 - len(pre)
                layers.append(nn.Sequential(*[_conv_norm(pre[-1], width if s == steps - 1 else pre[-1], 3, 2,
                                                         norm_cfg, relu=True) for s in range(steps)]))
        return layers

    def init_weights(self) -> None:
        """Kaiming (fan_out, ReLU) convs, unit / zero norms (MMDetection's default init of HRNet), optional zero
        gamma of each block's last norm; then ``init_cfg``."""
        init_convs_and_norms(self)
        if self.zero_init_residual:
            zero_init_last_norms(self, (BasicBlock, Bottleneck))
        if self.init_cfg is not None:
            load_hrnet_imagenet(self, self.init_cfg["checkpoint"], prefix=self.init_cfg.get("prefix"))

    def train(self, mode: bool = True) -> "HRNet":
        """Train mode, except that (with ``norm_eval``) every BatchNorm stays in eval mode."""
        super().train(mode)
        if mode and self.norm_eval:
            keep_batchnorms_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        for k in range(1, 4):
            transition = getattr(self, f"transition{k}")
            # kept branches: their own output (a width change, else unchanged); new ones: from the lowest resolution.
            # (MMDetection feeds a width-changing transition of a kept branch the lowest resolution too; no HRNet
            # config changes a kept branch's width, so the two agree on every published model.)
            xs = [ys[i] if layer is None else layer(ys[i] if i < len(ys) else ys[-1])
                  for i, layer in enumerate(transition)]
            ys = getattr(self, f"stage{k + 1}")(xs)
        return tuple(ys)


def load_hrnet_imagenet(module: HRNet, checkpoint: str, prefix: str | None = None) -> tuple[list[str], list[str]]:
    """Load an HRNet checkpoint into ``module``: the official ImageNet HRNet (HRNet-Image-Classification, the files
    MMDetection loads as ``open-mmlab://msra/hrnetv2_w{18,32,40}``) or a detector's backbone (``prefix``).

    The backbone's keys are the same on both sides; the classification head's (:data:`CLASSIFIER_PREFIXES`:
    ``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) are dropped and reported, as are
    BatchNorm step counters the model's norm (FrozenBN) does not have. Every other tensor must match by name and
    shape; BatchNorm step counters the checkpoint lacks keep their value.

    Returns:
        (loaded, dropped): the model keys loaded, and the checkpoint keys dropped.

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: checkpoint keys with no place in the model, model tensors the checkpoint lacks, or shape
            mismatches (the first few of each named; e.g. a W32 checkpoint for a W18 model).
    """
    state = read_state_dict(checkpoint, prefix)
    own = module.state_dict()
    dropped = [k for k in state if k.startswith(CLASSIFIER_PREFIXES)
               or (k.endswith("num_batches_tracked") and k not in own)]
    kept = {k: v for k, v in state.items() if k not in set(dropped)}
    unexpected = [k for k in kept if k not in own]
    missing = [k for k in own if k not in kept and not k.endswith("num_batches_tracked")]
    mismatched = [k for k in kept if k in own and kept[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        problems = []
        for what, keys in (("checkpoint tensors have no place in the model", unexpected),
                           ("model tensors are not in the checkpoint", missing)):
            if keys:
                problems.append(f"{len(keys)} {what}, e.g. {', '.join(keys[:3])}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches, e.g. " + ", ".join(
                f"{k}: checkpoint {tuple(kept[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:3]))
        raise ValueError(f"{checkpoint} does not fit this HRNet (extra widths {_widths(module)}): "
                         + "; ".join(problems))
    module.load_state_dict(kept, strict=False)
    heads = sorted({k.split(".", 1)[0] for k in dropped})
    logger.info("HRNet: loaded %d/%d tensors from %s; dropped %d (%s)", len(kept), len(own), checkpoint,
                len(dropped), ", ".join(heads) or "none")
    return list(kept), dropped


def _widths(module: HRNet) -> list[int]:
    return list(module.extra["stage4"]["num_channels"])
