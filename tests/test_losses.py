"""Loss values against the formulas, worked out by hand on two or three numbers."""
import math

import pytest
import torch

from raydet.models.losses import (BalancedL1Loss, BoundedIoULoss, CrossEntropyLoss, FocalLoss, GIoULoss, IoULoss,
                                  L1Loss, SmoothL1Loss, weight_reduce_loss)
from raydet.registry import ConfigError, build

LN2 = math.log(2.0)


def close(actual, expected, **kw):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kw)


# ---------------------------------------------------------------------------------------------------- reduction

def test_weight_reduce_loss():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    close(weight_reduce_loss(loss, w, "none"), [1.0, 0.0, 3.0, 4.0])
    close(weight_reduce_loss(loss, w, "mean"), 2.0)         # 8 / 4 elements
    close(weight_reduce_loss(loss, w, "sum"), 8.0)
    close(weight_reduce_loss(loss, w, "mean", avg_factor=2), 4.0)  # 8 / 2
    close(weight_reduce_loss(loss, None, "mean", avg_factor=5), 2.0)
    assert torch.isfinite(weight_reduce_loss(loss * 0, None, "mean", avg_factor=0))
    with pytest.raises(ValueError):
        weight_reduce_loss(loss, w, "sum", avg_factor=2)


def test_loss_weight_and_reduction_override():
    loss = L1Loss(reduction="sum", loss_weight=2.0)
    pred, target = torch.tensor([[1.0, 2.0, 0.0, 0.0]]), torch.zeros(1, 4)
    close(loss(pred, target), 6.0)
    close(loss(pred, target, reduction_override="mean"), 1.5)
    close(loss(pred, target, reduction_override="none"), [[2.0, 4.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        L1Loss(reduction="avg")


# ---------------------------------------------------------------------------------------------------- regression

def test_smooth_l1_below_and_above_beta():
    pred, target = torch.tensor([0.5, 2.0, -0.25]), torch.zeros(3)
    # beta 1: 0.5 * 0.25 = 0.125; 2 - 0.5 = 1.5; 0.5 * 0.0625 = 0.03125.
    close(SmoothL1Loss(beta=1.0, reduction="none")(pred, target), [0.125, 1.5, 0.03125])
    # beta 0.5: 0.5 -> 0.5 - 0.25 = 0.25 (not below beta); 2 -> 1.75; 0.25 -> 0.5 * 0.0625 / 0.5 = 0.0625.
    close(SmoothL1Loss(beta=0.5, reduction="none")(pred, target), [0.25, 1.75, 0.0625])
    # beta 1/9 (the RPN study): 2 - 1/18.
    close(SmoothL1Loss(beta=1 / 9, reduction="sum")(torch.tensor([2.0]), torch.zeros(1)), 2 - 1 / 18)


def test_smooth_l1_beta_zero_is_l1_with_finite_grad():
    pred = torch.tensor([0.0, -1.5, 2.0], requires_grad=True)
    loss = SmoothL1Loss(beta=0.0, reduction="sum")(pred, torch.zeros(3))
    close(loss, 3.5)
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_box_loss_weights_per_box_and_per_coordinate():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    target = torch.zeros(2, 4)
    l1 = L1Loss()
    close(l1(pred, target), 14.0 / 8)
    close(l1(pred, target, weight=torch.tensor([1.0, 0.0])), 10.0 / 8)  # (N,) weight -> per box
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    close(l1(pred, target, weight=w), 2.0 / 8)
    close(l1(pred, target, weight=w, avg_factor=2), 1.0, atol=1e-5, rtol=1e-5)
    close(l1(torch.zeros(0, 4), torch.zeros(0, 4)), 0.0)


def balanced_l1_paper(x, alpha=0.5, gamma=1.5):
    """Libra R-CNN eq. 8 with b from alpha ln(b + 1) = gamma and C making the two pieces meet at |x| = 1."""
    b = math.exp(gamma / alpha) - 1
    inner = lambda t: alpha / b * (b * t + 1) * math.log(b * t + 1) - alpha * t  # noqa: E731
    c = inner(1.0) - gamma * 1.0
    x = abs(x)
    return inner(x) if x < 1 else gamma * x + c


def test_balanced_l1_against_paper():
    b = math.exp(3.0) - 1
    assert 0.5 * math.log(b + 1) == pytest.approx(1.5)
    xs = [0.1, 0.5, -0.9, 1.0, 2.0]
    expected = [balanced_l1_paper(x) for x in xs]
    assert expected[1] == pytest.approx(0.40057, abs=1e-4)  # by hand: 0.0262 * 10.5428 * 2.3554 - 0.25
    out = BalancedL1Loss(reduction="none")(torch.tensor(xs), torch.zeros(5))
    close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- decoded boxes

def test_iou_loss_modes():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    target = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 50 / 150 = 1/3
    close(IoULoss()(pred, target), math.log(3.0))
    close(IoULoss(mode="linear")(pred, target), 2 / 3)
    close(IoULoss(linear=True)(pred, target), 2 / 3)
    close(IoULoss(mode="square")(pred, target), 1 - 1 / 9)
    # Disjoint boxes: IoU clamped at eps.
    close(IoULoss()(pred, torch.tensor([[20.0, 0.0, 30.0, 10.0]])), -math.log(1e-6), rtol=1e-4, atol=1e-4)


def test_giou_loss():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    target = torch.tensor([[5.0, 0.0, 15.0, 10.0],    # enclosing == union: GIoU = IoU = 1/3
                           [20.0, 0.0, 30.0, 10.0]])  # IoU 0, enclosing 300, union 200: GIoU = -1/3
    close(GIoULoss(reduction="none")(pred, target), [2 / 3, 4 / 3])
    # (N, 4) weights are averaged per box.
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    close(GIoULoss(reduction="sum")(pred, target, weight=w), 2 / 3)
    close(GIoULoss()(pred, target, weight=torch.tensor([0.0, 2.0]), avg_factor=1), 8 / 3, rtol=1e-5, atol=1e-5)


def test_bounded_iou_loss_against_paper():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    target = torch.tensor([[2.0, 0.0, 12.0, 20.0]])
    # Target centre (7, 10), size (10, 20); pred centre (5, 5), size (10, 10).
    cost_x = 1 - (10 - 2 * 2) / (10 + 2 * 2)   # 1 - 6/14
    cost_y = 1 - (20 - 2 * 5) / (20 + 2 * 5)   # 1 - 1/3
    cost_w = 1 - min(10 / 10, 10 / 10)        # 0
    cost_h = 1 - min(10 / 20, 20 / 10)        # 0.5
    beta = 0.2
    smooth = [c - 0.5 * beta if c >= beta else 0.5 * c * c / beta for c in (cost_x, cost_y, cost_w, cost_h)]
    out = BoundedIoULoss(beta=beta, reduction="none")(pred, target)
    assert out.shape == (1, 4)
    close(out, [smooth], atol=2e-4, rtol=0)  # eps = 1e-3 in the denominators
    out.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_decoded_box_losses_flag_and_zero_weight():
    assert IoULoss.takes_decoded_boxes and GIoULoss.takes_decoded_boxes and BoundedIoULoss.takes_decoded_boxes
    for cls in (CrossEntropyLoss, FocalLoss, SmoothL1Loss, L1Loss, BalancedL1Loss):
        assert cls.takes_decoded_boxes is False
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0]], requires_grad=True)  # degenerate: would be log(eps)
    loss = IoULoss()(pred, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), weight=torch.zeros(1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(1, 4))


