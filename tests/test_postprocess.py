"""boxes_to_original and paste_masks: hand-computed cases and an independent per-pixel reference.

The paste convention (Detectron2 / MMDetection ``_do_paste_mask``): output pixel (x, y) has its centre at
(x + 0.5, y + 0.5); the box's M x M mask covers [x1, x2] x [y1, y2], mask cell j covering
[x1 + j * w / M, x1 + (j + 1) * w / M), and is sampled bilinearly with zeros outside the mask.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydet.models.postprocess import boxes_to_original, paste_masks


# ------------------------------------------------------------------------------------------------ boxes_to_original
def test_boxes_to_original_undoes_the_resize():
    # The image was resized by sx = 0.5, sy = 0.25: divide x by 0.5 and y by 0.25.
    meta = {"ori_shape": (200, 100), "img_shape": (50, 50), "scale_factor": (0.5, 0.25)}
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = boxes_to_original(boxes, meta)
    assert torch.equal(out, torch.tensor([[20.0, 80.0, 60.0, 160.0]]))
    assert torch.equal(boxes, torch.tensor([[10.0, 20.0, 30.0, 40.0]]))  # input untouched


def test_boxes_to_original_clips_to_the_original_shape():
    meta = {"ori_shape": (200, 100), "img_shape": (50, 50), "scale_factor": (0.5, 0.25)}
    # [40, 45, 60, 55] -> [80, 180, 120, 220] -> x clipped to 100 (width), y to 200 (height).
    out = boxes_to_original(torch.tensor([[40.0, 45.0, 60.0, 55.0], [-4.0, -1.0, 2.0, 3.0]]), meta)
    assert torch.equal(out, torch.tensor([[80.0, 180.0, 100.0, 200.0], [0.0, 0.0, 4.0, 12.0]]))


def test_boxes_to_original_undoes_the_flip_in_the_resized_frame():
    # Flipped in the resized 50 x 60 image: x -> 60 - x (x1 and x2 swap roles), then undo the resize.
    meta = {"ori_shape": (200, 120), "img_shape": (50, 60), "scale_factor": (0.5, 0.25), "flip": True}
    out = boxes_to_original(torch.tensor([[10.0, 5.0, 20.0, 15.0]]), meta)
    assert torch.equal(out, torch.tensor([[80.0, 20.0, 100.0, 60.0]]))


def test_boxes_to_original_defaults_to_identity_and_handles_no_boxes():
    meta = {"ori_shape": (30, 40), "img_shape": (30, 40)}
    boxes = torch.tensor([[1.5, 2.5, 10.0, 20.0]])
    assert torch.equal(boxes_to_original(boxes, meta), boxes)
    assert boxes_to_original(torch.zeros((0, 4)), meta).shape == (0, 4)


# ------------------------------------------------------------------------------------------------ paste_masks
def reference_paste(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Per-pixel float64 reference of the convention in the module docstring (written independently, loops)."""
    m = mask.shape[0]
    x1, y1, x2, y2 = box
    out = np.zeros((height, width))

    def value(r, c):
        return mask[r, c] if 0 <= r < m and 0 <= c < m else 0.0

    for y in range(height):
        for x in range(width):
            # continuous mask coordinates, cell centres at j + 0.5
            u = (x + 0.5 - x1) / (x2 - x1) * m - 0.5
            v = (y + 0.5 - y1) / (y2 - y1) * m - 0.5
            c0, r0 = math.floor(u), math.floor(v)
            fu, fv = u - c0, v - r0
            out[y, x] = ((1 - fv) * ((1 - fu) * value(r0, c0) + fu * value(r0, c0 + 1))
                         + fv * ((1 - fu) * value(r0 + 1, c0) + fu * value(r0 + 1, c0 + 1)))
    return out


def inside_box(box, height, width):
    """bool (h, w): pixels whose centre lies strictly inside the box."""
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    x1, y1, x2, y2 = box
    return (xs > x1) & (xs < x2) & (ys > y1) & (ys < y2)


def test_all_ones_mask_fills_exactly_the_pixels_whose_centres_are_in_the_box():
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100)
    assert out.dtype == torch.bool and out.shape == (1, 100, 100)
    expected = torch.zeros(100, 100, dtype=torch.bool)
    expected[20:60, 10:30] = True  # y 20..59, x 10..29
    assert torch.equal(out[0], expected)
    assert int(out.sum()) == 20 * 40


