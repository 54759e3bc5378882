"""HRNet (Sun et al. 2019): the backbone's branches, its multi-resolution fusion, the HRFPN neck, loading the official
ImageNet checkpoints' names, and a tiny HRNet Faster R-CNN that overfits a few images.

Expected values: the branch strides and widths are the paper's (Sec. 3-4: strides 4, 8, 16, 32; HRNetV2-W18 widths
18, 36, 72, 144); the fusion of a module whose branches are identities is written out with strided slices and
repeated pixels (the paper's Fig. 3 rule); HRFPN's levels are block means / maxima of the reduced map and a bilinear
upsampling written from its align_corners=False formula; the checkpoint keys of the official classifier are those of
HRNet-Image-Classification's ``cls_hrnet.py`` head; AP50 comes from pycocotools.
"""
from __future__ import annotations


import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import CLASSES
from raydet.evaluation import coco_from_records, evaluate_coco, predictions_to_coco_results
from raydet.models.backbones import HRNet
from raydet.models.backbones.hrnet import CLASSIFIER_PREFIXES, HRModule, load_hrnet_imagenet
from raydet.models.backbones.resnet import BasicBlock
from raydet.models.necks import HRFPN
from test_detectors import PIPELINES, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline, shapes  # noqa: F401

# HRNetV2 at widths 8 / 16 / 32 / 64, one module of one block per stage (stage 1: one bottleneck of width 16)
TINY_EXTRA = {"stage1": {"num_modules": 1, "num_branches": 1, "block": "BOTTLENECK", "num_blocks": [1],
                         "num_channels": [16]},
              "stage2": {"num_modules": 1, "num_branches": 2, "block": "BASIC", "num_blocks": [1, 1],
                         "num_channels": [8, 16]},
              "stage3": {"num_modules": 1, "num_branches": 3, "block": "BASIC", "num_blocks": [1, 1, 1],
                         "num_channels": [8, 16, 32]},
              "stage4": {"num_modules": 1, "num_branches": 4, "block": "BASIC", "num_blocks": [1, 1, 1, 1],
                         "num_channels": [8, 16, 32, 64]}}
TINY_HRNET = [
    "num_classes=3",
    "model.backbone.extra={stage1: {num_blocks: [1], num_channels: [16]}, stage2: {num_blocks: [1, 1], "
    "num_channels: [8, 16]}, stage3: {num_modules: 1, num_blocks: [1, 1, 1], num_channels: [8, 16, 32]}, "
    "stage4: {num_modules: 1, num_blocks: [1, 1, 1, 1], num_channels: [8, 16, 32, 64]}}",
    "model.backbone.norm_eval=false",
    "model.neck.in_channels=[8, 16, 32, 64]",
    "model.neck.out_channels=64",
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------------- backbone

def test_hrnetv2_w18_branches_have_strides_4_to_32_and_the_paper_widths():
    """The W18 pipeline's backbone (stages of 1 / 1 / 4 / 3 modules) on a 64 x 96 image: four branches at strides
    4, 8, 16, 32 with 18, 36, 72, 144 channels; without multiscale_output, only the stride-4 branch."""
    cfg = load_config(PIPELINES / "faster_rcnn_hrnetv2p_w18_1x_coco.yaml")
    backbone = cfg.build("model.backbone").eval()
    assert isinstance(backbone, HRNet) and backbone.out_channels == [18, 36, 72, 144]
    assert [len(getattr(backbone, f"stage{k}")) for k in (2, 3, 4)] == [1, 4, 3]
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 18, 16, 24), (1, 36, 8, 12), (1, 72, 4, 6), (1, 144, 2, 3)]

    single = HRNet(TINY_EXTRA, multiscale_output=False).eval()
    assert single.out_channels == [8] and len(single.stage4[-1].fuse_layers) == 1
    with torch.no_grad():
        assert [tuple(o.shape) for o in single(torch.randn(1, 3, 64, 64))] == [(1, 8, 16, 16)]
    with pytest.raises(ValueError, match=r"extra\.stage3\.num_channels must list 3 positive integers"):
        HRNet({**TINY_EXTRA, "stage3": {**TINY_EXTRA["stage3"], "num_channels": [8, 16]}})
    with pytest.raises(ValueError, match=r"extra\.stage2\.block must be one of BASIC, BOTTLENECK"):
        HRNet({**TINY_EXTRA, "stage2": {**TINY_EXTRA["stage2"], "block": "BASICS"}})


def _set_center_tap(conv: torch.nn.Conv2d, value: float) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = value


