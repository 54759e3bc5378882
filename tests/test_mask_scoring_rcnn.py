"""Mask Scoring R-CNN (Huang et al. 2019): MaskIoU targets, loss and mask scores, segm evaluation by mask scores,
and a tiny model that overfits a few images.

Expected values are computed by hand in each test (areas of known masks and boxes), from MMDetection's fixture
(parameter counts), or by pycocotools (AP through raydet.evaluation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.evaluation import (
    coco_from_records,
    evaluate_coco,
    predictions_to_coco_results,
)
from raydet.models.losses import MSELoss
from raydet.models.roi_heads.mask_heads import (
    MaskIoUHead,
    mask_area_ratios,
    mask_iou_targets,
)

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "ms_rcnn_r50_caffe_fpn_1x_coco.yaml"


def test_area_ratios_of_known_boxes_on_a_known_mask():
    """A 10 x 10 square mask (rows and columns 4..13) of a 20 x 20 image; boxes cut to whole pixels as MMDetection's
    ``BitmapMasks.crop`` (corners truncated, at least one pixel)."""
    masks = torch.zeros(2, 20, 20, dtype=torch.uint8)
    masks[1, 4:14, 4:14] = 1
    boxes = torch.tensor([[4.0, 4.0, 9.7, 14.0],     # columns 4..8 (x2 9.7 -> 9), rows 4..13: 5 x 10 = 50 of 100
                          [0.0, 0.0, 20.0, 20.0],    # the whole image: 100 of 100
                          [15.5, 15.5, 15.9, 15.9],  # one pixel (15, 15), outside the square: 0
                          [-3.0, 8.0, 6.0, 30.0]])   # clipped: columns 0..5 (4, 5 inside), rows 8..19 (8..13): 12
    ratios = mask_area_ratios(boxes, torch.tensor([1, 1, 1, 1]), masks)
    torch.testing.assert_close(ratios, torch.tensor([0.5, 1.0, 0.0, 0.12]))


def test_mask_iou_targets_by_hand():
    """4 x 4 RoI grid. Row 0: target = left half (8 cells), prediction 6 cells above 0.5 of which 4 in the target,
    the instance half inside the RoI (ratio 0.5: its whole area 16): IoU = 4 / (6 + 16 - 4). Row 1: prediction equal
    to the target, instance wholly inside: 1. Row 2: probabilities exactly 0.5 are not foreground, empty target: 0."""
    target = torch.zeros(3, 4, 4)
    target[0, :, :2] = 1
    target[1, 1:3, 1:3] = 1
    probs = torch.zeros(3, 4, 4)
    probs[0, :2, :] = 0.9        # rows 0-1: 8 cells, 4 of them in the left half ...
    probs[0, 1, 2:] = 0.2        # ... less 2 cells of row 1 outside the target: 6 predicted, 4 overlapping
    probs[1] = target[1] * 0.7
    probs[2] = 0.5
    iou = mask_iou_targets(probs, target, torch.tensor([0.5, 1.0, 0.3]))
    torch.testing.assert_close(iou, torch.tensor([4 / 18, 1.0, 0.0]), rtol=1e-5, atol=1e-6)


def test_maskiou_head_sees_the_max_pooled_mask_and_predicts_per_class():
    head = MaskIoUHead(num_classes=3, loss_iou=MSELoss(loss_weight=0.5), in_channels=8, conv_out_channels=8,
                       fc_out_channels=16, roi_feat_size=14)
    seen = []
    head.convs[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    feats, logits = torch.randn(2, 8, 14, 14), torch.randn(2, 28, 28)
    out = head(feats, logits)
    assert out.shape == (2, 3)
    expected = (1 / (1 + np.exp(-logits.numpy()))).reshape(2, 14, 2, 14, 2).max(axis=(2, 4))  # 2 x 2 max of sigmoid
    assert seen[0].shape == (2, 9, 14, 14)
    torch.testing.assert_close(seen[0][:, :8], feats)
    np.testing.assert_allclose(seen[0][:, 8].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert head.convs[-1].stride == (2, 2) and head.fcs[0].in_features == 8 * 7 * 7


def test_maskiou_loss_on_positive_targets_and_mask_scores():
    """MSE (weight 0.5) over the RoIs whose target is above 0; score x MaskIoU of the detection's class."""
    head = MaskIoUHead(num_classes=3, loss_iou=MSELoss(loss_weight=0.5), in_channels=8, conv_out_channels=8,
                       fc_out_channels=16)
    loss = head.loss(torch.tensor([0.5, 0.2, 0.9]), torch.tensor([1.0, 0.0, 0.6]))["loss_mask_iou"]
    assert loss.item() == pytest.approx(0.5 * (0.5 ** 2 + 0.3 ** 2) / 2)
    iou = torch.tensor([[0.1, 0.2, 0.7], [0.4, 0.5, 0.6]])
    scores = head.mask_scores(iou, torch.tensor([2, 0]), torch.tensor([0.9, 0.5]))
    torch.testing.assert_close(scores, torch.tensor([0.9 * 0.7, 0.5 * 0.4]))


