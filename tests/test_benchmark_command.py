"""``raydet benchmark`` (raydet/benchmark.py): the JSON record, the printed table, checkpoints, errors, Ray Data.

Runs the quickstart pipeline (ResNet-18 Faster R-CNN) shrunk to 64x64 inputs, 2 timed iterations after 1 warm-up,
8 data images, on one CPU thread.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from raydet import benchmark
from raydet.config import load_config
from raydet.engine.checkpoint import save_checkpoint

QUICKSTART = str(Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml")
# 6 training images, so --data-images 8 must cycle the records
SMALL = ["--set", "model.backbone.depth=18", "data.train.num_images=6", "--device", "cpu", "--size", "64", "64",
         "--iters", "2", "--warmup", "1", "--data-images", "8", "--threads", "1"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = benchmark.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One fp32 + amp run of every mode but the Ray Data path: (JSON record, stdout)."""
    out = tmp_path_factory.mktemp("bench") / "result.json"
    code, stdout, stderr = _run([QUICKSTART, *SMALL, "--skip", "ray-data", "--out", str(out)])
    assert code == 0, stderr
    return json.loads(out.read_text()), stdout


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def test_train_and_inference_entries_per_precision(cpu_run):
    record, _ = cpu_run
    settings, results = record["settings"], record["results"]
    assert settings["size_hw"] == [64, 64] and settings["iters"] == 2 and settings["warmup"] == 1
    assert settings["train_batch"] == 4  # the quickstart's data.images_per_worker
    assert settings["checkpoint"] is None and "random" in settings["weights"]
    for mode in ("train", "inference"):
        assert set(results[mode]) == {"fp32", "amp"}, mode
        for name, r in results[mode].items():
            assert len(r["times_s"]) == len(r["cpu_times_s"]) == 2, (mode, name)
            assert all(t > 0 for t in r["times_s"])
            assert r["median_s"] == statistics.median(r["times_s"])
            assert r["peak_mem_mib"] is None  # CPU
            assert _close(r["images_per_s"], r["batch"] / r["median_s"])
    for r in results["train"].values():
        assert r["batch"] == 4 and r["s_per_iter"] == r["median_s"]
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"]) and r["skipped_steps"] == 0
        assert _close(r["lr"], 0.001)  # the pipeline's AdamW lr 0.001 at base batch 4, scaled to batch 4
    for r in results["inference"].values():
        assert r["batch"] == 1 and r["detections"] > 0


def test_amp_on_cpu_is_bf16_autocast(cpu_run):
    record, stdout = cpu_run
    assert record["settings"]["precisions"]["amp"] == {"label": "amp (bf16)", "dtype": "bfloat16",
                                                       "autocast": "bf16", "grad_scaler": False}
    assert record["settings"]["precisions"]["fp32"]["autocast"] is None
    for mode in ("train", "inference"):
        assert record["results"][mode]["amp"]["dtype"] == "bfloat16"
        assert record["results"][mode]["fp32"]["dtype"] == "float32"
    assert "amp = bf16 autocast (on the CPU)" in stdout


def test_data_pipeline_counts_the_requested_images(cpu_run):
    record, _ = cpu_run
    data = record["results"]["data"]
    local = data["in_process"]
    assert local["images"] == sum(local["batch_sizes"]) == 8  # 6 records, cycled to --data-images
    assert local["batch_sizes"] == [4, 4] and len(local["batch_times_s"]) == 2
    assert _close(local["images_per_s"], 8 / local["total_s"])
    assert data["ray"]["skipped"] == "--skip ray-data"


def test_printed_table_has_every_row_with_the_json_values(cpu_run):
    record, stdout = cpu_run
    rows = record["table"]
    assert [(r["mode"], r["precision"]) for r in rows] == [
        ("train", "fp32"), ("train", "amp (bf16)"), ("inference", "fp32"), ("inference", "amp (bf16)"),
        ("data", "in-process")]
    lines = stdout.splitlines()
    assert "random initialisation (no --checkpoint)" in stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "precision"])
    for row, line in zip(rows, lines[header + 1:]):
        assert line.startswith(row["mode"]) and row["precision"] in line, line
        assert benchmark.format_value(row["value"]) in line.split() and row["unit"] in line.split(), line
        assert line.endswith("n/a")  # peak memory on the CPU


def test_environment_is_recorded(cpu_run):
    env = cpu_run[0]["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["device"] == "cpu"
    for key in ("torchvision", "ray", "device_name", "python"):
        assert env[key], key


def _quickstart_state(*overrides: str) -> dict:
    torch.manual_seed(0)
    return load_config(QUICKSTART, list(overrides)).build("model").state_dict()


def test_checkpoint_of_another_model_fails_naming_the_file(tmp_path):
    ckpt = save_checkpoint({"model": _quickstart_state("num_classes=5")}, tmp_path / "other.pt")
    code, _, stderr = _run([QUICKSTART, *SMALL, "--checkpoint", str(ckpt), "--skip", "data",
                            "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert stderr.startswith("error: ") and str(ckpt) in stderr and "does not fit" in stderr
    assert not (tmp_path / "r.json").exists()


def test_checkpoint_weights_are_the_ones_timed(tmp_path):
    """A checkpoint whose box classifier always says background: no detection survives, unlike random init."""
    state = _quickstart_state()
    state["roi_head.bbox_head.fc_cls.bias"][-1] = 100.0  # the last class is background
    ckpt = save_checkpoint({"model": state}, tmp_path / "ckpt" / "checkpoint.pt")
    out = tmp_path / "r.json"
    code, stdout, stderr = _run([QUICKSTART, *SMALL, "--checkpoint", str(ckpt.parent), "--precision", "fp32",
                                 "--skip", "train", "data", "--iters", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0, stderr
    record = json.loads(out.read_text())
    assert record["settings"]["checkpoint"] == str(ckpt) and "random" not in stdout
    assert set(record["results"]) == {"inference"}
    assert record["results"]["inference"]["fp32"]["detections"] == 0


@pytest.mark.parametrize("argv, message", [
    (["does/not/exist.yaml"], "does/not/exist.yaml"),
    ([QUICKSTART, "--set", "train.no_such_key=1"], "no_such_key"),
    ([QUICKSTART, "--checkpoint", "missing.pt"], "missing.pt"),
    ([QUICKSTART, "--device", "cpu", "--precision", "fp16"], "fp16 needs CUDA"),
])
def test_bad_input_exits_2(argv, message, tmp_path):
    code, _, stderr = _run([*argv, "--skip", "train", "inference", "data", "--out", str(tmp_path / "r.json")])
    assert code == 2 and stderr.startswith("error: ") and message in stderr, stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path):
    code, _, stderr = _run([QUICKSTART, "--device", "cuda", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "CUDA is not available" in stderr


def test_ray_data_path_streams_every_image(ray_session, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, stderr = _run([QUICKSTART, *SMALL, "--skip", "train", "inference", "--out", str(out)])
    assert code == 0, stderr
    data = json.loads(out.read_text())["results"]["data"]
    ray_r = data["ray"]
    assert ray_r["images"] == sum(ray_r["batch_sizes"]) == data["in_process"]["images"] == 8
    assert max(ray_r["batch_sizes"]) <= 4
    assert 0 < ray_r["first_batch_s"] <= ray_r["total_s"]
    assert _close(ray_r["images_per_s"], 8 / ray_r["total_s"])
    assert any(line.split()[:2] == ["data", "ray-data"] for line in stdout.splitlines())
    assert ray_session.is_initialized()  # the session's Ray instance is left running
