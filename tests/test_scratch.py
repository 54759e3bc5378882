"""Training from scratch: the "Rethinking ImageNet Pre-training" pipelines (He et al. 2019; GN everywhere, random
init, nothing frozen) and ScratchDet (Zhu et al. 2019; BN everywhere, the Root-ResNet backbone, on SSD).

Expected values: feature-map sizes and parameter counts by hand (the residual stages against torchvision's
ResNet-18); which parameters get weight decay by counting the GN layers; AP50 by pycocotools (through
raydet.evaluation).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import raydet.models  # noqa: F401  (registers the components)
import raydet.models.backbones.resnet as resnet_module
import raydet.models.backbones.root_resnet as root_resnet_module
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import make_shapes_dataset
from raydet.engine.optim import param_groups, parse_optimizer
from raydet.models.backbones import RootResNet
from test_detectors import PIPELINES, TINY, _ap, _train, build_from_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ["faster_rcnn_r50_fpn_gn_scratch_6x_coco.yaml", "mask_rcnn_r50_fpn_gn_scratch_6x_coco.yaml"]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture
def no_pretrained_load(monkeypatch):
    """Any pretrained-weight load while building fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a pretrained checkpoint was loaded: {args[1:]}")

    monkeypatch.setattr(resnet_module, "load_pretrained", refuse)
    monkeypatch.setattr(root_resnet_module, "load_pretrained", refuse)


# ---------------------------------------------------------------------------------- Rethinking ImageNet Pre-training

@pytest.mark.parametrize("name", SCRATCH)
def test_scratch_pipelines_start_random_with_every_layer_trainable(name, no_pretrained_load):
    with torch.device("meta"):
        model = load_config(PIPELINES / name).build("model")
    backbone = model.backbone
    assert backbone.init_cfg is None and backbone.frozen_stages == -1
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())  # no stage or norm held in eval mode
    # GN everywhere, no BatchNorm: backbone 53 (1 stem + 16 blocks x 3 + 4 downsample), FPN 8, box head 4 [+ mask 4]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    num_gn = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert num_gn == 53 + 8 + 4 + (4 if name.startswith("mask") else 0)


def test_scratch_backbone_random_init_keeps_unit_gammas_and_its_optimizer_skips_norm_decay(no_pretrained_load):
    torch.manual_seed(0)
    name = SCRATCH[0]
    model = build_from_pipeline(name, TINY[:2])  # ResNet-18 (BasicBlocks, GN 32), real tensors
    # zero_init_residual false: every GN starts at weight 1, bias 0 (the last norm of each block included)
    gns = [m for m in model.backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 1 + 8 * 2 + 3 and all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in gns)
    # the convs are random (Kaiming, fan_out): not a constant, std about sqrt(2 / fan_out) = sqrt(2 / (64 x 49))
    std = float(model.backbone.conv1.weight.detach().std())
    assert abs(std - (2 / (64 * 49)) ** 0.5) < 0.1 * (2 / (64 * 49)) ** 0.5
    # paramwise_cfg norm_decay_mult 0: the GN weights and biases (2 per GN) get no weight decay, all else 1e-4
    cfg = load_config(PIPELINES / name, TINY[:2])
    opt = parse_optimizer(cfg["optimizer"])
    groups = param_groups(model, opt.lr, opt.weight_decay, opt.paramwise_cfg)
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    all_gn = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(no_decay) == 2 * len(all_gn) == 2 * (20 + 8 + 4)
    assert {g["weight_decay"] for g in groups} == {0.0, 1e-4}


# ------------------------------------------------------------------------------------------------- Root-ResNet

def test_root_resnet_keeps_the_input_resolution_in_its_root_block():
    net = RootResNet(depth=18, stem_channels=8, base_channels=8)
    convs = [m for m in net.stem if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding, c.bias) for c in convs] == [((3, 3), (1, 1), (1, 1), None)] * 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.stem) == 3
    x = torch.randn(2, 3, 75, 75)
    assert tuple(net.stem(x).shape) == (2, 8, 75, 75)  # 3x3, stride 1, padding 1: 75 -> 75
    # then the 2x2 max-pool floor(75 / 2) = 37; layer1 keeps 37; the stride-2 3x3 convs (padding 1) map n to
    # floor((n - 1) / 2) + 1: 37 -> 19 -> 10 -> 5
    net.out_indices = (0, 1, 2, 3)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 37, 37), (2, 16, 19, 19), (2, 32, 10, 10), (2, 64, 5, 5)]


def test_root_resnet18_gives_ssd300s_38_and_19_maps():
    with torch.device("meta"):
        net = RootResNet(depth=18)
        outs = net(torch.zeros(1, 3, 300, 300))
    # 300 -> pool 150 -> layer1 150 -> 75 -> 38 -> 19; out_indices (2, 3): 256 and 512 channels
    assert [tuple(o.shape) for o in outs] == [(1, 256, 38, 38), (1, 512, 19, 19)] and net.out_channels == [256, 512]
    with pytest.raises(ValueError, match="out_indices"):
        RootResNet(depth=18, out_indices=(4,))
    with pytest.raises(ValueError, match="invalid depth 19"):
        RootResNet(depth=19)