# ---------------------------------------------------------------------------------------------------- focal

def test_focal_loss_at_p_half():
    pred = torch.zeros(2, 2)  # p = 0.5 everywhere
    target = torch.tensor([0, 2])  # row 1 is background (index C = 2)
    pos = 0.25 * 0.5 ** 2 * LN2          # alpha (1 - p)^2 (-log p)
    neg = 0.75 * 0.5 ** 2 * LN2          # (1 - alpha) p^2 (-log(1 - p))
    close(FocalLoss(reduction="none")(pred, target), [[pos, neg], [neg, neg]])
    close(FocalLoss(reduction="sum")(pred, target), pos + 3 * neg)
    close(FocalLoss()(pred, target, avg_factor=1), pos + 3 * neg, rtol=1e-5, atol=1e-6)
    close(FocalLoss(reduction="sum")(pred, target, weight=torch.tensor([1.0, 0.0])), pos + neg)
    close(FocalLoss(reduction="sum", gamma=0.0, alpha=0.5)(pred, target), 4 * 0.5 * LN2)


# ---------------------------------------------------------------------------------------------------- cross-entropy

def test_softmax_ce_with_class_weight():
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([0, 2])
    ce0 = math.log(math.e + 2) - 1        # 0.55144
    ce1 = math.log(2 + math.e ** 2)       # 2.23954
    close(CrossEntropyLoss()(pred, target), (ce0 + ce1) / 2)
    # Each sample is scaled by its class weight; the mean still divides by N.
    close(CrossEntropyLoss(class_weight=[1.0, 2.0, 3.0])(pred, target), (ce0 + 3 * ce1) / 2)
    close(CrossEntropyLoss(reduction="none")(pred, target, weight=torch.tensor([2.0, 0.0])), [2 * ce0, 0.0])


