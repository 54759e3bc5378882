"""R-FCN (Dai et al. 2016): position-sensitive RoI pooling, voting, the C4 / C5 layout and its parameter count.

Expected values: pooled values of constructed score maps computed by hand and by torchvision's ``ps_roi_pool`` /
``ps_roi_align``; the parameter count by hand from the paper's layout (the backbone's from torchvision's ResNets).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import ps_roi_align, ps_roi_pool

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.models.roi_heads.roi_extractors import PSRoIExtractor

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"

# A ResNet-18 variant of rfcn_r50_caffe_c4_1x_coco for 128-px images: C4 256 / C5 512 channels, 64-channel heads,
# anchors of 32-128 px, k = 7 as the paper
TINY_RFCN = [
    "num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=-1", "model.backbone.norm_eval=false",
    "model.backbone.norm_cfg={type: BN, requires_grad: true}",
    "model.rpn_head.in_channels=256", "model.rpn_head.feat_channels=64",
    "model.rpn_head.anchor_generator.scales=[2, 4, 8]",
    "model.rpn_head.train_proposals={nms_pre: 500, max_per_img: 300, nms_iou: 0.7, min_bbox_size: 0}",
    "model.rpn_head.test_proposals={nms_pre: 500, max_per_img: 300, nms_iou: 0.7, min_bbox_size: 0}",
    "model.roi_head.bbox_head.in_channels=512", "model.roi_head.bbox_head.feat_channels=64",
]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("roi_type", ["PSRoIPool", "PSRoIAlign"])
def test_ps_roi_pooling_reads_each_bins_own_channel_group(roi_type):
    """k = 2, D = 3: 12 maps. Constant maps (map c holds c): output (d, i, j) reads map (d k + i) k + j only. Maps that
    hold their column index x: a 4 x 4 RoI's bin (i, j) covers columns [2 j, 2 j + 2), mean 2 j + 0.5 (the cells'
    mean for PSRoIPool, the bilinear samples at x = 2 j and 2 j + 1 for PSRoIAlign)."""
    pool = PSRoIExtractor(output_size=2, featmap_stride=1, roi_type=roi_type)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    constant = torch.arange(12.0).view(1, 12, 1, 1).expand(1, 12, 6, 6)
    out = pool(constant, rois)
    assert out.shape == (1, 3, 2, 2)
    expected = torch.tensor([[[(d * 2 + i) * 2 + j for j in range(2)] for i in range(2)] for d in range(3)],
                            dtype=torch.float32)
    torch.testing.assert_close(out[0], expected)
    columns = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 12, 6, 6)
    torch.testing.assert_close(pool(columns, rois)[0], torch.tensor([[0.5, 2.5], [0.5, 2.5]]).expand(3, 2, 2))


def test_ps_roi_extractor_is_torchvisions_operator_at_the_feature_stride():
    """Two images' stride-16 maps, RoIs in input pixels: torchvision's ops with spatial scale 1/16."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4 * 49, 10, 12, generator=g)
    rois = torch.tensor([[0, 8.0, 16.0, 120.0, 90.0], [1, 30.0, 5.0, 70.0, 150.0], [1, 0.0, 0.0, 190.0, 159.0]])
    torch.testing.assert_close(PSRoIExtractor(7, 16, "PSRoIPool")(maps, rois), ps_roi_pool(maps, rois, 7, 1 / 16))
    torch.testing.assert_close(PSRoIExtractor(7, 16, "PSRoIAlign", sampling_ratio=2)(maps, rois),
                               ps_roi_align(maps, rois, 7, 1 / 16, 2))


def test_rfcn_head_votes_by_averaging_the_bins():
    from raydet.registry import build

    head = build({"type": "RFCNBBoxHead", "num_classes": 2, "in_channels": 8, "feat_channels": 4, "roi_feat_size": 3,
                  "bbox_coder": {"type": "DeltaXYWHBBoxCoder"}, "loss_cls": {"type": "CrossEntropyLoss"},
                  "loss_bbox": {"type": "SmoothL1Loss"}}, "bbox_head")
    cls_maps, reg_maps = head.score_maps(torch.randn(1, 8, 5, 5))
    assert cls_maps.shape == (1, 3 * 9, 5, 5) and reg_maps.shape == (1, 4 * 9, 5, 5)
    cls_pooled = torch.arange(2 * 3 * 9.0).view(2, 3, 3, 3)  # bins of RoI r, class c: 27 r + 9 c + 0..8, mean + 4
    cls, reg = head(cls_pooled, torch.ones(2, 4, 3, 3))
    torch.testing.assert_close(cls, torch.tensor([[4.0, 13.0, 22.0], [31.0, 40.0, 49.0]]))
    torch.testing.assert_close(reg, torch.ones(2, 4))


def test_rfcn_keeps_stride_16_on_c5_and_gives_per_roi_outputs():
    torch.manual_seed(0)
    model = load_config(PIPELINES / "rfcn_r50_caffe_c4_1x_coco.yaml", TINY_RFCN).build("model").eval()
    images = torch.randn(2, 3, 128, 96)
    c4, c5 = model.extract_feat(images)
    assert c4.shape == (2, 256, 8, 6) and c5.shape == (2, 512, 8, 6)  # conv5: stride 1, dilation 2
    cls_maps, reg_maps = model.roi_head.bbox_head.score_maps(c5)
    assert cls_maps.shape == (2, 4 * 49, 8, 6) and reg_maps.shape == (2, 4 * 49, 8, 6)
    rois = torch.tensor([[0, 10.0, 10.0, 60.0, 70.0], [1, 0.0, 30.0, 90.0, 120.0], [1, 5.0, 5.0, 20.0, 20.0]])
    cls, reg = model.roi_head.bbox_forward((c5,), rois)
    assert cls.shape == (3, 4) and reg.shape == (3, 4)  # C + 1 scores, class-agnostic deltas


def test_rfcn_parameter_counts_by_hand():
    """The paper's layout on ResNet-50 / 101 (torchvision's ResNets without their fc: the backbone): RPN 3x3 conv
    1024 -> 512, 9 objectness + 36 deltas; conv_new 2048 -> 1024; k^2 (C + 1) = 49 x 81 class maps and 4 k^2 = 196
    box maps, each a 1x1 conv with bias. MODEL_ZOO.md records the counts."""
    from torchvision.models import resnet50, resnet101

    head = (1024 * 512 * 9 + 512) + (512 * 9 + 9) + (512 * 36 + 36) + (2048 * 1024 + 1024) + 1025 * 49 * 81 \
        + 1025 * 196
    text = (ROOT / "MODEL_ZOO.md").read_text()
    for name, reference in (("rfcn_r50_caffe_c4_1x_coco", resnet50), ("rfcn_r101_caffe_c4_1x_coco", resnet101)):
        with torch.device("meta"):
            ours = _count(load_config(PIPELINES / f"{name}.yaml", []).build("model"))
            tv = reference()
        backbone = _count(tv) - _count(tv.fc)
        assert ours == backbone + head, name
        assert f"| [`{name}`](pipelines/{name}.yaml) | {ours:,} |" in text
    assert head == 11_109_490

