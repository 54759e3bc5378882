"""DeltaXYWHBBoxCoder against hand-computed deltas and boxes."""
import math

import pytest
import torch

from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
from raydet.registry import build

RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


def random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_by_hand():
    coder = DeltaXYWHBBoxCoder(target_stds=RCNN_STDS)
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 2.0, 13.0, 12.0]])
    # centres (5, 5) -> (7, 7), size (10, 10) -> (12, 10): raw (0.2, 0.2, log 1.2, 0) / stds.
    expected = torch.tensor([[0.2 / 0.1, 0.2 / 0.1, math.log(1.2) / 0.2, 0.0]])
    torch.testing.assert_close(coder.encode(proposal, gt), expected)
    torch.testing.assert_close(coder.decode(proposal, expected), gt)


def test_means_are_subtracted():
    coder = DeltaXYWHBBoxCoder(target_means=(0.1, 0.0, 0.0, 0.5), target_stds=(1.0, 1.0, 1.0, 2.0))
    deltas = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[1.0, 2.0, 13.0, 12.0]]))
    torch.testing.assert_close(deltas, torch.tensor([[0.1, 0.2, math.log(1.2), -0.25]]))


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), RCNN_STDS])
def test_round_trip(stds):
    gen = torch.Generator().manual_seed(0)
    coder = DeltaXYWHBBoxCoder(target_stds=stds)
    boxes, gts = random_boxes(50, gen), random_boxes(50, gen)
    deltas = coder.encode(boxes, gts)
    torch.testing.assert_close(coder.decode(boxes, deltas), gts, atol=1e-4, rtol=1e-5)


def test_dw_clamp_and_clip():
    coder = DeltaXYWHBBoxCoder()
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    deltas = torch.tensor([[0.0, 0.0, 10.0, -10.0]])
    # dw, dh clamp to +-log(1000 / 16): w = 10 * 62.5 = 625, h = 10 * 0.016 = 0.16 around (5, 5).
    torch.testing.assert_close(coder.decode(box, deltas), torch.tensor([[-307.5, 4.92, 317.5, 5.08]]))
    # Clipped to (h, w) = (20, 30).
    torch.testing.assert_close(coder.decode(box, deltas, max_shape=(20, 30)),
                               torch.tensor([[0.0, 4.92, 30.0, 5.08]]))
    # clip_border=False ignores max_shape.
    no_clip = DeltaXYWHBBoxCoder(clip_border=False)
    torch.testing.assert_close(no_clip.decode(box, deltas, max_shape=(20, 30)),
                               torch.tensor([[-307.5, 4.92, 317.5, 5.08]]))


def test_ctr_clamp():
    coder = DeltaXYWHBBoxCoder(add_ctr_clamp=True, ctr_clamp=32)
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    deltas = torch.tensor([[1.0, 0.0, -10.0, 0.0]])
    # Centre shift 100 px is clamped to 32; dw is only capped from above, so exp(-10) stays.
    w = 100 * math.exp(-10)
    torch.testing.assert_close(coder.decode(box, deltas), torch.tensor([[82 - w / 2, 0.0, 82 + w / 2, 100.0]]))


def test_class_specific_decode():
    coder = DeltaXYWHBBoxCoder()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0]])
    deltas = torch.zeros(2, 8)
    deltas[0, 4:] = torch.tensor([0.1, -0.2, math.log(2.0), 0.0])
    out = coder.decode(boxes, deltas)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out[:, :4], boxes)  # zero deltas
    # Box 0, class 1: centre (5 + 1, 5 - 2), size (20, 10).
    torch.testing.assert_close(out[0, 4:], torch.tensor([-4.0, -2.0, 16.0, 8.0]))
    torch.testing.assert_close(out[1, 4:], boxes[1])


def test_batched_deltas():
    gen = torch.Generator().manual_seed(1)
    coder = DeltaXYWHBBoxCoder(target_stds=RCNN_STDS)
    boxes = random_boxes(5, gen)
    deltas = torch.randn(3, 5, 8, generator=gen)
    out = coder.decode(boxes, deltas, max_shape=(80, 90))
    assert out.shape == (3, 5, 8)
    for b in range(3):
        torch.testing.assert_close(out[b], coder.decode(boxes, deltas[b], max_shape=(80, 90)))
    # Per-image max_shape as a (B, 2) tensor.
    shapes = torch.tensor([[50.0, 60.0], [80.0, 90.0], [20.0, 30.0]])
    out = coder.decode(boxes, deltas, max_shape=shapes)
    for b in range(3):
        torch.testing.assert_close(out[b], coder.decode(boxes, deltas[b], max_shape=tuple(shapes[b].tolist())))


def test_decode_is_differentiable():
    coder = DeltaXYWHBBoxCoder()
    deltas = torch.zeros(1, 4, requires_grad=True)
    out = coder.decode(torch.tensor([[10.0, 10.0, 20.0, 30.0]]), deltas, max_shape=(100, 100))
    (out * torch.tensor([[1.0, 1.0, 2.0, 3.0]])).sum().backward()
    # x1 + 2 x2 = 3 cx + w / 2: d/d(dx) = 3 pw = 30, d/d(dw) = pw / 2 = 5;
    # y1 + 3 y2 = 4 cy + h: d/d(dy) = 4 ph = 80, d/d(dh) = ph = 20.
    torch.testing.assert_close(deltas.grad, torch.tensor([[30.0, 80.0, 5.0, 20.0]]))


def test_empty_and_build():
    coder = build({"type": "DeltaXYWHBBoxCoder", "target_stds": [0.1, 0.1, 0.2, 0.2]})
    assert coder.stds == RCNN_STDS
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 320)).shape == (0, 320)
    assert coder.encode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError):
        DeltaXYWHBBoxCoder(target_stds=(1.0, 1.0, 0.0, 1.0))
