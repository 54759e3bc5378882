"""M2Det (Zhao et al. 2019): the TUM's scales, FFMv1 / FFMv2, SFAM's attention, the MLFPN pyramid, the pipelines'
priors and parameter counts, bf16 autocast, and a thin M2Det overfitting a few images.

Expected values: scales and shapes by hand from the paper's Fig. 4 and the authors' code (stride-2 3x3 convs with
padding 1, then one 3x3 valid conv); activations on constant inputs by hand in the comments; parameter counts by a
per-component formula written out here (MODEL_ZOO.md records them); AP50 by pycocotools (through raydet.evaluation).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.models.necks.mlfpn import FFMv1, FFMv2, MLFPN, SFAM, TUM
from test_detectors import _ap, _train, build_from_pipeline, shapes  # noqa: F401  (shapes: the module fixture)

ROOT = Path(__file__).resolve().parents[1]


def _shapes(maps) -> list[tuple[int, ...]]:
    return [tuple(m.shape) for m in maps]


# ------------------------------------------------------------------------------------------------------------ TUM

@pytest.mark.parametrize("size,scales", [(40, [40, 20, 10, 5, 3, 1]), (64, [64, 32, 16, 8, 4, 2])])
def test_tum_output_scales_and_channels(size, scales):
    # 5 encoder convs: 3x3 / 2 with padding 1 (40 -> 20 -> 10 -> 5 -> 3), then 3x3 / 1 valid (3 -> 1); 64 -> ... 4 -> 2
    tum = TUM(in_channels=6, planes=4, num_scales=6).eval()
    outs = tum(torch.randn(2, 6, size, size))
    assert _shapes(outs) == [(2, 4, s, s) for s in scales]
    assert len(tum.layers) == 5 and len(tum.latlayer) == 5 and len(tum.smooth) == 5


def _constant_convs(module: torch.nn.Module, bias: float) -> None:
    """Zero conv weights, BN weight 1 and bias ``bias`` (eval, running mean 0 / var 1): every conv + BN + ReLU
    outputs ``relu(bias / sqrt(1 + eps) * 1 + ...)``, i.e. ``bias`` up to the eps."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 0.0
            torch.nn.init.ones_(m.weight)
            torch.nn.init.constant_(m.bias, bias)


def test_tum_decoder_adds_the_upsampled_map_to_each_lateral_conv():
    # every conv + BN + ReLU gives 1: the decoder starts at toplayer's 1 on the 1x1 map and adds one lateral 1 per
    # finer scale: 1, 2, 3, 4, 5, 6 from the coarsest to the finest; with smoothing, each smoothed output is its
    # 1x1 conv's 1 again while the decoder still adds up the unsmoothed maps
    raw = TUM(in_channels=3, planes=2, num_scales=6, smooth=False).eval()
    _constant_convs(raw, 1.0)
    outs = raw(torch.randn(1, 3, 40, 40))
    for out, value in zip(outs, [6, 5, 4, 3, 2, 1]):
        assert torch.equal(out, torch.full_like(out, float(value)))
    smoothed = TUM(in_channels=3, planes=2, num_scales=6, smooth=True).eval()
    _constant_convs(smoothed, 1.0)
    assert all(torch.equal(o, torch.ones_like(o)) for o in smoothed(torch.randn(1, 3, 40, 40)))


# --------------------------------------------------------------------------------------------------- FFMv1, FFMv2

