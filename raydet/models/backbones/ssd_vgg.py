"""VGG with SSD's atrous fc6 / fc7 (Liu et al. 2016, Sec. 3 "Base network"), MMDetection's ``SSDVGG``.

The layers live in one ``features`` Sequential indexed as MMDetection's (and, up to conv5_3, torchvision's
``vgg16().features``): per stage ``n x (3x3 conv, ReLU)`` then a 2x2 / 2 max-pool (``ceil_mode``; none after the
last stage unless ``with_last_pool``), then pool5 (3x3 / 1, pad 1), fc6 (3x3 conv, dilation 6, pad 6), ReLU, fc7
(1x1 conv), ReLU. For VGG-16 that puts conv4_3's ReLU at index 22 and fc7's at 34, so MMDetection's and torchvision's
VGG-16 state dicts load without renaming (torchvision's has no fc6 / fc7 convs: they keep their random init).
"""
from __future__ import annotations

import torch
from torch import nn

from raydet.models.backbones.resnet import ResNet
from raydet.models.pretrained import load_pretrained
from raydet.registry import register

__all__ = ["SSDVGG"]

# convs per stage (mmcv's VGG.arch_settings)
_ARCH = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


@register
class SSDVGG(nn.Module):
    """VGG-11/13/16/19 without BatchNorm, with the reduced fc6 / fc7 of SSD as convolutions.

    Args:
        depth: 11, 13, 16 or 19.
        with_last_pool: a 2x2 pool after conv5 too (SSD: False).
        ceil_mode: the 2x2 pools round up (SSD: True, so 75 -> 38 at conv4 of a 300-pixel input).
        out_feature_indices: indices into ``features`` whose outputs ``forward`` returns; default conv4's last ReLU
            and fc7's ReLU ((22, 34) for VGG-16, MMDetection's ``out_feature_indices``).
        base_channels: conv1's width; stages have (1, 2, 4, 8, 8) x base_channels (64: VGG; smaller for thin test
            variants, not in MMDetection).
        fc_channels: width of fc6 and fc7 (1024 in SSD).
        init_cfg: ``{type: Pretrained, checkpoint: PATH, prefix: optional}`` loads a local state dict after the
            random init (e.g. MMDetection's ``vgg16_caffe`` or torchvision's ``vgg16``); None keeps the random init:
            Kaiming normal (fan_out, ReLU) weights and zero biases, as MMDetection's SSDVGG without a checkpoint.

    ``forward(x)``: (B, 3, H, W) -> tuple of the maps at ``out_feature_indices``; ``out_channels`` lists their
    channels. For a 300 x 300 input, VGG-16 gives conv4_3 (B, 512, 38, 38) and fc7 (B, 1024, 19, 19).
    """

    arch_settings = _ARCH

    def __init__(self, depth: int = 16, with_last_pool: bool = False, ceil_mode: bool = True,
                 out_feature_indices: tuple[int, ...] | None = None, base_channels: int = 64,
                 fc_channels: int = 1024, init_cfg: dict | None = None):
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"invalid depth {depth} for SSDVGG; choose one of {', '.join(map(str, _ARCH))}")
        if base_channels < 1 or fc_channels < 1:
            raise ValueError(f"base_channels and fc_channels must be >= 1, got {base_channels} and {fc_channels}")
        ResNet._check_init_cfg(init_cfg)
        layers: list[nn.Module] = []
        channels: list[int] = []  # output channels of each layer of `features`
        conv4_relu = -1
        in_ch = 3
        for stage, num_convs in enumerate(_ARCH[depth]):
            width = base_channels * min(2 ** stage, 8)
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels += [width, width]
                in_ch = width
            if stage == 3:
                conv4_relu = len(layers) - 1
            if stage < 4 or with_last_pool:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
                channels.append(in_ch)
        layers += [nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5
                   nn.Conv2d(in_ch, fc_channels, 3, padding=6, dilation=6), nn.ReLU(inplace=True),  # fc6
                   nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True)]  # fc7
        channels += [in_ch, fc_channels, fc_channels, fc_channels, fc_channels]
        if out_feature_indices is None:
            out_feature_indices = (conv4_relu, len(layers) - 1)
        if not out_feature_indices or any(not 0 <= i < len(layers) for i in out_feature_indices):
            raise ValueError(f"out_feature_indices {tuple(out_feature_indices)} must be non-empty indices into the "
                             f"{len(layers)} layers of SSDVGG-{depth}'s features (0..{len(layers) - 1})")
        self.features = nn.Sequential(*layers)
        self.depth = depth
        self.out_feature_indices = tuple(int(i) for i in out_feature_indices)
        self.out_channels = [channels[i] for i in self.out_feature_indices]
        self.init_cfg = init_cfg
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming normal (fan_out, ReLU) conv weights and zero biases; then ``init_cfg``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if self.init_cfg is not None:
            load_pretrained(self, self.init_cfg["checkpoint"], prefix=self.init_cfg.get("prefix"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        last = max(self.out_feature_indices)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.out_feature_indices:
                outs.append(x)
                if i == last:
                    break
                if getattr(self.features[i + 1], "inplace", False):  # a ReLU would overwrite the returned map
                    x = x.clone()
        return tuple(outs)
