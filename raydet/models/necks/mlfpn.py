"""M2Det's Multi-Level Feature Pyramid Network, MLFPN (Zhao et al. 2019, "M2Det: A Single-Shot Object Detector
based on Multi-Level Feature Pyramid Network", AAAI, Sec. 3 "Proposed Method", Fig. 2 and Fig. 4).

FFMv1 fuses two backbone maps into the base feature; ``num_levels`` levels each compress the base feature with an
FFMv2 (concatenated, from the second level on, with the previous level's finest output) and run a thinned U-shape
module (TUM) that gives ``num_scales`` maps; SFAM concatenates the levels scale by scale and reweights the channels
(squeeze-and-excitation). The layout details the paper's figures leave open (kernels, paddings, the encoder's last
3 x 3 valid conv, the 1 x 1 smoothing convs, conv + BatchNorm + ReLU everywhere, a BatchNorm on the finest output)
follow the authors' code (github.com/qijiezhao/M2Det: ``m2det.py``, ``layers/nn_utils.py``), whose module names
(``reduce``, ``up_reduce``, ``leach``, ``layers``, ``toplayer``, ``latlayer``, ``smooth``, ``fc1`` / ``fc2``) are kept.
Unlike that code, every FFMv2 has its own 1 x 1 conv and every scale its own SE block, as the paper describes them
(the code repeats one module object in a Python list, so all levels share one ``leach`` conv and all scales one SE
block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.norm import build_norm_layer
from raydet.registry import register

__all__ = ["MLFPN", "ConvNormReLU", "FFMv1", "FFMv2", "TUM", "SFAM"]

# the authors' BasicConv: BatchNorm2d(eps=1e-5, momentum=0.01) after every conv
DEFAULT_NORM = {"type": "BN", "eps": 1e-5, "momentum": 0.01}


class ConvNormReLU(nn.Module):
    """A conv without bias, a norm layer (``bn``) and ReLU: the authors' ``BasicConv``.

    ``forward(x)``: (B, in_channels, H, W) -> (B, out_channels, H', W') with the conv's stride and padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 norm_cfg: dict | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = build_norm_layer(dict(norm_cfg or DEFAULT_NORM), out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class FFMv1(nn.Module):
    """Feature Fusion Module v1 (paper Fig. 4 (a)): the base feature from a shallow and a deep backbone map.

    The shallow map (VGG-16's conv4_3, 512 channels) goes through a 3 x 3 conv to ``out_channels[0]`` (256), the
    deep map (fc7, 1024 channels, half the resolution) through a 1 x 1 conv to ``out_channels[1]`` (512) and is
    upsampled (nearest) to the shallow map's size; the two are concatenated (768 channels).

    ``forward(shallow, deep)``: (B, C_s, H, W), (B, C_d, H', W') -> (B, out_channels[0] + out_channels[1], H, W).
    """

    def __init__(self, in_channels: tuple[int, int] = (512, 1024), out_channels: tuple[int, int] = (256, 512),
                 norm_cfg: dict | None = None):
        super().__init__()
        self.reduce = ConvNormReLU(in_channels[0], out_channels[0], 3, padding=1, norm_cfg=norm_cfg)
        self.up_reduce = ConvNormReLU(in_channels[1], out_channels[1], 1, norm_cfg=norm_cfg)
        self.out_channels = int(out_channels[0]) + int(out_channels[1])

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.up_reduce(deep), size=shallow.shape[-2:], mode="nearest")
        return torch.cat([self.reduce(shallow), up], dim=1)


class FFMv2(nn.Module):
    """Feature Fusion Module v2 (paper Fig. 4 (b)): a 1 x 1 conv (``leach``) compresses the base feature to
    ``out_channels`` (128), concatenated with the previous TUM's finest output (same size) when there is one.

    ``forward(base, previous=None)``: (B, in_channels, H, W) [, (B, C_p, H, W)] -> (B, out_channels [+ C_p], H, W).
    """

    def __init__(self, in_channels: int = 768, out_channels: int = 128, norm_cfg: dict | None = None):
        super().__init__()
        self.leach = ConvNormReLU(in_channels, out_channels, 1, norm_cfg=norm_cfg)

    def forward(self, base: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        x = self.leach(base)
        return x if previous is None else torch.cat([x, previous], dim=1)


class TUM(nn.Module):
    """Thinned U-shape Module (paper Fig. 4 (c)): an encoder of ``num_scales - 1`` 3 x 3 convs, each with stride 2
    and padding 1 except the last (stride 1, no padding), and a decoder that walks back up: a 1 x 1 conv
    (``toplayer``) on the coarsest map, then at each finer scale the nearest-upsampled decoder map plus a 3 x 3 conv
    (``latlayer``) of the encoder map of that scale (of the input itself at the finest); with ``smooth`` each decoder
    map but the coarsest goes through a 1 x 1 conv (``smooth``) before it is output (the decoder itself continues
    with the unsmoothed map). Every conv is conv + BN + ReLU with ``planes`` outputs.

    Scales of a 40 x 40 input with 6 scales (M2Det320): 40, 20, 10, 5, 3 (stride 2, padding 1), 1 (the 3 x 3 valid
    conv); of 64 x 64 (M2Det512): 64, 32, 16, 8, 4, 2.

    Args:
        in_channels: the input's channels (128 for the first level, 128 + ``planes`` after it).
        planes: channels of every conv and output (256).
        num_scales: outputs (6), at least 2.
        smooth: the 1 x 1 smoothing convs (the authors' ``smooth=True``).
        norm_cfg: of every conv (default BN, eps 1e-5, momentum 0.01 as the authors' ``BasicConv``).

    ``forward(x)``: (B, in_channels, H, W) -> list of ``num_scales`` maps (B, planes, H_s, W_s), finest (H, W) first.

    Raises:
        ValueError: num_scales < 2.
    """

    def __init__(self, in_channels: int, planes: int = 256, num_scales: int = 6, smooth: bool = True,
                 norm_cfg: dict | None = None):
        super().__init__()
        if num_scales < 2:
            raise ValueError(f"TUM needs num_scales >= 2, got {num_scales}")
        self.num_scales = int(num_scales)
        self.planes = int(planes)
        encoder = [ConvNormReLU(in_channels, planes, 3, stride=2, padding=1, norm_cfg=norm_cfg)]
        for i in range(num_scales - 2):
            last = i == num_scales - 3
            encoder.append(ConvNormReLU(planes, planes, 3, stride=1 if last else 2, padding=0 if last else 1,
                                        norm_cfg=norm_cfg))
        self.layers = nn.Sequential(*encoder)
        self.toplayer = ConvNormReLU(planes, planes, 1, norm_cfg=norm_cfg)
        lateral = [ConvNormReLU(planes, planes, 3, padding=1, norm_cfg=norm_cfg) for _ in range(num_scales - 2)]
        lateral.append(ConvNormReLU(in_channels, planes, 3, padding=1, norm_cfg=norm_cfg))
        self.latlayer = nn.Sequential(*lateral)
        self.smooth = (nn.Sequential(*(ConvNormReLU(planes, planes, 1, norm_cfg=norm_cfg)
                                       for _ in range(num_scales - 1))) if smooth else None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        encoded = [x]
        for layer in self.layers:
            encoded.append(layer(encoded[-1]))
        decoded = self.toplayer(encoded[-1])
        outs = [decoded]  # coarsest first
        for i, lateral in enumerate(self.latlayer):
            skip = encoded[-2 - i]
            decoded = F.interpolate(decoded, size=skip.shape[-2:], mode="nearest") + lateral(skip)
            outs.append(self.smooth[i](decoded) if self.smooth is not None else decoded)
        return outs[::-1]


class SFAM(nn.Module):
    """Scale-wise Feature Aggregation Module's channel attention (paper Sec. 3, Eq. 2-3): per scale, a
    squeeze-and-excitation block, ``x * sigmoid(fc2(relu(fc1(avgpool(x)))))`` with 1 x 1 convs (with bias)
    ``channels -> channels // reduction -> channels``.

    ``forward(feats)``: ``num_scales`` maps (B, channels, H_s, W_s) -> the same shapes, reweighted per channel.
    """

    def __init__(self, channels: int, num_scales: int, reduction: int = 16):
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"SFAM's reduction {reduction} leaves no channel of {channels}")
        self.fc1 = nn.ModuleList(nn.Conv2d(channels, channels // reduction, 1) for _ in range(num_scales))
        self.fc2 = nn.ModuleList(nn.Conv2d(channels // reduction, channels, 1) for _ in range(num_scales))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.fc1):
            raise ValueError(f"SFAM has {len(self.fc1)} scales but got {len(feats)} maps")
        outs = []
        for x, fc1, fc2 in zip(feats, self.fc1, self.fc2):
            w = torch.sigmoid(fc2(torch.relu(fc1(F.adaptive_avg_pool2d(x, 1)))))
            outs.append(x * w)
        return outs


@register
class MLFPN(nn.Module):
    """The multi-level feature pyramid: FFMv1, ``num_levels`` x (FFMv2, TUM), the scale-wise concatenation, SFAM,
    and a BatchNorm on the finest output (the authors' ``Norm``, in place of SSD's L2Norm on conv4_3).

    Level l's TUM takes FFMv2(base feature, level l-1's finest output); output scale s concatenates the s-th map of
    the levels 1..L in order, so every scale has ``planes * num_levels`` channels (2048 for M2Det).

    Args:
        in_channels: channels of the shallow and the deep backbone maps (VGG-16: conv4_3 512, fc7 1024).
        reduce_channels: FFMv1's outputs for the shallow and the deep map (256, 512: a 768-channel base feature).
        planes: TUM width (256); each FFMv2 compresses the base feature to ``planes // 2`` (128).
        num_levels: TUMs (8). num_scales: outputs of each TUM (6). smooth: the TUMs' 1 x 1 smoothing convs.
        sfam: the SE attention per scale (the paper's M2Det: True). sfam_reduction: its reduction (16).
        norm_cfg: norm of every conv + norm + ReLU (default BN with eps 1e-5, momentum 0.01, as the authors').

    Convs of FFMv1, FFMv2 and the TUMs start Kaiming-normal (fan_out) as the authors' ``init_model``; norms at
    weight 1, bias 0; SFAM's convs keep PyTorch's default init (the authors' code leaves them).

    ``forward(inputs)``: (shallow (B, C_s, H, W), deep (B, C_d, H', W')) -> tuple of ``num_scales`` maps
    (B, planes * num_levels, H_s, W_s), finest (H, W) first; ``out_channels`` lists their channels.

    Raises:
        ValueError: not two input maps, or fewer than 1 level.
    """

    def __init__(self, in_channels: tuple[int, int] = (512, 1024), reduce_channels: tuple[int, int] = (256, 512),
                 planes: int = 256, num_levels: int = 8, num_scales: int = 6, smooth: bool = True, sfam: bool = True,
                 sfam_reduction: int = 16, norm_cfg: dict | None = None):
        super().__init__()
        if len(in_channels) != 2 or len(reduce_channels) != 2:
            raise ValueError(f"MLFPN fuses two backbone maps: in_channels and reduce_channels need 2 entries, got "
                             f"{list(in_channels)} and {list(reduce_channels)}")
        if num_levels < 1:
            raise ValueError(f"MLFPN needs num_levels >= 1, got {num_levels}")
        norm_cfg = dict(norm_cfg or DEFAULT_NORM)
        self.in_channels = [int(c) for c in in_channels]
        self.num_levels, self.num_scales, self.planes = int(num_levels), int(num_scales), int(planes)
        self.ffm1 = FFMv1(self.in_channels, reduce_channels, norm_cfg)
        leach = planes // 2
        self.ffm2 = nn.ModuleList(FFMv2(self.ffm1.out_channels, leach, norm_cfg) for _ in range(num_levels))
        self.tums = nn.ModuleList(TUM(leach if i == 0 else leach + planes, planes, num_scales, smooth, norm_cfg)
                                  for i in range(num_levels))
        channels = planes * num_levels
        self.sfam = SFAM(channels, num_scales, sfam_reduction) if sfam else None
        self.norm = nn.BatchNorm2d(channels)
        self.out_channels = [channels] * num_scales
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d) and not name.startswith("sfam"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != 2:
            raise ValueError(f"MLFPN expects 2 backbone maps (shallow, deep), got {len(inputs)}")
        base = self.ffm1(inputs[0], inputs[1])
        levels = []
        previous = None
        for ffm2, tum in zip(self.ffm2, self.tums):
            outs = tum(ffm2(base, previous))
            levels.append(outs)
            previous = outs[0]
        scales = [torch.cat([level[s] for level in levels], dim=1) for s in range(self.num_scales)]
        if self.sfam is not None:
            scales = self.sfam(scales)
        scales[0] = self.norm(scales[0])
        return tuple(scales)
