"""FCOS (Tian et al. 2019): points, distance coder, target assignment, centre-ness, losses and decoding against
hand-computed values; the pipelines against MMDetection's models; a tiny FCOS overfitting a few images.

Expected values: computed by hand in each test (the FCOS paper's rules: a point is positive for the boxes it lies
in whose largest distance fits its level's range, the smallest such box wins; centre-ness Eq. 3); parameter counts
from MMDetection's own models (tests/fixtures/interop/mmdet, written by tests/fixtures/interop/make_mmdet_fixtures.py);
AP50 from pycocotools.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import make_shapes_dataset
from raydet.engine.hooks import LrSchedulerHook
from raydet.engine.optim import build_optimizer, parse_lr_schedule, parse_optimizer
from raydet.models.dense_heads.fcos_head import FCOSHead, centerness_target
from raydet.models.head_configs import DetectionConfig
from raydet.models.losses import CrossEntropyLoss, FocalLoss, IoULoss
from raydet.models.task_modules.coders import DistancePointBBoxCoder
from raydet.models.task_modules.prior_generators import MlvlPointGenerator
from test_detectors import TINY, _ap, _train, build_from_pipeline

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "interop" / "mmdet"
FCOS_1X = "fcos_r50_caffe_fpn_gn-head_1x_coco.yaml"
FCOS_MS = "fcos_r50_caffe_fpn_gn-head_mstrain_640-800_2x_coco.yaml"
STRIDES = [8, 16, 32, 64, 128]
RANGES = [[-1, 64], [64, 128], [128, 256], [256, 512], [512, 1e8]]


def _head(**kwargs) -> FCOSHead:
    args = {"num_classes": 2, "in_channels": 8, "feat_channels": 8, "stacked_convs": 1, "strides": STRIDES,
            "regress_ranges": RANGES, "norm_cfg": None, "loss_cls": FocalLoss(), "loss_bbox": IoULoss(),
            "loss_centerness": CrossEntropyLoss(use_sigmoid=True)}
    args.update(kwargs)
    return FCOSHead(**args)


def _targets(head: FCOSHead, sizes, boxes, labels):
    """Per-level points and the labels / targets of one image: ({(level, x, y): (label, target)}, positives)."""
    points = head.prior_generator.grid_priors(sizes, with_stride=True)
    labels_, targets = head.get_targets(torch.cat(points), [p.shape[0] for p in points],
                                        [torch.tensor(boxes, dtype=torch.float32)], [torch.tensor(labels)])
    out, start = {}, 0
    for level, pts in enumerate(points):
        for j, (x, y) in enumerate(pts[:, :2].tolist()):
            out[(level, x, y)] = (int(labels_[0, start + j]), targets[0, start + j].tolist())
        start += pts.shape[0]
    return out, {k for k, (lab, _) in out.items() if lab < head.num_classes}


# ------------------------------------------------------------------------------------------------- points, coder

def test_points_and_strides_of_each_level():
    """A 64 x 96 (H x W) input: levels of 8 x 12, 4 x 6, 2 x 3, 1 x 2 and 1 x 1 locations; the point of location
    (y, x) of stride s is ((x + 0.5) s, (y + 0.5) s), row-major."""
    gen = MlvlPointGenerator(STRIDES)
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    points = gen.grid_priors(sizes, with_stride=True)
    assert [p.shape for p in points] == [(96, 4), (24, 4), (6, 4), (2, 4), (1, 4)]
    assert points[0][:3, :2].tolist() == [[4, 4], [12, 4], [20, 4]]
    assert points[0][12, :2].tolist() == [4, 12]  # second row
    assert points[0][-1, :2].tolist() == [92, 60]
    assert points[2].tolist() == [[16, 16, 32, 32], [48, 16, 32, 32], [80, 16, 32, 32],
                                  [16, 48, 32, 32], [48, 48, 32, 32], [80, 48, 32, 32]]
    assert points[3].tolist() == [[32, 32, 64, 64], [96, 32, 64, 64]]
    assert points[4].tolist() == [[64, 64, 128, 128]]
    # an image padded to 40 x 96 inside the batch: stride-8 rows 0..4 (ceil(40 / 8) = 5) are its own
    valid = gen.valid_flags(sizes, (40, 96))[0].reshape(8, 12)
    assert valid[:5].all() and not valid[5:].any()
    with pytest.raises(ValueError, match="2 feature map sizes for 5 point levels"):
        gen.grid_priors(sizes[:2])


def test_distance_coder_round_trip_and_clipping():
    coder = DistancePointBBoxCoder()
    points = torch.tensor([[10.0, 20.0], [50.0, 50.0]])
    boxes = torch.tensor([[0.0, 5.0, 30.0, 45.0], [40.0, 30.0, 70.0, 90.0]])
    dist = coder.encode(points, boxes)
    assert dist.tolist() == [[10, 15, 20, 25], [10, 20, 20, 40]]  # l = x - x1, t = y - y1, r = x2 - x, b = y2 - y
    assert torch.equal(coder.decode(points, dist), boxes)
    torch.testing.assert_close(coder.encode(points, boxes, max_dis=16),
                               torch.tensor([[10, 15, 15.9, 15.9], [10, 15.9, 15.9, 15.9]]))
    # (10, 10) with (20, 5, 100, 200): (-10, 5, 110, 210), clipped to a 60 x 80 (H x W) image
    far = torch.tensor([[20.0, 5.0, 100.0, 200.0]])
    assert coder.decode(torch.tensor([[10.0, 10.0]]), far, max_shape=(60, 80)).tolist() == [[0, 5, 80, 60]]
    assert DistancePointBBoxCoder(clip_border=False).decode(torch.tensor([[10.0, 10.0]]), far,
                                                            max_shape=(60, 80)).tolist() == [[-10, 5, 110, 210]]


# ------------------------------------------------------------------------------------------------- targets

SIZES_256 = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # a 256 x 256 input


def test_regress_ranges_decide_the_level_of_each_point():
    """Box (20, 20, 220, 220): a point is positive where its largest distance fits its level's range."""
    head = _head()
    out, pos = _targets(head, SIZES_256, [[20, 20, 220, 220]], [1])
    # stride 8, (116, 116): (96, 96, 104, 104), max 104 > 64
    assert out[(0, 116, 116)][0] == 2
    # stride 16, (120, 120): (100, 100, 100, 100), max 100 in [64, 128]
    assert out[(1, 120, 120)] == (1, [100, 100, 100, 100])
    # stride 32, (112, 112): max 108 < 128; (48, 48): (28, 28, 172, 172), max 172 in [128, 256]
    assert out[(2, 112, 112)][0] == 2
    assert out[(2, 48, 48)] == (1, [28, 28, 172, 172])
    # stride 64: (96, 96) max 124 < 256, (32, 32) max 188 < 256: no positive on P6 or P7
    assert not {k for k in pos if k[0] >= 3}
    # every positive point lies inside the box, with its largest distance inside its level's range
    for level, x, y in pos:
        d = max(x - 20, y - 20, 220 - x, 220 - y)
        assert 20 < x < 220 and 20 < y < 220 and RANGES[level][0] <= d <= RANGES[level][1]