def test_ffmv1_and_ffmv2_output_shapes():
    # the paper's widths on the meta device (shapes only): conv4_3 (512, 40 x 40) and fc7 (1024, 20 x 20) of a 320
    # input -> 256 + 512 = 768 channels at 40 x 40; FFMv2: 768 -> 128, + the previous TUM's 256 -> 384
    with torch.device("meta"):
        ffm1, ffm2 = FFMv1((512, 1024), (256, 512)), FFMv2(768, 128)
        base = ffm1(torch.empty(2, 512, 40, 40), torch.empty(2, 1024, 20, 20))
        assert tuple(base.shape) == (2, 768, 40, 40) and ffm1.out_channels == 768
        assert tuple(ffm2(base).shape) == (2, 128, 40, 40)
        assert tuple(ffm2(base, torch.empty(2, 256, 40, 40)).shape) == (2, 384, 40, 40)
    # values: the deep map's 1x1 conv output is upsampled by nearest neighbour; constant convs give 1 everywhere
    ffm1 = FFMv1((2, 3), (1, 2)).eval()
    _constant_convs(ffm1, 1.0)
    out = ffm1(torch.randn(1, 2, 6, 6), torch.randn(1, 3, 3, 3))
    assert tuple(out.shape) == (1, 3, 6, 6) and torch.equal(out, torch.ones_like(out))
    ffm2 = FFMv2(3, 2).eval()
    _constant_convs(ffm2, 2.0)
    previous = torch.randn(1, 5, 6, 6)
    fused = ffm2(out, previous)
    assert torch.equal(fused[:, :2], torch.full((1, 2, 6, 6), 2.0)) and torch.equal(fused[:, 2:], previous)


# ------------------------------------------------------------------------------------------------------------- SFAM

def test_sfam_se_attention_on_a_constant_input_by_hand():
    sfam = SFAM(channels=32, num_scales=2, reduction=16)
    assert sfam.fc1[0].out_channels == 2 and sfam.fc2[0].in_channels == 2
    with torch.no_grad():
        for i, (w1, w2) in enumerate([(0.01, 0.5), (-0.01, 1.0)]):
            sfam.fc1[i].weight.fill_(w1)
            sfam.fc1[i].bias.copy_(torch.tensor([0.0, -1.0]))
            sfam.fc2[i].weight.fill_(w2)
            sfam.fc2[i].bias.zero_()
    x = torch.full((1, 32, 5, 5), 2.0)
    out = sfam([x, x.clone()])
    # scale 0: pooled 2 per channel; fc1: 32 x 0.01 x 2 = 0.64 (+0, and -1 -> relu 0); fc2: 0.5 x 0.64 = 0.32 for
    # every channel; out = 2 sigmoid(0.32). Scale 1 (its own block): fc1 -0.64 -> relu 0 both; fc2 0: sigmoid(0) = 1/2
    assert torch.allclose(out[0], torch.full_like(x, 2 / (1 + math.exp(-0.32))), atol=1e-6)
    assert torch.allclose(out[1], torch.full_like(x, 1.0), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ MLFPN

def test_mlfpn_concatenates_the_levels_scale_by_scale():
    torch.manual_seed(0)
    neck = MLFPN(in_channels=(16, 32), reduce_channels=(8, 16), planes=8, num_levels=3, num_scales=4,
                 sfam=False).eval()
    tum_inputs, tum_outputs = [], []

    def record(module, args, out):  # returns None: the output is kept
        tum_inputs.append(args[0])
        tum_outputs.append(out)

    for tum in neck.tums:
        tum.register_forward_hook(record)
    outs = neck((torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)))
    # 3 levels x 8 planes = 24 channels per scale; 16 -> 8 -> 4 (stride 2) -> 2 (3x3 valid)
    assert _shapes(outs) == [(2, 24, s, s) for s in (16, 8, 4, 2)] and neck.out_channels == [24] * 4
    # TUM inputs: the first level gets FFMv2's 4 channels; later ones 4 + the previous level's finest output (8)
    assert [t.shape[1] for t in tum_inputs] == [4, 12, 12]
    for level in (1, 2):
        assert torch.equal(tum_inputs[level][:, 4:], tum_outputs[level - 1][0])
    # scale s is [level 1, level 2, level 3] along the channels; the finest one then goes through the BatchNorm
    for s in (1, 2, 3):
        assert torch.equal(outs[s], torch.cat([tum_outputs[level][s] for level in range(3)], 1))
    assert torch.allclose(outs[0], neck.norm(torch.cat([tum_outputs[level][0] for level in range(3)], 1)))


