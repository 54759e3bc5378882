"""Weight Standardization (Qiao et al. 2019): ConvWS's standardised weights, its forward, ``conv_cfg`` reaching every
conv of the GN + WS ("gn_ws-all") pipelines, and a tiny GN + WS Faster R-CNN overfitting a few images.

Expected values: the standardised weights by hand (mean, unbiased std, mmcv's eps 1e-5) and with NumPy; the conv
counts by hand from the layouts (MMDetection's configs/gn+ws); AP50 by pycocotools (through raydet.evaluation).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.models.conv import build_conv_layer
from raydet.models.conv_ws import ConvWS
from test_detectors import PIPELINES, TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline


def _meta_model(name: str, overrides=()) -> nn.Module:
    with torch.device("meta"):
        return load_config(PIPELINES / name, list(overrides)).build("model")


def _count(model: nn.Module, kind: type, exact: bool = False) -> int:
    return sum((type(m) is kind) if exact else isinstance(m, kind) for m in model.modules())


# --------------------------------------------------------------------------------------------------------- ConvWS

def test_convws_standardizes_each_output_channel_by_hand():
    conv = ConvWS(1, 2, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[-2.0, 0.0], [0.0, 2.0]]]]))
    # channel 0: mean 2.5, deviations -1.5, -0.5, 0.5, 1.5: unbiased variance (2.25 + 0.25) x 2 / 3 = 5 / 3
    # channel 1: mean 0, deviations -2, 0, 0, 2: unbiased variance 8 / 3; each divided by std + 1e-5 (mmcv's eps)
    s0, s1 = math.sqrt(5 / 3) + 1e-5, math.sqrt(8 / 3) + 1e-5
    expected = torch.tensor([[[[-1.5 / s0, -0.5 / s0], [0.5 / s0, 1.5 / s0]]], [[[-2 / s1, 0.0], [0.0, 2 / s1]]]])
    w = conv.standardized_weight()
    torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
    flat = w.detach().flatten(1)
    torch.testing.assert_close(flat.mean(dim=1), torch.zeros(2), rtol=0, atol=1e-7)
    # unit std up to eps: std / (std + 1e-5)
    torch.testing.assert_close(flat.std(dim=1), torch.tensor([(s0 - 1e-5) / s0, (s1 - 1e-5) / s1]))
    assert conv.weight[0, 0, 0, 0].item() == 1.0  # the stored parameter stays raw


def test_convws_zero_mean_unit_std_for_every_output_channel_with_numpy():
    torch.manual_seed(0)
    conv = ConvWS(6, 8, 3, groups=2)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 5.0, 8)[:, None, None, None]).add_(torch.arange(8.0)[:, None, None, None])
    # 8 channels of 3 x 3 x 3 = 27 weights; statistics in float64 (the offsets up to 7 leave float32 rounding ~1e-6)
    w = conv.standardized_weight().detach().double().numpy().reshape(8, -1)
    raw = conv.weight.detach().double().numpy().reshape(8, -1)
    np.testing.assert_allclose(w.mean(axis=1), 0.0, atol=1e-5)
    raw_std = raw.std(axis=1, ddof=1)
    np.testing.assert_allclose(w.std(axis=1, ddof=1), raw_std / (raw_std + 1e-5), rtol=1e-5)  # unit up to eps
    np.testing.assert_allclose(w.std(axis=1, ddof=1), 1.0, atol=1e-3)  # the smallest raw std here is ~0.01
    np.testing.assert_allclose(w, (raw - raw.mean(1, keepdims=True)) / (raw.std(1, ddof=1, keepdims=True) + 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_convws_forward_is_conv2d_with_the_standardized_weight():
    torch.manual_seed(0)
    conv = ConvWS(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)
    x = torch.randn(2, 4, 9, 11)
    raw = conv.weight.detach().flatten(1)
    by_hand = ((raw - raw.mean(1, keepdim=True)) / (raw.std(1, keepdim=True) + 1e-5)).view_as(conv.weight)
    expected = F.conv2d(x, by_hand, conv.bias.detach(), stride=2, padding=2, dilation=2, groups=2)
    out = conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    # the standardisation is invariant to scaling and shifting each output channel's raw weights
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.7)
    torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)


def test_convws_keeps_conv2d_names_so_checkpoints_load_either_way():
    plain, ws = nn.Conv2d(3, 4, 3, bias=True), ConvWS(3, 4, 3, bias=True)
    assert isinstance(ws, nn.Conv2d)
    assert list(ws.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
    ws.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(ws.weight, plain.weight)


def test_build_conv_layer_types_and_errors():
    assert type(build_conv_layer(None, 3, 4, 3)) is nn.Conv2d
    assert type(build_conv_layer({"type": "Conv"}, 3, 4, 1, bias=False)) is nn.Conv2d
    ws = build_conv_layer({"type": "ConvWS", "eps": 1e-4}, 3, 4, 3, stride=2, padding=1, bias=False)
    assert isinstance(ws, ConvWS) and ws.eps == 1e-4 and ws.stride == (2, 2) and ws.bias is None
    assert build_conv_layer({"type": "ConvWS"}, 3, 4, 3).eps == 1e-5  # mmcv's default
    with pytest.raises(ValueError, match="unknown conv type 'ConvWs'; did you mean 'ConvWS'"):
        build_conv_layer({"type": "ConvWs"}, 3, 4, 3)
    with pytest.raises(ValueError, match="unknown key 'esp' of conv type ConvWS; did you mean 'eps'"):
        build_conv_layer({"type": "ConvWS", "esp": 1e-5}, 3, 4, 3)
    with pytest.raises(ValueError, match="conv_cfg must be null or a dict with a 'type'"):
        build_conv_layer("ConvWS", 3, 4, 3)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        ConvWS(3, 4, 3, eps=0)


# ----------------------------------------------------------------------------------------------------- pipelines

# ResNet-50: stem 1 + (3 + 4 + 6 + 3) bottlenecks x 3 convs + 4 downsample convs = 53; ResNeXt-101: 1 + (3 + 4 + 23 +
# 3) x 3 + 4 = 104; FPN: 4 lateral + 4 output convs = 8; Shared4Conv1FC box head: 4; FCN mask head: 4.
@pytest.mark.parametrize("name,backbone,mask", [
    ("faster_rcnn_r50_fpn_gn_ws-all_1x_coco.yaml", 53, 0),
    ("mask_rcnn_r50_fpn_gn_ws-all_2x_coco.yaml", 53, 4),
    ("mask_rcnn_x101_32x4d_fpn_gn_ws-all_2x_coco.yaml", 104, 4),
])
def test_conv_cfg_reaches_every_conv_of_the_gn_ws_all_pipelines(name, backbone, mask):
    model = _meta_model(name)
    expected = backbone + 8 + 4 + mask
    assert _count(model, ConvWS) == expected
    assert _count(model.backbone, ConvWS) == backbone and _count(model.neck, ConvWS) == 8
    assert _count(model.roi_head.bbox_head, ConvWS) == 4
    # every ConvWS is followed by its GN (32 groups): one GroupNorm per ConvWS
    assert _count(model, nn.GroupNorm) == expected
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, nn.GroupNorm))
    # the plain convs left: the RPN's 3x3 conv and its two 1x1 outputs (MMDetection's gn_ws-all RPN), the masks'
    # 1x1 logits (the mask head's upsampling is a ConvTranspose2d)
    assert _count(model, nn.Conv2d, exact=True) == 3 + (1 if mask else 0)
    assert type(model.rpn_head.rpn_conv) is nn.Conv2d
    # the RPN head takes conv_cfg too (also with two shared convs)
    with_rpn = _meta_model(name, ["model.rpn_head.conv_cfg={type: ConvWS}", "model.rpn_head.num_convs=2"])
    assert _count(with_rpn, ConvWS) == expected + 2 and _count(with_rpn.rpn_head, ConvWS) == 2


def test_gn_ws_pipeline_without_conv_cfg_is_the_gn_model_with_the_same_names():
    """Switching WS off leaves the same keys and shapes (a ConvWS is an nn.Conv2d): only the conv type changes."""
    ws = _meta_model("mask_rcnn_r50_fpn_gn_ws-all_2x_coco.yaml")
    gn = _meta_model("mask_rcnn_r50_fpn_gn_ws-all_2x_coco.yaml", ["conv_cfg=null"])
    assert _count(gn, ConvWS) == 0
    assert [(k, v.shape) for k, v in ws.state_dict().items()] == [(k, v.shape) for k, v in gn.state_dict().items()]


# ----------------------------------------------------------------------------------------------------- overfitting

def test_tiny_gn_ws_faster_rcnn_overfits_and_runs_under_bf16_autocast():
    """GN + WS on every conv of a ResNet-18 / 64-channel FPN / 4conv1fc Faster R-CNN (32-channel box-head convs, 64
    RoIs per image), on four 96-pixel shapes images: WS doubles the backbone's cost on the CPU, hence the smaller
    images (passes for seeds 0, 1, 2: AP50 1.0, 1.0, 0.98)."""
    from raydet.data.synthetic import make_shapes_dataset

    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=96, width=96, max_objects=3, seed=3)
    records = [r for _, r in samples]
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_r50_fpn_gn_ws-all_1x_coco.yaml", TINY + TINY_RPN + TINY_ROI + [
        "model.roi_head.bbox_head.conv_out_channels=32", "model.roi_head.sampler.num=64"])
    assert _count(model.backbone, ConvWS) == 1 + 8 * 2 + 3  # ResNet-18: stem, 8 basic blocks x 2, 3 downsample
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, lr=3e-3, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        preds = model(batch, mode="predict")
    assert all(torch.isfinite(p["boxes"]).all() and torch.isfinite(p["scores"]).all() for p in preds)
    assert sum(len(p["scores"]) for p in preds) > 0
