"""COCO-scale driver and workers: reading, validating and shipping train2017-sized records.

Writes a synthetic annotation file with COCO train2017's shape (118,287 images, 860,001 boxes over COCO's 80
category ids, a polygon on every box, COCO's image sizes and fields) and measures, each part in a fresh process:

  pycocotools   ``pycocotools.coco.COCO(ann_file)`` on the same file: the anchor (wall time, peak RSS);
  driver        raydet's reading + validation + records (``CocoDataset`` with ``check_images: false``, which packs
                the records into a ``RecordTable``), shipping them (:func:`raydet.commands.loaders.put_datasets`:
                one ``ray.put`` of the table), then one training epoch's Ray Dataset as a Train worker builds it at
                world size 1 (:func:`raydet.commands.loaders.shard_records` +
                :func:`raydet.data.ray_data.build_ray_dataset` reading the shipped table; the build only, no image
                is decoded): wall time of each, the process's peak RSS;
  workers       what each training worker pays to receive the records the way ``raydet train`` ships them: the
                refs travel inside the train loop config and each worker calls
                :func:`raydet.commands.loaders.get_datasets` (``train_loop_per_worker``), then takes its shard
                (``shard_records``) and reads one record of it. Measured in ``--workers`` Ray actors at once:
                seconds, RSS and private (unshared) memory before and after: the table's columns are NumPy views
                of the node's one copy in the object store, so they count in RSS as shared pages, not as private
                memory. The serialised size is the records' pickle (protocol 5, NumPy arrays out of band, as Ray
                stores them).

The file is kept under ``--scratch`` (reused when it exists; ``--clean`` removes it at the end). Targets (issue 14):
driver path (reading + Ray Dataset) <= 2x pycocotools' time and <= 4 GiB peak; per-worker record memory <= 0.2 GiB.

Usage::

    python benchmarks/driver_scale.py --scratch /work/scratch/driverscale          # full size (a few minutes)
    python benchmarks/driver_scale.py --images 2000 --out /tmp/ds.json             # small (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# COCO train2017 (instances_train2017.json): 118,287 images, 860,001 annotations, 80 categories with ids 1..90.
COCO_IMAGES, COCO_ANNOTATIONS = 118_287, 860_001
COCO_CAT_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
GIB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------------
# The synthetic annotation file.

def _image_sizes(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths): COCO's shapes, the long side 640 for most images, the short side mostly 480 or 427."""
    long = np.where(rng.random(n) < 0.95, 640, rng.integers(200, 640, n))
    pick = rng.random(n)
    short = np.where(pick < 0.45, 480, np.where(pick < 0.7, 427, rng.integers(240, 641, n)))
    short = np.minimum(short, long)
    landscape = rng.random(n) < 0.7
    return np.where(landscape, short, long), np.where(landscape, long, short)


def _annotation_counts(rng, n: int, total: int) -> np.ndarray:
    """Boxes per image: a heavy-tailed count (gamma-Poisson, ~1 % of images empty) summing to ``total``."""
    counts = rng.poisson(rng.gamma(1.5, total / n / 1.5, n))
    diff = total - int(counts.sum())
    while diff:
        idx = rng.integers(0, n, abs(diff))
        np.add.at(counts, idx, np.sign(diff))
        counts = np.maximum(counts, 0)
        diff = total - int(counts.sum())
    return counts


