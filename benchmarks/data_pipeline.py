"""Input-pipeline throughput: Ray Data actors vs a torch DataLoader, same per-image transforms and collate.

Both loaders decode JPEGs, apply COCO's training transforms (Resize keeping the ratio, RandomFlip) and build
normalised, padded batches with raydet.data.collate.collate_detection. ``--resize range`` (default) is MMDetection's
multi-scale training, ``Resize(scale=[[1333, 640], [1333, 800]], multiscale_mode="range")``: each image gets its own
short side drawn uniformly from 640..800 (long side 1333); ``--resize fixed`` is ``Resize(scale=[1333, 800])``.
Images come from ../shared/data/bccd (640x480 JPEGs, resized up to at most 1067x800), ../shared/data/nuts_labelme
(``--source nuts``: 800x600 JPEGs, up to 1067x800), repeated to ``--images`` per epoch, or from synthetic JPEGs when
the bccd folder is absent (``--source synthetic`` forces them).

Reported per loader:
  cold start   time to the first batch and total time of a fresh epoch (Ray: dataset build + actor start-up;
               torch: worker processes start-up), and images/s over that whole epoch;
  steady state images/s after ``--warmup`` batches of the same epoch;
  per decode CPU   the epoch and steady images/s divided by the loader's decode CPUs: Ray, the CPUs its actors
               reserve (``--workers`` x ``--cpus-per-actor``, a scheduling label: Ray does not cap an actor's
               process at it); torch, one per worker process (``--workers``);
  per busy CPU-s   images per CPU-second the whole machine was busy (/proc/stat, all processes: decode, collate,
               Ray's own, and anything else running), the physical cost of an image: over the whole cold epoch
               (start-up included) and over its steady part (images the loader buffered before the steady part
               began cost CPU outside it, so this one flatters a loader that decodes ahead: use enough images);
  multi-epoch  ``--epochs`` epochs one after the other: Ray with one dataset per epoch (actor pool restarts every
               epoch) vs one dataset spanning all epochs (``num_epochs``, actors stay up); torch with fresh vs
               persistent workers.

Usage::

    python benchmarks/data_pipeline.py --images 300 --workers 2 --out benchmarks/results/data_pipeline.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raydet.data import CocoDataset, TorchDetectionDataset, build_ray_dataset, build_transforms  # noqa: E402
from raydet.data import iter_detection_batches  # noqa: E402

RESIZE = {
    "range": {"type": "Resize", "scale": [[1333, 640], [1333, 800]], "multiscale_mode": "range", "keep_ratio": True},
    "fixed": {"type": "Resize", "scale": [1333, 800], "keep_ratio": True},
}


def make_pipeline(resize: str) -> list[dict]:
    return [RESIZE[resize], {"type": "RandomFlip", "prob": 0.5},
            {"type": "Normalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
            {"type": "Pad", "size_divisor": 32}]


def make_dataset(source: str, num_images: int, pipeline: list[dict]) -> tuple[CocoDataset, str]:
    data = ROOT / ".." / "shared" / "data"
    if source == "nuts":
        ds = CocoDataset(str(data / "nuts_labelme" / "annotations" / "instances_train.json"),
                         str(data / "nuts_labelme" / "images") + "/", pipeline=pipeline, filter_empty_gt=True)
        name = "nuts_labelme 800x600 JPEG"
    elif source == "bccd" or (source == "auto" and (data / "bccd").is_dir()):
        ds = CocoDataset(str(data / "bccd" / "annotations" / "instances_trainval.json"),
                         str(data / "bccd" / "JPEGImages") + "/", pipeline=pipeline, filter_empty_gt=True)
        name = "bccd 640x480 JPEG"
    else:
        ds = _synthetic_jpegs(pipeline)
        name = "synthetic 640x480 JPEG"
    base = ds.records
    ds.records = [dict(base[i % len(base)], image_id=i + 1) for i in range(num_images)]
    return ds, name


def _synthetic_jpegs(pipeline: list[dict]) -> CocoDataset:
    import cv2

    from raydet.data.synthetic import make_shape_sample

    folder = Path(tempfile.mkdtemp(prefix="raydet_bench_"))
    images, anns = [], []
    for i in range(1, 33):
        image, rec = make_shape_sample(i, height=480, width=640, max_objects=8, min_size=30)
        cv2.imwrite(str(folder / rec["file_name"].replace(".png", ".jpg")), image[..., ::-1])
        images.append({"id": i, "file_name": rec["file_name"].replace(".png", ".jpg"), "height": 480, "width": 640})
        for b, lab in zip(rec["boxes"].tolist(), rec["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": lab + 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(("rectangle", "ellipse", "triangle"))]
    (folder / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return CocoDataset(str(folder / "ann.json"), str(folder) + "/", pipeline=pipeline)


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has been busy since boot (/proc/stat: all but idle and iowait); NaN without
    /proc."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal (guest time is inside user)
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def measure(batches, warmup: int, start: float, cpu_start: float, decode_cpus: float) -> dict:
    """Consume an iterator of batches; cold-start and steady-state timings (start, cpu_start: perf_counter and
    :func:`busy_cpu_s` when the loader was created), and the rates per decode CPU (``decode_cpus``: the loader's
    CPUs for decoding) and per busy machine CPU-second."""
    first = None
    n_images = 0
    t_warm, n_warm, cpu_warm = None, 0, None
    for k, batch in enumerate(batches):
        now = time.perf_counter()
        if first is None:
            first = now - start
        n_images += len(batch["img_metas"])
        if k + 1 == warmup:
            t_warm, n_warm, cpu_warm = now, n_images, busy_cpu_s()
    end, cpu_end = time.perf_counter(), busy_cpu_s()
    total = end - start
    steady = (n_images - n_warm) / (end - t_warm) if t_warm is not None and end > t_warm else float("nan")
    steady_per_cpu_s = (n_images - n_warm) / (cpu_end - cpu_warm) if cpu_warm is not None and cpu_end > cpu_warm \
        else float("nan")
    return {"images": n_images, "first_batch_s": round(first, 3), "total_s": round(total, 3),
            "epoch_img_per_s": round(n_images / total, 1), "steady_img_per_s": round(steady, 1),
            "decode_cpus": decode_cpus,
            "epoch_img_per_s_per_decode_cpu": round(n_images / total / decode_cpus, 1),
            "steady_img_per_s_per_decode_cpu": round(steady / decode_cpus, 1),
            "epoch_img_per_busy_cpu_s": round(n_images / (cpu_end - cpu_start), 1) if cpu_end > cpu_start
            else float("nan"),
            "steady_img_per_busy_cpu_s": round(steady_per_cpu_s, 1)}


def ray_epoch(ds, cfg, args, epoch: int, num_epochs: int = 1) -> dict:
    start, cpu_start = time.perf_counter(), busy_cpu_s()
    rd = build_ray_dataset(ds, train=True, seed=0, epoch=epoch, num_actors=args.workers, num_epochs=num_epochs,
                           num_cpus_per_actor=args.cpus_per_actor, actor_batch_size=args.actor_batch_size)
    built = time.perf_counter() - start
    out = measure(iter_detection_batches(rd, args.batch_size, cfg, with_masks=False, train=True,
                                         prefetch_batches=args.prefetch), args.warmup, start, cpu_start,
                  decode_cpus=args.workers * args.cpus_per_actor)
    out["build_dataset_s"] = round(built, 3)
    return out


def torch_loader(ds, args, persistent: bool):
    import torch

    tds = TorchDetectionDataset(ds, train=True, seed=0)
    loader = torch.utils.data.DataLoader(tds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                         collate_fn=tds.collate_fn, persistent_workers=persistent and args.workers > 0,
                                         prefetch_factor=2 if args.workers > 0 else None)
    return tds, loader


def torch_epoch(ds, args) -> dict:
    start, cpu_start = time.perf_counter(), busy_cpu_s()
    _, loader = torch_loader(ds, args, persistent=False)
    # workers=0 decodes in this process: one CPU
    return measure(iter(loader), args.warmup, start, cpu_start, decode_cpus=max(args.workers, 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images per epoch")
    parser.add_argument("--workers", type=int, default=2, help="Ray decode actors = DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="batches before steady-state timing starts")
    parser.add_argument("--epochs", type=int, default=2, help="epochs for the multi-epoch comparison (0: skip)")
    parser.add_argument("--cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--actor-batch-size", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=1, help="prefetch_batches of the Ray iterator")
    parser.add_argument("--source", choices=("auto", "bccd", "nuts", "synthetic"), default="auto")
    parser.add_argument("--resize", choices=("range", "fixed"), default="range",
                        help="range: short side drawn from 640..800 per image (multiscale_mode 'range'); fixed: 800")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    args = parser.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)
    pipeline = make_pipeline(args.resize)
    ds, source = make_dataset(args.source, args.images, pipeline)
    _, cfg = build_transforms(ds.pipeline)

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False

    results = {"ray": {}, "torch": {}}
    scale = "1333 x 640..800 (range)" if args.resize == "range" else "1333 x 800"
    print(f"{source}, {args.images} images/epoch at {scale}, {args.workers} workers ({args.cpus_per_actor} CPU per "
          f"Ray actor), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs; ray.init {ray_init_s:.1f}s", flush=True)
    results["torch"]["cold_epoch"] = torch_epoch(ds, args)
    results["ray"]["cold_epoch"] = ray_epoch(ds, cfg, args, epoch=0)  # actor pool start-up included

    if args.epochs > 1:
        t = time.perf_counter()
        per_epoch = [ray_epoch(ds, cfg, args, epoch=e) for e in range(args.epochs)]
        results["ray"]["dataset_per_epoch"] = {"epochs": args.epochs, "total_s": round(time.perf_counter() - t, 3),
                                               "first_batch_s": [r["first_batch_s"] for r in per_epoch]}
        spanning = ray_epoch(ds, cfg, args, epoch=0, num_epochs=args.epochs)
        results["ray"]["one_dataset_all_epochs"] = {"epochs": args.epochs, "total_s": spanning["total_s"],
                                                    "first_batch_s": spanning["first_batch_s"]}
        for persistent in (False, True):
            t = time.perf_counter()
            tds, loader = torch_loader(ds, args, persistent)
            for e in range(args.epochs):
                tds.set_epoch(e)
                for _ in loader:
                    pass
            key = "persistent_workers" if persistent else "fresh_workers"
            results["torch"][key] = {"epochs": args.epochs, "total_s": round(time.perf_counter() - t, 3)}

    results.update({
        "config": {**vars(args), "source": source, "pipeline": pipeline},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                    "torch": torch.__version__},
        "ray_init_s": round(ray_init_s, 3),
    })
    ray.shutdown()

    rows = [("loader", "decode CPUs", "first batch s", "epoch s", "epoch img/s", "steady img/s",
             "epoch img/s/CPU", "steady img/s/CPU", "epoch img/busy CPU-s", "steady img/busy CPU-s")]
    for name in ("torch", "ray"):
        r = results[name]["cold_epoch"]
        rows.append((name, r["decode_cpus"], r["first_batch_s"], r["total_s"], r["epoch_img_per_s"],
                     r["steady_img_per_s"], r["epoch_img_per_s_per_decode_cpu"], r["steady_img_per_s_per_decode_cpu"],
                     r["epoch_img_per_busy_cpu_s"], r["steady_img_per_busy_cpu_s"]))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    if args.epochs > 1:
        ray_r, torch_r = results["ray"], results["torch"]
        print(f"{args.epochs} epochs: ray dataset per epoch {ray_r['dataset_per_epoch']['total_s']}s, "
              f"one dataset for all epochs {ray_r['one_dataset_all_epochs']['total_s']}s; torch fresh workers "
              f"{torch_r['fresh_workers']['total_s']}s, persistent workers {torch_r['persistent_workers']['total_s']}s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
