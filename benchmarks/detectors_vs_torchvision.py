"""Speed of raydet's Faster R-CNN and RetinaNet R50-FPN against torchvision's, on identical inputs.

Measured per model, with both implementations configured to the same test- and train-time settings:

* ``inference``: batch 1, eval mode, ``torch.no_grad``, forward + post-processing (decoding, NMS, mapping boxes back
  to the original image), reported as images per second.
* ``train``: one iteration of forward + loss + backward + SGD step on a batch of ``--batch`` images with a few
  synthetic ground-truth boxes each, reported as seconds per iteration.

Each measurement is the median over ``--repeats`` timed runs after ``--warmup`` untimed ones; raydet and torchvision
runs alternate so that drifts in machine speed hit both alike. Usage::

    python benchmarks/detectors_vs_torchvision.py --size 512 768 --repeats 5          # CPU
    python benchmarks/detectors_vs_torchvision.py --device cuda                         # 800 x 1333 on a GPU

Input handling (stated in the JSON as ``meta.preprocessing``): raydet gets a batch that is already normalised and
padded (``collate_samples``, untimed); torchvision gets the same images as [0, 1] float tensors and its timed
forward includes its ``GeneralizedRCNNTransform``, configured with ``min_size`` / ``max_size`` equal to the input
so that the resize is the identity. The transform's own cost is timed separately (``torchvision_transform_s``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from raydet.benchmark import device_name, synchronize, timed

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "detectors_vs_torchvision.json"

MODELS = {
    "faster_rcnn": "faster_rcnn_r50_fpn_1x_coco.yaml",
    "retinanet": "retinanet_r50_fpn_1x_coco.yaml",
}
MODES = ("inference", "train")
PRECISIONS = ("fp32", "fp16", "bf16")
NUM_CLASSES = 80  # raydet's COCO pipelines


# ------------------------------------------------------------------------------------------------ arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                   help="input image height and width (both models see exactly this size, no resize)")
    p.add_argument("--batch", type=int, default=2, help="images per training iteration")
    p.add_argument("--gt-per-image", type=int, default=4, help="synthetic ground-truth boxes per training image")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations before timing, per model and mode")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                   help="fp32, or mixed precision: forward passes under torch.autocast with float16 (fp16, training "
                        "with a GradScaler) or bfloat16 (bf16), the same for both implementations")
    p.add_argument("--score-thr", type=float, default=0.05,
                   help="test score threshold of both implementations; random weights score below 0.05, so lower "
                        "it (e.g. 0.0) to make post-processing do real work")
    p.add_argument("--backbone", choices=("reference", "trainable"), default="reference",
                   help="reference: stem + layer1 frozen and BatchNorm statistics frozen (the 1x pipelines; "
                        "torchvision's model is frozen the same way); trainable: nothing frozen, BatchNorm in "
                        "train mode (torchvision's weights=None default; raydet gets frozen_stages=-1, "
                        "norm_eval=false)")
    p.add_argument("--tv-classes", choices=("coco91", "matched"), default="coco91",
                   help="coco91: torchvision built with num_classes=91 (its COCO layout); matched: 81 for Faster "
                        "R-CNN (80 + background) and 80 for RetinaNet, the same head widths as raydet")
    p.add_argument("--independent-weights", action="store_true",
                   help="keep each implementation's own random initialisation (and torchvision's stock RetinaNet "
                        "P6, computed from P5). By default torchvision's RetinaNet computes P6 from C5 like the "
                        "pipeline and both models get raydet's weights, so they see the same proposals and scores "
                        "and their post-processing does the same work")
    p.add_argument("--raydet-set", action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                   help="extra override of the raydet pipelines (repeatable); with a MODEL: prefix for that model "
                        "only, e.g. faster_rcnn:model.roi_head.bbox_roi_extractor.sampling_ratio=2")
    p.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate of the training step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile one iteration of each (model, mode, implementation) with "
                        "torch.profiler and print the top operators")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    if min(args.size) < 32:
        p.error("--size must be at least 32 x 32")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.gt_per_image < 1:
        p.error("--batch, --repeats and --gt-per-image must be >= 1 and --warmup >= 0")
    for item in args.raydet_set:
        scope, sep, override = item.partition(":")
        if sep and "=" not in scope and scope not in MODELS:
            p.error(f"--raydet-set {item!r}: the prefix must be one of {', '.join(sorted(MODELS))}")
    return args


# ------------------------------------------------------------------------------------------------ models

def build_raydet(model: str, args: argparse.Namespace) -> nn.Module:
    """raydet's detector from its pipeline, with the test score threshold set to ``--score-thr``."""
    import raydet.models  # noqa: F401  (registers the components)
    from raydet.config import load_config

    overrides = [f"num_classes={NUM_CLASSES}"]
    if model == "faster_rcnn":
        overrides.append(f"model.roi_head.test.score_thr={args.score_thr}")
    else:
        overrides.append(f"model.bbox_head.test.score_thr={args.score_thr}")
    if args.backbone == "trainable":
        overrides += ["model.backbone.frozen_stages=-1", "model.backbone.norm_eval=false"]
    for item in args.raydet_set:
        scope, sep, override = item.partition(":")
        if not sep or "=" in scope:  # no model prefix (a ':' inside the value does not count)
            overrides.append(item)
        elif scope == model:
            overrides.append(override)
    return load_config(PIPELINES / MODELS[model], overrides).build("model")