def _boxes_and_polygons(rng, heights: np.ndarray, widths: np.ndarray):
    """For each box (its image's height/width given): xywh (m, 4), polygon vertex counts (m,), the flat polygon
    coordinates (x0, y0, x1, y1, ...), and the polygons' areas (shoelace). Two decimals, as COCO's file."""
    m = len(heights)
    side = np.exp(rng.uniform(np.log(4), np.log(np.minimum(heights, widths)), m))
    aspect = np.exp(rng.uniform(-0.8, 0.8, m))
    bw = np.clip(side * np.sqrt(aspect), 2, widths - 1)
    bh = np.clip(side / np.sqrt(aspect), 2, heights - 1)
    x = rng.uniform(0, 1, m) * (widths - bw)
    y = rng.uniform(0, 1, m) * (heights - bh)
    xywh = np.round(np.stack([x, y, bw, bh], 1), 2)
    k = rng.integers(6, 42, m)  # vertices per polygon (COCO: about 24 on average)
    owner = np.repeat(np.arange(m), k)
    angle = rng.uniform(0, 2 * np.pi, len(owner))
    order = np.lexsort((angle, owner))  # each polygon's vertices by angle: a simple (star-shaped) polygon
    angle = angle[order]
    radius = rng.uniform(0.6, 1.0, len(owner))
    cx, cy = x + bw / 2, y + bh / 2
    px = np.round(cx[owner] + radius * np.cos(angle) * bw[owner] / 2, 2)
    py = np.round(cy[owner] + radius * np.sin(angle) * bh[owner] / 2, 2)
    starts = np.concatenate([[0], np.cumsum(k)[:-1]])
    nxt = np.arange(len(owner)) + 1
    nxt[np.cumsum(k) - 1] = starts
    area = np.abs(np.add.reduceat(px * py[nxt] - px[nxt] * py, starts)) / 2
    flat = np.empty(2 * len(owner))
    flat[0::2], flat[1::2] = px, py
    return xywh, k, flat, np.round(area, 2)


def write_annotations(path: Path, num_images: int, num_annotations: int, seed: int = 0) -> dict:
    """Write the synthetic file (streamed in chunks: bounded memory). Returns its counts and size."""
    rng = np.random.default_rng(seed)
    heights, widths = _image_sizes(rng, num_images)
    counts = _annotation_counts(rng, num_images, num_annotations)
    cat_p = 1.0 / (np.arange(len(COCO_CAT_IDS)) + 2.0)
    cat_p /= cat_p.sum()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "synthetic COCO train2017 shape (raydet benchmarks/driver_scale.py)"}, ')
        f.write('"licenses": [{"id": 1, "name": "synthetic", "url": ""}], "images": [')
        images = [{"license": 1, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.invalid/{i:012d}.jpg",
                   "height": int(h), "width": int(w), "date_captured": "2013-11-14 11:18:45",
                   "flickr_url": f"http://farm.invalid/{i:012d}.jpg", "id": i}
                  for i, h, w in zip(range(1, num_images + 1), heights.tolist(), widths.tolist())]
        f.write(", ".join(json.dumps(im) for im in images))
        del images
        f.write('], "annotations": [')
        image_of_ann = np.repeat(np.arange(1, num_images + 1), counts)
        chunk, first = 100_000, True
        for lo in range(0, len(image_of_ann), chunk):
            img = image_of_ann[lo:lo + chunk]
            xywh, k, flat, area = _boxes_and_polygons(rng, heights[img - 1].astype(float),
                                                      widths[img - 1].astype(float))
            cats = rng.choice(COCO_CAT_IDS, len(img), p=cat_p)
            flat_list, ends = flat.tolist(), np.cumsum(2 * k).tolist()
            start, parts = 0, []
            for j, (iid, cid, box, a, end) in enumerate(zip(img.tolist(), cats.tolist(), xywh.tolist(),
                                                            area.tolist(), ends)):
                parts.append(json.dumps({"segmentation": [flat_list[start:end]], "area": a, "iscrowd": 0,
                                         "image_id": iid, "bbox": box, "category_id": cid, "id": lo + j + 1}))
                start = end
            f.write(("" if first else ", ") + ", ".join(parts))
            first = False
        f.write('], "categories": [')
        f.write(", ".join(json.dumps({"supercategory": "thing", "id": c, "name": f"class_{c}"})
                          for c in COCO_CAT_IDS))
        f.write("]}")
    os.replace(tmp, path)
    return {"images": num_images, "annotations": int(counts.sum()), "categories": len(COCO_CAT_IDS),
            "empty_images": int((counts == 0).sum()), "bytes": path.stat().st_size}


# ----------------------------------------------------------------------------------------------------------
# Memory of this process.

