"""The four detectors built from their pipelines: architecture, CPU forward, and overfitting a few images.

Expected values: the parameter count comes from torchvision's independent Faster R-CNN implementation; AP50 comes
from pycocotools (through raydet.evaluation) scoring our predictions against the synthetic ground truth.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import CLASSES, make_shapes_dataset
from raydet.evaluation import coco_from_records, evaluate_coco, predictions_to_coco_results

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"

# A ResNet-18 / 64-channel variant of each R50-FPN pipeline, sized for a 2-core CPU.
TINY = [
    "num_classes=3",
    "model.backbone.depth=18",
    "model.backbone.frozen_stages=-1",
    "model.backbone.norm_eval=false",
    "model.neck.in_channels=[64, 128, 256, 512]",
    "model.neck.out_channels=64",
]
TINY_RPN = [
    "model.rpn_head.in_channels=64",
    "model.rpn_head.feat_channels=64",
    "model.rpn_head.train_proposals={nms_pre: 500, max_per_img: 300, nms_iou: 0.7, min_bbox_size: 0}",
    "model.rpn_head.test_proposals={nms_pre: 500, max_per_img: 300, nms_iou: 0.7, min_bbox_size: 0}",
]
TINY_ROI = [
    "model.roi_head.bbox_head.in_channels=64",
    "model.roi_head.bbox_head.fc_out_channels=256",
    "model.roi_head.sampler.num=128",
]
TINY_MASK = [
    "model.roi_head.mask_head.in_channels=64",
    "model.roi_head.mask_head.conv_out_channels=64",
]
TINY_RETINA = [
    "model.bbox_head.in_channels=64",
    "model.bbox_head.feat_channels=64",
]


def build_from_pipeline(name: str, overrides=()):
    cfg = load_config(PIPELINES / name, list(overrides))
    return cfg.build("model")


@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.yaml")))
def test_every_pipeline_builds_its_model(name):
    with torch.device("meta"):  # shapes and types only: no memory, no weight initialisation cost
        model = build_from_pipeline(name)
    expected = {"faster": "FasterRCNN", "mask": "MaskRCNN", "retinanet": "RetinaNet", "rpn": "RPN",
                "quickstart.yaml": "FasterRCNN", "fcos": "FCOS", "ssd300": "SSD", "ssd512": "SSD",
                "scratchdet300": "SSD", "m2det320": "SSD", "m2det512": "SSD",
                "fsaf": "FSAF", "fast": "FastRCNN", "dh": "FasterRCNN", "grid": "GridRCNN",
                "cascade": "CascadeRCNN", "htc": "HybridTaskCascade", "ms": "MaskScoringRCNN", "rfcn": "RFCN"}
    # ga_<detector>_...: guided anchors; libra_<detector>_...: Libra R-CNN's balancing on that detector
    kind = name.split("_")[1] if name.startswith(("ga_", "libra_")) else name.split("_")[0]
    assert type(model).__name__ == expected[kind]
    num_classes = 20 if "voc" in name else 3 if name == "quickstart.yaml" else 80
    if hasattr(model, "roi_head"):
        heads = model.roi_head.bbox_head  # a cascade has one per stage
        for head in heads if isinstance(heads, torch.nn.ModuleList) else [heads]:
            if type(model).__name__ == "RFCN":  # k x k = 49 position-sensitive maps per class and the background
                assert head.rfcn_cls.out_channels == 49 * (num_classes + 1)
                continue
            assert head.fc_cls.out_features == num_classes + 1
    if hasattr(model, "bbox_head") and hasattr(model.bbox_head, "retina_cls"):
        anchors = 1 if name.startswith(("ga_", "fsaf_")) else 9  # guided anchoring, FSAF: one per location
        assert model.bbox_head.retina_cls.out_channels == anchors * num_classes
    if type(model).__name__ == "FCOS":  # one point per location: C class logits, 4 distances, 1 centre-ness
        assert (model.bbox_head.conv_cls.out_channels, model.bbox_head.conv_reg.out_channels) == (num_classes, 4)
    if type(model).__name__ == "SSD":  # softmax over the classes and the background
        priors = 6 if name.startswith("m2det") else 4  # 4 on SSD's conv4_3; M2Det: 6 on every scale (its Sec. 4)
        assert model.bbox_head.cls_convs[0][0].out_channels == priors * (num_classes + 1)


def test_faster_rcnn_r50_fpn_has_the_reference_parameter_count():
    """Same layout as the reference: torchvision's Faster R-CNN R50-FPN differs only in its box regressor.

    torchvision predicts 4 deltas for each of its num_classes outputs including background; the reference
    (MMDetection) layout predicts 4 per foreground class. With torchvision built for 81 outputs, the reference
    with 80 classes has exactly 4 * 1024 + 4 = 4100 fewer parameters (one class's regression weights and biases).
    """
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    ours = build_from_pipeline("faster_rcnn_r50_fpn_1x_coco.yaml")
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(reference) - 4100


def test_faster_rcnn_r50_fpn_forward_on_one_800x1333_image_on_cpu():
    torch.manual_seed(0)
    model = build_from_pipeline("faster_rcnn_r50_fpn_1x_coco.yaml").eval()
    image = np.random.default_rng(0).integers(0, 255, size=(800, 1333, 3), dtype=np.uint8)
    record = {"image_id": 1, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    batch = collate_samples([(image, record)])
    assert tuple(batch["images"].shape) == (1, 3, 800, 1344)
    with torch.no_grad():
        (result,) = model(batch, mode="predict")
    boxes = result["boxes"]
    assert boxes.shape[1] == 4 and boxes.shape[0] == result["scores"].shape[0] == result["labels"].shape[0]
    assert boxes.shape[0] <= 100
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 1333).all() and (boxes[:, 3] <= 800).all()
    assert (result["scores"] > 0.05).all()


# ------------------------------------------------------------------------------------------------- overfitting

def _train(model, batch, iters: int, lr: float = 1e-3, warmup: int = 20, fused: bool = False,
           decay_at: int | None = None):
    """AdamW on one fixed batch (the reference SGD schedule needs thousands of iterations, too slow for CI).

    ``fused``: PyTorch's fused AdamW kernel (same update, about 4x cheaper on CPU than the per-tensor loop, which
    costs as much as a 64 px ResNet-18 forward and backward). ``decay_at``: the lr drops 10x from that iteration on
    (a step schedule, for a model whose AP still swings at the end at a constant lr)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4, fused=fused or None)
    model.train()
    first = last = None
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 0.1 + 0.9 * it / warmup) * (0.1 if decay_at is not None and it >= decay_at
                                                                     else 1.0)
        losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        last = {k: float(v.detach()) for k, v in losses.items()}
        first = first if first is not None else last
    model.eval()
    return first, last


