"""GHM-C and GHM-R (Li et al. 2019, "Gradient Harmonized Single-stage Detector") against hand-computed values; the
GHM RetinaNet pipeline against MMDetection's model; a tiny GHM RetinaNet overfitting a few images.

Expected values: weights ``tot / (count_in_region * non_empty_regions)`` (MMDetection's form of the paper's
beta = N / GD(g), Eq. 8) worked out by hand for hand-made gradient histograms; the authentic smooth L1
``sqrt(d^2 + mu^2) - mu`` (Eq. 14) by hand; the parameter count and buffers from MMDetection's own model
(tests/fixtures/interop/mmdet); AP50 from pycocotools.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.data.collate import collate_samples
from raydet.data.synthetic import make_shapes_dataset
from raydet.models.losses import GHMC, GHMR
from test_detectors import TINY, TINY_RETINA, _ap, _train, build_from_pipeline

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "interop" / "mmdet"
GHM_PIPELINE = "retinanet_ghm_r50_fpn_1x_coco.yaml"


def _logits(g: list[float]) -> torch.Tensor:
    """Logits whose sigmoid is g: against target 0 the gradient norm |sigmoid(x) - 0| is g."""
    g = torch.tensor(g, dtype=torch.float64)
    return torch.log(g / (1 - g))


def _weights(loss: GHMC, g: list[float], weight: list[float] | None = None) -> torch.Tensor:
    """The harmonizing weight of each element, read from the gradient: d loss / dx = w (p - y) / tot."""
    x = _logits(g).reshape(-1, 1).requires_grad_(True)
    target = torch.zeros_like(x)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64).reshape(-1, 1)
    loss(x, target, w).backward()
    tot = len(g) if weight is None else sum(v > 0 for v in weight)
    return (x.grad.reshape(-1) * tot / torch.tensor(g, dtype=torch.float64)).detach()


# ------------------------------------------------------------------------------------------------- GHM-C

def test_ghmc_weights_of_a_hand_made_histogram():
    """10 regions; g = 0.05, 0.05, 0.05 (region 0), 0.15 (region 1), 0.55 (region 5), 0.95 (region 9), plus one
    element of weight 0 (ignored). tot = 6 valid elements, 4 non-empty regions: weights 6 / (3 * 4) = 0.5 in
    region 0 and 6 / (1 * 4) = 1.5 elsewhere; the ignored element 0. The loss is sum(w * BCE) / tot with
    BCE = -log(1 - g) against target 0."""
    g = [0.05, 0.05, 0.05, 0.15, 0.55, 0.95, 0.5]
    weight = [1, 1, 1, 1, 1, 1, 0]
    loss = GHMC(bins=10, momentum=0.0)
    assert _weights(loss, g, weight).tolist() == pytest.approx([0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.0])
    x = _logits(g).reshape(-1, 1)
    expected = (0.5 * 3 * -math.log(0.95) + 1.5 * (-math.log(0.85) - math.log(0.45) - math.log(0.05))) / 6
    value = loss(x, torch.zeros_like(x), torch.tensor(weight, dtype=torch.float64).reshape(-1, 1))
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # the same histogram in 30 regions (the pipeline's): 0.05 -> 1, 0.15 -> 4, 0.55 -> 16, 0.95 -> 28
    assert _weights(GHMC(bins=30), g, weight).tolist() == pytest.approx([0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 0.0])


def test_ghmc_g_of_one_falls_in_the_last_region():
    """g = 1 exactly (a confident wrong prediction) belongs to the last region: two regions of one element each."""
    loss = GHMC(bins=10)
    x = torch.tensor([[100.0], [_logits([0.05]).item()]])
    y = torch.tensor([[0.0], [0.0]])
    x.requires_grad_(True)
    loss(x, y, torch.ones(2, 1)).backward()
    # weights 2 / (1 * 2) = 1: gradients (p - y) / tot
    torch.testing.assert_close(x.grad, torch.tensor([[0.5], [0.025]]))


def test_ghmc_momentum_update():
    """momentum 0.75, 10 regions. Batch 1: counts r0 = 3, r1 = 1, r5 = 1, r9 = 1 -> acc = 0.25 x counts;
    weights tot / (acc * n): 6 / (0.75 * 4) = 2 in r0, 6 / (0.25 * 4) = 6 elsewhere. Batch 2: g = 0.05, 0.15, 0.15,
    0.35: acc r0 = 0.75 * 0.75 + 0.25 * 1 = 0.8125, r1 = 0.75 * 0.25 + 0.25 * 2 = 0.6875, r3 = 0.25; r5, r9 (empty
    now) keep 0.25; n = 3, tot = 4."""
    loss = GHMC(bins=10, momentum=0.75)
    w1 = _weights(loss, [0.05, 0.05, 0.05, 0.15, 0.55, 0.95])
    assert w1.tolist() == pytest.approx([2, 2, 2, 6, 6, 6])
    assert loss.acc_sum.tolist() == pytest.approx([0.75, 0.25, 0, 0, 0, 0.25, 0, 0, 0, 0.25])
    w2 = _weights(loss, [0.05, 0.15, 0.15, 0.35])
    assert loss.acc_sum.tolist() == pytest.approx([0.8125, 0.6875, 0, 0.25, 0, 0.25, 0, 0, 0, 0.25])
    assert w2.tolist() == pytest.approx([4 / (0.8125 * 3), 4 / (0.6875 * 3), 4 / (0.6875 * 3), 4 / (0.25 * 3)])


def test_ghmc_takes_class_indices_and_sample_weights_as_heads_pass_them():
    """A dense head calls loss_cls(logits (N, C), labels (N,) with C = background, label_weights (N,)): the same as
    one-hot rows with per-element weights (MMDetection's _expand_onehot_labels)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    labels = torch.tensor([0, 2, 3, 1, 3])  # 3: background
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    onehot = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float32)
    a = GHMC(bins=30)(x, labels, weights, avg_factor=123.0)  # avg_factor plays no part (MMDetection)
    b = GHMC(bins=30)(x, onehot, weights[:, None].expand(-1, 3))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(ValueError, match="use_sigmoid"):
        GHMC(use_sigmoid=False)


