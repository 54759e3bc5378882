"""Deformable RoI pooling (Dai et al. 2017 Sec. 2.2; the modulated variant of DCNv2, Zhu et al. 2019 Sec. 3.1), the
RoI extractor's ``roi_layer``, the DCN / DPool pipelines, and a tiny Faster R-CNN with DCNv2 in its backbone and
modulated deformable RoI pooling that overfits a few images.

Expected values: with zero offsets, mmcv's ``deform_roi_pool`` kernel is RoIAlign with the half-pixel shift (its RoI
starts at ``x1 * scale - 0.5``, no 1 x 1 minimum, ``ceil(roi_size / bins)`` samples per bin side), so torchvision's
``roi_align(..., aligned=True)`` is the reference; moved bins are checked on linear ramps by hand; parameter counts
are summed by hand from mmcv's layer sizes; AP50 comes from pycocotools.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.interop.mmdet import convert_mmdet, to_mmdet
from raydet.models.roi_heads.roi_extractors import SingleRoIExtractor
from raydet.ops import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack, deform_roi_pool
from test_detectors import PIPELINES, TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline, shapes  # noqa: F401

# RoIs in image pixels: inside, partly outside the map, smaller than a pixel, wide; two images
ROIS = torch.tensor([[0, 1.3, 2.2, 40.1, 30.0], [1, -5.0, -3.0, 70.0, 60.0], [0, 10.0, 10.0, 10.5, 10.2],
                     [1, 30.0, 20.0, 90.0, 70.0]], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_zero_offsets_are_aligned_roi_align(sampling_ratio):
    """mmcv's kernel with offset NULL (or zeros) is RoIAlign aligned=True: torchvision's, to float64 precision, for
    RoIs inside, across the border, below one pixel, with the adaptive grid (ceil(roi / 7) samples, 1 to 3 here) and
    a fixed one."""
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torchvision.ops.roi_align(x, ROIS, 7, 0.25, sampling_ratio, aligned=True)
    zeros = torch.zeros(4, 2, 7, 7, dtype=torch.float64)
    for offset in (None, zeros):
        torch.testing.assert_close(deform_roi_pool(x, ROIS, offset, 7, 0.25, sampling_ratio), expected,
                                   rtol=0, atol=1e-12)


def test_offsets_move_each_bin_by_gamma_times_the_roi_size():
    """On the ramp f(y, x) = x + 10 y, RoI [2.5, 2.5, 9.5, 9.5] at scale 1 starts at 2.0 (the -0.5 shift) and is 7
    wide, so 7 x 7 bins of 1 pixel with one sample each (sampling_ratio 1) read f at (2.5 + i, 2.5 + j): 27.5 + j +
    10 i. Bin (1, 3) with offset (dx, dy) = (0.5, -1.0) moves by gamma x 7 x (0.5, -1.0) = (0.35, -0.7) pixels, so
    it reads 27.5 + 3 + 10 + 0.35 - 7 = 33.85; the other bins keep their values. gamma 0.2 doubles the move."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (xx + 10 * yy)[None, None].double()
    roi = torch.tensor([[0, 2.5, 2.5, 9.5, 9.5]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 7, 7, dtype=torch.float64)
    offset[0, 0, 1, 3], offset[0, 1, 1, 3] = 0.5, -1.0
    i, j = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    expected = (27.5 + j + 10 * i).double()
    out = deform_roi_pool(ramp, roi, None, 7, 1.0, 1)[0, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    moved = expected.clone()
    moved[1, 3] = 33.85
    torch.testing.assert_close(deform_roi_pool(ramp, roi, offset, 7, 1.0, 1, gamma=0.1)[0, 0], moved, rtol=0,
                               atol=1e-12)
    moved[1, 3] = 27.5 + 3 + 10 + 0.7 - 14
    torch.testing.assert_close(DeformRoIPool(7, 1.0, 1, gamma=0.2)(ramp, roi, offset)[0, 0], moved, rtol=0,
                               atol=1e-12)


def test_a_bin_moved_off_the_map_reads_zero():
    """mmcv's bilinear read: a sample beyond -1 pixel reads 0, one in [-1, 0] reads the first column (clamped). The
    RoI [0.5, 0.5, 1.5, 1.5] (start 0, 1 pixel, one bin) samples (0.5, 0.5) on a map of ones; dx = -1.2 moves it by
    -1.2 px to x = -0.7 (still 1), dx = -2 to x = -1.5 (0)."""
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    roi = torch.tensor([[0, 0.5, 0.5, 1.5, 1.5]], dtype=torch.float64)
    offset = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    values = []
    for dx in (-1.2, -2.0):
        offset[0, 0] = dx / 0.1
        values.append(deform_roi_pool(ones, roi, offset, 1, 1.0, 1).item())
    assert values == [1.0, 0.0]


def test_packs_start_as_roi_align_and_half_of_it_with_mmcv_layer_names():
    """Zero-initialised last FCs: DeformRoIPoolPack starts with zero offsets (RoIAlign); the modulated one also with
    masks sigmoid(0) = 0.5, i.e. half of RoIAlign. The FC shapes are mmcv's (C x h x w -> 1024 -> 1024 -> 2 h w;
    C x h x w -> 1024 -> h w), and the offsets and masks get gradients, so they learn."""
    x = torch.randn(2, 8, 13, 17, generator=torch.Generator().manual_seed(1))
    rois = ROIS.float()
    reference = torchvision.ops.roi_align(x, rois, 7, 0.25, 0, aligned=True)
    torch.manual_seed(0)
    plain = DeformRoIPoolPack(7, 8, deform_fc_channels=32, spatial_scale=0.25)
    modulated = ModulatedDeformRoIPoolPack(7, 8, deform_fc_channels=32, spatial_scale=0.25)
    torch.testing.assert_close(plain(x, rois), reference, rtol=0, atol=1e-5)
    out = modulated(x, rois)
    torch.testing.assert_close(out, 0.5 * reference, rtol=0, atol=1e-5)
    shapes_ = {k: tuple(v.shape) for k, v in modulated.state_dict().items()}
    assert shapes_ == {"offset_fc.0.weight": (32, 392), "offset_fc.0.bias": (32,), "offset_fc.2.weight": (32, 32),
                       "offset_fc.2.bias": (32,), "offset_fc.4.weight": (98, 32), "offset_fc.4.bias": (98,),
                       "mask_fc.0.weight": (32, 392), "mask_fc.0.bias": (32,), "mask_fc.2.weight": (49, 32),
                       "mask_fc.2.bias": (49,)}
    (out * torch.randn_like(out)).sum().backward()
    assert modulated.offset_fc[4].weight.grad.abs().sum() > 0 and modulated.mask_fc[2].bias.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: the FCs in bfloat16, the pooling in float32
        torch.testing.assert_close(modulated(x, rois), 0.5 * reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="output_channels=8"):
        plain(x[:, :4], rois)


def test_extractor_builds_one_roi_layer_per_level():
    """``roi_layer`` gives one layer per level with spatial_scale 1 / stride and its own parameters; at init the
    deformable layers pool as the extractor's RoIAlign (the same level per RoI)."""
    strides = [4, 8]
    cfg = {"type": "DeformRoIPoolPack", "output_channels": 8, "deform_fc_channels": 16}
    extractor = SingleRoIExtractor(7, strides, roi_layer=cfg)
    assert [layer.spatial_scale for layer in extractor.roi_layers] == [0.25, 0.125]
    assert [layer.output_size for layer in extractor.roi_layers] == [(7, 7), (7, 7)]
    first, second = (layer.offset_fc[0].weight for layer in extractor.roi_layers)
    assert first.data_ptr() != second.data_ptr()
    g = torch.Generator().manual_seed(2)
    feats = (torch.randn(2, 8, 32, 32, generator=g), torch.randn(2, 8, 16, 16, generator=g))
    rois = torch.tensor([[0, 4.0, 4.0, 60.0, 50.0], [1, 0.0, 0.0, 127.0, 127.0], [0, 10.0, 20.0, 30.0, 26.0]])
    torch.testing.assert_close(extractor(feats, rois), SingleRoIExtractor(7, strides)(feats, rois), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="roi_layer replaces sampling_ratio"):
        SingleRoIExtractor(7, strides, sampling_ratio=2, roi_layer=cfg)
    with pytest.raises(ValueError, match="spatial_scale"):
        SingleRoIExtractor(7, strides, roi_layer={**cfg, "spatial_scale": 0.5})
    with pytest.raises(ValueError, match="differs"):
        SingleRoIExtractor(7, strides, roi_layer={**cfg, "output_size": 14})


def _meta_model(pipeline: str) -> torch.nn.Module:
    with torch.device("meta"):
        return load_config(PIPELINES / pipeline).build("model")


@pytest.mark.parametrize("pipeline,expected", [
    # Faster R-CNN R50-FPN (41,753,056, MMDetection's count) + 4 levels x offset_fc: 7 x 7 x 256 -> 1024 -> 1024 -> 98
    # = (12,544 x 1,024 + 1,024) + (1,024 x 1,024 + 1,024) + (1,024 x 98 + 98) = 13,996,130
    ("faster_rcnn_r50_fpn_dpool_1x_coco.yaml", 41_753_056 + 4 * 13_996_130),
    # + 4 levels x mask_fc: 12,544 -> 1,024 -> 49 = 12,846,080 + 50,225 = 12,896,305
    ("faster_rcnn_r50_fpn_mdpool_1x_coco.yaml", 41_753_056 + 4 * (13_996_130 + 12_896_305)),
])
def test_dpool_pipelines_have_mmdetections_layout(pipeline, expected):
    """MMDetection's SingleRoIExtractor builds one roi_layer per featmap stride (``roi_layers.<i>``): 97,737,576
    and 149,322,796 parameters; their mmcv names convert both ways with nothing left over."""
    model = _meta_model(pipeline)
    assert sum(p.numel() for p in model.parameters()) == expected
    layers = model.roi_head.bbox_roi_extractor.roi_layers
    assert [layer.spatial_scale for layer in layers] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    state = model.state_dict()  # meta tensors: names and shapes
    theirs = to_mmdet(state)
    assert "roi_head.bbox_roi_extractor.roi_layers.3.offset_fc.4.weight" in theirs
    mapped, report = convert_mmdet(theirs, model, "dpool.pth")
    assert list(mapped) == list(state) and not report.dropped and not report.filled


def test_overfits_with_dcnv2_backbone_and_modulated_deformable_roi_pooling(shapes):  # noqa: F811
    """A tiny Faster R-CNN: a bottleneck ResNet-50 of base width 16 (outputs 64 .. 512 channels, as the tiny
    ResNet-18) with modulated deformable 3x3 convs in its last stage (c5; in c4 too, torchvision's CPU backward of
    the deformable conv takes half of each iteration), and modulated deformable RoI pooling for the box head (offset
    / mask FCs of 64, one sample per bin, 64 RoIs per image)."""
    samples, records = shapes
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_r50_fpn_mdpool_1x_coco.yaml", TINY + TINY_RPN + TINY_ROI + [
        "model.backbone.depth=50",
        "model.backbone.base_channels=16",
        "model.backbone.dcn_cfg={type: ModulatedDeformConv2dPack, deform_groups: 1}",
        "model.backbone.stage_with_dcn=[false, false, false, true]",
        "model.roi_head.bbox_roi_extractor.roi_layer.output_channels=64",
        "model.roi_head.bbox_roi_extractor.roi_layer.deform_fc_channels=64",
        "model.roi_head.bbox_roi_extractor.roi_layer.sampling_ratio=1",
        "model.roi_head.sampler.num=64",
    ])
    assert type(model.roi_head.bbox_roi_extractor.roi_layers[0]).__name__ == "ModulatedDeformRoIPoolPack"
    assert type(model.backbone.layer4[0].conv2).__name__ == "ModulatedDeformConv2dPack"
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