def torchvision_num_classes(model: str, args: argparse.Namespace) -> int:
    if args.tv_classes == "coco91":
        return 91
    return NUM_CLASSES + 1 if model == "faster_rcnn" else NUM_CLASSES


def torchvision_label_offset(model: str, args: argparse.Namespace) -> int:
    """torchvision label = raydet label + offset (Faster R-CNN reserves 0 for background)."""
    return 1 if model == "faster_rcnn" or args.tv_classes == "coco91" else 0


def build_torchvision(model: str, args: argparse.Namespace) -> nn.Module:
    """torchvision's detector with raydet's test / train settings, and no resize in its transform."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    h, w = args.size
    common = dict(weights=None, weights_backbone=None, num_classes=torchvision_num_classes(model, args),
                  min_size=min(h, w), max_size=max(h, w))
    if model == "faster_rcnn":
        net = fasterrcnn_resnet50_fpn(
            **common,
            rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
            rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7,
            rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
            box_score_thresh=args.score_thr, box_nms_thresh=0.5, box_detections_per_img=100,
            box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25)
    else:
        net = retinanet_resnet50_fpn(**common, score_thresh=args.score_thr, nms_thresh=0.5, detections_per_img=100,
                                     topk_candidates=1000, fg_iou_thresh=0.5, bg_iou_thresh=0.4)
        if not args.independent_weights:  # P6 = 3x3/2 conv on C5 (the pipeline's add_extra_convs: on_input)
            net.backbone.fpn.extra_blocks = LastLevelP6P7(2048, 256)
    if args.backbone == "reference":
        body = net.backbone.body
        for module in (body.conv1, body.bn1, body.layer1):
            for param in module.parameters():
                param.requires_grad_(False)
    return net


_DEAD_LOGIT = -1e4  # bias of torchvision's extra COCO-91 classes: probability exactly 0, so never a candidate

_RENAMES = [  # (raydet key pattern, torchvision replacement), first match wins
    (r"^backbone\.", "backbone.body."),
    (r"^neck\.lateral_convs\.(\d+)\.0\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.0\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"^neck\.extra_convs\.0\.0\.", "backbone.fpn.extra_blocks.p6."),
    (r"^neck\.extra_convs\.1\.0\.", "backbone.fpn.extra_blocks.p7."),
    (r"^rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"^rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"^rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"^roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"^roi_head\.bbox_head\.shared_fcs\.2\.", "roi_heads.box_head.fc7."),
    (r"^roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"^roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"^bbox_head\.cls_convs\.(\d+)\.", lambda m: f"head.classification_head.conv.{int(m[1]) // 2}.0."),
    (r"^bbox_head\.reg_convs\.(\d+)\.", lambda m: f"head.regression_head.conv.{int(m[1]) // 2}.0."),
    (r"^bbox_head\.retina_cls\.", "head.classification_head.cls_logits."),
    (r"^bbox_head\.retina_reg\.", "head.regression_head.bbox_reg."),
]


def _torchvision_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    raise KeyError(f"no torchvision counterpart for raydet parameter {key!r}")


def _place_classes(src: torch.Tensor, dst_shape: torch.Size, groups: int, per_class: int, first: int,
                   fill: float) -> torch.Tensor:
    """Rows of ``src`` are ``groups`` x (classes) x ``per_class``; put its classes at ``first``, ``first + 1``, ...
    of a ``dst_shape`` tensor laid out the same way with more classes, the other rows set to ``fill``."""
    src_classes = src.shape[0] // (groups * per_class)
    dst_classes = dst_shape[0] // (groups * per_class)
    out = torch.full((groups, dst_classes, per_class) + tuple(dst_shape[1:]), fill, dtype=src.dtype)
    out[:, first:first + src_classes] = src.reshape((groups, src_classes, per_class) + tuple(src.shape[1:]))
    return out.reshape(dst_shape)


def copy_raydet_weights(raydet_net: nn.Module, tv_net: nn.Module, label_offset: int) -> None:
    """Load raydet's (random) weights into torchvision's model so that both compute the same function.

    raydet class c is torchvision class c + ``label_offset``. Faster R-CNN's classifier has background at index 0
    in torchvision (raydet: last) and regresses 4 deltas for every class including background (raydet: foreground
    only). RetinaNet's classifier channels are anchor-major in both (a * classes + c). torchvision classes without
    a raydet counterpart get zero weights and a -1e4 bias: probability exactly 0, so they are never candidates.
    """
    src, dst = raydet_net.state_dict(), tv_net.state_dict()
    new = {}
    for key, value in src.items():
        tv_key = _torchvision_key(key)
        if tv_key not in dst:
            raise KeyError(f"{key} -> {tv_key}: not in torchvision's model")
        shape, fill = dst[tv_key].shape, (_DEAD_LOGIT if key.endswith(".bias") else 0.0)
        if key.startswith("roi_head.bbox_head.fc_cls."):  # [fg..., bg] -> [bg, fg..., unused...]
            value = _place_classes(torch.cat([value[NUM_CLASSES:], value[:NUM_CLASSES]]), shape, 1, 1, 0, fill)
        elif key.startswith("roi_head.bbox_head.fc_reg."):  # no background deltas in raydet
            value = _place_classes(value, shape, 1, 4, label_offset, 0.0)
        elif key.startswith("bbox_head.retina_cls."):
            value = _place_classes(value, shape, value.shape[0] // NUM_CLASSES, 1, label_offset, fill)
        if value.shape != shape:
            raise ValueError(f"{key} {tuple(value.shape)} -> {tv_key} {tuple(shape)}: shapes differ")
        new[tv_key] = value
    missing = sorted(set(dst) - set(new))
    if missing:
        raise KeyError(f"torchvision parameters without a raydet counterpart: {missing[:5]}")
    tv_net.load_state_dict(new)


def set_train_mode(net: nn.Module, impl: str, args: argparse.Namespace) -> None:
    """``net.train()``; for torchvision with the reference backbone, BatchNorm stays in eval mode like raydet's
    ``norm_eval`` (raydet's ResNet.train does this itself)."""
    net.train()
    if impl == "torchvision" and args.backbone == "reference":
        for m in net.backbone.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ------------------------------------------------------------------------------------------------ inputs

def random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n boxes (x1, y1, x2, y2) inside an h x w image, sides between 1/8 and 1/2 of the image."""
    bw = rng.uniform(w / 8, w / 2, n)
    bh = rng.uniform(h / 8, h / 2, n)
    x1 = rng.uniform(0, w - bw)
    y1 = rng.uniform(0, h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def make_inputs(n_images: int, args: argparse.Namespace, rng: np.random.Generator):
    """The same ``n_images`` random images for both implementations.

    Returns ``(samples, tv_images)``: raydet ``(image uint8 HxWx3, record)`` samples and torchvision (3, H, W)
    float images in [0, 1] (torchvision normalises with the same ImageNet mean / std as raydet).
    """
    h, w = args.size
    samples, tv_images = [], []
    for i in range(n_images):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        boxes = random_boxes(rng, args.gt_per_image, h, w)
        labels = rng.integers(0, NUM_CLASSES, size=args.gt_per_image).astype(np.int64)
        samples.append((image, {"image_id": i, "boxes": boxes, "labels": labels}))
        tv_images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
    return samples, tv_images


def raydet_batch(samples, device: torch.device) -> dict:
    from raydet.data.collate import collate_samples

    batch = collate_samples(samples)
    out = dict(batch)
    out["images"] = batch["images"].to(device)
    for key in ("gt_boxes", "gt_labels", "gt_boxes_ignore"):
        out[key] = [t.to(device) for t in batch[key]]
    return out


def torchvision_targets(samples, offset: int, device: torch.device) -> list[dict]:
    return [{"boxes": torch.from_numpy(rec["boxes"]).to(device),
             "labels": torch.from_numpy(rec["labels"] + offset).to(device)} for _, rec in samples]


# ------------------------------------------------------------------------------------------------ timing

# synchronize(device); timed(fn, device) -> (wall seconds, output, process CPU seconds): shared with raydet.benchmark
def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (fp32: autocast off)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def run_pair(steps: dict[str, Callable[[], object]], args: argparse.Namespace, device: torch.device) -> dict:
    """Warm up each implementation, then time them alternately ``--repeats`` times.

    Returns per implementation: all times (s), their median, the last output, and the peak GPU memory (MiB) of
    that implementation's runs.
    """
    results = {}
    for impl, step in steps.items():
        for _ in range(args.warmup):
            step()
        results[impl] = {"times_s": [], "cpu_times_s": [], "peak_mem_mib": None}
    for _ in range(args.repeats):
        for impl, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t, out, cpu = timed(step, device)
            results[impl]["times_s"].append(t)
            results[impl]["cpu_times_s"].append(cpu)
            results[impl]["last_output"] = out
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                results[impl]["peak_mem_mib"] = max(results[impl]["peak_mem_mib"] or 0.0, peak)
    for r in results.values():
        r["median_s"] = statistics.median(r["times_s"])
        r["min_s"] = min(r["times_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_times_s"])
    return results


def profile_step(label: str, step: Callable[[], object], device: torch.device, rows: int) -> None:
    """Print the operators of one run of ``step`` by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.key_averages()
    sort = "self_cpu_time_total"
    if on_gpu:  # renamed in torch 2.4
        sort = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(f"\n=== profile: {label} ===")
    print(events.table(sort_by=sort, row_limit=rows))


# ------------------------------------------------------------------------------------------------ benchmarks

def summary(r: dict) -> dict:
    """The JSON fields every measurement has (seconds)."""
    return {"median_s": r["median_s"], "min_s": r["min_s"], "times_s": r["times_s"],
            "median_cpu_s": r["median_cpu_s"], "peak_mem_mib": r["peak_mem_mib"]}


def count_detections(outputs: list[dict]) -> int:
    return int(sum(o["boxes"].shape[0] for o in outputs))


def bench_inference(model: str, nets: dict[str, nn.Module], args, device, rng, precision: str = "fp32") -> dict:
    samples, tv_images = make_inputs(1, args, rng)
    batch = raydet_batch(samples, device)
    images = [im.to(device) for im in tv_images]
    for net in nets.values():
        net.eval()

    def raydet_step():
        with torch.no_grad(), autocast(device, precision):
            return nets["raydet"](batch, mode="predict")

    def torchvision_step():
        with torch.no_grad(), autocast(device, precision):
            return nets["torchvision"](images)

    steps = {"raydet": raydet_step, "torchvision": torchvision_step}
    rois = {}
    if model == "faster_rcnn":  # how many proposals reach each RoI head (the second stage's work)
        hooks = [nets["raydet"].roi_head.bbox_roi_extractor.register_forward_pre_hook(
                     lambda m, a: rois.__setitem__("raydet", int(a[1].shape[0]))),
                 nets["torchvision"].roi_heads.box_roi_pool.register_forward_pre_hook(
                     lambda m, a: rois.__setitem__("torchvision", sum(int(p.shape[0]) for p in a[1])))]
    res = run_pair(steps, args, device)
    if model == "faster_rcnn":
        for hook in hooks:
            hook.remove()

    transform = nets["torchvision"].transform
    with torch.no_grad():
        transform_times = [timed(lambda: transform(images), device)[0] for _ in range(max(3, args.repeats))]

    row = {"model": model, "mode": "inference", "precision": precision, "unit": "images/s"}
    for impl, r in res.items():
        row[impl] = {"images_per_s": 1.0 / r["median_s"], **summary(r),
                     "detections": count_detections(r["last_output"])}
        if impl in rois:
            row[impl]["rois"] = rois[impl]
    row["torchvision"]["torchvision_transform_s"] = statistics.median(transform_times)
    row["ratio"] = row["raydet"]["images_per_s"] / row["torchvision"]["images_per_s"]
    row["cpu_time_ratio"] = row["torchvision"]["median_cpu_s"] / row["raydet"]["median_cpu_s"]
    if args.profile:
        for impl, step in steps.items():
            profile_step(f"{model} inference {impl}", step, device, args.profile_rows)
    return row


def bench_train(model: str, nets: dict[str, nn.Module], args, device, rng, precision: str = "fp32") -> dict:
    samples, tv_images = make_inputs(args.batch, args, rng)
    batch = raydet_batch(samples, device)
    images = [im.to(device) for im in tv_images]
    targets = torchvision_targets(samples, torchvision_label_offset(model, args), device)
    optimizers, scalers = {}, {}
    for impl, net in nets.items():
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range and needs none
        scalers[impl] = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        set_train_mode(net, impl, args)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizers[impl] = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)

    def make_step(impl: str):
        net, opt, scaler = nets[impl], optimizers[impl], scalers[impl]

        def step():
            with autocast(device, precision):
                losses = net(batch) if impl == "raydet" else net(images, targets)
                loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return float(loss.detach())

        return step

    steps = {impl: make_step(impl) for impl in nets}
    res = run_pair(steps, args, device)
    row = {"model": model, "mode": "train", "precision": precision, "unit": "s/iter", "batch": args.batch}
    for impl, r in res.items():
        row[impl] = {"s_per_iter": r["median_s"], **summary(r), "last_loss": r["last_output"],
                     "trainable_params": sum(p.numel() for p in nets[impl].parameters() if p.requires_grad)}
    row["ratio"] = row["torchvision"]["s_per_iter"] / row["raydet"]["s_per_iter"]
    row["cpu_time_ratio"] = row["torchvision"]["median_cpu_s"] / row["raydet"]["median_cpu_s"]
    if args.profile:
        for impl, step in steps.items():
            profile_step(f"{model} train {impl}", step, device, args.profile_rows)
    for net in nets.values():
        net.eval()
    return row