# --------------------------------------------------------------------------------------------------- ScratchDet

def test_scratchdet300_has_bn_after_every_conv_and_the_papers_parameter_count(no_pretrained_load):
    from torchvision.models import resnet18

    name = "scratchdet300_root_resnet18_coco.yaml"
    with torch.device("meta"):
        model = load_config(PIPELINES / name).build("model")
    # BN on every conv (none with a bias): backbone 3 root + 16 block + 3 downsample, 4 x 2 extra, 6 x 2 head convs
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 22 + 8 + 12 == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(c.bias is None for c in convs)
    assert model.backbone.frozen_stages == -1 and model.backbone.init_cfg is None and not model.backbone.norm_eval
    assert all(p.requires_grad for p in model.parameters())
    # by hand: root block 3 x 3 x 3 x 64 + 2 x 64 x 64 x 9 + 3 BN x 128; the residual stages are torchvision's
    # ResNet-18 less fc, conv1 (7x7) and bn1
    tv = resnet18()
    stages = _num_params(tv) - _num_params(tv.fc) - _num_params(tv.conv1) - _num_params(tv.bn1)
    root = 3 * 9 * 64 + 2 * 64 * 64 * 9 + 3 * 128
    assert _num_params(model.backbone) == root + stages == 75_840 + 11_166_976
    # extra levels (1x1 then 3x3, each + BN): 512 -> 256 -> 512, 512 -> 128 -> 256, twice 256 -> 128 -> 256
    extra = sum(a * b * k + 2 * b for a, b, k in [(512, 256, 1), (256, 512, 9), (512, 128, 1), (128, 256, 9),
                                                  (256, 128, 1), (128, 256, 9), (256, 128, 1), (128, 256, 9)])
    assert _num_params(model.neck) == extra == 2_330_368
    # head: per level A x (C_in x 9 + 2 BN) x (81 class slots + 4 deltas)
    head = sum(a * (c * 9 + 2) * 85 for a, c in zip([4, 6, 6, 6, 4, 4], [256, 512, 512, 256, 256, 256]))
    assert _num_params(model.bbox_head) == head == 8_230_380
    total = _num_params(model)
    assert total == root + stages + extra + head == 21_803_564
    row = f"| [`{Path(name).stem}`](pipelines/{name}) | {total:,} |"
    assert row in (ROOT / "MODEL_ZOO.md").read_text(), row


# A ScratchDet-style SSD at 1/8 of the widths on 128-pixel images: root block and stages of 8 / 8, 16, 32, 64
# channels (maps 64 -> 64, 32, 16, 8 after the pool), two extra levels (4, 2), priors as tests/test_ssd.py's TINY_SSD.
TINY_SCRATCHDET = [
    "num_classes=3",
    "model.backbone.stem_channels=8",
    "model.backbone.base_channels=8",
    "model.neck.in_channels=[32, 64]",
    "model.neck.out_channels=[32, 64, 32, 32]",
    "model.neck.level_strides=[2, 2]",
    "model.neck.level_paddings=[1, 1]",
    "model.bbox_head.in_channels=[32, 64, 32, 32]",
    ("model.bbox_head.anchor_generator={type: SSDAnchorGenerator, strides: [8, 16, 32, 64], "
     "ratios: [[2], [2, 3], [2, 3], [2]], min_sizes: [12, 24, 48, 80], max_sizes: [24, 48, 80, 112]}"),
]


def test_tiny_scratchdet_overfits_from_random_init_and_runs_under_bf16_autocast(no_pretrained_load):
    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3)
    records = [r for _, r in samples]
    torch.manual_seed(0)
    model = build_from_pipeline("scratchdet300_root_resnet18_coco.yaml", TINY_SCRATCHDET)
    assert model.backbone.init_cfg is None and all(p.requires_grad for p in model.parameters())
    batch = collate_samples(samples, size_divisor=1)
    first, last = _train(model, batch, 80, lr=3e-3, fused=True)
    # the head's BN normalises the logits over the batch in train mode, which bounds how low the loss gets (about
    # 0.15 of the first; seeds 0, 1, 2 all reach AP50 1.0)
    assert sum(last.values()) < 0.25 * sum(first.values())
    metrics = _ap(model, batch, records)  # eval mode: the BN running statistics
    assert metrics["bbox/AP50"] > 0.9, metrics
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(batch, mode="predict")
    assert all(torch.isfinite(p["boxes"]).all() and torch.isfinite(p["scores"]).all() for p in preds)
    assert sum(len(p["scores"]) for p in preds) > 0
