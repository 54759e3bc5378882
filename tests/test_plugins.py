"""Backbone plugins: GCNet's global context block (Cao et al. 2019), generalized attention (Zhu et al. 2019), their
places in a ResNet bottleneck, their config errors, and a tiny Faster R-CNN with both that overfits a few images.

Expected values: the GC block's output on a constant input and its multiplicative fusion are written out in scalars
(LayerNorm over one or two values by hand); generalized attention is recomputed with explicit loops over queries,
keys, heads and channels from the paper's four terms (sinusoids of the pixel offsets written out), not with the
module's batched products; a bottleneck's plugin points are recomposed from its layers; AP50 comes from pycocotools.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import raydet.models  # noqa: F401  (registers the components)
from raydet.data.collate import collate_samples
from raydet.models.backbones import ResNet
from raydet.models.plugins import ContextBlock, GeneralizedAttention
from raydet.registry import ConfigError, build
from test_detectors import TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline, shapes  # noqa: F401


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _set(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype).reshape(param.shape))


# ----------------------------------------------------------------------------------------------- GC block

def test_gc_block_on_a_constant_input_attends_uniformly_and_adds_its_transformed_context():
    """C = 4, ratio 0.5 (C' = 2), x = a_c everywhere on a 3 x 5 map. Whatever conv_mask's weights, its logits are
    equal at every position, so the attention is 1/15 each and the context is a. The transform by hand:
    t = W1 a + b1 (two values), LayerNorm over them (mean, biased variance, eps 1e-5, affine), ReLU, W3 . + b3; the
    output is a + that at every position."""
    torch.manual_seed(0)
    block = ContextBlock(4, ratio=0.5)
    x0 = torch.randn(2, 4, 3, 5)
    assert torch.equal(block(x0), x0)  # the zero-initialised last conv: the block starts as the identity
    a = [0.5, -1.0, 2.0, 0.25]
    w1, b1 = [[0.2, -0.1, 0.3, 0.0], [-0.4, 0.5, 0.1, 0.2]], [0.1, -0.2]
    ln_w, ln_b = [1.5, 0.5], [0.2, -0.3]
    w3, b3 = [[1.0, -2.0], [0.5, 0.0], [-1.0, 1.0], [0.0, 3.0]], [0.0, 0.1, -0.1, 0.2]
    _set(block.conv_mask.weight, [0.3, -0.7, 1.1, 0.4])
    _set(block.channel_add_conv[0].weight, w1)
    _set(block.channel_add_conv[0].bias, b1)
    _set(block.channel_add_conv[1].weight, ln_w)
    _set(block.channel_add_conv[1].bias, ln_b)
    _set(block.channel_add_conv[3].weight, w3)
    _set(block.channel_add_conv[3].bias, b3)
    x = torch.tensor(a).view(1, 4, 1, 1).expand(1, 4, 3, 5).contiguous()

    logits = []
    block.conv_mask.register_forward_hook(lambda m, i, o: logits.append(o))
    out = block(x)
    attention = logits[0].flatten(2).softmax(dim=-1)
    torch.testing.assert_close(attention, torch.full((1, 1, 15), 1 / 15))

    t = [sum(w * v for w, v in zip(row, a)) + b for row, b in zip(w1, b1)]
    mean = sum(t) / 2
    var = sum((v - mean) ** 2 for v in t) / 2
    t = [max(0.0, (v - mean) / math.sqrt(var + 1e-5) * g + bb) for v, g, bb in zip(t, ln_w, ln_b)]
    add = [sum(w * v for w, v in zip(row, t)) + b for row, b in zip(w3, b3)]
    expected = torch.tensor([ac + d for ac, d in zip(a, add)]).view(1, 4, 1, 1).expand(1, 4, 3, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_gc_block_attention_pooling_weights_positions_and_fusion_by_multiplication():
    """Attention pooling on two positions: with conv_mask weights (1, 0) and bias 0 the logits are x_0 of each
    position, so the context is sum_j softmax(x_0)_j x_j. Fusion by multiplication with C' = 1: the LayerNorm over
    one value gives its bias beta whatever the context, so the scale is sigmoid(w3 relu(beta) + b3) per channel."""
    block = ContextBlock(2, ratio=0.5, fusion_types=["channel_mul"])
    assert block.channel_add_conv is None and block.planes == 1
    x = torch.tensor([[1.0, 3.0], [2.0, -1.0]]).view(1, 2, 1, 2)  # channel c, position j
    torch.testing.assert_close(block(x), 0.5 * x)  # zero-initialised last conv: sigmoid(0) = 1/2
    _set(block.conv_mask.weight, [1.0, 0.0])
    _set(block.conv_mask.bias, [0.0])
    e = [math.exp(1.0), math.exp(3.0)]
    alpha = [v / sum(e) for v in e]
    context = [alpha[0] * 1.0 + alpha[1] * 3.0, alpha[0] * 2.0 + alpha[1] * -1.0]
    torch.testing.assert_close(block.spatial_pool(x).flatten(), torch.tensor(context))

    _set(block.channel_mul_conv[1].bias, [0.5])
    _set(block.channel_mul_conv[3].weight, [2.0, -1.0])
    _set(block.channel_mul_conv[3].bias, [0.0, 1.0])
    scale = [1 / (1 + math.exp(-(2.0 * 0.5))), 1 / (1 + math.exp(-(-1.0 * 0.5 + 1.0)))]
    expected = torch.tensor([[1.0 * scale[0], 3.0 * scale[0]], [2.0 * scale[1], -1.0 * scale[1]]]).view(1, 2, 1, 2)
    torch.testing.assert_close(block(x), expected)
    avg = ContextBlock(2, ratio=0.5, pooling_type="avg")
    assert not hasattr(avg, "conv_mask")
    torch.testing.assert_close(avg.spatial_pool(x).flatten(), torch.tensor([2.0, 0.5]))


# ------------------------------------------------------------------------------------- generalized attention

def _reference(module: GeneralizedAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's generalized attention with explicit loops (batch 1): for each head m, query (y, x) and key
    (y', x') (strided positions in input pixels), the selected terms of the logit -- z_q . x_k, z_q . r, u . x_k,
    v . r with r = (Wx [sin(o_x / l_i), cos(o_x / l_i)]_i + Wy [..o_y..]) / sqrt(2), l_i = 1000^(4 i / D) --
    masked beyond spatial_range, softmax over the keys, weighted sum of the values, projection, x + gamma out."""
    terms, heads, d = module.terms, module.num_heads, module.qk_embed_dim
    qs, ks, dim = module.q_stride, module.kv_stride, module.position_embedding_dim
    x0 = x[0].double()
    _, height, width = x0.shape
    qpos = [(y, xx) for y in range(0, height, qs) for xx in range(0, width, qs)]
    kpos = [(y, xx) for y in range(0, height, ks) for xx in range(0, width, ks)]

    def conv(layer, p):  # a 1x1 conv (no bias) at pixel p
        return layer.weight.double()[:, :, 0, 0] @ x0[:, p[0], p[1]]

    def embed(offset, fc):
        angles = [offset * module.position_magnitude / 1000.0 ** (4 * i / dim) for i in range(dim // 4)]
        vec = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles], dtype=torch.float64)
        return fc.weight.double() @ vec

    out = torch.zeros(heads * d, len(qpos), dtype=torch.float64)
    for qi, q in enumerate(qpos):
        logits = torch.zeros(heads, len(kpos), dtype=torch.float64)
        for ki, k in enumerate(kpos):
            if module.spatial_range >= 0 and max(abs(q[0] - k[0]), abs(q[1] - k[1])) > module.spatial_range:
                logits[:, ki] = -math.inf
                continue
            if terms[1] or terms[3]:
                r = (embed(q[1] - k[1], module.appr_geom_fc_x) + embed(q[0] - k[0], module.appr_geom_fc_y)) \
                    / math.sqrt(2)
            for m in range(heads):
                sl = slice(m * d, (m + 1) * d)
                total = 0.0
                if terms[0]:
                    total += float(conv(module.query_conv, q)[sl] @ conv(module.key_conv, k)[sl])
                if terms[1]:
                    total += float(conv(module.query_conv, q)[sl] @ r[sl])
                if terms[2]:
                    total += float(module.appr_bias.double()[sl] @ conv(module.key_conv, k)[sl])
                if terms[3]:
                    total += float(module.geom_bias.double()[sl] @ r[sl])
                logits[m, ki] = total
        weights = logits.softmax(dim=1)
        for m in range(heads):
            sl = slice(m * d, (m + 1) * d)
            out[sl, qi] = sum(weights[m, ki] * conv(module.value_conv, k)[sl] for ki, k in enumerate(kpos))
    proj = module.proj_conv.weight.double()[:, :, 0, 0] @ out + module.proj_conv.bias.double()[:, None]
    qh, qw = len(range(0, height, qs)), len(range(0, width, qs))
    return proj.view(1, -1, qh, qw)


def _attention(attention_type: str, **kwargs) -> GeneralizedAttention:
    torch.manual_seed(0)
    module = GeneralizedAttention(4, num_heads=2, attention_type=attention_type, **kwargs)
    _set(module.gamma, [1.0])  # 0 at init: the block starts as the identity
    return module


@pytest.mark.parametrize("kwargs", [{"kv_stride": 1}, {"kv_stride": 2}, {"kv_stride": 1, "spatial_range": 1},
                                    {"kv_stride": 2, "position_magnitude": 3}],
                         ids=["kv1", "kv2", "range1", "magnitude3"])
def test_generalized_attention_terms_one_by_one_and_together_follow_the_paper(kwargs):
    """Each of the four terms alone, the four with one switched off, and all four: the module's output on a
    3 x 4 map (C = 4, 2 heads of 2 channels, D = 4) equals the explicit-loop formula."""
    x = torch.randn(1, 4, 3, 4, generator=torch.Generator().manual_seed(1))
    for kind in ("1000", "0100", "0010", "0001", "0111", "1011", "1101", "1110", "1111"):
        module = _attention(kind, **kwargs)
        with torch.no_grad():
            out, expected = module(x), _reference(module, x)
        torch.testing.assert_close(out.double() - x.double(), expected, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{kind}: {m}")


def test_key_content_only_attention_is_the_same_for_every_query():
    """'0010' (u . x_k): no term depends on the query, so out - x is the same vector at every position, even with
    queries strided and upsampled; '1000' (z_q . x_k) differs between queries."""
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    for q_stride in (1, 2):
        module = _attention("0010", q_stride=q_stride)
        assert not hasattr(module, "query_conv") and not hasattr(module, "appr_geom_fc_x")
        with torch.no_grad():
            delta = module(x) - x
        torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta), rtol=0, atol=1e-6)
    with torch.no_grad():
        delta = _attention("1000")(x) - x
    assert (delta - delta[:, :, :1, :1]).abs().max() > 1e-3