def test_a_point_in_two_boxes_takes_the_smaller():
    """(124, 124) on stride 8 lies in C = (100, 100, 150, 150) (max distance 26) and D = (60, 60, 180, 180) (max 64:
    the upper end of [-1, 64] is inclusive); C, the smaller, wins."""
    head = _head()
    out, _ = _targets(head, SIZES_256, [[60, 60, 180, 180], [100, 100, 150, 150]], [0, 1])
    assert out[(0, 124, 124)] == (1, [24, 24, 26, 26])
    # (76, 76) is in D only: (16, 16, 104, 104) max 104 > 64 on stride 8 -> background
    assert out[(0, 76, 76)][0] == 2


def test_center_sampling_keeps_the_central_region_clipped_to_the_box():
    """Box (30, 46, 90, 58) on stride 8 (points at 4 + 8k): inside it (strictly), the points of row y = 52 with
    x = 36 ... 84 (7 points). Centre sampling, radius 1.5: the square of half-side 12 around (60, 52) is
    (48, 40, 72, 64), clipped to the box: (48, 46, 72, 58): x in {52, 60, 68}. Unclipped, rows 44 and 60 (outside
    the box) would be in it."""
    box = [[30, 46, 90, 58]]
    _, plain = _targets(_head(), SIZES_256, box, [0])
    assert plain == {(0, x, 52) for x in range(36, 85, 8)}
    _, centre = _targets(_head(center_sampling=True, center_sample_radius=1.5), SIZES_256, box, [0])
    assert centre == {(0, 52, 52), (0, 60, 52), (0, 68, 52)}


