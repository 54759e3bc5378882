"""``python benchmarks/model_zoo.py``: ``raydet benchmark`` of every method's R-50 (SSD: VGG-16) pipeline, one table.

For each pipeline in :data:`PIPELINES` (or ``--pipelines``) it runs ``python -m raydet.benchmark PIPELINE --skip data
ray-data`` in its own process (the same command a user types; one process per model, so that one model's allocator
state does not slow the next) and collects, per precision, the training seconds per iteration and the inference
images per second, with the process CPU time of each (steadier than wall time on a shared machine) and the peak GPU
memory. Inputs are ``raydet benchmark``'s: random images of the pipeline's test scale (on the CPU each side capped at
320 px), random weights, 4 random boxes per training image, the pipeline's own batch size.

Beside each row: MMDetection's published inference speed of the same config (its metafile's ``inference time
(ms/im)``, measured on a V100 at 800 x 1333 (SSD: 300 / 512), FP32, batch 1) as a reference for GPU runs; it is not
comparable with a CPU row.

A training row marked "(skipped)" timed steps whose loss was not finite (the optimizer step skipped): with random
weights a model can diverge in its first steps, so that row does not measure a real step.

Writes ``--out`` (default ``benchmarks/results/model_zoo_<device>.json``): every pipeline's ``raydet benchmark``
table and the summary rows. Exit status 1 if a pipeline's benchmark failed (the others still run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# pipeline -> MMDetection's published inference speed in images per second: 1000 / the "inference time (ms/im)" of
# the config's entry in mmdet 3.3.0's configs/<method>/metafile.yml (V100, FP32, batch 1, 800 x 1333); None where
# the metafile gives none
PIPELINES: dict[str, float | None] = {
    "faster_rcnn_r50_fpn_1x_coco.yaml": 21.4,
    "mask_rcnn_r50_fpn_1x_coco.yaml": 16.1,
    "retinanet_r50_fpn_1x_coco.yaml": 19.0,
    "ssd300_coco.yaml": 43.7,
    "ssd512_coco.yaml": 30.7,
    "fcos_r50_caffe_fpn_gn-head_1x_coco.yaml": 22.7,
    "retinanet_ghm_r50_fpn_1x_coco.yaml": 3.3,
    "fsaf_r50_fpn_1x_coco.yaml": 13.0,
    "ga_retinanet_r50_caffe_fpn_1x_coco.yaml": 16.8,
    "ga_rpn_r50_caffe_fpn_1x_coco.yaml": 15.8,
    "ga_faster_r50_caffe_fpn_1x_coco.yaml": None,
    "fast_rcnn_r50_fpn_1x_coco.yaml": None,  # 1000 random proposals per image (raydet benchmark)
    "cascade_rcnn_r50_fpn_1x_coco.yaml": 16.1,
    "cascade_mask_rcnn_r50_fpn_1x_coco.yaml": 11.2,
    # htc_r50_fpn_1x_coco (5.8 img/s published) trains only with COCO-stuff semantic maps, which raydet's data
    # pipeline does not read yet: its semantic-free variant stands in
    "htc_without_semantic_r50_fpn_1x_coco.yaml": None,
    "rfcn_r50_caffe_c4_1x_coco.yaml": None,
    "grid_rcnn_r50_fpn_gn-head_2x_coco.yaml": 15.0,
    "ms_rcnn_r50_caffe_fpn_1x_coco.yaml": None,
    "dh_faster_rcnn_r50_fpn_1x_coco.yaml": 9.5,
    "libra_faster_rcnn_r50_fpn_1x_coco.yaml": 19.0,
    "libra_retinanet_r50_fpn_1x_coco.yaml": 17.7,
    "faster_rcnn_r50_fpn_ohem_1x_coco.yaml": None,
}


def benchmark_one(pipeline: str, args: argparse.Namespace, folder: Path) -> dict:
    """Run ``raydet benchmark`` on one pipeline; its JSON record, or ``{"error": ...}``."""
    out = folder / (Path(pipeline).stem + ".json")
    cmd = [sys.executable, "-m", "raydet.benchmark", str(ROOT / "pipelines" / pipeline), "--device", args.device,
           "--precision", *args.precision, "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--skip", "data", "ray-data", "--out", str(out)]
    if args.size:
        cmd += ["--size", *map(str, args.size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}", "seconds": time.monotonic() - start}
    record = json.loads(out.read_text())
    record["seconds"] = time.monotonic() - start
    return record


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def summary_rows(pipeline: str, record: dict, published_fps: float | None) -> list[dict]:
    """One row per precision: train s/iter (and CPU s), inference img/s (and CPU s per image), peak memory."""
    if "error" in record:
        return [{"pipeline": pipeline, "error": record["error"]}]
    rows = []
    settings, results = record["settings"], record["results"]
    train, inference = results.get("train", {}), results.get("inference", {})
    for precision in dict.fromkeys([*train, *inference]):
        t, i = train.get(precision, {}), inference.get(precision, {})
        rows.append({
            "pipeline": Path(pipeline).stem, "precision": precision, "input": settings["size_hw"],
            "batch": settings["train_batch"], "parameters": settings["parameters"],
            "train_s_per_iter": t.get("s_per_iter"), "train_cpu_s_per_iter": _median(t.get("cpu_times_s")),
            "train_skipped_steps": t.get("skipped_steps", 0),
            "inference_img_per_s": i.get("images_per_s"), "inference_cpu_s_per_img": _median(i.get("cpu_times_s")),
            "train_peak_mem_mib": t.get("peak_mem_mib"), "inference_peak_mem_mib": i.get("peak_mem_mib"),
            "mmdet_published_fps_v100": published_fps,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    header = ("pipeline", "precision", "input", "batch", "train s/iter", "infer img/s", "infer CPU s/img",
              "mmdet img/s (V100)")
    cells = [header]
    for r in rows:
        if "error" in r:
            cells.append((r["pipeline"], "failed", r["error"][:60], "", "", "", "", ""))
            continue
        size = "x".join(map(str, r["input"])) if r["input"] else "-"
        train = num(r["train_s_per_iter"], ".3f") + (" (skipped)" if r.get("train_skipped_steps") else "")
        cells.append((r["pipeline"], r["precision"], size, str(r["batch"]), train,
                      num(r["inference_img_per_s"], ".2f"), num(r["inference_cpu_s_per_img"], ".2f"),
                      num(r["mmdet_published_fps_v100"], ".1f")))
    widths = [max(len(c[k]) for c in cells) for k in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) if k < 3 else v.rjust(w) for k, (v, w) in enumerate(zip(c, widths)))
                     for c in cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), help="pipeline files under pipelines/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=("fp32", "amp", "fp16", "bf16"))
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default: raydet benchmark's: the test scale, on the CPU <= 320 a side)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=900, help="seconds per pipeline")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = [name for name in args.pipelines if not (ROOT / "pipelines" / name).is_file()]
    if unknown:
        p.error(f"no such pipeline under pipelines/: {', '.join(unknown)}")
    out = args.out or ROOT / "benchmarks" / "results" / f"model_zoo_{args.device}.json"
    records, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="raydet-zoo-bench-") as tmp:
        for pipeline in args.pipelines:
            record = benchmark_one(pipeline, args, Path(tmp))
            records[pipeline] = record
            rows += summary_rows(pipeline, record, PIPELINES.get(pipeline))
            print(format_rows(rows[-len(args.precision):] if "error" not in record else rows[-1:]), flush=True)
    print("\n" + format_rows(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "precision": args.precision, "iters": args.iters,
                               "warmup": args.warmup, "rows": rows, "records": records}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
