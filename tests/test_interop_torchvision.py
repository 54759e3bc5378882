"""torchvision detectors converted by ``raydet convert`` give torchvision's detections and losses in raydet.

The reference is torchvision itself: each model is built by its torchvision builder with random weights (fixed seed;
``weights=None, weights_backbone=None``). The v1 models get FrozenBatchNorm2d layers with random statistics and eps 0,
as their builders make them when they load the COCO_V1 weights (``norm_layer=FrozenBatchNorm2d``,
``overwrite_eps(model, 0.0)``); the v2 models keep their BatchNorm2d layers, with random statistics. Each is converted
for its pipeline in ``pipelines/zoo/torchvision/`` (Faster R-CNN through the files ``raydet convert`` reads and
writes, the others in memory) and loaded as ``raydet test`` loads a checkpoint. Both then see the same three images
of different sizes at their test scale (SSD300: three of its fixed 300 x 300; torchvision's resize is made the
identity, so both get the same normalised, zero-padded batch) and the same targets. No network: nothing is downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.engine.checkpoint import load_checkpoint, load_model_weights
from raydet.interop import ConversionError, convert_checkpoint, convert_state_dict
from raydet.interop.torchvision import coco_slots, legacy_names

tv_detection = pytest.importorskip("torchvision.models.detection")
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "pipelines" / "zoo" / "torchvision"
SIZES = [(96, 128), (128, 96), (112, 160)]  # (h, w): three sizes, one padded batch of 128 x 160
CLASS_IDS, CLASS_NAMES, UNUSED_IDS = coco_slots()
SAMPLE_ALL = ["model.rpn_head.sampler.num=100000", "model.roi_head.sampler.num=100000"]


# ----------------------------------------------------------------------------------------------------------------
# torchvision models, inputs and targets


def _frozen_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d (eps 0) with random affine and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            n = child.num_features
            frozen = FrozenBatchNorm2d(n, eps=0.0)
            frozen.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            frozen.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            frozen.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            frozen.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            setattr(module, name, frozen)
        else:
            _frozen_bn(child, gen)


def _torchvision_model(builder: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tv_detection, builder)(weights=None, weights_backbone=None, **kwargs)
    _frozen_bn(model, torch.Generator().manual_seed(1))
    # inputs are at the test scale: torchvision's resize (a bilinear interpolation by 1.0) is the identity
    model.transform.resize = lambda image, target=None: (image, target)
    return model.eval()


def _spread_rcnn_scores(model: nn.Module, cls_scale: float = 0.05, reg_scale: float = 3.0) -> None:
    """Random weights give flat class scores; spread them (smaller weights, random class biases) so that each image
    has 5-25 detections. The 10 unused COCO slots get a constant logit 0: several percent of the softmax's mass, yet
    never a score above 0.05 (as in the trained model, where they are never targets)."""
    with torch.no_grad():
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.mul_(cls_scale)
        predictor.cls_score.bias.copy_(torch.randn(91, generator=torch.Generator().manual_seed(3)) * 2.0)
        predictor.bbox_pred.weight.mul_(reg_scale)
        predictor.cls_score.weight[UNUSED_IDS] = 0.0
        predictor.cls_score.bias[UNUSED_IDS] = 0.0


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for h, w in SIZES:
        blocks = rng.integers(0, 256, (h // 8, w // 8, 3)).astype(np.float32)
        image = np.kron(blocks, np.ones((8, 8, 1)))[:h, :w] + rng.normal(0, 20, (h, w, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def _targets(with_masks: bool = False) -> list[dict]:
    """Three boxes per image (one in the second) with contiguous labels in [0, 80) and elliptic masks."""
    rng = np.random.default_rng(1)
    records = []
    for i, (h, w) in enumerate(SIZES):
        n = 1 if i == 1 else 3
        x1, y1 = rng.uniform(0, w * 0.6, n), rng.uniform(0, h * 0.6, n)
        x2 = np.minimum(x1 + rng.uniform(12, w * 0.4, n), w)
        y2 = np.minimum(y1 + rng.uniform(12, h * 0.4, n), h)
        rec = {"boxes": np.stack([x1, y1, x2, y2], 1).astype(np.float32), "labels": rng.integers(0, 80, n)}
        if with_masks:
            yy, xx = np.mgrid[:h, :w] + 0.5
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            rec["bitmaps"] = np.stack([((xx - cx[k]) / rx[k]) ** 2 + ((yy - cy[k]) / ry[k]) ** 2 <= 1
                                       for k in range(n)]).astype(np.uint8)
        records.append(rec)
    return records


def _tv_images(images) -> list[torch.Tensor]:
    return [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in images]


def _raydet_batch(tv_model, images, records=None) -> dict:
    """raydet's batch of the images (and targets), with torchvision's normalised and padded tensor."""
    records = records or [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}] * len(images)
    batch = collate_samples(list(zip(images, records)))
    with torch.no_grad():
        tv_batch, _ = tv_model.transform(_tv_images(images))
    # the pipeline's Normalize / Pad (0-255 mean and std = torchvision's x 255, zero padding to 32) agree
    assert tv_batch.tensors.shape == batch["images"].shape
    assert torch.allclose(tv_batch.tensors, batch["images"], atol=1e-5)
    batch["images"] = tv_batch.tensors
    if records[0].get("bitmaps") is not None:
        batch["gt_masks"] = [torch.from_numpy(r["bitmaps"]) for r in records]
    return batch


def _tv_targets(records) -> list[dict]:
    out = []
    for r in records:
        t = {"boxes": torch.from_numpy(r["boxes"]), "labels": torch.tensor([CLASS_IDS[k] for k in r["labels"]])}
        if "bitmaps" in r:
            t["masks"] = torch.from_numpy(r["bitmaps"])
        out.append(t)
    return out


def _convert(tv_model, pipeline: Path, tmp_path: Path | None = None, overrides=()) -> tuple[nn.Module, dict]:
    """Convert the torchvision state dict and load it as ``raydet test`` loads a checkpoint; with ``tmp_path``
    through the files ``raydet convert`` reads and writes, else in memory (the same converter, less disk)."""
    model = load_config(pipeline, list(overrides)).build("model")
    if tmp_path is None:
        mapped, report = convert_state_dict(tv_model.state_dict(), model, "torchvision", "torchvision model")
        load_model_weights(model, mapped, "converted")
        return model.eval(), {"classes": report.classes, "cat_ids": report.cat_ids}
    src, out = tmp_path / "torchvision.pth", tmp_path / "converted.pt"
    torch.save(tv_model.state_dict(), src)
    convert_checkpoint(src, out, source_format="torchvision", pipeline=pipeline, overrides=overrides)
    state = load_checkpoint(out)
    load_model_weights(model, state["model"], str(out))
    return model.eval(), state["meta"]


def _assert_same_detections(tv_out, rd_out, cat_ids, min_count: int, masks: bool = False) -> None:
    for i, (a, b) in enumerate(zip(tv_out, rd_out)):
        assert len(a["boxes"]) >= min_count, f"image {i}: too few torchvision detections to compare"
        assert not set(a["labels"].tolist()) & set(UNUSED_IDS + [0])
        assert len(b["boxes"]) == len(a["boxes"]), f"image {i}"
        assert torch.allclose(b["boxes"], a["boxes"], rtol=0, atol=1e-3), f"image {i}"
        assert torch.allclose(b["scores"], a["scores"], rtol=0, atol=1e-4), f"image {i}"
        assert torch.equal(torch.tensor(cat_ids)[b["labels"]], a["labels"]), f"image {i}"
        if masks:
            agree = (b["masks"] == (a["masks"][:, 0] > 0.5)).float().mean(dim=(1, 2))
            assert agree.min().item() >= 0.999, f"image {i}: mask agreement {agree.min().item():.5f}"


# ----------------------------------------------------------------------------------------------------------------
# Equivalence: detections and losses


@pytest.fixture(scope="module")
def frcnn():
    """torchvision's fasterrcnn_resnet50_fpn with random weights (shared: later tests use only its state dict)."""
    tv = _torchvision_model("fasterrcnn_resnet50_fpn")
    _spread_rcnn_scores(tv)
    return tv