def test_centerness_of_a_known_box_at_a_known_point():
    """Box (0, 0, 100, 50), point (30, 10): l, t, r, b = 30, 10, 70, 40: sqrt(30/70 * 10/40) = sqrt(3/28)."""
    dist = DistancePointBBoxCoder().encode(torch.tensor([[30.0, 10.0]]), torch.tensor([[0.0, 0.0, 100.0, 50.0]]))
    assert centerness_target(dist).item() == pytest.approx(math.sqrt(3 / 28), rel=1e-6)
    # at the centre 1, and symmetric in l <-> r and t <-> b
    assert centerness_target(torch.tensor([[50.0, 25.0, 50.0, 25.0], [70.0, 40.0, 30.0, 10.0]])).tolist() == \
        pytest.approx([1.0, math.sqrt(3 / 28)])


def test_norm_on_bbox_targets_in_strides_and_predictions_in_pixels_at_test_time():
    head = _head(norm_on_bbox=True)
    out, _ = _targets(head, SIZES_256, [[20, 20, 220, 220]], [1])
    assert out[(1, 120, 120)] == (1, [100 / 16] * 4)
    with torch.no_grad():
        for m in (head.conv_reg,):
            m.weight.zero_()
            m.bias.fill_(2.0)
        feats = [torch.zeros(1, 8, 2, 2) for _ in STRIDES]
        head.train()
        train_pred = head(feats)[1]
        head.eval()
        test_pred = head(feats)[1]
    assert [float(p[0, 0, 0, 0]) for p in train_pred] == [2.0] * 5  # relu(scale * 2), scale 1
    assert [float(p[0, 0, 0, 0]) for p in test_pred] == [2.0 * s for s in STRIDES]


def test_dcn_on_last_conv_starts_as_half_the_plain_conv():
    """dcn_on_last_conv: the last conv of each tower is a modulated deformable conv (DCNv2) whose offset / mask
    branch starts at zero: offsets 0 and masks sigmoid(0) = 0.5, i.e. half the plain 3x3 conv of its weight."""
    head = _head(stacked_convs=2, dcn_on_last_conv=True)
    for tower in (head.cls_convs, head.reg_convs):
        dcn = tower[2]  # conv, ReLU, then the last conv (no norm)
        assert type(dcn).__name__ == "ModulatedDeformConv2dPack" and dcn.bias is not None
        x = torch.randn(1, 8, 6, 6)
        plain = torch.nn.functional.conv2d(x, dcn.weight, dcn.bias, padding=1)
        torch.testing.assert_close(dcn(x), 0.5 * (plain - dcn.bias[None, :, None, None])
                                   + dcn.bias[None, :, None, None])
    assert type(_head(stacked_convs=2).cls_convs[2]).__name__ == "Conv2d"


# ------------------------------------------------------------------------------------------------- losses, decoding

