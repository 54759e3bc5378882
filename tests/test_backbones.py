"""ResNet / ResNeXt backbones, norm layers, pretrained loading and FPN, checked against torchvision."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from raydet.models.backbones.resnet import ResNet, ResNeXt
from raydet.models.necks.fpn import FPN
from raydet.models.norm import build_norm_layer, convert_sync_batchnorm
from raydet.models.pretrained import load_pretrained
from raydet.registry import build


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP sync overhead (slow on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tv_backbone_params(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("fc."))


def tv_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """torchvision ResNet's layer1..layer4 outputs, computed module by module."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        outs.append(x)
    return outs


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine, so that a wrong BN mapping shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def tv_resnet18_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    randomise_bn(model)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def tv_resnet50_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    randomise_bn(model)
    path = tmp_path_factory.mktemp("ckpt") / "resnet50.pth"
    torch.save(model.state_dict(), path)
    return model, path


# ------------------------------------------------------------------------------------------------- structure

@pytest.mark.parametrize("ours, theirs", [
    (lambda: ResNet(18), torchvision.models.resnet18),
    (lambda: ResNet(50), torchvision.models.resnet50),
    (lambda: ResNeXt(50, groups=32, base_width=4), torchvision.models.resnext50_32x4d),
])
def test_parameter_count_and_names_match_torchvision(ours, theirs):
    model, ref = ours(), theirs(weights=None)
    assert n_params(model) == tv_backbone_params(ref)
    ref_keys = {k for k in ref.state_dict() if not k.startswith("fc.")}
    assert set(model.state_dict()) == ref_keys


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_output_strides_and_channels(depth, channels):
    model = ResNet(depth).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 32, 64))
    assert [o.shape[1] for o in outs] == channels
    assert [tuple(o.shape[-2:]) for o in outs] == [(32 // s, 64 // s) for s in (4, 8, 16, 32)]
    sub = ResNet(depth, out_indices=(1, 3)).eval()
    assert sub.out_channels == [channels[1], channels[3]]
    with torch.no_grad():
        assert [o.shape[1] for o in sub(torch.rand(1, 3, 32, 32))] == [channels[1], channels[3]]


def test_style_puts_stride_in_3x3_or_first_1x1():
    pytorch, caffe = ResNet(50, style="pytorch"), ResNet(50, style="caffe")
    for name in ("layer2", "layer3", "layer4"):
        first_p, first_c = getattr(pytorch, name)[0], getattr(caffe, name)[0]
        assert (first_p.conv1.stride, first_p.conv2.stride) == ((1, 1), (2, 2))
        assert (first_c.conv1.stride, first_c.conv2.stride) == ((2, 2), (1, 1))
        assert first_p.downsample[0].stride == first_c.downsample[0].stride == (2, 2)
    assert pytorch.layer1[0].conv1.stride == pytorch.layer1[0].conv2.stride == (1, 1)
    assert caffe.layer1[0].conv1.stride == (1, 1)


def test_resnext_width():
    model = ResNeXt(50, groups=32, base_width=4)
    # width = floor(planes * 4 / 64) * 32: 128, 256, 512, 1024 for planes 64..512
    assert [getattr(model, f"layer{i}")[0].conv2.in_channels for i in (1, 2, 3, 4)] == [128, 256, 512, 1024]
    assert model.layer1[0].conv2.groups == 32
    assert model.out_channels == [256, 512, 1024, 2048]


def test_bad_depth_and_arguments():
    with pytest.raises(ValueError, match="invalid depth 42 .*18, 34, 50, 101, 152"):
        ResNet(42)
    with pytest.raises(ValueError, match="ResNeXt needs bottleneck blocks"):
        ResNeXt(18)
    with pytest.raises(ValueError, match="did you mean 'caffe'"):
        ResNet(18, style="cafe")
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(18, out_indices=(4,))
    with pytest.raises(ValueError, match="did you mean 'Pretrained'"):
        ResNet(18, init_cfg={"type": "Pretrain", "checkpoint": "x.pth"})


def test_zero_init_residual_and_kaiming():
    torch.manual_seed(0)
    model = ResNet(50)
    blocks = [b for name in model.stage_names for b in getattr(model, name)]
    assert all(float(b.bn3.weight.detach().abs().max()) == 0 for b in blocks)
    assert all(bool((b.bn2.weight == 1).all()) for b in blocks)
    plain = ResNet(50, zero_init_residual=False)
    assert all(bool((b.bn3.weight == 1).all()) for name in plain.stage_names for b in getattr(plain, name))
    w = model.layer4[0].conv2.weight  # kaiming normal, fan_out = 512 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)


# ------------------------------------------------------------------------------------------------ pretrained

@pytest.mark.parametrize("depth, ckpt", [(18, "tv_resnet18_ckpt"), (50, "tv_resnet50_ckpt")])
def test_torchvision_checkpoint_loads_and_matches_features(depth, ckpt, request):
    ref, path = request.getfixturevalue(ckpt)
    model = build({"type": "ResNet", "depth": depth, "init_cfg": {"type": "Pretrained", "checkpoint": str(path)}})
    model.eval()
    x = torch.randn(1, 3, 64 if depth == 18 else 48, 64)
    with torch.no_grad():
        ours, theirs = model(x), tv_features(ref, x)
    assert len(ours) == 4
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_wrapped_checkpoint_with_module_and_prefix(tv_resnet18_ckpt, tmp_path):
    ref, _ = tv_resnet18_ckpt
    wrapped = {"meta": {"epoch": 12},
               "state_dict": {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}}
    wrapped["state_dict"]["module.neck.conv.weight"] = torch.zeros(1)
    path = tmp_path / "detector.pth"
    torch.save(wrapped, path)
    model = ResNet(18, init_cfg={"type": "Pretrained", "checkpoint": str(path), "prefix": "backbone"}).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], tv_features(ref, x)[-1])
    missing, unexpected = load_pretrained(ResNet(18), str(path), prefix="backbone.")
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    with pytest.raises(ValueError, match="no key of .* starts with prefix 'head.'"):
        load_pretrained(ResNet(18), str(path), prefix="head.")