def test_fasterrcnn_resnet50_fpn_gives_torchvisions_detections_and_losses(frcnn, tmp_path):
    pipeline = ZOO / "fasterrcnn_resnet50_fpn.yaml"
    tv = frcnn.eval()
    model, meta = _convert(tv, pipeline, tmp_path)
    assert meta["classes"] == CLASS_NAMES and meta["cat_ids"] == CLASS_IDS
    images = _images()
    batch = _raydet_batch(tv, images)
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(batch, mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=5)

    # the 10 unused COCO slots weigh in torchvision's softmax: dropping them (num_unused_classes 0) changes scores
    dropped, _ = _convert(tv, pipeline, overrides=["model.roi_head.bbox_head.num_unused_classes=0"])
    with torch.no_grad():
        first = dropped(batch, mode="predict")[0]
    assert (first["scores"][:5] - tv_out[0]["scores"][:5]).abs().max() > 1e-3

    # training losses on one batch: every anchor / proposal sampled on both sides (the samplers draw at random)
    records = _targets()
    tv.train()
    tv.rpn.fg_bg_sampler.batch_size_per_image = 100000
    tv.roi_heads.fg_bg_sampler.batch_size_per_image = 100000
    tv_losses = tv(_tv_images(images), _tv_targets(records))
    train_model = load_config(pipeline, SAMPLE_ALL).build("model")
    train_model.load_state_dict(model.state_dict())
    rd_losses = train_model.train()(_raydet_batch(tv, images, records), mode="loss")
    pairs = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_bbox"}
    for tv_key, rd_key in pairs.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-5), tv_key
    tv.eval()


def test_maskrcnn_resnet50_fpn_gives_torchvisions_detections_masks_and_losses():
    pipeline = ZOO / "maskrcnn_resnet50_fpn.yaml"
    tv = _torchvision_model("maskrcnn_resnet50_fpn")
    _spread_rcnn_scores(tv)
    model, meta = _convert(tv, pipeline)
    images = _images()
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(_raydet_batch(tv, images), mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=5, masks=True)
    assert all(r["masks"].any() for r in rd_out)

    records = _targets(with_masks=True)
    tv.train()
    tv.rpn.fg_bg_sampler.batch_size_per_image = 100000
    tv.roi_heads.fg_bg_sampler.batch_size_per_image = 100000
    tv_losses = tv(_tv_images(images), _tv_targets(records))
    train_model = load_config(pipeline, SAMPLE_ALL).build("model")
    train_model.load_state_dict(model.state_dict())
    rd_losses = train_model.train()(_raydet_batch(tv, images, records), mode="loss")
    pairs = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_bbox", "loss_mask": "loss_mask"}
    for tv_key, rd_key in pairs.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-5), tv_key