def test_fuse_layers_sum_upsampled_and_strided_branches():
    """Three 1-channel branches (8x8, 4x4, 2x2), each one basic block whose convs are zero (block(x) = relu(x));
    BatchNorms at their initial statistics with eps 0 (the identity); fuse convs set to single taps. With r_k =
    relu(x_k), up_s nearest upsampling by s and [::s] the stride-s subsampling a centre-tap 3x3 stride-2 conv does:
        out0 = relu(r0 + a01 up2(r1) + a02 up4(r2))
        out1 = relu(r1 + b10 r0[::2] + a12 up2(r2))
        out2 = relu(r2 + b21 r1[::2] + c2 relu(c1 r0[::2] + beta)[::2])
    (two resolution steps from branch 0 to 2: the first conv keeps branch 0's channels and has a ReLU, the last
    does not; beta is the first step's BatchNorm bias)."""
    module = HRModule(BasicBlock, [1, 1, 1], [1, 1, 1], [1, 1, 1], norm_cfg={"type": "BN", "eps": 0.0}).eval()
    a01, a02, a12, b10, b21, c1, c2, beta = 0.5, -2.0, 1.5, 3.0, -0.25, 2.0, -1.0, -0.5
    with torch.no_grad():
        for branch in module.branches:
            branch[0].conv1.weight.zero_()
            branch[0].conv2.weight.zero_()
        module.fuse_layers[0][1][0].weight.fill_(a01)
        module.fuse_layers[0][2][0].weight.fill_(a02)
        module.fuse_layers[1][2][0].weight.fill_(a12)
        _set_center_tap(module.fuse_layers[1][0][0][0], b10)
        _set_center_tap(module.fuse_layers[2][1][0][0], b21)
        _set_center_tap(module.fuse_layers[2][0][0][0], c1)
        module.fuse_layers[2][0][0][1].bias.fill_(beta)
        _set_center_tap(module.fuse_layers[2][0][1][0], c2)
    assert module.fuse_layers[0][0] is None and len(module.fuse_layers[2][0]) == 2
    assert isinstance(module.fuse_layers[2][0][0][2], torch.nn.ReLU) and len(module.fuse_layers[2][0][1]) == 2

    torch.manual_seed(0)
    xs = [torch.randn(1, 1, s, s) for s in (8, 4, 2)]
    r0, r1, r2 = (x.relu() for x in xs)

    def up(x, s):
        return x.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)

    def sub(x):
        return x[..., ::2, ::2]

    expected = [(r0 + a01 * up(r1, 2) + a02 * up(r2, 4)).relu(),
                (r1 + b10 * sub(r0) + a12 * up(r2, 2)).relu(),
                (r2 + b21 * sub(r1) + c2 * sub((c1 * sub(r0) + beta).relu())).relu()]
    with torch.no_grad():
        outs = module([x.clone() for x in xs])
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ HRFPN

