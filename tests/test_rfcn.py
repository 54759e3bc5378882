"""R-FCN (Dai et al. 2016): position-sensitive RoI pooling, voting, the C4 / C5 layout and its parameter count.

Expected values: pooled values of constructed score maps and their gradients computed by hand and by torchvision's
``ps_roi_pool`` (on RoIs that its border error does not reach) / ``ps_roi_align``; the parameter count by hand from
the paper's layout (the backbone's from torchvision's ResNets); AP50 from pycocotools.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.ops import ps_roi_align, ps_roi_pool

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.models.roi_heads.roi_extractors import PSRoIExtractor
from raydet.ops import ps_roi_pool as raydet_ps_roi_pool
from test_detectors import _ap, _train, build_from_pipeline, shapes  # noqa: F401

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
    """Two images' stride-16 maps (10 x 12), RoIs in input pixels: torchvision's ops with spatial scale 1/16. The
    RoIs end on or before the map's last-but-one cell (round(x2 / 16) <= 11, round(y2 / 16) <= 9), where
    torchvision's ``ps_roi_pool`` is right (see the next test)."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4 * 49, 10, 12, generator=g)
    rois = torch.tensor([[0, 8.0, 16.0, 120.0, 90.0], [1, 30.0, 5.0, 70.0, 150.0], [1, 0.0, 0.0, 170.0, 140.0]])
    torch.testing.assert_close(PSRoIExtractor(7, 16, "PSRoIPool")(maps, rois), ps_roi_pool(maps, rois, 7, 1 / 16))
    torch.testing.assert_close(PSRoIExtractor(7, 16, "PSRoIAlign", sampling_ratio=2)(maps, rois),
                               ps_roi_align(maps, rois, 7, 1 / 16, 2))


def test_ps_roi_pool_reads_and_trains_the_maps_last_row_and_column():
    """torchvision 0.29's ``ps_roi_pool`` clips bins to rows < H - 1 and columns < W - 1 in its forward (the last row
    and column are never read) but not in its backward; raydet's op pools every cell a bin covers inside the map.

    k = 2, D = 1 on a 4 x 4 map at stride 1, map m holding 16 m + 4 r + c at row r, column c. RoI (0, 0, 4, 4): bin
    (i, j) reads map 2 i + j over rows 2 i, 2 i + 1 and columns 2 j, 2 j + 1: mean 16 (2 i + j) + 4 (2 i + 0.5) +
    2 j + 0.5; the gradient of the sum is 1/4 on those four cells of that map, 0 elsewhere. RoI (2, 2, 6, 6): bin
    (0, 0) is rows and columns 2-3 of map 0 (mean 12.5); the other bins lie outside the map and pool 0."""
    x = (16 * torch.arange(4.0).view(4, 1, 1) + 4 * torch.arange(4.0).view(1, 4, 1)
         + torch.arange(4.0).view(1, 1, 4))[None].requires_grad_()
    out = raydet_ps_roi_pool(x, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 2, 1.0)
    expected = [[16 * (2 * i + j) + 4 * (2 * i + 0.5) + 2 * j + 0.5 for j in range(2)] for i in range(2)]
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))
    out.sum().backward()
    grad = torch.zeros(4, 4, 4)
    for m in range(4):
        i, j = divmod(m, 2)
        grad[m, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = 0.25
    torch.testing.assert_close(x.grad[0], grad)
    outside = raydet_ps_roi_pool(x.detach(), torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]]), 2, 1.0)
    torch.testing.assert_close(outside[0, 0], torch.tensor([[12.5, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="not a multiple of k_h x k_w = 9"):
        raydet_ps_roi_pool(x, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 3, 1.0)


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



# The overfitting variant: ResNet-18 at a quarter width (C4 64, C5 128 channels), a 256-channel conv_new, and conv4 /
# conv5 both "a trous" (stride 8, dilations 2 / 4): the shapes' 20-64 px objects then span 2.5-8 cells of the score
# maps, as the paper's COCO objects do at stride 16 in 600 px images. At stride 16 PS RoI pooling snaps RoIs to 16 px
# cells, close to the objects' own size, and AP50 stays near 0.67.
TINY_RFCN_FIT = TINY_RFCN + [
    "model.backbone.base_channels=16", "model.backbone.strides=[1, 2, 1, 1]", "model.backbone.dilations=[1, 1, 2, 4]",
    "model.rpn_head.in_channels=64", "model.rpn_head.anchor_generator.strides=[8]",
    "model.rpn_head.anchor_generator.scales=[4, 8, 16]",
    "model.roi_head.bbox_roi_extractor.featmap_stride=8",
    "model.roi_head.bbox_head.in_channels=128", "model.roi_head.bbox_head.feat_channels=256",
]


def test_rfcn_overfits_a_few_images(shapes):  # noqa: F811
    samples, records = shapes
    torch.manual_seed(0)  # seeds 0, 1, 2: AP50 1.0 (at a constant lr AP50 swings between 0.67 and 1 past 100 iters)
    model = build_from_pipeline("rfcn_r50_caffe_c4_1x_coco.yaml", TINY_RFCN_FIT)
    assert model.roi_head.bbox_roi_extractor.roi_type == "PSRoIPool"
    batch = collate_samples(samples)
    first, last = _train(model, batch, 120, lr=3e-3, fused=True, decay_at=100)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
