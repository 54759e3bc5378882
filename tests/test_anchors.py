"""AnchorGenerator and anchor_inside_flags against hand-computed MMDetection anchors."""
import math

import pytest
import torch

from raydet.models.task_modules.prior_generators import AnchorGenerator, anchor_inside_flags
from raydet.registry import ConfigError, build

SQ2 = math.sqrt(2.0)


def faster_rcnn_anchors():
    return AnchorGenerator(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])


def test_faster_rcnn_base_anchors_stride4():
    gen = faster_rcnn_anchors()
    assert gen.num_base_anchors == 3 and gen.num_levels == 5
    # base 4 * scale 8 = 32; ratio 0.5 -> w = 32 * sqrt(2) = 45.25, h = 32 / sqrt(2) = 22.63, centred at 0.
    expected = torch.tensor([
        [-22.627417, -11.313708, 22.627417, 11.313708],  # ratio 0.5 (h / w)
        [-16.0, -16.0, 16.0, 16.0],                      # ratio 1
        [-11.313708, -22.627417, 11.313708, 22.627417],  # ratio 2
    ])
    torch.testing.assert_close(gen.base_anchors[0], expected)


def test_faster_rcnn_base_anchors_stride64():
    gen = faster_rcnn_anchors()
    # base 64 * 8 = 512: ratio 0.5 -> 724.08 x 362.04.
    expected = torch.tensor([
        [-362.038672, -181.019336, 362.038672, 181.019336],
        [-256.0, -256.0, 256.0, 256.0],
        [-181.019336, -362.038672, 181.019336, 362.038672],
    ])
    torch.testing.assert_close(gen.base_anchors[4], expected)


