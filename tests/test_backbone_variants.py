"""The backbone variants of the MMDetection report's Table 10 (``pipelines/_base_/backbones/``: R-50 (c), R-101,
X-101-32x4d, X-101-64x4d), as composed onto each detector's R-50 pipeline.

Expected values: widths and block counts by hand from the ResNet / ResNeXt papers (X-101-32x4d: 32 groups x 4
channels = 128 in the first stage; 64x4d: 256; ResNet-101: 3, 4, 23, 3 bottlenecks), every backbone tensor's name and
shape from torchvision's independent ResNet implementation, and MMDetection's caffe style (stride in the first 1x1
conv of a bottleneck) and caffe input normalisation from its ``*_r50-caffe_*`` configs.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.models.resnet import Bottleneck, ResNet

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from test_detectors import PIPELINES

FAMILIES = ["rpn", "faster_rcnn", "mask_rcnn", "fast_rcnn", "retinanet", "cascade_rcnn", "cascade_mask_rcnn"]
VARIANTS = {  # variant -> torchvision ResNet(Bottleneck, layers, groups, width_per_group) arguments
    "r50_caffe": ([3, 4, 6, 3], 1, 64),
    "r101": ([3, 4, 23, 3], 1, 64),
    "x101_32x4d": ([3, 4, 23, 3], 32, 4),
    "x101_64x4d": ([3, 4, 23, 3], 64, 4),
}


def _backbone(pipeline: str) -> torch.nn.Module:
    with torch.device("meta"):
        return load_config(PIPELINES / pipeline).build("model.backbone")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_backbones_by_value(variant):
    backbone = _backbone(f"faster_rcnn_{variant}_fpn_1x_coco.yaml")
    layers, groups, width_per_group = VARIANTS[variant]
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == layers  # 23 blocks in layer3
    conv2 = backbone.layer1[0].conv2
    # X-101-32x4d: 32 groups x 4 = 128 channels; 64x4d: 64 x 4 = 256; ResNets: 64
    assert (conv2.groups, conv2.out_channels) == {"x101_32x4d": (32, 128), "x101_64x4d": (64, 256)}.get(
        variant, (1, 64))
    assert backbone.layer4[0].conv2.out_channels == 8 * conv2.out_channels  # doubling per stage
    with torch.device("meta"):
        reference = ResNet(Bottleneck, layers, groups=groups, width_per_group=width_per_group)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in backbone.state_dict().items()} == expected
    caffe = variant == "r50_caffe"
    # MMDetection's caffe style: the stride in conv1 (1x1) of a stage's first bottleneck; pytorch style in conv2 (3x3)
    assert (backbone.layer2[0].conv1.stride, backbone.layer2[0].conv2.stride) == \
        (((2, 2), (1, 1)) if caffe else ((1, 1), (2, 2)))
    # caffe: BN affine frozen (norm_cfg.requires_grad false); else trainable past the frozen stem and layer1
    assert backbone.layer2[0].bn1.weight.requires_grad is not caffe


def test_caffe_variant_sets_bgr_caffe_normalisation_on_every_family():
    """The R-50 (c) pipelines feed BGR minus the caffe ImageNet means, std 1 (MMDetection's data_preprocessor of its
    caffe configs); the other variants keep the RGB ImageNet mean / std."""
    for family in FAMILIES:
        for variant in VARIANTS:
            cfg = load_config(PIPELINES / f"{family}_{variant}_fpn_1x_coco.yaml")
            for split in ("train", "test"):
                (norm,) = [t for t in cfg[f"data.{split}.pipeline"] if t["type"] == "Normalize"]
                if variant == "r50_caffe":
                    assert (norm["mean"], norm["std"], norm["to_rgb"]) == ([103.53, 116.28, 123.675], [1.0] * 3,
                                                                           False)
                else:
                    assert (norm["mean"], norm["std"], norm["to_rgb"]) == ([123.675, 116.28, 103.53],
                                                                           [58.395, 57.12, 57.375], True)