# ------------------------------------------------------------------------------------------------ report

def metadata(args: argparse.Namespace, device: torch.device) -> dict:
    import torchvision

    h, w = args.size
    return {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "input_size_hw": [h, w], "train_batch": args.batch, "gt_per_image": args.gt_per_image,
        "warmup": args.warmup, "repeats": args.repeats, "statistic": "median", "score_thr": args.score_thr,
        "backbone": args.backbone, "weights": "independent" if args.independent_weights else "raydet's, copied",
        "raydet_overrides": list(args.raydet_set), "precisions": list(args.precision),
        "torchvision_num_classes": {m: torchvision_num_classes(m, args) for m in args.models},
        "raydet_num_classes": NUM_CLASSES, "lr": args.lr, "seed": args.seed,
        "test_settings": {"score_thr": args.score_thr, "nms_iou": 0.5, "max_per_img": 100,
                          "rpn_test_pre_nms_top_n_per_level": 1000, "rpn_test_post_nms_top_n": 1000,
                          "retinanet_topk_per_level": 1000},
        "preprocessing": ("raydet: batch normalised and padded before timing (collate_samples, untimed); "
                          "torchvision: timed forward includes GeneralizedRCNNTransform with min_size/max_size equal "
                          "to the input (normalise, identity bilinear resize, pad to 32); its cost is "
                          "torchvision_transform_s"),
        "ratio": "raydet speed / torchvision speed from median wall time (> 1: raydet faster); cpu_time_ratio: "
                 "the same from the process CPU time",
    }