def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=False: source coordinate
    (i + 0.5) n_in / n_out - 0.5, clamped at 0, between its floor and floor + 1 (clamped at the end)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(src)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def test_hrfpn_pools_the_reduced_map_into_levels():
    """Branches of 2 / 3 / 4 / 5 channels at 16, 8, 4, 2 pixels. The 1x1 reduction keeps two channels: out 0 =
    branch 0's channel 0, out 1 = branch 1's channel 2 after bilinear upsampling x2; 3x3 level convs are identities.
    Level l is the reduced map pooled over 2**l x 2**l blocks (AVG: block means; MAX: block maxima): 5 levels of 16,
    8, 4, 2, 1 pixels (strides 4-64 on HRNet); stride-2 level convs halve each level again."""
    torch.manual_seed(0)
    inputs = [torch.randn(1, c, s, s) for c, s in ((2, 16), (3, 8), (4, 4), (5, 2))]
    up = _bilinear_matrix(8, 16)
    reduced = torch.stack([inputs[0][0, 0], up @ inputs[1][0, 2] @ up.T])[None]
    for pooling, reduce in (("AVG", torch.mean), ("MAX", torch.amax)):
        neck = HRFPN([2, 3, 4, 5], 2, num_outs=5, pooling_type=pooling)
        with torch.no_grad():
            neck.reduction_conv[0].weight.zero_()
            neck.reduction_conv[0].weight[0, 0] = 1.0
            neck.reduction_conv[0].weight[1, 2 + 2] = 1.0  # branch 1 starts at channel 2 of the concatenation
            for conv in neck.fpn_convs:
                conv[0].weight.zero_()
                conv[0].weight[0, 0, 1, 1] = conv[0].weight[1, 1, 1, 1] = 1.0
        assert [c[0].bias.abs().sum().item() for c in neck.fpn_convs] == [0.0] * 5  # MMDetection's zero biases
        with torch.no_grad():
            outs = neck(inputs)
        assert [tuple(o.shape) for o in outs] == [(1, 2, s, s) for s in (16, 8, 4, 2, 1)]
        for level, out in enumerate(outs):
            k = 2 ** level
            expected = reduce(reduced.reshape(1, 2, 16 // k, k, 16 // k, k), dim=(3, 5))
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    strided = HRFPN([2, 3, 4, 5], 2, stride=2)
    with torch.no_grad():
        assert [o.shape[-1] for o in strided(inputs)] == [8, 4, 2, 1, 1]
    with pytest.raises(ValueError, match="pooling_type must be 'AVG' or 'MAX', got 'avg'"):
        HRFPN([2, 3], 2, pooling_type="avg")


# -------------------------------------------------------------------------------------------- ImageNet checkpoints

def test_official_imagenet_checkpoint_loads_without_its_classification_head(tmp_path):
    """The official ImageNet HRNet's state dict: the backbone under the same names as ours, plus the classifier head
    of HRNet-Image-Classification (``incre_modules`` bottlenecks, ``downsamp_modules`` conv + BN, ``final_layer``
    conv + BN to 2048 channels, ``classifier`` Linear(2048, 1000)). The head's keys are dropped and named; every
    other tensor lands in place; a checkpoint of other widths fails naming a shape."""
    torch.manual_seed(0)
    source = HRNet(TINY_EXTRA)
    backbone = {k: torch.randn(v.shape) if v.is_floating_point() else torch.tensor(7)
                for k, v in source.state_dict().items()}
    head = {"incre_modules.0.0.conv1.weight": torch.randn(32, 8, 1, 1),
            "incre_modules.3.0.bn3.running_var": torch.rand(1024),
            "downsamp_modules.0.0.weight": torch.randn(256, 128, 3, 3),
            "downsamp_modules.2.1.num_batches_tracked": torch.tensor(3),
            "final_layer.0.weight": torch.randn(2048, 1024, 1, 1),
            "final_layer.1.bias": torch.randn(2048),
            "classifier.weight": torch.randn(1000, 2048),
            "classifier.bias": torch.randn(1000)}
    path = tmp_path / "hrnetv2_tiny_imagenet_pretrained.pth"
    torch.save({**backbone, **head}, path)

    model = HRNet(TINY_EXTRA)
    loaded, dropped = load_hrnet_imagenet(model, str(path))
    assert sorted(dropped) == sorted(head) and all(k.startswith(CLASSIFIER_PREFIXES) for k in dropped)
    assert sorted(loaded) == sorted(backbone)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone.items())

    cfg = load_config(PIPELINES / "faster_rcnn_hrnetv2p_w18_1x_coco.yaml",
                      [f"model.backbone.init_cfg={{type: Pretrained, checkpoint: {path}}}"] + TINY_HRNET)
    built = cfg.build("model.backbone")  # what a pipeline's init_cfg does
    assert torch.equal(built.stage4[0].fuse_layers[3][0][2][0].weight,
                       backbone["stage4.0.fuse_layers.3.0.2.0.weight"])

    wide = HRNet({**TINY_EXTRA, "stage4": {**TINY_EXTRA["stage4"], "num_channels": [8, 16, 32, 48]}})
    with pytest.raises(ValueError, match=r"shape mismatches, e\.g\. transition3\.3\.0\.0\.weight: "
                                         r"checkpoint \(64, 32, 3, 3\) vs model \(48, 32, 3, 3\)"):
        load_hrnet_imagenet(wide, str(path))


# ------------------------------------------------------------------------------------------------------ overfitting

def test_tiny_hrnet_faster_rcnn_overfits_a_few_images(shapes):  # noqa: F811
    """HRNetV2p (widths 8-64, one module of one block per stage) with HRFPN (64 channels, 5 levels) in the W18
    Faster R-CNN pipeline; the trained model detects as well under bf16 CPU autocast (bf16 features at strides
    4-64; boxes scored in float32)."""
    samples, records = shapes
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_hrnetv2p_w18_1x_coco.yaml", TINY_HRNET + TINY_RPN + TINY_ROI)
    assert type(model.backbone).__name__ == "HRNet" and type(model.neck).__name__ == "HRFPN"
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40)  # AP50 1.0 at 40 iterations for seeds 0, 1, 2
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.neck(model.backbone(batch["images"]))
        preds = model(batch, mode="predict")
    assert [f.dtype for f in feats] == [torch.bfloat16] * 5
    assert [128 // f.shape[-1] for f in feats] == [4, 8, 16, 32, 64]  # HRFPN's strides on 128 px images
    preds = [{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in p.items()}
             for p in preds]
    results = predictions_to_coco_results(preds, [r["image_id"] for r in records], [1, 2, 3])
    metrics = evaluate_coco(coco_from_records(records, list(CLASSES)), results, ("bbox",))
    assert metrics["bbox/AP50"] > 0.9, metrics
