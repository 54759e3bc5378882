"""``python -m raydet.benchmark PIPELINE [options]``: training speed, inference speed, memory and data throughput.

The numbers of the MMDetection report's Table 2, for one pipeline on this machine, per precision:

* ``train``: seconds per iteration of forward + losses + backward + optimizer step, run by the real
  :class:`~raydet.engine.runner.Runner` loop with the pipeline's model, its optimizer (``raydet.engine.optim``,
  learning rate scaled to the batch; no warmup schedule) and its gradient clipping (the ``OptimizerHook``).
  Batch: ``data.images_per_worker`` images (``--batch`` to change). Inputs are synthetic (see below).
* ``inference``: images per second at batch 1: eval mode, ``torch.no_grad``, ``model(batch, mode="predict")``
  (forward + post-processing: decoding, NMS, boxes mapped back to the image).
* peak GPU memory of each of those (``torch.cuda.max_memory_allocated`` over the timed iterations, reset before
  them); ``None`` on the CPU.
* ``data``: images per second of the pipeline's training dataset through its transforms (decode + augment +
  collate), ``--data-images`` images, once in this process (``TorchDetectionDataset`` + ``collate_fn``) and once
  through the Ray Data actor pool of training (``raydet.train.ray_stream``: ``build_ray_dataset`` +
  ``iter_detection_batches``, with the pipeline's ``scaling.data_*`` settings; start-up included, and the steady
  rate after the first batch reported beside it). The data rows do not depend on the precision.

Precisions: ``fp32``; ``amp`` = fp16 autocast + GradScaler on CUDA, bf16 autocast on the CPU (the run prints and
records which); ``fp16`` (CUDA only) and ``bf16`` name the autocast type directly.

Timing: each value is the median of ``--iters`` timed iterations after ``--warmup`` untimed ones; on CUDA every
iteration is bracketed by ``torch.cuda.synchronize``. The JSON keeps every raw time (and the process CPU time of
each, steadier on a shared machine).

Inputs of the train and inference modes: random uint8 images of ``--size H W`` (default: the short and long side
of the pipeline's test ``Resize`` scale; on the CPU each side capped at 320) with ``--gt-per-image`` random boxes
(and box-shaped masks for Mask R-CNN; random semantic maps for a semantic branch, HTC's) of random classes,
normalised and padded before timing. So the train and inference numbers need no dataset; ``--skip data`` benchmarks
a pipeline whose dataset is not on this machine.

Weights: ``--checkpoint`` (a file or a Ray checkpoint folder) is loaded before timing; without it the model is
randomly initialised, which the output says: with random weights few boxes pass the test score threshold, so
post-processing does less work than with trained weights.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from raydet.engine.hooks import Hook, OptimizerHook, Priority
from raydet.engine.optim import build_optimizer, scaled_lr
from raydet.engine.runner import Runner, move_batch

__all__ = ["main", "synchronize", "timed", "time_calls", "device_name", "environment", "resolve_precision",
           "synthetic_batch", "format_value", "format_table"]

MODES = ("train", "inference", "data")
CPU_MAX_SIDE = 320           # default input side cap on the CPU
FALLBACK_SIZE = (800, 1333)  # when the pipeline's test pipeline has no Resize


# --------------------------------------------------------------------------------------------------- timing helpers
def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any, float]:
    """Wall seconds of ``fn()`` (bracketed by synchronize), its output, and this process's CPU seconds meanwhile."""
    synchronize(device)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out, time.process_time() - cpu


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> dict:
    """Run ``fn`` ``warmup`` times untimed, reset the peak memory, then time it ``iters`` times.

    Returns ``times_s``, ``cpu_times_s``, ``median_s``, ``peak_mem_mib`` and the last output (``output``).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    reset_peak_memory(device)
    times, cpu_times, out = [], [], None
    for _ in range(iters):
        t, out, cpu = timed(fn, device)
        times.append(t)
        cpu_times.append(cpu)
    return {"times_s": times, "cpu_times_s": cpu_times, "median_s": statistics.median(times),
            "peak_mem_mib": peak_memory_mib(device), "output": out}


# --------------------------------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (else ``platform.processor()``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def environment(device: torch.device) -> dict:
    """Library versions, device and thread count, for the JSON record."""
    import torchvision

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    from raydet import __version__

    return {
        "raydet": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
        "ray": ray_version, "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# --------------------------------------------------------------------------------------------------- precision
def resolve_precision(name: str, device: torch.device) -> dict:
    """``fp32`` / ``amp`` / ``fp16`` / ``bf16`` -> the autocast dtype (None: no autocast) and whether a GradScaler
    is used. ``amp`` is fp16 + GradScaler on CUDA and bf16 on the CPU."""
    if name == "amp":
        name_used = "fp16" if device.type == "cuda" else "bf16"
    else:
        name_used = name
    if name_used == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA (on the CPU use amp or bf16: bf16 autocast)")
    if name_used not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown precision {name!r}")
    autocast = None if name_used == "fp32" else name_used
    label = name if name == name_used else f"{name} ({name_used})"
    return {"name": name, "label": label, "autocast": autocast,
            "dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name_used],
            "grad_scaler": autocast == "fp16"}


def describe_precision(precision: dict, device: torch.device) -> str:
    """E.g. ``amp = bf16 autocast (on the CPU)``."""
    if precision["autocast"] is None:
        return f"{precision['name']} = float32, no autocast"
    what = f"{precision['autocast']} autocast" + (" + GradScaler" if precision["grad_scaler"] else "")
    return f"{precision['name']} = {what}" + (" (on the CPU)" if device.type == "cpu" else " (on CUDA)")


def autocast(device: torch.device, amp: str | None):
    """The autocast context of ``amp`` (None, "fp16", "bf16"), as the Runner uses it."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