# ------------------------------------------------------------------------------------------------- GHM-R

def _asl1(d: float, mu: float = 0.02) -> float:
    return math.sqrt(d * d + mu * mu) - mu


def test_ghmr_on_a_known_pair():
    """mu 0.02; d = pred - target = (0.5, -0.01, 0, 0.03): g = |d| / sqrt(d^2 + mu^2) = 0.9992, 0.447, 0, 0.832:
    one element in each of regions 9, 4, 0 and 8, so every weight is tot / (1 * 4) = 1 with tot = 4: the loss is
    the mean ASL1, times loss_weight 10."""
    pred = torch.tensor([[1.5, 0.99, 0.2, 0.33]])
    target = torch.tensor([[1.0, 1.0, 0.2, 0.3]])
    d = (0.5, -0.01, 0.0, 0.03)
    assert [_asl1(v) for v in d] == pytest.approx([0.48039984, 0.00236068, 0.0, 0.01605551], abs=1e-7)
    loss = GHMR(mu=0.02, bins=10, momentum=0.0, loss_weight=10.0)
    value = loss(pred, target, torch.ones(1, 4), avg_factor=7.0)
    assert value.item() == pytest.approx(10 * sum(_asl1(v) for v in d) / 4, rel=1e-5)


def test_ghmr_harmonizes_a_crowded_region():
    """d = (0.5, 0.6, 0.7, 0) and an ignored row: three elements in region 9 (weight 4 / (3 * 2) = 2/3), one in
    region 0 (4 / (1 * 2) = 2); tot = 4 (the weights' sum)."""
    pred = torch.tensor([[0.5, 0.6, 0.7, 0.0], [5.0, 5.0, 5.0, 5.0]])
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    value = GHMR(mu=0.02, bins=10)(pred, torch.zeros_like(pred), weight)
    expected = (2 / 3 * (_asl1(0.5) + _asl1(0.6) + _asl1(0.7)) + 2 * _asl1(0.0)) / 4
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ghmr_momentum_update():
    """momentum 0.7: the first batch's counts (regions 9, 4, 0, 8: one each) enter as 0.3 x count."""
    loss = GHMR(mu=0.02, bins=10, momentum=0.7)
    loss(torch.tensor([[0.5, -0.01, 0.0, 0.03]]), torch.zeros(1, 4), torch.ones(1, 4))
    assert loss.acc_sum.tolist() == pytest.approx([0.3, 0, 0, 0, 0.3, 0, 0, 0, 0.3, 0.3])


# ------------------------------------------------------------------------------------------------- pipeline

def test_ghm_retinanet_r50_has_mmdetection_parameter_count_and_buffers():
    """MMDetection's retinanet_r50_fpn_ghm-1x_coco: the GHM losses add no parameter. By hand: ResNet-50 without fc
    23,508,032; FPN laterals 917,504 + 768, three 3x3 outputs 3 x 590,080, P6 from C5 2048 x 256 x 9 + 256,
    P7 590,080: 7,997,440; head: 8 tower convs 8 x 590,080, retina_cls 256 x 720 x 9 + 720, retina_reg
    256 x 36 x 9 + 36: 6,463,220. Total 37,968,692. The losses' buffers (edges, running counts) are MMDetection's."""
    hand = 23_508_032 + 7_997_440 + 6_463_220
    assert hand == 37_968_692
    model = build_from_pipeline(GHM_PIPELINE)
    head = model.bbox_head
    assert type(head.loss_cls).__name__ == "GHMC" and type(head.loss_bbox).__name__ == "GHMR"
    assert (head.loss_cls.bins, head.loss_cls.momentum, head.loss_bbox.mu, head.loss_bbox.bins,
            head.loss_bbox.momentum, head.loss_bbox.loss_weight) == (30, 0.75, 0.02, 10, 0.7, 10.0)
    fixture = FIXTURES / "retinanet_r50_fpn_ghm-1x_coco.json"
    reference = json.loads(fixture.read_text()) if fixture.exists() else None
    assert sum(p.numel() for p in model.parameters()) == (reference["num_params"] if reference else hand)
    ours = {k: list(v.shape) for k, v in model.state_dict().items() if ".loss_" in k}
    if reference:
        assert ours == {k: s for k, s in reference["state_dict"] if ".loss_" in k}
    else:
        assert ours == {"bbox_head.loss_cls.edges": [31], "bbox_head.loss_cls.acc_sum": [30],
                        "bbox_head.loss_bbox.edges": [11], "bbox_head.loss_bbox.acc_sum": [10]}


def test_tiny_ghm_retinanet_overfits_a_few_images():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(2, height=64, width=64, max_objects=2, seed=3)  # 3 shapes of 23-30 px
    records = [r for _, r in samples]
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (AP50 1.0)
    model = build_from_pipeline(GHM_PIPELINE, TINY + TINY_RETINA)
    batch = collate_samples(samples)
    first, last = _train(model, batch, 80, lr=2e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