def test_frozen_bn_loads_torchvision_bn(tv_resnet18_ckpt):
    ref, path = tv_resnet18_ckpt
    model = ResNet(18, norm_cfg={"type": "FrozenBN"}, init_cfg={"type": "Pretrained", "checkpoint": str(path)})
    assert isinstance(model.bn1, FrozenBatchNorm2d) and not batchnorms(model)
    model.train()  # FrozenBN ignores the mode
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), tv_features(ref, x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_missing_checkpoint_file(tmp_path):
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        ResNet(18, init_cfg={"type": "Pretrained", "checkpoint": str(path)})


def test_shape_mismatch_lists_both_shapes(tv_resnet50_ckpt):
    _, path = tv_resnet50_ckpt
    with pytest.raises(ValueError) as info:
        load_pretrained(ResNet(18), str(path))
    msg = str(info.value)
    assert "layer1.0.conv1.weight: checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in msg
    assert "layer4.0.downsample.0.weight: checkpoint (2048, 1024, 1, 1) vs model (512, 256, 1, 1)" in msg


def test_shape_mismatch_skipped_without_strict_shapes(tv_resnet18_ckpt):
    ref, path = tv_resnet18_ckpt
    model = ResNet(18, in_channels=4)  # conv1 (64, 4, 7, 7) vs (64, 3, 7, 7)
    missing, unexpected = load_pretrained(model, str(path), strict_shapes=False)
    assert missing == ["conv1.weight"] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_no_matching_key(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="no key of .*other.pth matches ResNet; is this the right checkpoint"):
        load_pretrained(ResNet(18), str(path))


# ----------------------------------------------------------------------------------------- norms and freezing

def test_frozen_stages_and_norm_eval():
    model = ResNet(18, frozen_stages=1, norm_eval=False)
    frozen = ("conv1.", "bn1.", "layer1.")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    model.train()
    assert not model.bn1.training and not any(m.training for m in batchnorms(model.layer1))
    assert all(m.training for m in batchnorms(model.layer2))
    before1 = model.layer1[0].bn1.running_mean.clone()
    before2 = model.layer2[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer1[0].bn1.running_mean, before1)
    assert not torch.equal(model.layer2[0].bn1.running_mean, before2)


def test_norm_eval_keeps_every_bn_in_eval():
    model = ResNet(18, norm_eval=True).train()
    assert model.training and all(not m.training for m in batchnorms(model))
    before = [m.running_mean.clone() for m in batchnorms(model)]
    model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(m.running_mean, b) for m, b in zip(batchnorms(model), before))


@pytest.mark.parametrize("norm_eval, requires_grad", [(False, True), (True, False), (True, True)])
def test_table6_bn_switches(norm_eval, requires_grad):
    model = ResNet(18, norm_eval=norm_eval, norm_cfg={"type": "BN", "requires_grad": requires_grad}).train()
    bns = batchnorms(model)
    assert len(bns) == 1 + 2 * 8 + 3  # stem, two per BasicBlock, three downsamples
    assert all(m.training == (not norm_eval) for m in bns)
    assert all(m.weight.requires_grad == requires_grad and m.bias.requires_grad == requires_grad for m in bns)
    assert all(m.weight.requires_grad for m in model.modules() if isinstance(m, nn.Conv2d))


