"""The prepared GPU check: everything a session with a GPU lease should measure, in one call, in a few minutes.

Run it through ``benchmarks/gpu_check.sh`` on the GPU machine (it unpacks the Ray / pycocotools bundle and puts
raydet on the path first); ``--device cpu --quick`` runs the same steps small on a CPU, to check the script itself.

Steps (each a subprocess with its own time limit; its output goes to ``<out>/<step>.log``):

1. ``environment``: torch, torchvision, CUDA, the GPU's name, and which of raydet's dependencies import.
2. ``cuda_tests``: the test suite's CUDA tests (``pytest -k cuda``).
3. ``train_fp16`` / ``train_bf16``: the quickstart trained for 20 iterations through Ray Train on one GPU under
   autocast (fp16 with a GradScaler, bf16 without), then evaluated; the run's ``log.jsonl`` is read back: iterations,
   first and last loss (finite), the evaluation's ``bbox/AP50``, peak memory.
4. ``vs_torchvision``: ``benchmarks/detectors_vs_torchvision.py`` at 800 x 1333, FP32 and fp16, beside torchvision's
   same models (images/s, s/iter, peak memory).
5. ``model_zoo``: ``benchmarks/model_zoo.py``, i.e. ``python -m raydet.benchmark`` of every method's R-50 / VGG-16
   pipeline at its test scale (800 x 1333; SSD 300 / 512), FP32 and AMP, beside MMDetection's published V100
   inference speeds (last, so that its time limit cannot cut the steps above short).

Writes ``<out>/gpu_check.json`` (every step's status, seconds and numbers) and prints one table. Exit status 0 when
every step passed, 1 otherwise (the JSON says which).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("ray", "pycocotools", "cv2", "simplejpeg", "PIL", "yaml", "matplotlib", "tqdm", "pyarrow", "pytest")


def run_step(name: str, cmd: list[str], out: Path, timeout_s: float) -> dict:
    """Run ``cmd`` (cwd: the repository), its output to ``<out>/<name>.log``; status passed / failed / timeout."""
    log = out / f"{name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    seconds = time.monotonic() - start
    print(f"{name:<28} {status:<8} {seconds:7.1f} s   ({log.name})", flush=True)
    return {"status": status, "returncode": rc, "seconds": round(seconds, 1), "log": log.name}


def environment() -> dict:
    import torch
    import torchvision

    from raydet.benchmark import device_name

    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
           "device_name": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "cpus": os.cpu_count(), "missing": []}
    for module in DEPENDENCIES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is worth reporting
            env["missing"].append(f"{module} ({type(exc).__name__}: {exc})")
    return env


def read_train_log(work_dir: Path) -> dict:
    """The numbers of a training run's ``log.jsonl`` (the newest one under ``work_dir``)."""
    logs = sorted(work_dir.rglob("log.jsonl"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return {"error": f"no log.jsonl under {work_dir}"}
    records = [json.loads(line) for line in logs[-1].read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("mode") == "train"]
    evals = [r for r in records if r.get("mode") == "val"]
    losses = [r["loss"] for r in train]
    return {
        "log": str(logs[-1].relative_to(work_dir)), "logged_iterations": [r.get("iter") for r in train],
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "bbox_AP50": evals[-1].get("bbox/AP50") if evals else None,
        "peak_memory_mb": max((r.get("memory_mb") or 0 for r in train), default=None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes and few iterations (to check the script)")
    p.add_argument("--skip", nargs="+", default=[], help="steps to skip (by name prefix)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick = args.quick
    record = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": args.device, "quick": quick,
              "environment": environment(), "steps": {}}
    env = record["environment"]
    print(f"{env['device_name']}: torch {env['torch']}, torchvision {env['torchvision']}, CUDA {env['cuda']}, "
          f"{env['cpus']} CPUs; missing: {', '.join(env['missing']) or 'nothing'}", flush=True)
    if args.device == "cuda" and not env["cuda_available"]:
        print("error: CUDA is not available (use --device cpu --quick to check the script on a CPU)", file=sys.stderr)
        return 2
    steps = record["steps"]

    def want(name: str) -> bool:
        return not any(name.startswith(s) for s in args.skip)

    if want("cuda_tests"):
        steps["cuda_tests"] = run_step("cuda_tests", [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests/"], out,
                                       240)

    use_gpu = "true" if args.device == "cuda" else "false"
    for precision in ("fp16", "bf16"):
        name = f"train_{precision}"
        if not want(name):
            continue
        work_dir = out / name
        # the quickstart at 4 images per worker: 80 images = 20 iterations, then one evaluation
        overrides = [f"scaling.use_gpu={use_gpu}", f"train.amp={precision}", "train.max_epochs=1",
                     "data.train.num_images=" + ("16" if quick else "80"), "data.val.num_images=8",
                     "evaluation.interval=1", "checkpoint.interval=1", "runtime.log_interval=1",
                     f"work_dir={work_dir}"]
        if args.device == "cpu" and precision == "fp16":
            continue  # fp16 autocast training is a CUDA path
        steps[name] = run_step(name, [py, "-m", "raydet.train", "pipelines/quickstart.yaml", "--set", *overrides],
                               out, 300)
        steps[name].update(read_train_log(work_dir))

    size = ["96", "128"] if quick else ["800", "1333"]
    if want("vs_torchvision"):
        result = out / "vs_torchvision.json"
        precisions = ["fp32", "bf16"] if args.device == "cpu" else ["fp32", "fp16"]
        cmd = [py, "benchmarks/detectors_vs_torchvision.py", "--device", args.device, "--size", *size,
               "--precision", *precisions, "--repeats", "2" if quick else "10", "--warmup", "1" if quick else "3",
               "--out", str(result)] + (["--models", "retinanet", "--modes", "inference"] if quick else [])
        steps["vs_torchvision"] = run_step("vs_torchvision", cmd, out, 420)
        if result.is_file():
            steps["vs_torchvision"]["results"] = json.loads(result.read_text())["results"]

    if want("model_zoo"):
        result = out / "model_zoo.json"
        cmd = [py, "benchmarks/model_zoo.py", "--device", args.device, "--precision", "fp32",
               *(["bf16"] if args.device == "cpu" else ["amp"]), "--iters", "2" if quick else "5",
               "--warmup", "1" if quick else "2", "--out", str(result), "--timeout", "120"]
        if quick:
            cmd += ["--pipelines", "retinanet_r50_fpn_1x_coco.yaml", "--size", *size]
        steps["model_zoo"] = run_step("model_zoo", cmd, out, 360)
        if result.is_file():
            steps["model_zoo"]["rows"] = json.loads(result.read_text())["rows"]

    record["passed"] = all(s["status"] == "passed" for s in steps.values())
    (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print()
    for name, s in steps.items():
        extra = ""
        if name.startswith("train_"):
            extra = (f"iterations {len(s.get('logged_iterations') or [])}, loss {s.get('first_loss')} -> "
                     f"{s.get('last_loss')}, AP50 {s.get('bbox_AP50')}")
        print(f"{name:<28} {s['status']:<8} {s['seconds']:7.1f} s  {extra}")
        for row in s.get("rows", []):
            if "error" in row:
                print(f"    {row['pipeline']:<40} failed: {row['error']}")
                continue
            print(f"    {row['pipeline']:<40} {row['precision']:<5} train {row['train_s_per_iter']:.3f} s/iter, "
                  f"inference {row['inference_img_per_s']:.2f} img/s (MMDetection V100: "
                  f"{row['mmdet_published_fps_v100'] or '-'} img/s)")
        for row in s.get("results", []):
            key = "images_per_s" if row["mode"] == "inference" else "s_per_iter"
            mem = ("" if row["raydet"].get("peak_mem_mib") is None else
                   f", peak {row['raydet']['peak_mem_mib']:.0f} / {row['torchvision']['peak_mem_mib']:.0f} MiB")
            print(f"    {row['model']:<12} {row['mode']:<10} {row['precision']:<5} raydet {row['raydet'][key]:.3f} "
                  f"torchvision {row['torchvision'][key]:.3f} {row['unit']} (ratio {row['ratio']:.2f}){mem}")
    print(f"\nwrote {out / 'gpu_check.json'}; {'all passed' if record['passed'] else 'SOME STEPS FAILED'}")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