def memory() -> dict:
    """This process's RSS, peak RSS (VmHWM) and private (unshared) memory, in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    private = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1]) * 1024
    return {"rss": out["VmRSS"], "peak_rss": out["VmHWM"], "private": private}


def _emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The parts, each in its own process (``--part``).

def part_pycocotools(args) -> dict:
    import contextlib
    import io

    from pycocotools.coco import COCO

    base = memory()
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # COCO prints its progress
        coco = COCO(args.ann_file)
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 3), "peak_rss": memory()["peak_rss"], "base_rss": base["rss"],
            "images": len(coco.imgs), "annotations": len(coco.anns)}


class _Receiver:
    """A stand-in for a Ray Train worker: receives the datasets ref as ``train_loop_per_worker`` does."""

    def __init__(self):
        import raydet.commands.loaders  # noqa: F401  (a worker has raydet imported before the records arrive)
        import raydet.data  # noqa: F401

    def receive(self, shipped: dict, rank: int, world: int) -> dict:
        from raydet.commands.loaders import get_datasets, shard_records

        before = memory()
        t = time.perf_counter()
        datasets, _ = get_datasets(shipped)  # as train_loop_per_worker
        get_s = time.perf_counter() - t
        after = memory()
        t = time.perf_counter()
        shard = shard_records(datasets["train"].records, rank, world, 0, 0, pad=True)
        shard_s = time.perf_counter() - t
        t = time.perf_counter()
        boxes = sum(len(r["boxes"]) for r in shard)  # every record of the shard, as an epoch's decoding reads them
        read_all_s = time.perf_counter() - t
        touched = memory()
        return {"rank": rank, "get_s": round(get_s, 3), "shard_s": round(shard_s, 3), "shard_images": len(shard),
                "rss_delta": after["rss"] - before["rss"], "private_delta": after["private"] - before["private"],
                "rss_after": after["rss"], "read_all_s": round(read_all_s, 3), "shard_boxes": boxes,
                "rss_delta_after_reading": touched["rss"] - before["rss"],
                "private_delta_after_reading": touched["private"] - before["private"]}


def _serialized_size(obj) -> tuple[int, int]:
    """(in-band pickle bytes, out-of-band buffer bytes) of ``obj`` as Ray stores it (pickle protocol 5)."""
    import pickle

    import ray.cloudpickle

    buffers: list = []
    inband = len(ray.cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append))
    return inband, sum(pickle.PickleBuffer.raw(b).nbytes for b in buffers)


def part_driver(args) -> dict:
    import ray

    from raydet.commands.loaders import put_datasets, shard_records, with_records
    from raydet.data import CocoDataset
    from raydet.data.ray_data import build_ray_dataset

    ray.init(num_cpus=args.num_cpus, object_store_memory=args.object_store_gib * GIB, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    out: dict = {"base_rss": memory()["rss"]}

    t = time.perf_counter()
    ds = CocoDataset(args.ann_file, str(Path(args.ann_file).parent / "images") + "/", with_masks=args.masks,
                     check_images=False)
    out["read_s"] = round(time.perf_counter() - t, 3)
    out["read_peak_rss"] = memory()["peak_rss"]
    out["records"] = len(ds.records)
    out["boxes"] = int(sum(len(r["labels"]) for r in ds.records))

    datasets = {"train": ds}
    t = time.perf_counter()
    shipped = put_datasets(datasets)
    out["put_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    records = shard_records(ds.records, 0, 1, 0, 0, pad=True)
    rd = build_ray_dataset(with_records(ds, records), train=True, seed=0, epoch=0, num_actors=1,
                           records_ref=shipped["records"]["train"])
    out["ray_dataset_s"] = round(time.perf_counter() - t, 3)
    del rd, records
    out["peak_rss"] = memory()["peak_rss"]
    out["pickle_inband_bytes"], out["pickle_buffer_bytes"] = _serialized_size(ds.records)
    receiver = ray.remote(num_cpus=0)(_Receiver)
    actors = [receiver.remote() for _ in range(args.workers)]
    ray.get([a.__ray_ready__.remote() for a in actors])
    out["workers"] = ray.get([a.receive.remote(shipped, rank, args.workers) for rank, a in enumerate(actors)])
    ray.shutdown()
    return out


# ----------------------------------------------------------------------------------------------------------

def _run_part(part: str, args) -> dict:
    cmd = [sys.executable, __file__, "--part", part, "--ann-file", str(args.ann_file),
           "--workers", str(args.workers), "--num-cpus", str(args.num_cpus),
           "--object-store-gib", str(args.object_store_gib), "--masks" if args.masks else "--no-masks"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"part {part!r} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=COCO_IMAGES, help="images (default: COCO train2017's)")
    parser.add_argument("--annotations", type=int, default=None,
                        help="boxes (default: COCO train2017's 7.27 per image, 860,001 at full size)")
    parser.add_argument("--masks", action=argparse.BooleanOptionalAction, default=True,
                        help="read the polygons (with_masks, Mask R-CNN's datasets); --no-masks: boxes only")
    parser.add_argument("--workers", type=int, default=2, help="training workers receiving the records at once")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--object-store-gib", type=float, default=4.0)
    parser.add_argument("--scratch", default="/work/scratch/driverscale",
                        help="folder for the synthetic annotation file (never inside the repository)")
    parser.add_argument("--clean", action="store_true", help="remove the annotation file at the end")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "driver_scale.json"))
    parser.add_argument("--part", choices=("pycocotools", "driver"), help=argparse.SUPPRESS)
    parser.add_argument("--ann-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.part:
        _emit(part_pycocotools(args) if args.part == "pycocotools" else part_driver(args))
        return {}

    annotations = args.annotations
    if annotations is None:
        annotations = round(COCO_ANNOTATIONS * args.images / COCO_IMAGES)
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    args.ann_file = scratch / f"instances_synthetic_{args.images}_{annotations}.json"
    generated = None
    if not args.ann_file.exists():
        t = time.perf_counter()
        generated = write_annotations(args.ann_file, args.images, annotations)
        generated["seconds"] = round(time.perf_counter() - t, 1)
    size = args.ann_file.stat().st_size
    print(f"{args.ann_file}: {args.images} images, {annotations} boxes with polygons, {size / 1e6:.0f} MB"
          + (f" (written in {generated['seconds']} s)" if generated else " (reused)"), flush=True)

    coco = _run_part("pycocotools", args)
    driver = _run_part("driver", args)
    driver_s = driver["read_s"] + driver["put_s"] + driver["ray_dataset_s"]
    results = {
        "file": {"images": args.images, "annotations": annotations, "bytes": size, "generated": generated},
        "pycocotools": coco, "driver": driver,
        "ratios": {"read_vs_pycocotools": round(driver["read_s"] / coco["seconds"], 2),
                   "driver_vs_pycocotools": round(driver_s / coco["seconds"], 2)},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "part"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    assert coco["images"] == driver["records"] and coco["annotations"] == driver["boxes"], (coco, driver)

    rows = [("step", "seconds", "x pycocotools", "peak RSS GiB")]
    rows.append(("pycocotools COCO(ann_file)", coco["seconds"], "1.00", _gib(coco["peak_rss"])))
    rows.append(("raydet read + validate + records", driver["read_s"],
                 f"{results['ratios']['read_vs_pycocotools']:.2f}", _gib(driver["read_peak_rss"])))
    rows.append(("+ ship the records (ray.put)", driver["put_s"], "", ""))
    rows.append(("+ one epoch's Ray Dataset", driver["ray_dataset_s"], "", _gib(driver["peak_rss"])))
    rows.append(("driver path", round(driver_s, 3), f"{results['ratios']['driver_vs_pycocotools']:.2f}",
                 _gib(driver["peak_rss"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print(f"records as shipped to workers: pickle {driver['pickle_inband_bytes'] / 1e6:.1f} MB in band + "
          f"{driver['pickle_buffer_bytes'] / 1e6:.0f} MB NumPy buffers; ray.put {driver['put_s']} s")
    for w in driver["workers"]:
        print(f"worker {w['rank']} of {args.workers}: get_datasets {w['get_s']} s, RSS +{_gib(w['rss_delta'])} GiB "
              f"(private +{_gib(w['private_delta'])} GiB), shard_records {w['shard_s']} s; after reading all "
              f"{w['shard_images']} records of its shard ({w['read_all_s']} s): RSS "
              f"+{_gib(w['rss_delta_after_reading'])} GiB (private +{_gib(w['private_delta_after_reading'])} GiB)")
    if args.clean:
        args.ann_file.unlink()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