def test_losses_of_hand_made_outputs():
    """Strides 8, 16 on a 32 x 32 image, C = 2, one box (2, 2, 14, 14) of class 0. Positives: the four stride-8
    points (4|12, 4|12), each at distances (2, 2, 10, 10) up to symmetry (max 10 in [-1, 64]); the stride-16 points
    (8|24, 8|24) have max distance >= 6 outside [64, inf). All logits 0 (p = 0.5), all distances 4.

    * focal: positive entries alpha (1-p)^2 (-log p) = 0.25 * 0.25 ln 2, the other 36 of the 20 x 2 entries
      0.75 * 0.25 ln 2; sum 7 ln 2 over 4 positives;
    * IoU: each predicted box (x +- 4, y +- 4) overlaps its 12 x 12 target by 6 x 6: IoU 36 / (64 + 144 - 36);
      loss -log(36 / 172) (the centre-ness weights, all 0.2, cancel);
    * centre-ness: target sqrt(2/10 * 2/10) = 0.2 for each, BCE of logit 0 is ln 2 whatever the target.
    """
    head = _head(strides=[8, 16], regress_ranges=[[-1, 64], [64, 1e8]])
    cls = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)]
    reg = [torch.full((1, 4, 4, 4), 4.0), torch.full((1, 4, 2, 2), 4.0)]
    ctr = [torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    batch = {"gt_boxes": [torch.tensor([[2.0, 2.0, 14.0, 14.0]])], "gt_labels": [torch.tensor([0])]}
    losses = head.loss(None, batch, outputs=(cls, reg, ctr))
    ln2 = math.log(2)
    assert losses["loss_cls"].item() == pytest.approx(7 * ln2 / 4, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(-math.log(36 / 172), rel=1e-5)
    assert losses["loss_centerness"].item() == pytest.approx(ln2, rel=1e-5)
    # no box: only the classification loss (all 40 entries negative, over max(0, 1) positives); exact zeros else
    empty = head.loss(None, {"gt_boxes": [torch.zeros(0, 4)], "gt_labels": [torch.zeros(0, dtype=torch.long)]},
                      outputs=(cls, reg, ctr))
    assert empty["loss_cls"].item() == pytest.approx(40 * 0.75 * 0.25 * ln2, rel=1e-5)
    assert empty["loss_bbox"].item() == 0 and empty["loss_centerness"].item() == 0


def test_predict_scores_are_class_times_centerness():
    """One level of 2 x 2 points at stride 8 (C = 2): point (12, 4) class 1 at sigmoid(2) = 0.881, centre-ness
    sigmoid(0) = 0.5; point (4, 12) class 0 at sigmoid(-2) = 0.119 > score_thr 0.05, centre-ness sigmoid(-2): its
    final score 0.119^2 = 0.014 is kept (MMDetection thresholds the class score alone). Boxes decode from the
    points, clipped to the 16 x 16 image, then scale back by the image's scale factor 2."""
    head = _head(strides=[8], regress_ranges=[[-1, 1e8]], test=DetectionConfig(score_thr=0.05))
    cls = torch.full((1, 2, 2, 2), -10.0)
    cls[0, 1, 0, 1] = 2.0
    cls[0, 0, 1, 0] = -2.0
    reg = torch.full((1, 4, 2, 2), 3.0)
    reg[0, :, 0, 1] = torch.tensor([2.0, 2.0, 8.0, 1.0])
    ctr = torch.zeros(1, 1, 2, 2)
    ctr[0, 0, 1, 0] = -2.0
    meta = {"img_shape": (16, 16), "ori_shape": (8, 8), "scale_factor": (2.0, 2.0), "flip": False}
    (res,) = head.predict_by_feat([cls], [reg], [ctr], img_metas=[meta])
    s_hi, s_lo = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))
    assert res["scores"].tolist() == pytest.approx([s_hi * 0.5, s_lo * s_lo], rel=1e-5)
    assert res["labels"].tolist() == [1, 0]
    # (12, 4) - (2, 2) .. + (8, 1) = (10, 2, 20, 5) -> x2 clipped to 16 -> / 2; (4, 12) +- 3 = (1, 9, 7, 15) / 2
    torch.testing.assert_close(res["boxes"], torch.tensor([[5, 1, 8, 2.5], [0.5, 4.5, 3.5, 7.5]]))


def test_open_regress_ranges_exclude_both_ends():
    """The box D = (60, 60, 180, 180) alone: stride-8 point (124, 124) has max distance 64, the shared end of
    [-1, 64] and [64, 128]. Closed ranges (MMDetection) make it positive; open ones (torchvision) do not, and its
    stride-16 point (120, 120) (max 60 < 64) is negative either way."""
    closed, _ = _targets(_head(), SIZES_256, [[60, 60, 180, 180]], [0])
    opened, _ = _targets(_head(regress_range_bounds="open"), SIZES_256, [[60, 60, 180, 180]], [0])
    assert closed[(0, 124, 124)] == (0, [64, 64, 56, 56])
    assert opened[(0, 124, 124)][0] == 2
    assert closed[(1, 120, 120)][0] == opened[(1, 120, 120)][0] == 2
    with pytest.raises(ValueError, match="regress_range_bounds"):
        _head(regress_range_bounds="half")