def _spread_retina_scores(model: nn.Module, num_slots: int) -> None:
    """Class biases around -3 (instead of the prior's -4.6) so that hundreds of anchors score above 0.05; the
    background and unused COCO slots of a 91-slot model stay far below."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        bias = model.head.classification_head.cls_logits.bias.view(9, num_slots)
        bias.copy_(torch.randn(9, num_slots, generator=gen) - 3.0)
        if num_slots == 91:
            bias[:, [0] + UNUSED_IDS] = -12.0


def _check_dense_detections(tv, pipeline: Path, min_count: int) -> list[np.ndarray]:
    """Convert a 91-slot torchvision dense detector for ``pipeline``; both give the same detections on the three
    images (returned for the loss check)."""
    model, meta = _convert(tv, pipeline)
    assert meta["cat_ids"] == CLASS_IDS
    images = _images()
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(_raydet_batch(tv, images), mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=min_count)
    return images


def test_retinanet_resnet50_fpn_gives_torchvisions_detections_and_losses():
    pipeline = ZOO / "retinanet_resnet50_fpn.yaml"
    tv = _torchvision_model("retinanet_resnet50_fpn")
    _spread_retina_scores(tv, 91)
    images = _check_dense_detections(tv, pipeline, min_count=50)

    # Losses: torchvision's 91-slot focal loss also sums its 11 never-target slots, which a model of 80 classes
    # does not have; a torchvision RetinaNet of 80 classes (labels 0..79, no background slot) defines the same loss.
    tv80 = _torchvision_model("retinanet_resnet50_fpn", num_classes=80)
    _spread_retina_scores(tv80, 80)
    model80, meta80 = _convert(tv80, pipeline)
    assert meta80["cat_ids"] == list(range(1, 81))
    records = _targets()  # 3, 1 and 3 objects: torchvision averages each image's loss over its own positives
    tv80.train()
    targets = [{"boxes": torch.from_numpy(r["boxes"]), "labels": torch.from_numpy(r["labels"])} for r in records]
    tv_losses = tv80(_tv_images(images), targets)
    rd_losses = model80.train()(_raydet_batch(tv80, images, records), mode="loss")
    for tv_key, rd_key in {"classification": "loss_cls", "bbox_regression": "loss_bbox"}.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-5), tv_key


# ----------------------------------------------------------------------------------------------------------------
# The options the torchvision pipelines use, each against the torchvision component it reproduces


def test_anchor_generator_options_give_torchvisions_anchors():
    """Per-level sizes, rounded base anchors and strides from the padded input: RetinaNet's anchors on a 160 x 96
    input, whose P6 / P7 (3 x 2, 2 x 1) have strides 53 x 48 and 80 x 96 rather than 64 and 128."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from raydet.models.task_modules.prior_generators import AnchorGenerator

    sizes = [[32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406], [512, 645, 812]]
    ours = AnchorGenerator(strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], sizes=sizes,
                           round_base_anchors=True, strides_from_input=True)
    featmaps = [(20, 12), (10, 6), (5, 3), (3, 2), (2, 1)]
    assert ours.level_strides(featmaps, (160, 96))[3:] == [(53, 48), (80, 96)]
    reference = TVAnchorGenerator(tuple(tuple(s) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(1, 3, 160, 96), [(160, 96)])
    expected = reference(images, [torch.zeros(1, 1, h, w) for h, w in featmaps])[0]
    got = torch.cat(ours.grid_anchors(featmaps, input_shape=(160, 96)))
    assert torch.equal(got, expected)
    # the first base anchor by hand: size 32, ratio h / w 0.5 -> w = 32 * sqrt(2) = 45.25, h = 22.63, halves rounded
    assert ours.base_anchors[0][0].tolist() == [-23.0, -11.0, 23.0, 11.0]


def test_box_coder_caps_dw_dh_from_above_only_as_torchvision():
    from torchvision.models.detection._utils import BoxCoder

    from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder

    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 30.0]])
    deltas = torch.tensor([[0.5, -0.3, -10.0, 9.0], [-1.0, 2.0, 0.2, -6.0]]).repeat(1, 2) * torch.tensor(
        [1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 5.0, 5.0])
    reference = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, boxes)
    ours = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2), clamp_dwh="max").decode(boxes, deltas)
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-5)
    # dw = -10 / 5 = -2 is applied: width 40 * exp(-2) = 5.41; the default clamps dw only beyond +-4.135
    assert (ours[0, 2] - ours[0, 0]).item() == pytest.approx(40 * np.exp(-2.0), rel=1e-5)


def test_low_quality_matches_keep_their_own_best_gt_as_torchvisions_matcher():
    """Box 0 is gt 0's best box (IoU 0.40) but overlaps gt 1 more (0.45; gt 1's best is box 1 at 0.6): MMDetection
    gives box 0 to gt 0, torchvision's Matcher to gt 1 (box 0's own best)."""
    from torchvision.models.detection._utils import Matcher

    from raydet.models.task_modules.assigners import MaxIoUAssigner

    overlaps = torch.tensor([[0.40, 0.10, 0.00], [0.45, 0.60, 0.20]])
    expected = Matcher(0.7, 0.3, allow_low_quality_matches=True)(overlaps.clone())  # gt index, -1 bg, -2 ignored
    torchvision_like = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.0, low_quality_assign="best_gt")
    gt_inds = torchvision_like.assign_wrt_overlaps(overlaps).gt_inds
    assert torch.equal(torch.where(gt_inds > 0, gt_inds - 1, torch.where(gt_inds == 0, -1, -2)), expected)
    assert gt_inds.tolist() == [2, 2, 0]
    mmdet = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.0).assign_wrt_overlaps(overlaps).gt_inds
    assert mmdet.tolist() == [1, 2, 0]