def test_kv_and_q_strides_subsample_keys_and_queries():
    """kv_stride 2 on a 5 x 7 map: keys and values come from rows / columns 0, 2, 4, (6): a 3 x 4 map; q_stride 2:
    queries likewise, and the output is upsampled back to 5 x 7. With q_stride 2 the output at the strided pixels
    equals the explicit formula (bilinear upsampling by an integer factor keeps no source pixel exactly, so those
    are compared before the upsampling)."""
    seen = {}
    module = _attention("1111", kv_stride=2, q_stride=2)
    for name in ("query_conv", "key_conv", "value_conv"):
        getattr(module, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].shape))
    proj = []
    module.proj_conv.register_forward_hook(lambda m, i, o: proj.append(o))
    x = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, expected = module(x), _reference(module, x)
    assert out.shape == x.shape
    assert seen == {"query_conv": (1, 4, 3, 4), "key_conv": (1, 4, 3, 4), "value_conv": (1, 4, 3, 4)}
    torch.testing.assert_close(proj[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_generalized_attention_layers_follow_the_selected_terms():
    """mmcv's layer set per attention_type (so MMDetection's checkpoints load): the query conv only for the query
    terms, the key conv only for the key-content terms, position projections only for the position terms."""
    def names(kind):
        return {k.split(".")[0] for k in GeneralizedAttention(16, num_heads=8, attention_type=kind).state_dict()}
    assert names("0010") == {"key_conv", "value_conv", "appr_bias", "proj_conv", "gamma"}
    assert names("1111") == {"query_conv", "key_conv", "value_conv", "appr_geom_fc_x", "appr_geom_fc_y",
                             "appr_bias", "geom_bias", "proj_conv", "gamma"}
    assert names("0001") == {"value_conv", "appr_geom_fc_x", "appr_geom_fc_y", "geom_bias", "proj_conv", "gamma"}
    module = GeneralizedAttention(16, num_heads=8)
    assert module.appr_geom_fc_x.weight.shape == (16, 8)  # D = C = 16: 8 = D / 2 embedding values per axis
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(module(x), x)  # gamma 0: identity at init


def test_plugins_run_under_bfloat16_autocast():
    """Both modules under CPU autocast (bfloat16 convs and products): finite, same shape, within bfloat16's
    precision of the float32 result."""
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    gc = ContextBlock(16, ratio=0.25)
    nn.init.normal_(gc.channel_add_conv[3].weight)
    ga = GeneralizedAttention(16, num_heads=4, attention_type="1111", kv_stride=2)
    _set(ga.gamma, [1.0])
    for module in (gc, ga):
        with torch.no_grad():
            ref = module(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


# ------------------------------------------------------------------------------------------------ in a ResNet

def _plugin(kind: str, position: str, stages=None, **cfg) -> dict:
    entry = {"cfg": {"type": kind, **cfg}, "position": position}
    if stages is not None:
        entry["stages"] = stages
    return entry


def test_plugin_positions_in_a_bottleneck():
    """A ResNet-50 of base width 8 with a GC block after conv1 and after conv3 (postfixes tell them apart) and a
    generalized attention after conv2, in stage 2 only: the plugins are named and sized as MMDetection's (after
    conv1 / conv2: the bottleneck width 16; after conv3: 4 x 16 = 64), keep their own init (zero last conv, gamma
    0) and sit where the block's forward, recomposed from its layers, puts them."""
    backbone = ResNet(50, base_channels=8, num_stages=2, out_indices=(1,), norm_eval=False, plugins=[
        _plugin("ContextBlock", "after_conv1", [False, True], ratio=0.25, postfix=1),
        _plugin("GeneralizedAttention", "after_conv2", [False, True], num_heads=2, kv_stride=1),
        _plugin("ContextBlock", "after_conv3", [False, True], ratio=0.25, postfix=3)])
    block = backbone.layer2[0]
    assert block.plugin_names == {"after_conv1": ["context_block1"], "after_conv2": ["gen_attention_block"],
                                  "after_conv3": ["context_block3"]}
    assert not any("block" in name for name in dict(backbone.layer1.named_children()))  # stage 1: none
    assert len(backbone.layer1[0].plugin_names["after_conv3"]) == 0
    assert (block.context_block1.in_channels, block.gen_attention_block.in_channels,
            block.context_block3.in_channels) == (16, 16, 64)
    assert not block.context_block3.channel_add_conv[3].weight.any() and block.gen_attention_block.gamma == 0
    assert block.context_block1.conv_mask.weight.std() > 0

    for plugin in (block.context_block1, block.context_block3):
        nn.init.normal_(plugin.channel_add_conv[3].weight)  # make every plugin change its input
    _set(block.gen_attention_block.gamma, [0.5])
    seen = {}
    for name in ("context_block1", "gen_attention_block", "context_block3"):
        getattr(block, name).register_forward_pre_hook(lambda m, i, name=name: seen.__setitem__(name, i[0].clone()))
    backbone.eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        out = block(x)
        h1 = torch.relu(block.bn1(block.conv1(x)))
        torch.testing.assert_close(seen["context_block1"], h1)
        h2 = torch.relu(block.bn2(block.conv2(block.context_block1(h1))))
        torch.testing.assert_close(seen["gen_attention_block"], h2)
        h3 = block.bn3(block.conv3(block.gen_attention_block(h2)))
        torch.testing.assert_close(seen["context_block3"], h3)
        expected = torch.relu(block.context_block3(h3) + block.downsample(x))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("plugins,message", [
    ([_plugin("ContextBlock", "after_conv4", ratio=0.25)],
     r"model\.backbone: building ResNet failed: plugins\[0\]\.position: unknown position 'after_conv4'; "
     r"did you mean 'after_conv3' or .* \(valid: after_conv1, after_conv2, after_conv3\)"),
    ([_plugin("ContextBlock", "after_conv3", [False, True, True], ratio=0.25)],
     r"plugins\[0\]\.stages must list 4 booleans \(one per stage\), got \[False, True, True\]"),
    ([{"cfg": {"type": "ContextBlock", "ratio": 0.25}, "position": "after_conv3", "stage": [True] * 4}],
     r"plugins\[0\]: unknown key 'stage'; did you mean 'stages'\?"),
    ([{"cfg": {"ratio": 0.25}, "position": "after_conv3"}], r"plugins\[0\]\.cfg must be a dict with a 'type'"),
    ([_plugin("ContextBlock", "after_conv3", ratio=0.25, in_channels=8)],
     r"model\.backbone\.plugins\[0\]\.cfg must not set in_channels"),
    ([_plugin("ContextBlok", "after_conv3", ratio=0.25)],
     r"model\.backbone\.plugins\[0\]\.cfg\.type: unknown type 'ContextBlok'; did you mean 'ContextBlock'"),
    ([_plugin("ContextBlock", "after_conv3", ratoi=0.25)],
     r"model\.backbone\.plugins\[0\]\.cfg\.ratoi: unknown argument of ContextBlock; did you mean 'ratio'"),
    ([_plugin("ContextBlock", "after_conv3", ratio=0.25), _plugin("ContextBlock", "after_conv1", ratio=0.25)],
     r"plugins\[1\]: a second plugin named 'context_block' in one block; give each .* a distinct 'postfix'"),
    ([_plugin("ContextBlock", "after_conv3", ratio=0.25, fusion_types=["channel_sum"])],
     r"unknown fusion 'channel_sum'; did you mean 'channel_mul'"),
    ([_plugin("GeneralizedAttention", "after_conv2", attention_type="1112")],
     r"attention_type must be four '0'/'1' characters"),
], ids=["position", "stages", "key", "cfg", "in_channels", "type", "argument", "duplicate", "fusion", "attention"])
def test_bad_plugin_configs_fail_naming_the_key(plugins, message):
    cfg = {"type": "ResNet", "depth": 50, "base_channels": 8, "plugins": plugins}
    with pytest.raises((ValueError, ConfigError), match=message):
        with torch.device("meta"):
            build(cfg, "model.backbone")


def test_plugins_need_bottleneck_blocks():
    """MMDetection's BasicBlock takes no plugins (ResNet-18 / 34)."""
    cfg = {"type": "ResNet", "depth": 18, "plugins": [_plugin("ContextBlock", "after_conv2", ratio=0.25)]}
    with pytest.raises(ConfigError, match=r"model\.backbone: .*plugins\[0\]: plugins go into Bottleneck blocks "
                                          r"\(depth 50/101/152\); BasicBlock has none"):
        build(cfg, "model.backbone")


# ------------------------------------------------------------------------------------------------------ overfitting

# ResNet-50 at base width 16 (stage outputs 64-512 channels, TINY's neck) with a GC block (r4) after conv3 of c3-c5
# and "1111" generalized attention after conv2 of c4-c5, as the GCNet and attention pipelines place them
TINY_PLUGINS = [t for t in TINY if t != "model.backbone.depth=18"] + [
    "model.backbone.depth=50",
    "model.backbone.base_channels=16",
    "model.backbone.plugins=[{cfg: {type: ContextBlock, ratio: 0.25}, stages: [false, true, true, true], "
    "position: after_conv3}, {cfg: {type: GeneralizedAttention, num_heads: 4, attention_type: '1111', "
    "kv_stride: 2}, stages: [false, false, true, true], position: after_conv2}]",
]


def test_faster_rcnn_with_gc_blocks_and_generalized_attention_overfits_a_few_images(shapes):  # noqa: F811
    samples, records = shapes
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_r50_fpn_1x_coco.yaml", TINY_PLUGINS + TINY_RPN + TINY_ROI)
    gc, ga = model.backbone.layer3[0].context_block, model.backbone.layer4[1].gen_attention_block
    assert (gc.in_channels, ga.in_channels) == (256, 128)  # c4: 4 x 64 out; c5: width 128
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, fused=True)  # AP50 1.0 for seeds 0-2 (0.93-0.97 at 35 iterations)
    assert sum(last.values()) < 0.5 * sum(first.values())
    assert gc.channel_add_conv[3].weight.abs().sum() > 0 and ga.gamma.abs() > 0  # the plugins were trained
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