def test_uniform_bbox_loss_weight_averages_over_positives():
    """Two positives with different centre-ness: box (0, 0, 16, 32) on one stride-8 level of a 32 x 32 image,
    predicted distances all 6. Points (4, 4|12|20|28) and (12, 4|...) lie inside; take the loss per point
    l_i = -log IoU_i by hand and check 'uniform' = mean(l_i), 'centerness' = sum(c_i l_i) / sum(c_i)."""
    box = [0.0, 0.0, 16.0, 32.0]
    kw = {"strides": [8], "regress_ranges": [[-1, 1e8]]}
    outputs = ([torch.zeros(1, 2, 4, 4)], [torch.full((1, 4, 4, 4), 6.0)], [torch.zeros(1, 1, 4, 4)])
    batch = {"gt_boxes": [torch.tensor([box])], "gt_labels": [torch.tensor([0])]}
    losses, weights = [], []
    for y in (4, 12, 20, 28):
        for x in (4, 12):
            d = [x - box[0], y - box[1], box[2] - x, box[3] - y]
            inter = (min(6, d[0]) + min(6, d[2])) * (min(6, d[1]) + min(6, d[3]))
            losses.append(-math.log(inter / (144 + 16 * 32 - inter)))
            weights.append(math.sqrt(min(d[0], d[2]) / max(d[0], d[2]) * min(d[1], d[3]) / max(d[1], d[3])))
    uniform = _head(bbox_loss_weight="uniform", **kw).loss(None, batch, outputs=outputs)["loss_bbox"]
    weighted = _head(**kw).loss(None, batch, outputs=outputs)["loss_bbox"]
    assert uniform.item() == pytest.approx(sum(losses) / 8, rel=1e-5)
    assert weighted.item() == pytest.approx(sum(w * v for w, v in zip(weights, losses)) / sum(weights), rel=1e-5)
    assert abs(uniform.item() - weighted.item()) > 0.01


def test_sqrt_multiply_scores_select_on_the_joint_score():
    """torchvision's scoring: the point (4, 12) of test_predict_scores... has sqrt(0.119 x 0.119) = 0.119 <
    score_thr 0.2 and is dropped; (12, 4) scores sqrt(0.881 x 0.5) = 0.664."""
    head = _head(strides=[8], regress_ranges=[[-1, 1e8]], score_factor_mode="sqrt_multiply",
                 test=DetectionConfig(score_thr=0.2))
    cls = torch.full((1, 2, 2, 2), -10.0)
    cls[0, 1, 0, 1] = 2.0
    cls[0, 0, 1, 0] = -2.0
    ctr = torch.zeros(1, 1, 2, 2)
    ctr[0, 0, 1, 0] = -2.0
    meta = {"img_shape": (16, 16), "ori_shape": (16, 16), "scale_factor": (1.0, 1.0), "flip": False}
    (res,) = head.predict_by_feat([cls], [torch.full((1, 4, 2, 2), 3.0)], [ctr], img_metas=[meta])
    s_hi = 1 / (1 + math.exp(-2))
    assert res["scores"].tolist() == pytest.approx([math.sqrt(s_hi * 0.5)], rel=1e-5)
    assert res["labels"].tolist() == [1]
    with pytest.raises(ValueError, match="score_factor_mode"):
        _head(score_factor_mode="mean")


# ------------------------------------------------------------------------------------------------- pipelines

def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _reference_count(config: str, hand_count: int) -> int:
    """MMDetection's count from its fixture; the test's own hand count where the fixture is absent."""
    path = FIXTURES / f"{config}.json"
    return json.loads(path.read_text())["num_params"] if path.exists() else hand_count


@pytest.mark.parametrize("pipeline", [FCOS_1X, FCOS_MS])
def test_fcos_r50_has_mmdetection_parameter_count(pipeline):
    """MMDetection's fcos_r50-caffe_fpn_gn-head_1x_coco. By hand: ResNet-50 without fc 23,508,032; FPN laterals
    (512 + 1024 + 2048) x 256 + 3 x 256 and five 3x3 256 -> 256 convs with bias: 3,868,672; head: 8 tower convs
    (no bias under GN) 8 x 589,824, 8 GNs x 512, conv_cls 256 x 80 x 9 + 80, conv_reg 256 x 4 x 9 + 4,
    conv_centerness 256 x 9 + 1, 5 scales: 4,918,618. Total 32,295,322."""
    hand = 23_508_032 + 3_868_672 + (8 * 589_824 + 8 * 512 + 184_400 + 9_220 + 2_305 + 5)
    assert hand == 32_295_322
    model = build_from_pipeline(pipeline)
    assert type(model).__name__ == "FCOS"
    assert _num_params(model) == _reference_count("fcos_r50-caffe_fpn_gn-head_1x_coco", hand)
    head = model.bbox_head
    assert (head.strides, head.regress_ranges[-1], head.center_sampling, head.norm_on_bbox) == \
        (STRIDES, (512.0, 1e8), False, False)