def test_soft_unaligned_mask_targets_are_torchvisions():
    from torchvision.models.detection.roi_heads import project_masks_on_boxes

    from raydet.models.roi_heads.mask_heads import mask_targets

    masks = torch.zeros(2, 40, 50, dtype=torch.uint8)
    masks[0, 5:30, 10:37] = 1
    masks[1, 12:40, 0:22] = 1
    boxes = torch.tensor([[8.3, 3.7, 39.2, 31.5], [0.0, 10.2, 25.6, 39.9], [11.0, 6.0, 20.0, 14.0]])
    inds = torch.tensor([0, 1, 0])
    expected = project_masks_on_boxes(masks, boxes, inds, 28)
    got = mask_targets(boxes, inds, masks, 28, aligned=False, binarize=False)
    assert torch.allclose(got, expected, atol=1e-6)
    assert ((got > 0) & (got < 1)).any()  # soft at the edges, as torchvision's targets


def test_detection_min_bbox_size_drops_narrow_boxes_as_remove_small_boxes():
    from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
    from raydet.models.head_configs import DetectionConfig
    from raydet.models.losses import CrossEntropyLoss, L1Loss
    from raydet.models.roi_heads.bbox_heads import Shared2FCBBoxHead

    head = Shared2FCBBoxHead(1, DeltaXYWHBBoxCoder(), CrossEntropyLoss(), L1Loss(), in_channels=1, roi_feat_size=1,
                             fc_out_channels=4)
    rois = torch.tensor([[0.0, 10.0, 10.0, 30.0, 40.0], [0.0, 10.0, 10.0, 10.005, 40.0]])  # 20 and 0.005 px wide
    cls_score = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    kept = head.predict_boxes(rois, cls_score, torch.zeros(2, 4), (64, 64), DetectionConfig(min_bbox_size=0.01))
    assert kept[0].tolist() == [[10.0, 10.0, 30.0, 40.0]]
    assert len(head.predict_boxes(rois, cls_score, torch.zeros(2, 4), (64, 64), DetectionConfig())[0]) == 2


# ----------------------------------------------------------------------------------------------------------------
# What the converter reports and refuses


def test_old_torchvision_key_names_and_batchnorm_counters_are_read(frcnn):
    """Pre-v2 names (as torchvision's own _load_from_state_dict reads them) give the same tensors; a BatchNorm
    model's step counters are reported as dropped, nothing else."""
    state = frcnn.state_dict()
    old = {}
    for key, value in state.items():
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
        key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d+)\.0\.", r"\1.", key)
        old[key] = value
    assert "rpn.head.conv.weight" in old and "backbone.fpn.inner_blocks.3.weight" in old
    assert legacy_names(old).keys() == state.keys()
    probe = tv_detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    _frozen_bn(probe, torch.Generator().manual_seed(0))
    probe.load_state_dict(old)  # torchvision itself reads these as the same tensors
    assert torch.equal(probe.rpn.head.conv[0][0].weight, frcnn.rpn.head.conv[0][0].weight)

    counters = {f"{k[:-len('.running_var')]}.num_batches_tracked": torch.tensor(7)
                for k in state if k.endswith("running_var")}
    model = load_config(ZOO / "fasterrcnn_resnet50_fpn.yaml").build("model")
    mapped, report = convert_state_dict({**old, **counters}, model, "torchvision", "bn.pth")
    reference, _ = convert_state_dict(state, model, "torchvision", "tv.pth")
    assert mapped.keys() == reference.keys() and all(torch.equal(mapped[k], reference[k]) for k in mapped)
    assert len(report.dropped) == len(counters) == 53
    assert all("step counter" in p.note for p in report.dropped)
    assert len(report.placed) == len(state)


def test_a_checkpoint_of_another_architecture_fails_naming_keys_and_shapes(frcnn):
    state = frcnn.state_dict()
    model = load_config(ZOO / "maskrcnn_resnet50_fpn.yaml").build("model")
    with pytest.raises(ConversionError, match=r"(?s)does not fit.*12 model tensors have no source, e\.g\. "
                                              r"roi_head\.mask_head\.convs\.0\.weight \[256, 256, 3, 3\]"):
        convert_state_dict(state, model, "torchvision", "frcnn.pth")

    extra = {**state, "roi_heads.keypoint_head.0.weight": torch.zeros(512, 256, 3, 3)}
    model = load_config(ZOO / "fasterrcnn_resnet50_fpn.yaml").build("model")
    with pytest.raises(ConversionError, match=r"1 source tensors have no place in the model, e\.g\. "
                                              r"roi_heads\.keypoint_head\.0\.weight \[512, 256, 3, 3\]"):
        convert_state_dict(extra, model, "torchvision", "kp.pth")

    wrong = {**state, "roi_heads.box_head.fc7.weight": torch.zeros(512, 1024)}
    with pytest.raises(ConversionError, match=r"1 shape mismatches, e\.g\. roi_head\.bbox_head\.shared_fcs\.2\.weight: "
                                              r"converted \[512, 1024\] vs model \[1024, 1024\]"):
        convert_state_dict(wrong, model, "torchvision", "wide.pth")

    model = load_config(ZOO / "fasterrcnn_resnet50_fpn.yaml", ["num_classes=20"]).build("model")
    with pytest.raises(ConversionError, match="has 91 class slots but the pipeline's model has 20 classes"):
        convert_state_dict(state, model, "torchvision", "coco.pth")