# --------------------------------------------------------------------------------------------------- inputs
def random_boxes(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """n boxes (x1, y1, x2, y2) inside an h x w image, sides between 1/8 and 1/2 of the image."""
    bw, bh = rng.uniform(w / 8, w / 2, n), rng.uniform(h / 8, h / 2, n)
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def synthetic_batch(n: int, size: tuple[int, int], num_classes: int, gt_per_image: int, with_masks: bool,
                    rng: np.random.Generator, device: torch.device, num_proposals: int = 0,
                    seg_classes: int = 0) -> dict:
    """A model batch of ``n`` random images of ``size`` (H, W) with random boxes, labels (and box-shaped polygon
    masks; ``num_proposals`` random precomputed proposals per image for a detector that reads them, Fast R-CNN;
    ``seg_classes``: random (H, W) semantic maps of ids below it, ``gt_semantic_seg``, for a semantic branch),
    normalised and padded to a multiple of 32, on ``device``."""
    from raydet.data.collate import collate_samples

    h, w = size
    samples = []
    for i in range(n):
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        boxes = random_boxes(rng, gt_per_image, h, w)
        record = {"image_id": i, "boxes": boxes,
                  "labels": rng.integers(0, max(num_classes, 1), size=gt_per_image).astype(np.int64)}
        if with_masks:
            record["masks"] = [[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes.tolist()]
        if num_proposals:
            record["proposals"] = random_boxes(rng, num_proposals, h, w)
        if seg_classes:
            record["seg_map"] = rng.integers(0, min(seg_classes, 256), size=(h, w), dtype=np.uint8)
        samples.append((image, record))
    return move_batch(collate_samples(samples, with_masks=with_masks), device)


def default_size(cfg, device: torch.device) -> tuple[int, int]:
    """(H, W) = (short, long) side of the first Resize scale of the test (else val) pipeline; on the CPU each side
    capped at :data:`CPU_MAX_SIDE`."""
    size = FALLBACK_SIZE
    for key in ("data.test.pipeline", "data.val.pipeline", "test_pipeline"):
        pipeline = cfg.get(key)
        resize = next((t for t in pipeline or [] if isinstance(t, dict) and t.get("type") == "Resize"), None)
        if resize and resize.get("scale"):
            scale = resize["scale"]
            pair = scale if np.isscalar(scale[0]) else scale[0]
            size = (int(min(pair)), int(max(pair)))
            break
    if device.type != "cuda":
        size = (min(size[0], CPU_MAX_SIDE), min(size[1], CPU_MAX_SIDE))
    return size


# --------------------------------------------------------------------------------------------------- benchmarks
class IterationTimer(Hook):
    """Runner hook, lowest priority (so it ends after the OptimizerHook's step): wall and CPU seconds of each
    iteration from ``before_train_iter`` to ``after_train_iter``, and its loss; resets the peak GPU memory when
    the ``warmup`` iterations are done."""

    priority = Priority.LOWEST

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self._start = self._cpu = 0.0

    def before_train_iter(self, runner):
        synchronize(self.device)
        if runner.inner_iter == self.warmup:
            reset_peak_memory(self.device)
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def after_train_iter(self, runner):
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu)
        self.losses.append(float(runner.loss.detach()))


def bench_train(model, initial_state: dict, optimizer_cfg, batch: dict, precision: dict, iters: int, warmup: int,
                device: torch.device) -> dict:
    """Seconds per training iteration through ``Runner.train_epoch`` over the same batch."""
    model.load_state_dict(initial_state)
    n_images = len(batch["img_metas"])
    optimizer = build_optimizer(model, optimizer_cfg, scaled_lr(optimizer_cfg, n_images))
    step = OptimizerHook(optimizer_cfg.grad_clip, fp16_scaler=precision["grad_scaler"], nonfinite="skip")
    timer = IterationTimer(warmup, device)
    runner = Runner(model, optimizer, train_loader=lambda epoch: itertools.repeat(batch, warmup + iters),
                    val_loader=None, max_epochs=1, hooks=[step, timer], device=device,
                    amp=precision["autocast"])
    runner.train_epoch()
    times = timer.times[warmup:]
    median = statistics.median(times)
    out = {"precision": precision["label"], "dtype": precision["dtype"], "autocast": precision["autocast"],
           "grad_scaler": precision["grad_scaler"], "batch": n_images, "times_s": times,
           "cpu_times_s": timer.cpu_times[warmup:], "median_s": median, "s_per_iter": median,
           "images_per_s": n_images / median, "peak_mem_mib": peak_memory_mib(device),
           "losses": timer.losses[warmup:], "skipped_steps": step.skipped, "lr": optimizer.param_groups[0]["lr"]}
    del runner, optimizer, step
    model.zero_grad(set_to_none=True)  # free the gradients before the next measurement
    return out


def bench_inference(model, initial_state: dict, batch: dict, precision: dict, iters: int, warmup: int,
                    device: torch.device) -> dict:
    """Images per second at batch 1: eval mode, no_grad, ``model(batch, mode="predict")``."""
    model.load_state_dict(initial_state)
    model.eval()

    def predict():
        with torch.no_grad(), autocast(device, precision["autocast"]):
            return model(batch, mode="predict")

    r = time_calls(predict, iters, warmup, device)
    detections = int(sum(len(p["boxes"]) for p in r.pop("output")))
    return {"precision": precision["label"], "dtype": precision["dtype"], "autocast": precision["autocast"],
            "batch": 1, **r, "images_per_s": 1.0 / r["median_s"], "detections": detections}


def _consume(batches, start: float) -> dict:
    """Pull every batch; images, per-batch times (from the previous batch, the first from ``start``), totals."""
    times, sizes = [], []
    last = start
    for batch in batches:
        now = time.perf_counter()
        times.append(now - last)
        sizes.append(len(batch["img_metas"]))
        last = now
    total = last - start
    n = sum(sizes)
    out = {"images": n, "batches": len(sizes), "batch_sizes": sizes, "batch_times_s": times, "total_s": total,
           "images_per_s": n / total if total > 0 else math.inf,
           "first_batch_s": times[0] if times else None, "steady_images_per_s": None}
    if len(times) > 1 and total > times[0]:
        out["steady_images_per_s"] = (n - sizes[0]) / (total - times[0])
    return out


def bench_data_in_process(dataset, batch_size: int, seed: int) -> dict:
    """Decode + transform + collate in this process, in record order, ``batch_size`` images at a time."""
    from raydet.data.pipeline import TorchDetectionDataset

    start = time.perf_counter()
    tds = TorchDetectionDataset(dataset, train=True, seed=seed)

    def batches():
        for i in range(0, len(tds), batch_size):
            yield tds.collate_fn([tds[j] for j in range(i, min(i + batch_size, len(tds)))])

    return {"path": "in-process", **_consume(batches(), start)}


def bench_data_ray(dataset, sections) -> dict:
    """The training workers' Ray Data stream (actor pool decode + augment, grouped collate), start-up included."""
    from raydet.commands.loaders import ray_stream

    start = time.perf_counter()
    stream = ray_stream(sections)(dataset, dataset.records, True, 0)
    out = {"path": "ray-data", "actors": list(sections.scaling.data_actors),
           "cpus_per_actor": sections.scaling.data_cpus_per_actor,
           "actor_batch_size": sections.scaling.data_batch_size}
    try:
        out.update(_consume(stream, start))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    return out


# --------------------------------------------------------------------------------------------------- report
def format_value(value: float | None) -> str:
    """How values appear in the table (the tests compare it with the JSON)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def table_rows(results: dict) -> list[dict]:
    """One row per (mode, precision) and per data path: mode, precision, value, unit, peak memory (MiB)."""
    rows = []
    for mode, key, unit in (("train", "s_per_iter", "s/iter"), ("inference", "images_per_s", "img/s")):
        for r in results.get(mode, {}).values():
            rows.append({"mode": mode, "precision": r["precision"], "value": r[key], "unit": unit,
                         "peak_mem_mib": r["peak_mem_mib"]})
    for r in results.get("data", {}).values():
        if "images_per_s" in r:
            rows.append({"mode": "data", "precision": r["path"], "value": r["images_per_s"], "unit": "img/s",
                         "peak_mem_mib": None})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`table_rows` as a plain-text table."""
    header = ("mode", "precision", "value", "unit", "peak memory")
    cells = [header] + [(r["mode"], r["precision"], format_value(r["value"]), r["unit"],
                         "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f} MiB") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    def line(c):  # the value column right-aligned
        return "  ".join(v.rjust(w) if i == 2 else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    return "\n".join(line(c) for c in cells)


# --------------------------------------------------------------------------------------------------- command
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="raydet benchmark", description="Time training, inference and the data "
                                "pipeline of a pipeline (the MMDetection report's Table 2).")
    p.add_argument("pipeline", help="pipeline YAML")
    p.add_argument("--checkpoint", default=None, help="checkpoint file or Ray checkpoint folder (default: random "
                   "initialisation)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override pipeline keys, values parsed as YAML")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--precision", nargs="+", choices=("fp32", "amp", "fp16", "bf16"), default=None,
                   help="default: fp32 amp (amp: fp16 + GradScaler on CUDA, bf16 autocast on the CPU)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="synthetic input size (default: the test Resize scale; on the CPU at most 320 a side)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing")
    p.add_argument("--batch", type=int, default=None, help="training images per iteration (default: "
                   "data.images_per_worker)")
    p.add_argument("--gt-per-image", type=int, default=4, help="random ground-truth boxes per training image")
    p.add_argument("--data-images", type=int, default=100, help="images through the data pipeline (the training "
                   "dataset's records, repeated if it has fewer)")
    p.add_argument("--skip", nargs="+", action="extend", default=[], choices=(*MODES, "ray-data"),
                   help="modes to leave out; ray-data skips only the Ray Data path of the data mode")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    p.add_argument("--out", default=None, help="JSON results (default: <work_dir>/<pipeline>/benchmark.json)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1) or args.data_images < 1 \
            or args.gt_per_image < 1 or (args.threads is not None and args.threads < 1):
        p.error("--iters, --batch, --data-images, --gt-per-image and --threads must be >= 1, --warmup >= 0")
    if args.size is not None and min(args.size) < 32:
        p.error("--size must be at least 32 x 32")
    return args


def _repeat_records(dataset, n: int):
    """A copy of ``dataset`` with exactly ``n`` records (its own, cycled)."""
    import numpy as np

    from raydet.commands.loaders import with_records
    from raydet.data.record_table import RecordTable

    if not dataset.records:
        raise ValueError(f"the training dataset {dataset!r} has no images")
    table = RecordTable.from_records(dataset.records)
    return with_records(dataset, table[np.arange(n) % len(table)])  # a view: the records are not copied


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """Load and check everything (errors before any timing), then benchmark; returns the JSON record and the path
    to write it to."""
    import raydet.data  # noqa: F401  (registers the dataset and transform types)
    import raydet.models  # noqa: F401  (registers the model components)
    from raydet.config import load_config
    from raydet.engine.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
    from raydet.engine.optim import parse_optimizer
    from raydet.registry import ConfigError, build_context
    from raydet.commands.sections import build_datasets
    from raydet.commands.validation import validate_pipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    precisions = [resolve_precision(p, device) for p in dict.fromkeys(args.precision or ["fp32", "amp"])]
    skip = set(args.skip)

    cfg = load_config(args.pipeline, args.set)
    sections = validate_pipeline(cfg)  # every section, before anything is timed or Ray starts
    with build_context(file=cfg.path, origins=cfg.origins):
        optimizer_cfg = parse_optimizer(cfg.get("optimizer"))
    torch.manual_seed(sections.seed)
    model = cfg.build("model")
    checkpoint = None
    if args.checkpoint:
        checkpoint = resolve_checkpoint(args.checkpoint)
        load_model_weights(model, load_checkpoint(checkpoint, map_location="cpu")["model"], str(checkpoint))
        weights = f"checkpoint {checkpoint}"
    else:
        weights = "random initialisation (no --checkpoint)"
    # every mode and precision starts from these weights; a CPU copy, so it adds nothing to the GPU's peak memory
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(device)
    dataset = None
    if "data" not in skip:
        try:
            dataset = build_datasets(cfg, sections, splits=("train",))["train"]
        except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError
            hint = "\n  (the data mode reads the training dataset; --skip data benchmarks the model without it)"
            raise (FileNotFoundError if isinstance(exc, FileNotFoundError) else ConfigError)(f"{exc}{hint}") from None
        dataset = _repeat_records(dataset, args.data_images)

    size = tuple(args.size) if args.size else default_size(cfg, device)
    batch_size = args.batch or sections.data.images_per_worker
    num_classes = sections.data.num_classes or cfg.get("num_classes") or 1
    with_masks = bool(getattr(getattr(model, "roi_head", None), "with_mask", False))
    # a detector on precomputed proposals (Fast R-CNN): 1000 per image, what an RPN's test settings keep
    num_proposals = 1000 if getattr(model, "requires_proposals", False) else 0
    # a semantic branch (HTC's) trains on semantic maps: random ids of its classes
    seg_classes = int(getattr(getattr(getattr(model, "roi_head", None), "semantic_head", None), "num_classes", 0) or 0)
    rng = np.random.default_rng(sections.seed)
    record = {
        "environment": environment(device),
        "settings": {
            "pipeline": str(cfg.path), "overrides": list(args.set), "model": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": str(checkpoint) if checkpoint else None, "weights": weights,
            "device": str(device), "precisions": {p["name"]: {k: p[k] for k in ("label", "dtype", "autocast",
                                                                                  "grad_scaler")}
                                                  for p in precisions},
            "size_hw": list(size), "train_batch": batch_size, "inference_batch": 1, "iters": args.iters,
            "warmup": args.warmup, "statistic": "median", "gt_per_image": args.gt_per_image,
            "num_classes": num_classes, "with_masks": with_masks, "data_images": args.data_images,
            "proposals_per_image": num_proposals,
            "skip": sorted(skip), "optimizer": optimizer_cfg.type,
            "inputs": "train / inference: synthetic random images and boxes, normalised and padded before timing; "
                      "data: the pipeline's training dataset",
        },
        "results": {},
    }
    results = record["results"]
    print(f"raydet benchmark: {Path(cfg.path).name} ({type(model).__name__}), {weights}")
    print(f"{record['environment']['device_name']} ({device}), torch threads {torch.get_num_threads()}; input "
          f"{size[0]}x{size[1]}, train batch {batch_size}, inference batch 1; median of {args.iters} after "
          f"{args.warmup} warm-up")
    print("precisions: " + "; ".join(describe_precision(p, device) for p in precisions), flush=True)

    if "train" not in skip:
        batch = synthetic_batch(batch_size, size, num_classes, args.gt_per_image, with_masks, rng, device,
                                num_proposals, seg_classes)
        results["train"] = {}
        for p in precisions:
            results["train"][p["name"]] = r = bench_train(model, initial_state, optimizer_cfg, batch, p, args.iters,
                                                          args.warmup, device)
            if r["skipped_steps"]:
                print(f"warning: train {p['label']}: {r['skipped_steps']} steps had a non-finite loss and were "
                      f"skipped", file=sys.stderr)
            _empty_cache(device)
        del batch
    if "inference" not in skip:
        batch = synthetic_batch(1, size, num_classes, args.gt_per_image, with_masks, rng, device, num_proposals)
        results["inference"] = {}
        for p in precisions:
            results["inference"][p["name"]] = bench_inference(model, initial_state, batch, p, args.iters,
                                                              args.warmup, device)
            _empty_cache(device)
    if dataset is not None:
        results["data"] = {"in_process": bench_data_in_process(dataset, batch_size, sections.seed)}
        if "ray-data" in skip:
            results["data"]["ray"] = {"path": "ray-data", "skipped": "--skip ray-data"}
        else:
            results["data"]["ray"] = _ray_data(dataset, sections)
    record["table"] = table_rows(results)
    from raydet.commands.sections import work_dir_of
    from raydet.workspace import resolve_work_dir

    out = (resolve_work_dir(args.out, work_root=sections.runtime.work_root, key="--out") if args.out
           else os.path.join(work_dir_of(cfg, sections), "benchmark.json"))
    return record, out


def _ray_data(dataset, sections) -> dict:
    """The Ray Data path, on the running Ray instance (or a local one started here and shut down after)."""
    try:
        import ray
    except ImportError:
        return {"path": "ray-data", "skipped": "ray is not installed"}
    from raydet.commands.ray_setup import init_ray

    started = not ray.is_initialized()
    init_ray()
    try:
        return bench_data_ray(dataset, sections)
    finally:
        if started:
            ray.shutdown()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failure_dir(args: argparse.Namespace) -> str | None:
    """The folder a failure's traceback goes to: the one of ``--out`` or of the default ``benchmark.json``, if it
    exists."""
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
    else:
        from raydet.config import load_config
        from raydet.commands.sections import parse_sections, work_dir_of

        try:
            cfg = load_config(args.pipeline, args.set)
            folder = work_dir_of(cfg, parse_sections(cfg))
        except Exception:  # the failure was in the pipeline itself
            return None
    return folder if os.path.isdir(folder) else None


def main(argv=None) -> int:
    from raydet.commands.ray_setup import configure_ray_console
    from raydet.errors import report_failure

    configure_ray_console()  # before Ray is imported (the Ray Data mode): Ray's library logs off the console
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        record, out = run(args)
    except Exception as exc:  # one line (ours, or the original behind Ray's wrapping); the traceback to a file
        from raydet.commands.ray_setup import release_ray

        release_ray()  # no actor output after the error line
        return report_failure(exc, _failure_dir(args), "benchmark")
    finally:
        torch.set_num_threads(threads)
    print()
    print(format_table(record["table"]))
    for name, r in record["results"].get("data", {}).items():
        if "skipped" in r:
            print(f"data {r['path']}: skipped ({r['skipped']})")
        elif r.get("steady_images_per_s"):
            print(f"data {r['path']}: {r['images']} images in {r['total_s']:.2f} s, first batch after "
                  f"{r['first_batch_s']:.2f} s, then {format_value(r['steady_images_per_s'])} img/s")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s (as raydet.train / raydet.test do: anything Ray pickles is
    # then found by reference in raydet.benchmark).
    import importlib

    sys.exit(importlib.import_module("raydet.benchmark").main())