@pytest.mark.parametrize("name,size,grids,priors", [
    ("m2det320_vgg16_coco", 320, [40, 20, 10, 5, 3, 1], 12_810),
    ("m2det512_vgg16_coco", 512, [64, 32, 16, 8, 4, 2], 32_760)])
def test_pipeline_pyramid_priors_and_parameter_count_by_hand(name, size, grids, priors):
    with torch.device("meta"):  # shapes only; eval: the BatchNorms of the 1 x 1 scale need no batch statistics
        model = build_from_pipeline(f"{name}.yaml").eval()
    assert type(model.neck).__name__ == "MLFPN"
    feats = model.extract_feat(torch.empty(1, 3, size, size, device="meta"))
    # planes x num_levels = 256 x 8 = 2048 channels on each of the 6 scales
    assert _shapes(feats) == [(1, 2048, g, g) for g in grids]
    gen = load_config(ROOT / "pipelines" / f"{name}.yaml").build("model.bbox_head.anchor_generator")
    assert gen.num_base_priors == [6] * 6  # ratios 1, 2, 1/2, 3, 1/3 and the sqrt(min max) square
    assert sum(a.shape[0] for a in gen.grid_anchors([(g, g) for g in grids])) == priors == 6 * sum(g * g for g in grids)

    def conv_bn(cin, cout, k):  # conv without bias + BN (weight, bias)
        return cin * cout * k * k + 2 * cout

    vgg = 20_483_904  # VGG-16 convs 14,714,688 + fc6 4,719,616 + fc7 1,049,600 (tests/test_ssd.py, by hand)
    ffm1 = conv_bn(512, 256, 3) + conv_bn(1024, 512, 1)  # 1,180,160 + 525,312
    leach = 8 * conv_bn(768, 128, 1)

    def tum(cin):  # 5 encoder convs, toplayer, 5 lateral convs (the finest on the input), 5 smoothing convs
        return (2 * conv_bn(cin, 256, 3) + 4 * conv_bn(256, 256, 3) + conv_bn(256, 256, 1)
                + 4 * conv_bn(256, 256, 3) + 5 * conv_bn(256, 256, 1))

    tums = tum(128) + 7 * tum(128 + 256)
    sfam = 6 * ((2048 * 128 + 128) + (128 * 2048 + 2048))  # per scale: 1x1 convs with bias 2048 -> 128 -> 2048
    norm = 2 * 2048  # the BatchNorm on the finest scale
    head = 6 * ((2048 * 9 + 1) * 6 * 81 + (2048 * 9 + 1) * 6 * 4)  # per scale 6 priors x (80 + 1 classes, 4 deltas)
    assert (ffm1, leach, tums, sfam, head) == (1_705_472, 788_480, 53_936_128, 3_158_784, 56_404_980)
    expected = vgg + ffm1 + leach + tums + sfam + norm + head
    count = sum(p.numel() for p in model.parameters())
    assert count == expected == 136_481_844
    text = (ROOT / "MODEL_ZOO.md").read_text()
    assert f"| [`{name}`](pipelines/{name}.yaml) | {count:,} |" in text