def _ap(model, batch, records, iou_types=("bbox",)):
    with torch.no_grad():
        preds = model(batch, mode="predict")
    gt = coco_from_records(records, list(CLASSES))
    results = predictions_to_coco_results(preds, [r["image_id"] for r in records], [1, 2, 3])
    return evaluate_coco(gt, results, iou_types)


@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3)
    return samples, [r for _, r in samples]


@pytest.fixture(scope="module")
def small_shapes():
    """Two 64 x 64 images, three shapes of 23-30 px: a quarter of ``shapes``' pixels, for the detectors that overfit
    them as well (seeds 0, 1, 2 checked for each test that uses it)."""
    torch.set_num_threads(2)
    samples = make_shapes_dataset(2, height=64, width=64, max_objects=2, seed=3)
    return samples, [r for _, r in samples]


@pytest.mark.parametrize("pipeline,extra,iters", [
    ("faster_rcnn_r50_fpn_1x_coco.yaml", TINY_RPN + TINY_ROI, 60),
    ("retinanet_r50_fpn_1x_coco.yaml", TINY_RETINA, 80),
], ids=["faster_rcnn", "retinanet"])
def test_detector_overfits_a_few_images(small_shapes, pipeline, extra, iters):
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (AP50 1.0)
    model = build_from_pipeline(pipeline, TINY + extra)
    batch = collate_samples(samples)
    first, last = _train(model, batch, iters, lr=2e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_rpn_overfits_a_few_images(small_shapes):
    """The RPN's own metric is proposal recall (class-agnostic): every object is found by one of the 10 best
    proposals at IoU >= 0.7 (the RPN's positive threshold, Ren et al. 2015, section 3.1.2); the untrained RPN's top 10
    find at most one of the three at that IoU.

    Box AP does not fit raw proposals: anchors in the assigner's ignore band (IoU 0.3-0.7) are never trained as
    negatives, so near-duplicates of one object keep high objectness and rank above other objects' proposals.
    """
    from raydet.evaluation import recall_at

    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass
    model = build_from_pipeline("rpn_r50_fpn_1x_coco.yaml", TINY + TINY_RPN)
    batch = collate_samples(samples)
    first, last = _train(model, batch, 80, lr=2e-3, warmup=10, fused=True)
    assert sum(last.values()) < 0.2 * sum(first.values())
    with torch.no_grad():
        proposals = model(batch, mode="predict")
    as_numpy = [torch.cat([p["boxes"], p["scores"][:, None]], 1).numpy() for p in proposals]
    assert recall_at(as_numpy, [r["boxes"] for r in records], 10, iou_thrs=np.array([0.7])) == 1.0


def test_mask_rcnn_overfits_boxes_and_masks(small_shapes):
    samples, records = small_shapes
    torch.manual_seed(0)  # seeds 0, 1, 2 all pass (box and mask AP50 1.0)
    model = build_from_pipeline("mask_rcnn_r50_fpn_1x_coco.yaml", TINY + TINY_RPN + TINY_ROI + TINY_MASK)
    batch = collate_samples(samples, with_masks=True)
    first, last = _train(model, batch, 60, lr=2e-3, warmup=10, fused=True)
    assert last["loss_mask"] < 0.5 * first["loss_mask"]
    metrics = _ap(model, batch, records, iou_types=("bbox", "segm"))
    assert metrics["bbox/AP50"] > 0.9, metrics
    assert metrics["segm/AP50"] > 0.9, metrics