def format_table(rows: list[dict]) -> str:
    """model, mode, raydet, torchvision, ratio (raydet speed / torchvision speed), and per-run details."""
    lines = [f"{'model':<12} {'mode':<10} {'prec':<5} {'unit':<9} {'raydet':>9} {'torchvision':>12} {'ratio':>6} "
             f"{'cpu ratio':>9}  details (raydet, torchvision)"]
    for r in rows:
        key = "images_per_s" if r["mode"] == "inference" else "s_per_iter"
        extra = []
        if r["mode"] == "inference":
            extra.append(f"detections {r['raydet']['detections']}, {r['torchvision']['detections']}")
        if "rois" in r["raydet"]:
            extra.append(f"rois {r['raydet']['rois']}, {r['torchvision']['rois']}")
        if r["raydet"]["peak_mem_mib"] is not None:
            extra.append(f"peak MiB {r['raydet']['peak_mem_mib']:.0f}, {r['torchvision']['peak_mem_mib']:.0f}")
        lines.append(f"{r['model']:<12} {r['mode']:<10} {r.get('precision', 'fp32'):<5} {r['unit']:<9} {r['raydet'][key]:>9.3f} "
                     f"{r['torchvision'][key]:>12.3f} {r['ratio']:>6.2f} {r['cpu_time_ratio']:>9.2f}  "
                     f"{'; '.join(extra)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    load_before = os.getloadavg()
    rows = []
    for model in args.models:
        nets = {"raydet": build_raydet(model, args), "torchvision": build_torchvision(model, args)}
        if not args.independent_weights:
            copy_raydet_weights(nets["raydet"], nets["torchvision"], torchvision_label_offset(model, args))
        nets = {impl: net.to(device) for impl, net in nets.items()}
        for precision in args.precision:
            for mode in args.modes:
                bench = bench_inference if mode == "inference" else bench_train
                row = bench(model, nets, args, device, rng, precision)
                rows.append(row)
                print(format_table([row]).splitlines()[1], flush=True)
        del nets
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {"meta": metadata(args, device), "results": rows}
    result["meta"]["loadavg_1min_before_after"] = [load_before[0], os.getloadavg()[0]]
    for row in rows:
        for impl in ("raydet", "torchvision"):
            if row["mode"] == "train" and not math.isfinite(row[impl]["last_loss"]):
                print(f"warning: {row['model']} {impl} training loss is not finite", file=sys.stderr)
    print()
    print(f"{result['meta']['device_name']}, {result['meta']['threads']} threads, input {args.size[0]}x"
          f"{args.size[1]}, train batch {args.batch}, median of {args.repeats} after {args.warmup} warm-up")
    print(format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