def test_gn_and_frozen_bn_build():
    gn = ResNet(50, norm_cfg={"type": "GN", "num_groups": 32}).train()
    assert isinstance(gn.layer1[0].bn1, nn.GroupNorm) and gn.layer1[0].bn1.num_groups == 32
    assert not batchnorms(gn)
    assert [o.shape[1] for o in gn(torch.randn(1, 3, 32, 32))] == [256, 512, 1024, 2048]

    frozen = ResNet(18, norm_cfg={"type": "FrozenBN"}, frozen_stages=-1)
    assert all(not isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in frozen.modules())
    conv_params = sum(n_params(m) for m in frozen.modules() if isinstance(m, nn.Conv2d))
    assert n_params(frozen) == conv_params  # the norms hold buffers only
    layer = frozen.layer1[0].bn1
    before = layer.running_mean.clone()
    frozen.train()(torch.randn(2, 3, 32, 32))
    assert torch.equal(layer.running_mean, before)


def test_build_norm_layer_types_and_errors():
    bn = build_norm_layer({"type": "BN", "eps": 1e-3, "momentum": 0.01}, 8)
    assert isinstance(bn, nn.BatchNorm2d) and bn.eps == 1e-3 and bn.momentum == 0.01
    assert isinstance(build_norm_layer({"type": "SyncBN"}, 8), nn.SyncBatchNorm)
    gn = build_norm_layer({"type": "GN", "num_groups": 4, "requires_grad": False}, 8)
    assert isinstance(gn, nn.GroupNorm) and not gn.weight.requires_grad and not gn.bias.requires_grad
    with pytest.raises(ValueError, match="did you mean 'SyncBN'"):
        build_norm_layer({"type": "SyncBn"}, 8)
    with pytest.raises(ValueError, match="did you mean 'momentum'"):
        build_norm_layer({"type": "BN", "momentun": 0.1}, 8)
    with pytest.raises(ValueError, match="num_groups"):
        build_norm_layer({"type": "GN"}, 8)
    with pytest.raises(ValueError, match="divisor of 10"):
        build_norm_layer({"type": "GN", "num_groups": 4}, 10)


def test_convert_sync_batchnorm_keeps_switches():
    model = convert_sync_batchnorm(ResNet(18, frozen_stages=1, norm_cfg={"type": "BN", "requires_grad": False}))
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 20 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.train()
    assert all(not m.training for m in syncs) and all(not m.weight.requires_grad for m in syncs)


# ---------------------------------------------------------------------------------------------------- DCN

def test_dcn_stages_start_as_plain_convs():
    from raydet.ops.deform_conv import DeformConv2dPack

    torch.manual_seed(0)
    plain = ResNet(50, zero_init_residual=False).eval()
    randomise_bn(plain)
    dcn = build({"type": "ResNet", "depth": 50, "zero_init_residual": False,
                 "dcn_cfg": {"type": "DeformConv2dPack", "deform_groups": 1},
                 "stage_with_dcn": [False, True, True, True]}).eval()
    assert not isinstance(dcn.layer1[0].conv2, DeformConv2dPack)
    assert all(isinstance(b.conv2, DeformConv2dPack) for name in ("layer2", "layer3", "layer4")
               for b in getattr(dcn, name))
    conv = dcn.layer2[0].conv2
    assert (conv.stride, conv.padding, conv.bias) == ((2, 2), (1, 1), None)
    # Kaiming init of the deformable weight, zero offsets.
    assert dcn.layer4[0].conv2.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)
    assert not dcn.layer4[0].conv2.conv_offset.weight.detach().any()

    result = dcn.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all("conv_offset" in k for k in result.missing_keys)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(dcn(x), plain(x)):  # float sums in another order: relative to the map's scale
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
        dcn.layer3[0].conv2.conv_offset.bias.fill_(0.5)  # the offsets are really used
        assert not torch.allclose(dcn(x)[2], plain(x)[2], atol=1e-3)


def test_dcn_errors():
    with pytest.raises(ValueError, match="Bottleneck"):
        ResNet(18, dcn_cfg={"type": "DeformConv2dPack"}, stage_with_dcn=(False, True, False, False))
    with pytest.raises(ValueError, match="dcn_cfg is not set"):
        ResNet(50, stage_with_dcn=(False, True, False, False))