def test_m2det_data_pipeline_and_schedule_follow_the_authors():
    from raydet.data import build_transforms
    from raydet.data.pipeline import record_to_sample
    from raydet.data.synthetic import make_shapes_dataset
    from raydet.data.transforms import CollateConfig

    cfg = load_config(ROOT / "pipelines" / "m2det320_vgg16_coco.yaml")
    transforms, collate = build_transforms(cfg["data.train.pipeline"])
    # BGR minus rgb_means (104, 117, 123), std 1 (m2det320_vgg.py); zoom out with p = 0.6 (data_augment.py _expand)
    assert collate == CollateConfig(mean=(104.0, 117.0, 123.0), to_rgb=False)
    assert transforms.transforms[0].prob == 0.6
    (image, record), = make_shapes_dataset(1, height=96, width=128, seed=5)
    out = transforms(record_to_sample(record, image), np.random.default_rng(0))
    assert out["image"].shape == (320, 320, 3)
    # warm-up: 5 epochs of 117,266 images at batch 64 (1,832 iterations each); paper: x0.1 at 90 and 120, 150 epochs
    assert cfg["lr_schedule.warmup_iters"] == 5 * (117_266 // 64) and cfg["lr_schedule.steps"] == [90, 120]
    assert cfg["train.max_epochs"] == 150
    assert cfg["optimizer.lr"] * cfg["lr_schedule.warmup_ratio"] == pytest.approx(1e-6)  # from end_lr 1e-6
    m2det512 = load_config(ROOT / "pipelines" / "m2det512_vgg16_coco.yaml")
    for split in ("train", "test"):
        assert [t["scale"] for t in m2det512[f"data.{split}.pipeline"] if t["type"] == "Resize"] == [[512, 512]]


# ---------------------------------------------------------------------------------------------------- tiny M2Det

# A thin M2Det on 128-pixel images: VGG-16 at 1/8 of the widths (conv4_3 64 channels at 16 x 16, fc7 128 at 8 x 8),
# an MLFPN of 2 levels x 4 scales x 32 planes (16, 8, 4, 2 cells, 64 channels each), priors sized for the 20-64 px
# shapes.
TINY_M2DET = [
    "num_classes=3",
    "model.backbone.base_channels=8",
    "model.backbone.fc_channels=128",
    "model.neck.in_channels=[64, 128]",
    "model.neck.reduce_channels=[32, 64]",
    "model.neck.planes=32",
    "model.neck.num_levels=2",
    "model.neck.num_scales=4",
    "model.bbox_head.in_channels=[64, 64, 64, 64]",
    ("model.bbox_head.anchor_generator={type: SSDAnchorGenerator, strides: [8, 16, 32, 64], input_size: 128, "
     "ratios: [[2, 3], [2, 3], [2, 3], [2, 3]], min_sizes: [12, 24, 48, 80], max_sizes: [24, 48, 80, 112], "
     "clip: true}"),
    "model.bbox_head.test={nms_pre: -1, score_thr: 0.05, nms_iou: 0.45, max_per_img: 100}",
]


def test_tiny_m2det_forward_under_bf16_cpu_autocast(shapes):  # noqa: F811
    samples, _ = shapes
    torch.manual_seed(0)
    model = build_from_pipeline("m2det320_vgg16_coco.yaml", TINY_M2DET)
    batch = collate_samples(samples[:2], size_divisor=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.extract_feat(batch["images"])
        losses = model(batch)
    assert [f.dtype for f in feats] == [torch.bfloat16] * 4 and _shapes(feats) == [(2, 64, s, s) for s in (16, 8, 4, 2)]
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_cls"] > 0


def _recompute_batchnorm_statistics(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Every BatchNorm's running mean / variance set to the statistics of one forward pass over ``images`` ("precise
    BN"): 80 steps are too few for running averages of momentum 0.01 (the authors') to follow the changing weights."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    model.train()
    with torch.no_grad():
        model.extract_feat(images)
    model.eval()


def test_tiny_m2det_overfits_a_few_images(shapes):  # noqa: F811
    samples, records = shapes
    torch.manual_seed(0)
    model = build_from_pipeline("m2det320_vgg16_coco.yaml", TINY_M2DET)
    batch = collate_samples(samples, size_divisor=1)
    first, last = _train(model, batch, 80, fused=True)
    assert sum(last.values()) < 0.2 * sum(first.values())
    _recompute_batchnorm_statistics(model, batch["images"])
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