def test_raydet_convert_command_writes_a_checkpoint_that_raydet_test_loads(frcnn, tmp_path, capsys):
    from raydet.cli import main

    src = tmp_path / "fasterrcnn_resnet50_fpn_coco.pth"
    torch.save(frcnn.state_dict(), src)
    pipeline = str(ZOO / "fasterrcnn_resnet50_fpn.yaml")
    out = tmp_path / "out" / "converted.pt"
    assert main(["convert", str(src), str(out), "--from", "torchvision", "--pipeline", pipeline]) == 0
    printed = capsys.readouterr().out
    assert "295 source tensors placed, 0 dropped (torchvision)" in printed
    assert "dropped those of the background slot 0 and the 10 unused COCO id slots" in printed
    state = load_checkpoint(out)
    assert state["meta"]["classes"][:3] == ["person", "bicycle", "car"] and state["meta"]["cat_ids"][-1] == 90
    assert state["meta"]["converted_from"]["file"] == str(src)
    model = load_config(pipeline).build("model")
    load_model_weights(model, state["model"], str(out))  # what raydet test / infer do
    assert torch.equal(model.roi_head.bbox_head.fc_cls.bias[80], frcnn.roi_heads.box_predictor.cls_score.bias[0])

    bad = tmp_path / "bad.pt"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(bad), "--from", "torchvision", "--pipeline",
              str(ZOO / "retinanet_resnet50_fpn.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit the pipeline's model" in err
    assert "3 shape mismatches, e.g. neck.lateral_convs.0.0.weight: converted [256, 256, 1, 1] vs model " in err
    assert "source tensors have no place in the model, e.g. backbone.fpn.inner_blocks.3.0.weight" in err
    assert "model tensors have no source, e.g. neck.extra_convs.0.0.weight [256, 256, 3, 3]" in err
    assert not bad.exists()


# ----------------------------------------------------------------------------------------------------------------
# MODEL_ZOO.md


def test_model_zoo_parameter_table_matches_the_pipelines_and_torchvision():
    """Each row: the raydet pipeline's parameter count (built on the meta device), torchvision's published count
    (its weights' ``num_params``) and the difference, the class slots raydet drops (by hand in the table)."""
    text = (ROOT / "MODEL_ZOO.md").read_text()
    section = text[text.index("## Parameter counts"):]
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", section, flags=re.M)
    assert sorted(r[0] for r in rows) == sorted(p.stem for p in ZOO.glob("*.yaml"))
    weights = [getattr(w, "COCO_V1", None) for name, w in vars(tv_detection).items() if name.endswith("_Weights")]
    for name, ours, theirs, dropped in rows:
        ours, theirs, dropped = (int(v.replace(",", "")) for v in (ours, theirs, dropped))
        with torch.device("meta"):
            model = load_config(ZOO / f"{name}.yaml").build("model")
        assert sum(p.numel() for p in model.parameters()) == ours, name
        builder_weights = [w for w in weights if w is not None and w.url.split("/")[-1].startswith(f"{name}_coco")]
        assert len(builder_weights) == 1, name
        assert builder_weights[0].meta["num_params"] == theirs, name
        assert theirs - ours == dropped, name


# ----------------------------------------------------------------------------------------------------------------
# The v2 models: BatchNorm2d everywhere (backbone, FPN, box and mask heads), two RPN convs, GroupNorm and GIoU in
# RetinaNet


def _random_bn_statistics(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _torchvision_v2(builder: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tv_detection, builder)(weights=None, weights_backbone=None, **kwargs)
    _random_bn_statistics(model)
    model.transform.resize = lambda image, target=None: (image, target)
    return model.eval()


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn_v2"])
def test_rcnn_v2_models_give_torchvisions_detections_and_losses(name):
    """With weights=None every BatchNorm2d of torchvision's model trains (trainable_backbone_layers=5): raydet's
    pipeline with frozen_stages=-1 trains the same layers, so that both use the batch's statistics."""
    pipeline = ZOO / f"{name}.yaml"
    tv = _torchvision_v2(name)
    _spread_rcnn_scores(tv, cls_scale=0.01, reg_scale=1.0)
    model, meta = _convert(tv, pipeline)
    masks = name.startswith("mask")
    images = _images()
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(_raydet_batch(tv, images), mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=10, masks=masks)

    records = _targets(with_masks=masks)
    tv.train()
    tv.rpn.fg_bg_sampler.batch_size_per_image = 100000
    tv.roi_heads.fg_bg_sampler.batch_size_per_image = 100000
    tv.rpn._post_nms_top_n["training"] = 300  # fewer RoIs through the 4-conv box head (time), on both sides
    tv_losses = tv(_tv_images(images), _tv_targets(records))
    overrides = SAMPLE_ALL + ["model.backbone.frozen_stages=-1", "model.rpn_head.train_proposals.max_per_img=300"]
    train_model = load_config(pipeline, overrides).build("model")
    train_model.load_state_dict(model.state_dict())
    rd_losses = train_model.train()(_raydet_batch(tv, images, records), mode="loss")
    pairs = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_bbox", "loss_classifier": "loss_cls",
             "loss_box_reg": "loss_bbox", **({"loss_mask": "loss_mask"} if masks else {})}
    for tv_key, rd_key in pairs.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-4), tv_key


def test_retinanet_v2_gives_torchvisions_detections_and_losses():
    pipeline = ZOO / "retinanet_resnet50_fpn_v2.yaml"
    tv = _torchvision_v2("retinanet_resnet50_fpn_v2")
    _spread_retina_scores(tv, 91)
    model, meta = _convert(tv, pipeline)
    images = _images()
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(_raydet_batch(tv, images), mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=100)

    tv80 = _torchvision_v2("retinanet_resnet50_fpn_v2", num_classes=80)
    _spread_retina_scores(tv80, 80)
    model80, _ = _convert(tv80, pipeline, overrides=["model.backbone.frozen_stages=-1"])
    records = _targets()
    tv80.train()
    targets = [{"boxes": torch.from_numpy(r["boxes"]), "labels": torch.from_numpy(r["labels"])} for r in records]
    tv_losses = tv80(_tv_images(images), targets)
    rd_losses = model80.train()(_raydet_batch(tv80, images, records), mode="loss")
    for tv_key, rd_key in {"classification": "loss_cls", "bbox_regression": "loss_bbox"}.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-4), tv_key