# ---------------------------------------------------------------------------------------------------- FPN

def copy_fpn_weights(ours: FPN, ref: FeaturePyramidNetwork) -> None:
    pairs = [(a[0], b[0]) for a, b in zip(ours.lateral_convs, ref.inner_blocks)]
    pairs += [(a[0], b[0]) for a, b in zip(ours.fpn_convs, ref.layer_blocks)]
    if isinstance(ref.extra_blocks, LastLevelP6P7):
        pairs += [(ours.extra_convs[0][0], ref.extra_blocks.p6), (ours.extra_convs[1][0], ref.extra_blocks.p7)]
    with torch.no_grad():
        for a, b in pairs:
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)


def feature_maps(channels, sizes):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes))


def test_fpn_faster_rcnn_matches_torchvision():
    chans = [256, 512, 1024, 2048]
    fpn = build({"type": "FPN", "in_channels": chans, "out_channels": 256, "num_outs": 5})
    ref = FeaturePyramidNetwork(chans, 256, extra_blocks=LastLevelMaxPool())
    assert n_params(fpn) == n_params(ref)
    copy_fpn_weights(fpn, ref)
    # Odd sizes (a 100x76 image): the upsampled maps must be cut to the exact finer size.
    feats = feature_maps(chans, [(25, 19), (13, 10), (7, 5), (4, 3)])
    with torch.no_grad():
        outs = fpn(feats)
        expected = list(ref(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
    assert [tuple(o.shape) for o in outs] == [(1, 256, 25, 19), (1, 256, 13, 10), (1, 256, 7, 5), (1, 256, 4, 3),
                                              (1, 256, 2, 2)]
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fpn_retinanet_matches_torchvision():
    chans = [256, 512, 1024, 2048]
    fpn = FPN(chans, 256, num_outs=5, start_level=1, add_extra_convs="on_input", relu_before_extra_convs=True)
    assert fpn.extra_convs[0][0].in_channels == 2048 and fpn.extra_convs[1][0].in_channels == 256
    ref = FeaturePyramidNetwork(chans[1:], 256, extra_blocks=LastLevelP6P7(2048, 256))
    assert n_params(fpn) == n_params(ref)
    copy_fpn_weights(fpn, ref)
    feats = feature_maps(chans, [(16, 16), (8, 8), (4, 4), (2, 2)])
    with torch.no_grad():
        outs = fpn(feats)
        expected = list(ref(OrderedDict((str(i), f) for i, f in enumerate(feats[1:]))).values())
        no_relu = FPN(chans, 256, num_outs=5, start_level=1, add_extra_convs="on_input")
        no_relu.load_state_dict(fpn.state_dict())
        outs_no_relu = no_relu(feats)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # P3-P7
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs_no_relu[3], outs[3])  # P6 from C5 either way
    assert not torch.allclose(outs_no_relu[4], outs[4])  # P7 sees relu(P6) only with the switch


def test_fpn_extra_sources_and_init():
    chans = [64, 128, 256, 512]
    on_output = FPN(chans, 32, num_outs=6, add_extra_convs="on_output")
    assert [c[0].in_channels for c in on_output.extra_convs] == [32, 32]
    assert len(on_output(feature_maps(chans, [(16, 16), (8, 8), (4, 4), (2, 2)]))) == 6
    on_lateral = FPN(chans, 32, num_outs=5, add_extra_convs=True)  # True = on_input
    assert on_lateral.add_extra_convs == "on_input" and on_lateral.extra_convs[0][0].in_channels == 512
    for m in on_output.modules():
        if isinstance(m, nn.Conv2d):
            fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
            assert float(m.weight.detach().abs().max()) <= math.sqrt(6 / (fan_in + fan_out))
            assert not m.bias.detach().any()
    gn = FPN(chans, 32, num_outs=4, norm_cfg={"type": "GN", "num_groups": 8})
    assert gn.lateral_convs[0][0].bias is None and isinstance(gn.lateral_convs[0][1], nn.GroupNorm)


def test_fpn_errors():
    with pytest.raises(ValueError, match="fewer than the 4 backbone levels"):
        FPN([8, 16, 32, 64], 8, num_outs=3)
    with pytest.raises(ValueError, match="num_outs must equal 2"):
        FPN([8, 16, 32, 64], 8, num_outs=3, start_level=1, end_level=2)
    with pytest.raises(ValueError, match="did you mean 'on_output'"):
        FPN([8, 16], 8, num_outs=3, add_extra_convs="on_outputs")