@pytest.mark.parametrize("box", [[-10.0, -4.0, 12.0, 8.0], [90.0, 0.0, 130.0, 28.0], [3.0, 5.0, 4.0, 6.0]])
def test_all_ones_mask_fills_integer_boxes_clipped_to_the_image(box):
    # For integer boxes no larger than ~2 M, every pixel centre inside is >= 0.5 px from each edge, so it samples
    # >= 0.5 even at the corners, and every centre outside samples < 0.5: exactly the centre-inside pixels.
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 100, 100)
    assert np.array_equal(out[0].numpy(), inside_box(box, 100, 100))


@pytest.mark.parametrize("box", [[10.3, 20.7, 30.2, 59.6], [-10.0, -4.5, 12.25, 7.6]])
def test_all_ones_mask_on_fractional_boxes_follows_the_bilinear_rule(box):
    # Along one edge the sampled value is 0.5 + d * M / w for a centre d pixels inside (0.5 - d * M / w outside), so
    # away from the corners the pixels are those whose centres are inside; at a corner the two edge factors
    # multiply, and a corner pixel whose centre is barely inside can fall below 0.5 (as in Detectron2).
    out = paste_masks(torch.ones(1, 28, 28), torch.tensor([box]), 100, 100)[0].numpy()
    ref = reference_paste(np.ones((28, 28)), box, 100, 100) >= 0.5
    assert np.array_equal(out, ref)
    assert not (out & ~inside_box(box, 100, 100)).any()  # never a pixel whose centre is outside


def test_left_half_mask_pastes_into_the_left_half_of_the_box():
    mask = torch.zeros(1, 28, 28)
    mask[:, :, :14] = 1.0
    out = paste_masks(mask, torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100)
    expected = torch.zeros(100, 100, dtype=torch.bool)
    expected[20:60, 10:20] = True  # the box's left half: x 10..19
    assert torch.equal(out[0], expected)


def test_paste_matches_an_independent_bilinear_reference():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 7, 7, generator=gen)
    boxes = torch.tensor([[2.3, 1.7, 17.6, 11.2], [-3.0, 4.0, 9.5, 25.0], [5.0, 5.0, 6.5, 8.0]])
    probs = paste_masks(masks, boxes, 20, 24, threshold=-1)
    assert probs.dtype == torch.float32 and probs.shape == (3, 20, 24)
    for i in range(3):
        ref = reference_paste(masks[i].double().numpy(), boxes[i].tolist(), 20, 24)
        np.testing.assert_allclose(probs[i].numpy(), ref, atol=1e-5)
    binary = paste_masks(masks, boxes, 20, 24, threshold=0.5)
    assert torch.equal(binary, probs >= 0.5)


def test_negative_threshold_returns_probabilities():
    out = paste_masks(torch.full((1, 28, 28), 0.3), torch.tensor([[10.0, 20.0, 30.0, 60.0]]), 100, 100, threshold=-1)
    assert out.dtype == torch.float32
    # Mask cells span 20/28 px in x and 40/28 px in y; a pixel samples the mask's value when its centre is at least
    # half a cell inside, i.e. for x in 10..29 (10.5 - 10 >= 10/28) and y in 21..58.
    assert torch.allclose(out[0, 21:59, 10:30], torch.tensor(0.3))
    # Row y = 20: centre 0.5 px below y1 = 0.35 cells, i.e. 0.15 cell outside the first cell centre, weight 0.85.
    assert torch.allclose(out[0, 20, 10:30], torch.tensor(0.3 * 0.85))
    # Row y = 19 (centre 0.85 cell outside the first cell centre) still gets weight 0.15; beyond that, nothing.
    assert torch.allclose(out[0, 19, 10:30], torch.tensor(0.3 * 0.15))
    outside = torch.ones(100, 100, dtype=torch.bool)
    outside[19:61, 10:30] = False
    assert torch.all(out[0][outside] == 0)


def test_chunking_gives_the_same_result():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(5, 28, 28, generator=gen)
    xy = torch.rand(5, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 5 + torch.rand(5, 2, generator=gen) * 30], dim=1)
    whole = paste_masks(masks, boxes, 50, 60, threshold=-1)
    chunked = paste_masks(masks, boxes, 50, 60, threshold=-1, max_elements=2 * 50 * 60)  # chunks of 2
    single = paste_masks(masks, boxes, 50, 60, threshold=-1, max_elements=1)  # chunks of 1
    assert torch.equal(whole, chunked) and torch.equal(whole, single)
    assert torch.equal(paste_masks(masks, boxes, 50, 60, max_elements=1), whole >= 0.5)


def test_no_masks():
    out = paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 12)
    assert out.shape == (0, 10, 12) and out.dtype == torch.bool
