"""ResNet and ResNeXt backbones returning multi-scale feature maps.

Module names follow ``torchvision.models.resnet`` exactly (``conv1``, ``bn1``, ``layer1``.. ``layer4``; blocks with
``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0/1``), so torchvision ImageNet state dicts load with no key
mapping (their ``fc.*`` is reported as unexpected and ignored).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from raydet.models.conv import build_conv_layer
from raydet.models.backbones.weight_init import (freeze, init_convs_and_norms, keep_batchnorms_in_eval,
                                                 zero_init_last_norms)
from raydet.models.norm import build_norm_layer
from raydet.models.plugins import build_plugin_layer
from raydet.models.pretrained import load_pretrained
from raydet.registry import build, closest, current_path, register

__all__ = ["ResNet", "ResNeXt", "BasicBlock", "Bottleneck"]

_DEFAULT_NORM = {"type": "BN", "requires_grad": True}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1, groups: int = 1,
             conv_cfg: dict | None = None) -> nn.Conv2d:
    return build_conv_layer(conv_cfg, in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                            groups=groups, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1, conv_cfg: dict | None = None) -> nn.Conv2d:
    return build_conv_layer(conv_cfg, in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). ``style`` makes no difference here: the stride is in the first 3x3."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", norm_cfg: dict = _DEFAULT_NORM,
                 dcn_cfg: dict | None = None, groups: int = 1, base_width: int = 64, conv_cfg: dict | None = None):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock (depth 18/34) supports only groups=1, base_width=64; "
                             f"got groups={groups}, base_width={base_width}")
        if dcn_cfg is not None:
            raise ValueError("deformable convs (dcn_cfg) need Bottleneck blocks (depth 50/101/152)")
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation, conv_cfg=conv_cfg)
        self.bn1 = build_norm_layer(norm_cfg, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, conv_cfg=conv_cfg)
        self.bn2 = build_norm_layer(norm_cfg, planes)
        self.downsample = downsample
        self.stride = stride

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision: one allocation less per block
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (optionally grouped / deformable), 1x1 expand (x4).

    ``style="pytorch"`` puts the stride in the 3x3 conv (torchvision, "ResNet v1.5"); ``"caffe"`` in the first 1x1
    (the original MSRA models). ``plugins``: ``{cfg, position[, key]}`` entries (see :class:`ResNet`), built here
    with the channels at their position and run after conv1's / conv2's ReLU or after bn3 (before the sum).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", norm_cfg: dict = _DEFAULT_NORM,
                 dcn_cfg: dict | None = None, groups: int = 1, base_width: int = 64, conv_cfg: dict | None = None,
                 plugins: list[dict] | None = None):
        super().__init__()
        width = math.floor(planes * base_width / 64) * groups
        stride1, stride2 = (stride, 1) if style == "caffe" else (1, stride)
        self.conv1 = _conv1x1(inplanes, width, stride1, conv_cfg=conv_cfg)
        self.bn1 = build_norm_layer(norm_cfg, width)
        if dcn_cfg is None:
            self.conv2 = _conv3x3(width, width, stride2, dilation, groups, conv_cfg=conv_cfg)
        else:
            self.conv2 = _build_dcn(dcn_cfg, width, stride2, dilation, groups)
        self.bn2 = build_norm_layer(norm_cfg, width)
        self.conv3 = _conv1x1(width, planes * self.expansion, conv_cfg=conv_cfg)
        self.bn3 = build_norm_layer(norm_cfg, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        # position -> names of its plugin modules, in config order (MMDetection's after_conv{1,2,3}_plugin_names)
        self.plugin_names: dict[str, list[str]] = {p: [] for p in PLUGIN_POSITIONS}
        channels = {"after_conv1": width, "after_conv2": width, "after_conv3": planes * self.expansion}
        for plugin in plugins or ():
            name, layer = _build_plugin(plugin, channels[plugin["position"]])
            if hasattr(self, name):
                raise ValueError(f"{plugin.get('key', 'plugins')}: a second plugin named '{name}' in one block; give "
                                 f"each plugin of this type a distinct 'postfix' in its cfg")
            self.add_module(name, layer)
            self.plugin_names[plugin["position"]].append(name)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def _plugins(self, x: torch.Tensor, position: str) -> torch.Tensor:
        for name in self.plugin_names[position]:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self._plugins(self.relu(self.bn1(self.conv1(x))), "after_conv1")
        out = self._plugins(self.relu(self.bn2(self.conv2(out))), "after_conv2")
        out = self._plugins(self.bn3(self.conv3(out)), "after_conv3")
        out += identity  # in place, as torchvision: one allocation less per block
        return self.relu(out)


PLUGIN_POSITIONS = ("after_conv1", "after_conv2", "after_conv3")
_PLUGIN_KEYS = ("cfg", "position", "stages")


def _build_plugin(plugin: dict, channels: int) -> tuple[str, nn.Module]:
    """(module name, module) of one ``{cfg, position[, key]}`` entry for a map of ``channels`` channels."""
    base = current_path()
    key = plugin.get("key", "plugins")
    return build_plugin_layer(plugin["cfg"], channels, f"{base}.{key}.cfg" if base else f"{key}.cfg")


def _stage_plugins(plugins: list[dict] | None, num_stages: int, block) -> list[list[dict]]:
    """Per stage, the ``{cfg, position, key}`` entries of the ``plugins`` flagged for it (MMDetection's
    ``make_stage_plugins``: an entry without ``stages`` goes into every stage).

    Raises:
        ValueError: naming the entry's key: not a dict, an unknown key, a missing / non-dict ``cfg``, an unknown
            ``position``, ``stages`` not of ``num_stages`` booleans; or any plugin on BasicBlock (ResNet-18/34), which
            MMDetection does not support either.
    """
    per_stage: list[list[dict]] = [[] for _ in range(num_stages)]
    if plugins is None:
        return per_stage
    if not isinstance(plugins, (list, tuple)):
        raise ValueError(f"plugins must be a list of {{cfg, position, stages}} entries, got {plugins!r}")
    for i, entry in enumerate(plugins):
        key = f"plugins[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{key} must be a dict with cfg, position and optional stages, got {entry!r}")
        for k in entry:
            if k not in _PLUGIN_KEYS:
                raise ValueError(f"{key}: unknown key '{k}'{closest(k, _PLUGIN_KEYS)} "
                                 f"(valid: {', '.join(_PLUGIN_KEYS)})")
        cfg = entry.get("cfg")
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise ValueError(f"{key}.cfg must be a dict with a 'type' (e.g. {{type: ContextBlock, ratio: 0.0625}}), "
                             f"got {cfg!r}")
        position = entry.get("position")
        if position not in PLUGIN_POSITIONS:
            raise ValueError(f"{key}.position: unknown position {position!r}{closest(position, PLUGIN_POSITIONS)} "
                             f"(valid: {', '.join(PLUGIN_POSITIONS)})")
        stages = entry.get("stages")
        if stages is not None and (not isinstance(stages, (list, tuple)) or len(stages) != num_stages
                                   or not all(isinstance(s, bool) for s in stages)):
            raise ValueError(f"{key}.stages must list {num_stages} booleans (one per stage), got {stages!r}")
        if block is not Bottleneck:
            raise ValueError(f"{key}: plugins go into Bottleneck blocks (depth 50/101/152); {block.__name__} has "
                             f"none (as in MMDetection)")
        for s in range(num_stages):
            if stages is None or stages[s]:
                per_stage[s].append({"cfg": cfg, "position": position, "key": key})
    return per_stage


_DCN_SET_BY_BACKBONE = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                        "bias")


def _build_dcn(dcn_cfg: dict, channels: int, stride: int, dilation: int, groups: int) -> nn.Module:
    """The deformable 3x3 conv of a bottleneck from an ops config such as ``{type: DeformConv2dPack}``."""
    if not isinstance(dcn_cfg, dict) or "type" not in dcn_cfg:
        raise ValueError(f"dcn_cfg must be a dict with a 'type' (e.g. DeformConv2dPack), got {dcn_cfg!r}")
    clash = [k for k in dcn_cfg if k in _DCN_SET_BY_BACKBONE]
    if clash:
        raise ValueError(f"dcn_cfg must not set {', '.join(clash)}: the backbone sets them from the replaced conv")
    import raydet.ops.deform_conv  # noqa: F401  (registers the deformable conv types)

    base = current_path()
    return build(dict(dcn_cfg), f"{base}.dcn_cfg" if base else "dcn_cfg", in_channels=channels,
                 out_channels=channels, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                 groups=groups, bias=False)


_ARCH = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@register
class ResNet(nn.Module):
    """ResNet backbone (He et al., 2016).

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck).
        in_channels: channels of the input image.
        num_stages: residual stages built (1-4); ``layer{i}`` for i = 1..num_stages.
        strides, dilations: per stage (the first ``num_stages`` entries are used).
        out_indices: stages (0-based) whose outputs ``forward`` returns; stage i has stride 4 * 2**i by default.
        style: ``"pytorch"`` (stride in the 3x3 conv of a bottleneck) or ``"caffe"`` (stride in the first 1x1).
        frozen_stages: -1 freezes nothing; k >= 0 freezes the stem (conv1 + bn1) and layer1..layerk
            (``requires_grad`` False, kept in eval mode).
        norm_cfg: see :func:`raydet.models.norm.build_norm_layer`; ``requires_grad`` trains the affine or not.
        norm_eval: keep every BatchNorm in eval mode (frozen statistics) even when the model trains.
        zero_init_residual: gamma of the last norm of each block starts at 0 (each block starts as identity).
            Skipped for norms whose affine is not trainable, where a zero gamma would disable the block for good.
        groups, base_width: grouped 3x3 convs of bottlenecks (ResNeXt); width = floor(planes * base_width / 64) *
            groups.
        dcn_cfg: ops config of a deformable conv, e.g. ``{type: DeformConv2dPack, deform_groups: 1}``, that replaces
            the 3x3 conv of the bottlenecks of the stages flagged in ``stage_with_dcn``.
        stage_with_dcn: per stage, whether its bottlenecks use ``dcn_cfg``.
        init_cfg: ``{type: Pretrained, checkpoint: PATH, prefix: optional}`` loads a local state dict (e.g.
            torchvision's ImageNet weights) after the random init; None keeps the random (Kaiming) init.
        conv_cfg: the type of every conv (stem, blocks, downsample; :func:`~raydet.models.conv.build_conv_layer`),
            e.g. ``{type: ConvWS}`` (Weight Standardization); None: ``nn.Conv2d``. A ``dcn_cfg`` conv stays
            deformable.
        plugins: modules inserted into the bottlenecks (MMDetection's ``plugins``), a list of
            ``{cfg: {type: ContextBlock, ratio: 0.0625}, stages: [false, true, true, true], position: after_conv3}``:
            ``cfg`` a registered plugin (:mod:`raydet.models.plugins`; ``in_channels`` set here, optional
            ``postfix`` to tell two of one type apart), ``position`` after the ReLU of conv1 / conv2
            (``after_conv1`` / ``after_conv2``, the bottleneck width) or after bn3 before the residual sum
            (``after_conv3``, 4 x planes), ``stages`` one flag per stage (omitted: every stage). Several plugins at one
            position run in list order. Each block's plugin is named after its kind (``layer2.0.context_block``,
            ``layer3.1.gen_attention_block``) as in MMDetection, and keeps its own init. Bottleneck depths only.
        base_channels: channels of the stem and of the first stage's bottleneck (``planes`` of stage i is
            base_channels * 2**i; MMDetection's ``base_channels``; 64 in every reference model).

    ``forward(x)``: x (B, in_channels, H, W) -> tuple of feature maps of ``out_indices``; ``out_channels`` lists
    their channel counts.
    """

    arch_settings = _ARCH

    def __init__(self, depth: int, in_channels: int = 3, num_stages: int = 4,
                 strides: tuple[int, ...] = (1, 2, 2, 2), dilations: tuple[int, ...] = (1, 1, 1, 1),
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), style: str = "pytorch", frozen_stages: int = -1,
                 norm_cfg: dict = _DEFAULT_NORM, norm_eval: bool = True, zero_init_residual: bool = True,
                 groups: int = 1, base_width: int = 64, dcn_cfg: dict | None = None,
                 stage_with_dcn: tuple[bool, ...] = (False, False, False, False), init_cfg: dict | None = None,
                 conv_cfg: dict | None = None, plugins: list[dict] | None = None, base_channels: int = 64):
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"invalid depth {depth} for {type(self).__name__}; choose one of "
                             f"{', '.join(map(str, _ARCH))}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be in 1..4, got {num_stages}")
        for name, seq in (("strides", strides), ("dilations", dilations), ("stage_with_dcn", stage_with_dcn)):
            if len(seq) < num_stages:
                raise ValueError(f"{name} has {len(seq)} entries for {num_stages} stages")
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must be non-empty and within 0..{num_stages - 1}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got '{style}'{closest(style, ['pytorch', 'caffe'])}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        if any(stage_with_dcn[:num_stages]) and dcn_cfg is None:
            raise ValueError("stage_with_dcn flags stages but dcn_cfg is not set")
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        self._check_init_cfg(init_cfg)
        stage_plugins = _stage_plugins(plugins, num_stages, _ARCH[depth][0])

        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual
        self.init_cfg = init_cfg

        block, stage_blocks = _ARCH[depth]
        self.conv1 = build_conv_layer(conv_cfg, in_channels, base_channels, kernel_size=7, stride=2, padding=3,
                                      bias=False)
        self.bn1 = build_norm_layer(norm_cfg, base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.stage_names: list[str] = []
        stage_channels = []
        inplanes = base_channels
        for i in range(num_stages):
            planes = base_channels * 2 ** i
            stage = self._make_stage(block, inplanes, planes, stage_blocks[i], strides[i], dilations[i], style,
                                     norm_cfg, dcn_cfg if stage_with_dcn[i] else None, groups, base_width,
                                     conv_cfg=conv_cfg, plugins=stage_plugins[i])
            inplanes = planes * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, stage)
            self.stage_names.append(name)
            stage_channels.append(inplanes)
        self.out_channels = [stage_channels[i] for i in self.out_indices]

        self.init_weights()
        self.train()

    @staticmethod
    def _check_init_cfg(init_cfg: dict | None) -> None:
        if init_cfg is None:
            return
        if not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained":
            kind = init_cfg.get("type") if isinstance(init_cfg, dict) else init_cfg
            raise ValueError(f"init_cfg type must be 'Pretrained', got {kind!r}{closest(kind, ['Pretrained'])}")
        valid = ("type", "checkpoint", "prefix")
        for key in init_cfg:
            if key not in valid:
                raise ValueError(f"unknown key '{key}' of init_cfg{closest(key, valid)} (valid: {', '.join(valid)})")
        if not isinstance(init_cfg.get("checkpoint"), str):
            raise ValueError("init_cfg of type Pretrained needs 'checkpoint': a local file path")

    @staticmethod
    def _make_stage(block, inplanes: int, planes: int, num_blocks: int, stride: int, dilation: int, style: str,
                    norm_cfg: dict, dcn_cfg: dict | None, groups: int, base_width: int,
                    conv_cfg: dict | None = None, plugins: list[dict] | None = None) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(inplanes, planes * block.expansion, stride, conv_cfg=conv_cfg),
                                       build_norm_layer(norm_cfg, planes * block.expansion))
        kwargs = dict(dilation=dilation, style=style, norm_cfg=norm_cfg, dcn_cfg=dcn_cfg, groups=groups,
                      base_width=base_width, conv_cfg=conv_cfg)
        if plugins:
            kwargs["plugins"] = plugins
        layers = [block(inplanes, planes, stride, downsample=downsample, **kwargs)]
        layers += [block(planes * block.expansion, planes, 1, **kwargs) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """Kaiming (fan_out) init of convs, unit/zero norms, zero last gamma per block, each plugin's own init
        (mmcv's: e.g. a zero last conv of a GC block); then ``init_cfg``."""
        dcn_inner = set()
        plugins = [getattr(m, name) for m in self.modules() if isinstance(m, Bottleneck)
                   for names in m.plugin_names.values() for name in names]
        plugin_inner = {id(c) for plugin in plugins for c in plugin.modules()}
        for m in self.modules():
            if isinstance(m, Bottleneck) and not isinstance(m.conv2, nn.Conv2d):
                dcn_inner.update(id(c) for c in m.conv2.modules())
                # The deformable conv's own weight gets the conv init; its offset branch keeps its (zero) init.
                if isinstance(getattr(m.conv2, "weight", None), torch.Tensor):
                    nn.init.kaiming_normal_(m.conv2.weight, mode="fan_out", nonlinearity="relu")
        init_convs_and_norms(self, skip=plugin_inner | dcn_inner)
        if self.zero_init_residual:
            zero_init_last_norms(self, (BasicBlock, Bottleneck))
        for plugin in plugins:
            if hasattr(plugin, "init_weights"):
                plugin.init_weights()
        if self.init_cfg is not None:
            load_pretrained(self, self.init_cfg["checkpoint"], prefix=self.init_cfg.get("prefix"))

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        freeze([self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)])

    def train(self, mode: bool = True) -> "ResNet":
        """Train mode, except that frozen stages and (with ``norm_eval``) all BatchNorms stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            keep_batchnorms_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


@register
class ResNeXt(ResNet):
    """ResNeXt (Xie et al., 2017): ResNet whose bottleneck 3x3 convs have ``groups`` groups of ``base_width``
    channels (at the first stage); ``groups=32, base_width=4`` is "32x4d" (torchvision's resnext50_32x4d).
    Depth 50, 101 or 152. Other arguments as :class:`ResNet`.
    """

    def __init__(self, depth: int, in_channels: int = 3, num_stages: int = 4,
                 strides: tuple[int, ...] = (1, 2, 2, 2), dilations: tuple[int, ...] = (1, 1, 1, 1),
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), style: str = "pytorch", frozen_stages: int = -1,
                 norm_cfg: dict = _DEFAULT_NORM, norm_eval: bool = True, zero_init_residual: bool = True,
                 groups: int = 32, base_width: int = 4, dcn_cfg: dict | None = None,
                 stage_with_dcn: tuple[bool, ...] = (False, False, False, False), init_cfg: dict | None = None,
                 conv_cfg: dict | None = None, plugins: list[dict] | None = None):
        if depth in _ARCH and _ARCH[depth][0] is not Bottleneck:
            raise ValueError(f"ResNeXt needs bottleneck blocks: depth 50, 101 or 152, got {depth}")
        super().__init__(depth, in_channels=in_channels, num_stages=num_stages, strides=strides,
                         dilations=dilations, out_indices=out_indices, style=style, frozen_stages=frozen_stages,
                         norm_cfg=norm_cfg, norm_eval=norm_eval, zero_init_residual=zero_init_residual,
                         groups=groups, base_width=base_width, dcn_cfg=dcn_cfg, stage_with_dcn=stage_with_dcn,
                         init_cfg=init_cfg, conv_cfg=conv_cfg, plugins=plugins)