def test_mstrain_pipeline_draws_one_of_the_two_short_sides():
    """Table 10's multi-scale training as MMDetection's config: each image's scale is (1333, 640) or (1333, 800)."""
    from raydet.registry import build

    cfg = load_config(ROOT / "pipelines" / FCOS_MS, [])
    resize = build(cfg.get("data.train.pipeline")[0])
    rng = np.random.default_rng(0)
    drawn = {tuple(resize.choose_scale(rng)) for _ in range(50)}
    assert drawn == {(1333, 640), (1333, 800)}
    assert cfg.get("train.max_epochs") == 24 and cfg.get("lr_schedule.steps") == [16, 22]


def test_fcos_optimizer_biases_at_twice_the_lr_without_decay():
    """MMDetection's paramwise_cfg (bias_lr_mult 2, bias_decay_mult 0) and ConstantLR warmup 1/3: during warmup a
    conv weight trains at 0.01 / 3 with decay 1e-4, a conv bias at 0.02 / 3 without decay, a GN weight and bias
    (norms are not "biases") at 0.01 / 3 with decay; after warmup 0.01 and 0.02."""
    cfg = load_config(ROOT / "pipelines" / FCOS_1X, TINY + ["model.bbox_head.in_channels=64",
                                                            "model.bbox_head.feat_channels=64"])
    model = cfg.build("model")
    opt_cfg = parse_optimizer(cfg.get("optimizer"))
    optimizer = build_optimizer(model, opt_cfg, lr=0.01)
    head = model.bbox_head
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    hook = LrSchedulerHook(0.01, parse_lr_schedule(cfg.get("lr_schedule")))
    runner = type("R", (), {"optimizer": optimizer, "epoch": 0, "iter": 0})()
    for it, scale in ((0, 1 / 3), (499, 1 / 3), (500, 1.0)):
        runner.iter = it
        hook.before_train_iter(runner)
        for param, lr, wd in [(head.conv_cls.weight, 0.01, 1e-4), (head.conv_cls.bias, 0.02, 0.0),
                              (head.cls_convs[1].weight, 0.01, 1e-4), (head.cls_convs[1].bias, 0.01, 1e-4),
                              (model.neck.lateral_convs[0][0].bias, 0.02, 0.0), (head.scales[0].scale, 0.01, 1e-4)]:
            group = group_of[id(param)]
            assert (group["lr"], group["weight_decay"]) == (pytest.approx(lr * scale), pytest.approx(wd))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in model.parameters()
                                                                        if p.requires_grad)
    assert opt_cfg.grad_clip == {"max_norm": 35, "norm_type": 2}


def test_paramwise_cfg_rejects_unknown_keys():
    from raydet.registry import ConfigError

    with pytest.raises(ConfigError, match=r"optimizer.paramwise_cfg.bias_lr_mul: unknown key of paramwise_cfg; "
                                          r"did you mean 'bias_lr_mult'"):
        parse_optimizer({"paramwise_cfg": {"bias_lr_mul": 2.0}})


# ------------------------------------------------------------------------------------------------- overfitting

TINY_FCOS = ["model.bbox_head.in_channels=64", "model.bbox_head.feat_channels=64",
             "model.backbone.norm_cfg={type: BN, requires_grad: true}"]


def test_tiny_fcos_overfits_a_few_images():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(2, height=64, width=64, max_objects=2, seed=3)  # 3 shapes of 23-30 px
    records = [r for _, r in samples]
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (AP50 1.0)
    model = build_from_pipeline(FCOS_1X, TINY + TINY_FCOS)
    batch = collate_samples(samples)
    first, last = _train(model, batch, 60, lr=3e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics
