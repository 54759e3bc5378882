"""Feature Pyramid Network (Lin et al., 2017) with MMDetection's options for extra levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydet.models.conv import build_conv_layer
from raydet.models.norm import build_norm_layer
from raydet.registry import closest, register

__all__ = ["FPN"]

_EXTRA_SOURCES = ("on_input", "on_lateral", "on_output")


def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, norm_cfg: dict | None,
               conv_cfg: dict | None = None) -> nn.Sequential:
    """conv (with bias unless followed by a norm) [+ norm], as ``Sequential`` entries 0 [, 1]."""
    layers = [build_conv_layer(conv_cfg, in_ch, out_ch, kernel, stride=stride, padding=kernel // 2,
                               bias=norm_cfg is None)]
    if norm_cfg is not None:
        layers.append(build_norm_layer(norm_cfg, out_ch))
    return nn.Sequential(*layers)


@register
class FPN(nn.Module):
    """Top-down feature pyramid with lateral connections.

    Args:
        in_channels: channels of each backbone map (finest first), e.g. [256, 512, 1024, 2048] for ResNet-50.
        out_channels: channels of every output level.
        num_outs: number of output levels; those beyond the used backbone levels are extra (coarser) levels.
        start_level: first backbone map used (1 = start from C3, as RetinaNet).
        end_level: last backbone map used, inclusive (-1 = the last one). When it is not the last, no extra levels
            are allowed (num_outs = end_level - start_level + 1).
        add_extra_convs: how the first extra level is made. False: max-pool (kernel 1, stride 2) of the last
            output (Faster R-CNN's P6), and the same for further levels. Otherwise a 3x3 stride-2 conv on
            ``"on_input"`` the last used backbone map (True means this; RetinaNet's P6 from C5), ``"on_lateral"``
            its lateral, or ``"on_output"`` the last output; further levels are 3x3 stride-2 convs on the previous.
        relu_before_extra_convs: apply ReLU to the input of the extra convs after the first.
        norm_cfg: optional norm after every conv (convs then have no bias).
        conv_cfg: the type of every conv (:func:`~raydet.models.conv.build_conv_layer`; None: ``nn.Conv2d``), e.g.
            ``{type: ConvWS}`` (Weight Standardization).
        upsample_mode: ``"nearest"`` or ``"bilinear"``; coarse maps are resized to the exact size of the finer map.

    ``forward(inputs)``: tuple of backbone maps (B, in_channels[i], H_i, W_i) -> tuple of ``num_outs`` maps
    (B, out_channels, ., .), finest first.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs: bool | str = False, relu_before_extra_convs: bool = False,
                 norm_cfg: dict | None = None, upsample_mode: str = "nearest", conv_cfg: dict | None = None):
        super().__init__()
        num_ins = len(in_channels)
        if num_ins == 0:
            raise ValueError("in_channels must list at least one channel count")
        if not 0 <= start_level < num_ins:
            raise ValueError(f"start_level {start_level} must index in_channels (0..{num_ins - 1})")
        if end_level in (-1, num_ins - 1):
            end = num_ins  # exclusive
            if num_outs < end - start_level:
                raise ValueError(f"num_outs {num_outs} is fewer than the {end - start_level} backbone levels used")
        else:
            if not start_level <= end_level < num_ins:
                raise ValueError(f"end_level {end_level} must be -1 or in {start_level}..{num_ins - 1}")
            end = end_level + 1
            if num_outs != end - start_level:
                raise ValueError(f"with end_level={end_level} (not the last input) num_outs must equal "
                                 f"{end - start_level} (no extra levels), got {num_outs}")
        if add_extra_convs is True:
            add_extra_convs = "on_input"
        if add_extra_convs is not False and add_extra_convs not in _EXTRA_SOURCES:
            raise ValueError(f"add_extra_convs must be false, true or one of {', '.join(_EXTRA_SOURCES)}; got "
                             f"{add_extra_convs!r}{closest(add_extra_convs, _EXTRA_SOURCES)}")
        if upsample_mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsample_mode must be 'nearest' or 'bilinear', got '{upsample_mode}'"
                             f"{closest(upsample_mode, ['nearest', 'bilinear'])}")

        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.start_level = start_level
        self.backbone_end_level = end
        self.add_extra_convs = add_extra_convs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.upsample_mode = upsample_mode

        used = range(start_level, end)
        self.lateral_convs = nn.ModuleList(_conv_norm(in_channels[i], out_channels, 1, 1, norm_cfg, conv_cfg)
                                            for i in used)
        self.fpn_convs = nn.ModuleList(_conv_norm(out_channels, out_channels, 3, 1, norm_cfg, conv_cfg)
                                        for _ in used)
        self.extra_convs = nn.ModuleList()
        if add_extra_convs:
            for k in range(num_outs - len(used)):
                in_ch = in_channels[end - 1] if k == 0 and add_extra_convs == "on_input" else out_channels
                self.extra_convs.append(_conv_norm(in_ch, out_channels, 3, 2, norm_cfg, conv_cfg))
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier-uniform conv weights, zero biases (as MMDetection's FPN)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} input maps, got {len(inputs)}")
        feats = inputs[self.start_level:self.backbone_end_level]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats)]
        # Top-down: each coarser (already merged) map is resized to the finer map's exact size and added.
        for i in range(len(laterals) - 1, 0, -1):
            size = laterals[i - 1].shape[-2:]
            up = F.interpolate(laterals[i], size=size, mode=self.upsample_mode,
                               **({} if self.upsample_mode == "nearest" else {"align_corners": False}))
            laterals[i - 1] = laterals[i - 1] + up
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]

        if not self.add_extra_convs:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        elif self.extra_convs:
            source = {"on_input": inputs[self.backbone_end_level - 1], "on_lateral": laterals[-1],
                      "on_output": outs[-1]}[self.add_extra_convs]
            outs.append(self.extra_convs[0](source))
            for conv in self.extra_convs[1:]:
                outs.append(conv(F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]))
        return tuple(outs)
