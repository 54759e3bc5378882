"""Root-ResNet (Zhu et al. 2019, "ScratchDet: Training Single-Shot Object Detectors from Scratch", Sec. 4.2): a
ResNet whose stem keeps the input resolution for a detector trained from scratch.

The paper finds that the down-sampling of ResNet's first conv (7x7, stride 2) loses the small objects' detail that a
detector trained from scratch needs, and replaces it by the "root block": three stacked 3x3 convs of stride 1, each
with BatchNorm and ReLU. As in the authors' code (their Caffe ``Resnet18rootV2`` and mmdetection ``SSDRES300``), a
2 x 2 max-pool of stride 2 follows the root block, so the residual stages run at 1/2, 1/4, 1/8, 1/16 of the input
(ResNet: 1/4 .. 1/32): on SSD300's 300 x 300 input the third and fourth stages give the 38 x 38 and 19 x 19 maps
that VGG-16's conv4_3 and fc7 give SSD.

The residual stages are raydet's ResNet blocks (:class:`~raydet.models.backbones.resnet.BasicBlock` /
:class:`~raydet.models.backbones.resnet.Bottleneck`, post-activation, torchvision's names ``layer{i}.{j}.conv1/bn1``),
as in the authors' mmdetection port; their Caffe ``Resnet18rootV2`` has pre-activation blocks instead.
"""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.backbones.resnet import _ARCH, BasicBlock, Bottleneck
from raydet.models.conv import build_conv_layer
from raydet.models.backbones.weight_init import (freeze, init_convs_and_norms, keep_batchnorms_in_eval,
                                                 zero_init_last_norms)
from raydet.models.norm import build_norm_layer
from raydet.models.pretrained import load_pretrained
from raydet.registry import register

__all__ = ["RootResNet"]

_BN = {"type": "BN", "requires_grad": True}


@register
class RootResNet(nn.Module):
    """Root-ResNet: root block (3 x (3x3 conv stride 1 + norm + ReLU)), 2 x 2 max-pool, residual stages.

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck); ScratchDet's SSD300 uses 18 (ablations) and 34.
        in_channels: channels of the input image.
        stem_channels: width of the three root convs (the paper: 64).
        base_channels: width of the first stage; stage i has ``base_channels * 2**i`` (x 4 for bottlenecks).
        num_stages: residual stages built (1-4), ``layer1``..``layer{num_stages}``.
        strides: per stage (the first ``num_stages`` used); ``(1, 2, 2, 2)`` as ResNet.
        out_indices: stages (0-based) whose outputs ``forward`` returns; ScratchDet's SSD300: (2, 3), the stride-8
            and stride-16 maps (38 x 38 and 19 x 19 on 300 x 300).
        norm_cfg: norm after every conv (:func:`~raydet.models.norm.build_norm_layer`); the paper: BN everywhere.
        conv_cfg: the type of every conv (:func:`~raydet.models.conv.build_conv_layer`); None: ``nn.Conv2d``.
        norm_eval: keep BatchNorms in eval mode while training (False: a from-scratch model trains its statistics).
        frozen_stages: -1 freezes nothing (training from scratch); k >= 0 freezes the root block and layer1..layerk.
        zero_init_residual: start each block's last norm gamma at 0 (False: the authors' init, gamma 1).
        init_cfg: ``{type: Pretrained, checkpoint: PATH, prefix: optional}`` loads a local state dict after the random
            init; None (ScratchDet) keeps the random init: Kaiming-normal (fan_out) convs, unit / zero norms.

    ``forward(x)``: x (B, in_channels, H, W) -> tuple of the ``out_indices`` stage maps; stage i is
    (B, out_channels[k], ~H / 2**(i + 1), ~W / 2**(i + 1)) (each stride-2 3x3 conv maps n to floor((n - 1) / 2) + 1,
    the max-pool n to floor(n / 2)).

    Raises:
        ValueError: an unknown depth, num_stages outside 1..4, too few strides, out_indices outside the stages,
            frozen_stages outside -1..num_stages, or a malformed init_cfg.
    """

    def __init__(self, depth: int = 18, in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 num_stages: int = 4, strides: tuple[int, ...] = (1, 2, 2, 2), out_indices: tuple[int, ...] = (2, 3),
                 norm_cfg: dict = _BN, conv_cfg: dict | None = None, norm_eval: bool = False,
                 frozen_stages: int = -1, zero_init_residual: bool = False, init_cfg: dict | None = None):
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"invalid depth {depth} for RootResNet; choose one of {', '.join(map(str, _ARCH))}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be in 1..4, got {num_stages}")
        if len(strides) < num_stages:
            raise ValueError(f"strides has {len(strides)} entries for {num_stages} stages")
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must be non-empty and within 0..{num_stages - 1}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained"
                                     or not isinstance(init_cfg.get("checkpoint"), str)
                                     or set(init_cfg) - {"type", "checkpoint", "prefix"}):
            raise ValueError(f"init_cfg must be null or {{type: Pretrained, checkpoint: PATH, prefix: optional}}, "
                             f"got {init_cfg!r}")
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.norm_eval = norm_eval
        self.frozen_stages = frozen_stages
        self.zero_init_residual = zero_init_residual
        self.init_cfg = init_cfg

        stem, channels = [], in_channels
        for _ in range(3):  # the root block ([paper] Sec. 4.2, Fig. 3): three 3x3 convs, stride 1
            stem += [build_conv_layer(conv_cfg, channels, stem_channels, 3, padding=1, bias=False),
                     build_norm_layer(norm_cfg, stem_channels), nn.ReLU(inplace=True)]
            channels = stem_channels
        self.stem = nn.Sequential(*stem)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)  # the authors' pool1 (Caffe and mmdetection code)

        block, stage_blocks = _ARCH[depth]
        self.stage_names: list[str] = []
        stage_channels, inplanes = [], stem_channels
        for i in range(num_stages):
            planes, stride = base_channels * 2 ** i, strides[i]
            outplanes = planes * block.expansion
            downsample = None
            if stride != 1 or inplanes != outplanes:
                downsample = nn.Sequential(build_conv_layer(conv_cfg, inplanes, outplanes, 1, stride=stride,
                                                            bias=False),
                                           build_norm_layer(norm_cfg, outplanes))
            blocks = [block(inplanes, planes, stride, downsample=downsample, norm_cfg=norm_cfg, conv_cfg=conv_cfg)]
            blocks += [block(outplanes, planes, 1, norm_cfg=norm_cfg, conv_cfg=conv_cfg)
                       for _ in range(1, stage_blocks[i])]
            inplanes = outplanes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{i + 1}")
            stage_channels.append(outplanes)
        self.out_channels = [stage_channels[i] for i in self.out_indices]

        self.init_weights()
        self.train()

    def init_weights(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convs, unit / zero norms, optionally zero last gammas; then ``init_cfg``."""
        init_convs_and_norms(self)
        if self.zero_init_residual:
            zero_init_last_norms(self, (BasicBlock, Bottleneck))
        if self.init_cfg is not None:
            load_pretrained(self, self.init_cfg["checkpoint"], prefix=self.init_cfg.get("prefix"))

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        freeze([self.stem] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)])

    def train(self, mode: bool = True) -> "RootResNet":
        """Train mode, except frozen stages and (with ``norm_eval``) every BatchNorm, kept in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            keep_batchnorms_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.stem(x))
        outs = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