# ----------------------------------------------------------------------------------------------------------------
# FCOS: points from torchvision's one-anchor AnchorGenerator, open regress ranges, sqrt(cls x centre-ness) scores


def _torchvision_fcos(**kwargs) -> nn.Module:
    """fcos_resnet50_fpn with random weights; its FrozenBatchNorm2d layers keep eps 1e-5 (the builder does not
    overwrite it), with random statistics."""
    torch.manual_seed(0)
    model = tv_detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    _frozen_bn(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 1e-5
    model.transform.resize = lambda image, target=None: (image, target)
    return model.eval()


def _spread_fcos_scores(model: nn.Module, num_slots: int) -> None:
    """Class biases around -1 and centre-ness biases around 0 so that sqrt(sigmoid(cls) x sigmoid(ctr)) passes 0.2
    for tens of (point, class) pairs per image; larger regression weights spread the boxes. The background and
    unused COCO slots of a 91-slot model stay far below."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        head = model.head
        head.classification_head.cls_logits.bias.copy_(torch.randn(num_slots, generator=gen) - 6.5)
        head.classification_head.cls_logits.weight.mul_(3.0)
        if num_slots == 91:
            head.classification_head.cls_logits.bias[[0] + UNUSED_IDS] = -12.0
            head.classification_head.cls_logits.weight[[0] + UNUSED_IDS] = 0.0
        head.regression_head.bbox_ctrness.weight.mul_(3.0)
        head.regression_head.bbox_reg.weight.mul_(5.0)
        head.regression_head.bbox_reg.bias.fill_(1.0)


def test_fcos_resnet50_fpn_gives_torchvisions_detections_and_losses():
    pipeline = ZOO / "fcos_resnet50_fpn.yaml"
    tv = _torchvision_fcos()
    _spread_fcos_scores(tv, 91)
    images = _check_dense_detections(tv, pipeline, min_count=10)

    # losses: as RetinaNet's, a torchvision FCOS of 80 classes (no background slot) defines raydet's focal loss
    tv80 = _torchvision_fcos(num_classes=80)
    _spread_fcos_scores(tv80, 80)
    model80, _ = _convert(tv80, pipeline)
    records = _targets()
    tv80.train()
    targets = [{"boxes": torch.from_numpy(r["boxes"]), "labels": torch.from_numpy(r["labels"])} for r in records]
    tv_losses = tv80(_tv_images(images), targets)
    rd_losses = model80.train()(_raydet_batch(tv80, images, records), mode="loss")
    pairs = {"classification": "loss_cls", "bbox_regression": "loss_bbox", "bbox_ctrness": "loss_centerness"}
    for tv_key, rd_key in pairs.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-4), tv_key


def test_fcos_points_are_torchvisions_anchor_centres():
    """offset 0 and strides from the padded input: on a 160 x 96 input P6 / P7 (3 x 2, 2 x 1) are placed every
    53 x 48 and 80 x 96 pixels, as the centres of torchvision's one-anchor-per-location AnchorGenerator; the
    returned strides stay the nominal 64 and 128 (torchvision's anchor sizes)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from raydet.models.task_modules.prior_generators import MlvlPointGenerator

    featmaps = [(20, 12), (10, 6), (5, 3), (3, 2), (2, 1)]
    ours = MlvlPointGenerator([8, 16, 32, 64, 128], offset=0.0, strides_from_input=True)
    points = ours.grid_priors(featmaps, with_stride=True, input_shape=(160, 96))
    assert points[3][1].tolist() == [48.0, 0.0, 64.0, 64.0]  # P6 (x=1, y=0): x = 1 * (96 // 2)
    assert points[3][2].tolist() == [0.0, 53.0, 64.0, 64.0]  # P6 (x=0, y=1): y = 1 * (160 // 3)
    reference = TVAnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    anchors = reference(ImageList(torch.zeros(1, 3, 160, 96), [(160, 96)]),
                        [torch.zeros(1, 1, h, w) for h, w in featmaps])[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert torch.equal(torch.cat([p[:, :2] for p in points]), centres)
    assert torch.equal(torch.cat([p[:, 2] for p in points]), anchors[:, 2] - anchors[:, 0])
    with pytest.raises(ValueError, match="needs the padded input_shape"):
        ours.grid_priors(featmaps)


# ----------------------------------------------------------------------------------------------------------------
# SSD300 VGG-16: a softmax over 91 slots per prior, priors in another order, the top-k per class


def _ssd_images(n: int = 3) -> list[np.ndarray]:
    """300 x 300 images (SSD's fixed size: torchvision's resize is the identity) of 10-pixel blocks plus noise."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        blocks = rng.integers(0, 256, (30, 30, 3)).astype(np.float32)
        image = np.kron(blocks, np.ones((10, 10, 1))) + rng.normal(0, 20, (300, 300, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def _spread_ssd_scores(model: nn.Module) -> None:
    """Random weights give a few classes scores that round to 1.0 everywhere (ties); smaller weights, random class
    biases (15 % of the slots likely, the rest rarely), the background logit 5 and the 10 unused slots' logit 0
    (weights 0): those hold a few percent of the softmax's mass yet never score above 0.01 (e^0 / e^5 < 0.007), as in
    the trained model, where they are never targets. Dozens of classes then have more than 400 priors above 0.01."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for conv in model.head.classification_head.module_list:
            a = conv.out_channels // 91
            weight, bias = conv.weight.view(a, 91, -1), conv.bias.view(a, 91)
            weight.mul_(0.3)
            likely = torch.rand(91, generator=gen) < 0.15
            bias.copy_(torch.randn(a, 91, generator=gen) * 0.5 + torch.where(likely, 0.0, -4.0))
            weight[:, [0] + UNUSED_IDS] = 0.0
            bias[:, 0] = 5.0
            bias[:, UNUSED_IDS] = 0.0


def _ssd_batch(cfg, tv_model, images, records=None) -> dict:
    """raydet's batch made by the pipeline's own test transforms (Resize to 300 x 300, Normalize), with
    torchvision's normalised tensor."""
    from raydet.data.collate import collate_detection
    from raydet.data.pipeline import build_transforms, image_rng, record_to_sample

    transforms, collate_cfg = build_transforms(cfg["data.val.pipeline"])
    empty = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    samples = [transforms(record_to_sample({"image_id": i, "height": 300, "width": 300, **(records or [empty] * 3)[i]},
                                           image), image_rng(0, 0, i)) for i, image in enumerate(images)]
    batch = collate_detection(samples, collate_cfg)
    with torch.no_grad():
        tv_batch, _ = tv_model.transform(_tv_images(images))
    # raydet's x - 255 m and torchvision's (x / 255 - m) / (1 / 255) differ by float32 rounding (values up to 255)
    assert tv_batch.tensors.shape == batch["images"].shape == (len(images), 3, 300, 300)
    assert torch.allclose(tv_batch.tensors, batch["images"], rtol=0, atol=1e-4)
    batch["images"] = tv_batch.tensors
    return batch


def test_ssd300_vgg16_gives_torchvisions_detections_and_losses():
    """Detections on three 300 x 300 images; losses on two of them (3 objects and 1: torchvision and raydet both
    divide the sums of the batch by its positives, not each image's by its own)."""
    pipeline = ZOO / "ssd300_vgg16.yaml"
    cfg = load_config(pipeline)
    torch.manual_seed(0)
    tv = tv_detection.ssd300_vgg16(weights=None, weights_backbone=None)
    tv.transform.resize = lambda image, target=None: (image, target)  # inputs at 300 x 300: the identity
    _spread_ssd_scores(tv)
    model, meta = _convert(tv.eval(), pipeline)
    assert meta["classes"] == CLASS_NAMES and meta["cat_ids"] == CLASS_IDS
    # level 0's 4 priors x 91 slots: raydet's prior 1 is torchvision's 2 (the 2:1 box; torchvision's 1 is the
    # sqrt(s_k s_k+1) square, raydet's 3), each with the 80 classes, the background (logit 5) and 10 unused slots
    ours, theirs = model.bbox_head.cls_convs[0][0].bias.view(4, 91), tv.head.classification_head.module_list[0].bias
    theirs = theirs.view(4, 91)
    assert torch.equal(ours[1, :80], theirs[2, CLASS_IDS]) and torch.equal(ours[3, :80], theirs[1, CLASS_IDS])
    assert (ours[:, 80] == 5.0).all() and (ours[:, 81:] == 0.0).all()
    images = _ssd_images()
    with torch.no_grad():
        tv_out = tv(_tv_images(images))
        rd_out = model(_ssd_batch(cfg, tv, images), mode="predict")
    _assert_same_detections(tv_out, rd_out, meta["cat_ids"], min_count=200)

    rng = np.random.default_rng(1)
    records = []
    for n in (3, 1):
        x1, y1 = rng.uniform(0, 180, n), rng.uniform(0, 180, n)
        wh = rng.uniform(20, 120, (2, n))
        records.append({"boxes": np.stack([x1, y1, x1 + wh[0], y1 + wh[1]], 1).astype(np.float32),
                        "labels": rng.integers(0, 80, n)})
    tv.train()
    tv_losses = tv(_tv_images(images[:2]), _tv_targets(records))
    rd_losses = model.train()(_ssd_batch(cfg, tv, images[:2], records), mode="loss")
    for tv_key, rd_key in {"classification": "loss_cls", "bbox_regression": "loss_bbox"}.items():
        assert rd_losses[rd_key].item() == pytest.approx(tv_losses[tv_key].item(), rel=1e-5), tv_key


def test_ssd_priors_are_torchvisions_default_boxes_in_raydets_order():
    """The pipeline's SSDAnchorGenerator (clip: true) against DefaultBoxGenerator as ssd300_vgg16 builds it, after
    the converter's reordering of each location's priors."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    from raydet.interop.torchvision import _ssd_prior_order

    ours = load_config(ZOO / "ssd300_vgg16.yaml").build("model.bbox_head.anchor_generator")
    reference = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    featmaps = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
    expected = reference(ImageList(torch.zeros(1, 3, 300, 300), [(300, 300)]),
                         [torch.zeros(1, 1, h, w) for h, w in featmaps])[0]
    levels = ours.grid_anchors(featmaps)
    in_tv_order = [p.view(h * w, a, 4)[:, np.argsort(_ssd_prior_order(a))].reshape(-1, 4)
                   for p, (h, w), a in zip(levels, featmaps, ours.num_base_priors)]
    assert expected.shape == (8732, 4)
    assert torch.allclose(torch.cat(in_tv_order), expected, rtol=0, atol=1e-4)
    # by hand: the last level's 2:1 prior is 261 sqrt(2) = 369.1 wide, clipped to 300, and 261 / sqrt(2) = 184.55
    # high, centred at (150, 150); without clip it crosses the image by 34.55 px on each side
    assert levels[5][1].tolist() == pytest.approx([0.0, 57.7226, 300.0, 242.2774], abs=1e-4)
    ours.clip = False
    ours.base_anchors = [ours._base_anchors(i) for i in range(ours.num_levels)]
    assert ours.grid_anchors(featmaps)[5][1].tolist() == pytest.approx([-34.5549, 57.7226, 334.5549, 242.2774],
                                                                       abs=1e-4)


def test_ssd_head_takes_the_top_k_per_class_over_all_levels_as_torchvision():
    """nms_pre_per: class keeps each class's nms_pre best priors of all levels (torchvision's topk_candidates);
    level (MMDetection) the nms_pre best (prior, class) pairs of each level. Checked by hand and against
    torchvision's own SSD.postprocess_detections on the same scores."""
    from types import SimpleNamespace

    from torchvision.models.detection._utils import BoxCoder

    from raydet.models.dense_heads.ssd_head import SSDHead
    from raydet.models.head_configs import DetectionConfig
    from raydet.models.task_modules.assigners import MaxIoUAssigner
    from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
    from raydet.models.task_modules.prior_generators import SSDAnchorGenerator

    # two levels on a 32 x 32 input: 2 x 2 and 1 x 1 locations, 2 priors each (squares of min and sqrt(min * max))
    gen = SSDAnchorGenerator(strides=[16, 32], ratios=[[], []], min_sizes=[8, 16], max_sizes=[16, 32], input_size=32)
    # (class 0, class 1) probabilities of the 10 priors; the background takes the rest; 0.005 is below score_thr
    probs = torch.full((10, 2), 0.005)
    probs[[0, 1, 2, 8], 0] = torch.tensor([0.9, 0.8, 0.7, 0.95])  # priors 0-7 on level 0, 8-9 on level 1
    probs[[3, 9], 1] = torch.tensor([0.5, 0.3])
    logits = torch.cat([probs, 1 - probs.sum(1, keepdim=True)], 1).log()  # raydet's slots: classes, background
    cls_scores = [logits[:8].view(2, 2, 6).permute(2, 0, 1)[None], logits[8:].view(1, 1, 6).permute(2, 0, 1)[None]]
    bbox_preds = [torch.zeros(1, 8, 2, 2), torch.zeros(1, 8, 1, 1)]
    meta = {"img_shape": (32, 32), "pad_shape": (32, 32), "batch_input_shape": (32, 32), "ori_shape": (32, 32)}
    test = DetectionConfig(nms_pre=2, score_thr=0.01, nms_iou=1.0, max_per_img=100)  # IoU > 1: no suppression
    results = {}
    for per in ("class", "level"):
        head = SSDHead(2, [4, 4], gen, DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2)), MaxIoUAssigner(0.5, 0.5),
                       test=test, nms_pre_per=per)
        head.forward = lambda feats: (cls_scores, bbox_preds)
        results[per] = head.predict(None, [meta])[0]
    # per class: class 0's best two of all levels (prior 8: 0.95, prior 0: 0.9), class 1's (prior 3: 0.5, 9: 0.3)
    assert results["class"]["scores"].tolist() == pytest.approx([0.95, 0.9, 0.5, 0.3], abs=1e-6)
    assert results["class"]["labels"].tolist() == [0, 0, 1, 1]
    # per level: level 0's best two pairs (priors 0, 1 of class 0), level 1's (prior 8 of class 0, prior 9 of class 1)
    assert results["level"]["scores"].tolist() == pytest.approx([0.95, 0.9, 0.8, 0.3], abs=1e-6)
    assert results["level"]["labels"].tolist() == [0, 0, 0, 1]
    # boxes are the priors (zero deltas): prior 8 is level 1's 16-square at (16, 16), prior 0 level 0's 8-square at
    # (8, 8), prior 3 level 0's sqrt(8 x 16) = 11.31-square at (24, 8)
    hand = [[8.0, 8.0, 24.0, 24.0], [4.0, 4.0, 12.0, 12.0], [18.3431, 2.3431, 29.6569, 13.6569]]
    assert torch.allclose(results["class"]["boxes"][:3], torch.tensor(hand), atol=1e-4)

    # torchvision's postprocess_detections on the same scores (its slots: background first) and priors
    anchors = torch.cat(gen.grid_anchors([(2, 2), (1, 1)]))
    reference = SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=0.01, topk_candidates=2,
                                nms_thresh=1.0, detections_per_img=100)
    outputs = {"cls_logits": logits[:, [2, 0, 1]][None], "bbox_regression": torch.zeros(1, 10, 4)}
    (expected,) = tv_detection.ssd.SSD.postprocess_detections(reference, outputs, [anchors], [(32, 32)])
    assert torch.allclose(results["class"]["scores"], expected["scores"], atol=1e-6)
    assert torch.equal(results["class"]["labels"] + 1, expected["labels"])
    assert torch.allclose(results["class"]["boxes"], expected["boxes"], atol=1e-5)

    unused = SSDHead(2, [4, 4], gen, DeltaXYWHBBoxCoder(), MaxIoUAssigner(0.5, 0.5), num_unused_classes=10)
    assert unused.cls_out_channels == 13 and unused.cls_convs[0][0].out_channels == 2 * 13
    with pytest.raises(ValueError, match="nms_pre_per must be 'level' or 'class', got 'image'"):
        SSDHead(2, [4, 4], gen, DeltaXYWHBBoxCoder(), MaxIoUAssigner(0.5, 0.5), nms_pre_per="image")