def test_retinanet_octave_scales_ratio_major():
    gen = AnchorGenerator(strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], octave_base_scale=4,
                          scales_per_octave=3)
    assert gen.num_base_anchors == 9
    assert gen.scales == pytest.approx([4.0, 5.039684, 6.349604], rel=1e-6)
    base = gen.base_anchors[0]
    assert base.shape == (9, 4)
    ws = base[:, 2] - base[:, 0]
    hs = base[:, 3] - base[:, 1]
    # Ratio-major: rows 0-2 are ratio 0.5 at scales 4, 5.04, 6.35; rows 3-5 ratio 1; rows 6-8 ratio 2.
    expected_w = [8 * s * SQ2 for s in (4, 5.039684, 6.349604)] + [8 * s for s in (4, 5.039684, 6.349604)] + \
                 [8 * s / SQ2 for s in (4, 5.039684, 6.349604)]
    expected_h = [8 * s / SQ2 for s in (4, 5.039684, 6.349604)] + [8 * s for s in (4, 5.039684, 6.349604)] + \
                 [8 * s * SQ2 for s in (4, 5.039684, 6.349604)]
    torch.testing.assert_close(ws, torch.tensor(expected_w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hs, torch.tensor(expected_h), rtol=1e-5, atol=1e-4)
    # Centred at 0 (center_offset 0).
    torch.testing.assert_close(base[:, :2] + base[:, 2:], torch.zeros(9, 2), atol=1e-4, rtol=0)
    # Row 4 = ratio 1, scale 4 * 2^(1/3): a 40.32 square.
    torch.testing.assert_close(base[4], torch.tensor([-20.158737, -20.158737, 20.158737, 20.158737]))


def test_center_offset_and_base_sizes():
    gen = AnchorGenerator(strides=[4], ratios=[1.0], scales=[8], center_offset=0.5)
    torch.testing.assert_close(gen.base_anchors[0], torch.tensor([[2.0 - 16, 2.0 - 16, 18.0, 18.0]]))
    gen = AnchorGenerator(strides=[4], ratios=[1.0], scales=[2], base_sizes=[10])
    torch.testing.assert_close(gen.base_anchors[0], torch.tensor([[-10.0, -10.0, 10.0, 10.0]]))


def test_grid_order_and_counts():
    gen = faster_rcnn_anchors()
    sizes = [(2, 3), (1, 2), (1, 1), (1, 1), (1, 1)]
    anchors = gen.grid_anchors(sizes, device="cpu")
    assert [a.shape for a in anchors] == [(18, 4), (6, 4), (3, 4), (3, 4), (3, 4)]
    base = gen.base_anchors[0]
    lvl0 = anchors[0].view(2, 3, 3, 4)  # (y, x, A, 4)
    torch.testing.assert_close(lvl0[0, 0], base)
    # Second location is shifted by the stride along x.
    torch.testing.assert_close(anchors[0][3:6], base + torch.tensor([4.0, 0.0, 4.0, 0.0]))
    # Location (y=1, x=0) comes after the whole first row.
    torch.testing.assert_close(anchors[0][9:12], base + torch.tensor([0.0, 4.0, 0.0, 4.0]))
    torch.testing.assert_close(lvl0[1, 2], base + torch.tensor([8.0, 4.0, 8.0, 4.0]))
    # Level 1: stride 8, second location at x = 8.
    torch.testing.assert_close(anchors[1][3:6], gen.base_anchors[1] + torch.tensor([8.0, 0.0, 8.0, 0.0]))


def test_valid_flags_pad_smaller_than_featmap():
    gen = AnchorGenerator(strides=[8], ratios=[0.5, 1.0], scales=[4])
    # Feature map 4 x 5 (batch padded), but this image's padded shape is 20 x 17:
    # ceil(20 / 8) = 3 valid rows, ceil(17 / 8) = 3 valid columns.
    (flags,) = gen.valid_flags([(4, 5)], (20, 17), device="cpu")
    assert flags.dtype == torch.bool and flags.shape == (4 * 5 * 2,)
    expected_locations = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(flags.view(4, 5, 2), expected_locations[:, :, None].expand(4, 5, 2))
    # A pad shape covering the map (or larger) keeps everything.
    (flags,) = gen.valid_flags([(4, 5)], (32, 40), device="cpu")
    assert bool(flags.all())
    (flags,) = gen.valid_flags([(4, 5)], (64, 64), device="cpu")
    assert bool(flags.all())


def test_anchor_inside_flags():
    anchors = torch.tensor([
        [-5.0, 0.0, 10.0, 10.0],   # crosses the left border by 5
        [0.0, 0.0, 20.0, 10.0],    # x2 == w: not inside (strict <)
        [0.0, 0.0, 19.9, 9.0],     # inside
        [-11.0, 0.0, 5.0, 5.0],    # crosses by 11
    ])
    valid = torch.tensor([True, True, True, True])
    img_shape = (10, 20)  # (h, w)
    assert anchor_inside_flags(anchors, valid, img_shape, 0).tolist() == [False, False, True, False]
    assert anchor_inside_flags(anchors, valid, img_shape, -1).tolist() == [True, True, True, True]
    assert anchor_inside_flags(anchors, valid, img_shape, 10).tolist() == [True, True, True, False]
    valid = torch.tensor([True, False, True, True])
    assert anchor_inside_flags(anchors, valid, img_shape, -1).tolist() == [True, False, True, True]
    assert anchor_inside_flags(anchors, valid, img_shape, 10).tolist() == [True, False, True, False]


def test_bad_arguments():
    with pytest.raises(ValueError):
        AnchorGenerator(strides=[8], ratios=[1.0], scales=[4], octave_base_scale=4, scales_per_octave=3)
    with pytest.raises(ValueError):
        AnchorGenerator(strides=[8], ratios=[1.0])
    with pytest.raises(ValueError):
        AnchorGenerator(strides=[8, 16], ratios=[1.0], scales=[4], base_sizes=[8])
    with pytest.raises(ValueError):
        faster_rcnn_anchors().grid_anchors([(2, 2)], device="cpu")


def test_build_from_config():
    gen = build({"type": "AnchorGenerator", "strides": [8, 16], "ratios": [1.0], "octave_base_scale": 4,
                 "scales_per_octave": 2})
    assert gen.num_base_anchors == 2
    with pytest.raises(ConfigError, match="scales_per_octave"):
        build({"type": "AnchorGenerator", "strides": [8], "ratios": [1.0], "octave_base_scale": 4,
               "scales_per_octave": 2.5})