def test_maskiou_head_parameter_count_is_mmdetections():
    """R-50 pipeline: the MaskIoU head by hand (convs 257 -> 256, 3 x 256 -> 256, FCs 256 x 7 x 7 -> 1024 -> 1024,
    80 outputs) is the difference between MMDetection's Mask Scoring and Mask R-CNN models."""
    from raydet.config import load_config

    with torch.device("meta"):
        model = load_config(ROOT / "pipelines" / PIPELINE, []).build("model")
    head = sum(p.numel() for p in model.roi_head.mask_iou_head.parameters())
    by_hand = (257 * 256 * 9 + 256) + 3 * (256 * 256 * 9 + 256) + (12544 * 1024 + 1024) + (1024 * 1024 + 1024) \
        + (1024 * 80 + 80)
    fixtures = ROOT / "tests" / "fixtures" / "interop" / "mmdet"
    ms = json.loads((fixtures / "ms-rcnn_r50-caffe_fpn_1x_coco.json").read_text())["num_params"]
    mask = json.loads((fixtures / "mask-rcnn_r50_fpn_1x_coco.json").read_text())["num_params"]
    assert head == by_hand == ms - mask == 16_340_304
    assert sum(p.numel() for p in model.parameters()) == ms


def test_segm_evaluation_ranks_masks_by_mask_scores():
    """One object; two detections on its box: a wrong mask (IoU 0.25) with the higher box score, the right mask with
    the higher mask score. Box AP50 is 1; mask AP50 is 1 ranked by mask scores, 0.5 by box scores (a false positive
    before the only true positive: precision 1/2 at every recall)."""
    square = [[16.0, 16.0, 48.0, 16.0, 48.0, 48.0, 16.0, 48.0]]
    record = {"image_id": 1, "height": 64, "width": 64, "boxes": np.array([[16, 16, 48, 48]], np.float32),
              "labels": np.array([0]), "ignore": np.array([False]), "masks": [square]}
    good = np.zeros((64, 64), bool)
    good[16:48, 16:48] = True
    bad = np.zeros((64, 64), bool)
    bad[16:32, 16:32] = True
    pred = {"boxes": np.array([[16, 16, 48, 48]] * 2, np.float32), "scores": np.array([0.9, 0.6], np.float32),
            "labels": np.array([0, 0]), "masks": np.stack([bad, good]),
            "mask_scores": np.array([0.1, 0.8], np.float32)}
    gt = coco_from_records([record], ["square"])
    with_scores = evaluate_coco(gt, predictions_to_coco_results([pred], [1], [1]), ("bbox", "segm"))
    assert with_scores["bbox/AP50"] == pytest.approx(1.0) and with_scores["segm/AP50"] == pytest.approx(1.0)
    pred.pop("mask_scores")
    by_box = evaluate_coco(gt, predictions_to_coco_results([pred], [1], [1]), ("segm",))
    assert by_box["segm/AP50"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------- overfitting

TINY_MS = [  # the MaskIoU head of the ResNet-18 / 64-channel Mask R-CNN variant of test_detectors
    "model.backbone.norm_cfg={type: BN, requires_grad: true}",  # the caffe pipeline freezes the BN affine
    "model.roi_head.mask_iou_head.in_channels=64",
    "model.roi_head.mask_iou_head.conv_out_channels=64",
    "model.roi_head.mask_iou_head.fc_out_channels=256",
]


@pytest.fixture(scope="module")
def trained():
    """A tiny Mask Scoring R-CNN trained on 2 synthetic 64-px images (40 AdamW steps, as Mask R-CNN's test)."""
    from test_detectors import (
        TINY,
        TINY_MASK,
        TINY_ROI,
        TINY_RPN,
        _train,
        build_from_pipeline,
    )

    from raydet.data.collate import collate_samples
    from raydet.data.synthetic import make_shapes_dataset

    torch.set_num_threads(2)
    samples = make_shapes_dataset(2, height=64, width=64, max_objects=2, seed=3)  # test_detectors.small_shapes
    torch.manual_seed(0)
    model = build_from_pipeline(PIPELINE, TINY + TINY_RPN + TINY_ROI + TINY_MASK + TINY_MS)
    batch = collate_samples(samples, with_masks=True)
    first, last = _train(model, batch, 40, lr=2e-3, warmup=10, fused=True)  # box / mask AP50 1.0 for seeds 0, 1, 2
    with torch.no_grad():
        preds = model(batch, mode="predict")
    return [r for _, r in samples], preds, first, last


def test_ms_rcnn_overfits_boxes_and_masks(trained):
    from raydet.data.synthetic import CLASSES

    records, preds, first, last = trained
    assert last["loss_mask_iou"] < first["loss_mask_iou"]
    gt = coco_from_records(records, list(CLASSES))
    metrics = evaluate_coco(gt, predictions_to_coco_results(preds, [r["image_id"] for r in records], [1, 2, 3]),
                            ("bbox", "segm"))
    assert metrics["bbox/AP50"] > 0.9, metrics
    assert metrics["segm/AP50"] > 0.9, metrics  # masks ranked by their mask scores