def test_softmax_ce_ignore_index():
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    ce0 = math.log(math.e + 2) - 1
    close(CrossEntropyLoss(reduction="none")(pred, torch.tensor([0, -100])), [ce0, 0.0])
    close(CrossEntropyLoss(ignore_index=1, reduction="sum")(pred, torch.tensor([0, 1])), ce0)


def bce(x, y):
    return math.log(1 + math.exp(x)) - x * y


def test_sigmoid_ce_background_row():
    pred = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -2.0]])
    target = torch.tensor([1, 3])  # row 1: background (index C = 3) -> every class negative
    expected = [[bce(0.5, 0), bce(-1.0, 1), bce(2.0, 0)], [bce(1.0, 0), bce(0.0, 0), bce(-2.0, 0)]]
    loss = CrossEntropyLoss(use_sigmoid=True, reduction="none")
    close(loss(pred, target), expected)
    # Negative labels are ignored (weight 0); per-sample weights broadcast over classes.
    close(loss(pred, torch.tensor([1, -1])), [expected[0], [0.0, 0.0, 0.0]])
    close(loss(pred, target, weight=torch.tensor([0.0, 2.0])), [[0.0] * 3, [2 * v for v in expected[1]]])
    # class_weight weighs the positive term.
    close(CrossEntropyLoss(use_sigmoid=True, class_weight=[1.0, 3.0, 1.0], reduction="none")(pred, target)[0, 1],
          3 * bce(-1.0, 1))


def test_sigmoid_ce_binary_objectness():
    target = torch.tensor([1, 0, -1])
    expected = [bce(2.0, 1), bce(-1.0, 0), 0.0]
    loss = CrossEntropyLoss(use_sigmoid=True, reduction="none")
    close(loss(torch.tensor([2.0, -1.0, 3.0]), target), expected)
    close(loss(torch.tensor([[2.0], [-1.0], [3.0]]), target), [[v] for v in expected])
    close(CrossEntropyLoss(use_sigmoid=True)(torch.tensor([2.0, -1.0, 3.0]), target.float(), avg_factor=2),
          sum(expected) / 2, rtol=1e-5, atol=1e-6)


def test_mask_ce_selects_label_channel():
    pred = torch.full((2, 3, 2, 2), 50.0)  # wrong channels would give a huge loss against zero targets
    pred[0, 2] = torch.tensor([[0.0, 1.0], [-1.0, 2.0]])
    pred[1, 0] = 0.0
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    loss = CrossEntropyLoss(use_mask=True)
    roi0 = (bce(0.0, 0) + bce(1.0, 1) + bce(-1.0, 0) + bce(2.0, 1)) / 4
    roi1 = LN2
    close(loss(pred, target, label=torch.tensor([2, 0])), (roi0 + roi1) / 2)
    close(loss(pred, target, label=torch.tensor([2, 0]), reduction_override="none"), [roi0, roi1])
    close(loss(pred, target, weight=torch.tensor([1.0, 0.0]), avg_factor=1, label=torch.tensor([2, 0])),
          roi0, rtol=1e-5, atol=1e-6)


def test_build_losses_from_config():
    assert isinstance(build({"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}), FocalLoss)
    ce = build({"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0})
    assert ce.use_sigmoid
    with pytest.raises(ConfigError):
        build({"type": "SmoothL1Loss", "beta": 1.0, "reduction": "average"})
    with pytest.raises(ConfigError):
        build({"type": "IoULoss", "mode": "cube"})
