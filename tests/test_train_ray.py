"""Training and evaluation as Ray programs: Ray Data streams into Ray Train workers (2 CPU workers, gloo DDP)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raydet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"

# The quickstart, shrunk: 16 training images of 96x96 at 2 per worker.
SMALL = [
    "data.train.num_images=16", "data.train.height=96", "data.train.width=96",
    "data.val.num_images=6", "data.val.height=96", "data.val.width=96",
    "data.test.num_images=6", "data.test.height=96", "data.test.width=96",
    "train_pipeline=[{type: Resize, scale: [96, 96]}, {type: RandomFlip, prob: 0.5}, "
    "{type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}, {type: Pad, size_divisor: 32}]",
    "test_pipeline=[{type: Resize, scale: [96, 96]}, "
    "{type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}, {type: Pad, size_divisor: 32}]",
    "data.images_per_worker=2", "scaling.cpus_per_worker=0.5", "runtime.log_interval=1", "runtime.tensorboard=false",
    "checkpoint.interval=1", "checkpoint.score_attribute=null", "evaluation.interval=2",
]


def _log_records(work_dir: Path, mode: str) -> list[dict]:
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == mode]


def test_two_worker_training_loss_falls_and_evaluates(ray_session, tmp_path):
    from raydet.train import fit

    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2", "train.max_epochs=3", "evaluation.interval=3"])
    result = fit(cfg, work_dir=str(tmp_path))
    out = result.return_value
    # 16 images over 2 workers x 2 images = 4 iterations per epoch
    assert out["epoch"] == 3 and out["iter"] == 12
    train = _log_records(tmp_path, "train")
    assert len(train) == 12
    first = sum(r["loss"] for r in train[:3]) / 3
    last = sum(r["loss"] for r in train[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "lr", "data_time", "time", "memory_mb",
            "eta_s"} <= set(train[-1])
    val = _log_records(tmp_path, "val")
    assert len(val) == 1 and 0.0 <= val[0]["bbox/AP50"] <= 1.0
    assert out["metrics"]["bbox/AP50"] == val[0]["bbox/AP50"]
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "checkpoint.pt").is_file()


@pytest.fixture(scope="module")
def one_epoch_run(ray_session, tmp_path_factory):
    """One epoch of the small quickstart under a stable run name: (work_dir, result)."""
    from raydet.train import fit

    work_dir = tmp_path_factory.mktemp("resumable")
    result = fit(load_config(QUICKSTART, SMALL + ["train.max_epochs=1"]), work_dir=str(work_dir), name="resumable")
    return work_dir, result


def test_resume_continues_from_the_last_checkpoint(one_epoch_run):
    from raydet.engine.checkpoint import load_checkpoint
    from raydet.train import fit

    work_dir, first = one_epoch_run
    assert first.return_value["epoch"] == 1 and first.return_value["iter"] == 8
    state = load_checkpoint(first.checkpoint.path)
    assert state["epoch"] == 1 and state["iter"] == 8

    second = fit(load_config(QUICKSTART, SMALL + ["train.max_epochs=2"]), work_dir=str(work_dir), name="resumable")
    # started at epoch 1 from the checkpoint: one more epoch of 8 iterations, not two
    assert second.return_value["epoch"] == 2 and second.return_value["iter"] == 16
    iters = [r["iter"] for r in _log_records(work_dir, "train")]
    assert iters == list(range(1, 17))
    resumed = load_checkpoint(second.checkpoint.path)
    assert not torch.equal(resumed["model"]["roi_head.bbox_head.fc_cls.weight"],
                           state["model"]["roi_head.bbox_head.fc_cls.weight"])


def test_test_command_evaluates_a_checkpoint_and_writes_results(one_epoch_run, tmp_path):
    from raydet.test import evaluate

    _, trained = one_epoch_run
    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2"])
    metrics = evaluate(cfg, trained.checkpoint.path, split="test", out_dir=str(tmp_path / "test"))
    assert set(metrics) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    written = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert all(set(r) >= {"image_id", "category_id", "bbox", "score"} for r in results)
    assert {r["image_id"] for r in results} <= set(range(100001, 100007))


def test_a_cpu_budget_that_would_deadlock_fails_clearly(ray_session, tmp_path):
    from raydet.registry import ConfigError
    from raydet.train import fit

    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"= 3 CPUs, but the cluster has 2; the data pipeline would wait forever"):
        fit(cfg, work_dir=str(tmp_path))


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    from raydet.test import main

    assert main([str(QUICKSTART), str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists(),
                    reason="the ray CLI is not installed")
def test_ray_job_submit_runs_the_training_command(tmp_path):
    """`ray start --head` + `ray job submit --working-dir . -- python -m raydet.train ...` against our own head."""
    import tempfile

    ray_cli = str(Path(sys.executable).parent / "ray")
    port, dash = _free_port(), _free_port()
    # every port the head's processes listen on, free ones: the defaults (the dashboard agent's 52365 ...) are
    # taken by the test session's own Ray instance, and an agent that cannot bind never registers for jobs
    agent_ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port")]
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    # the job entrypoint's `python` comes from the PATH the head was started with: this interpreter's folder first
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         *agent_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            status = subprocess.run([ray_cli, "job", "list", f"--address={address}"], env=env,
                                    capture_output=True, text=True)
            if status.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head did not come up: {status.stderr[-2000:]}")
        overrides = SMALL + ["train.max_epochs=1", "evaluation.interval=1"]
        cmd = [ray_cli, "job", "submit", f"--address={address}", "--working-dir", str(ROOT), "--",
               "python", "-m", "raydet.train", "pipelines/quickstart.yaml", "--work-dir", str(tmp_path / "work"),
               "--set", *overrides]
        deadline = time.time() + 120
        while True:  # the head answers `job list` before its job agent is ready (slow under load)
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            output = job.stdout + job.stderr
            if "No available agent to submit job" not in output or time.time() > deadline:
                break
            time.sleep(3)
        assert "No available agent to submit job" not in output, "the head's job agent never registered"
        assert job.returncode == 0, output[-4000:]
        assert "bbox/AP50" in output or "AP50" in output, output[-4000:]
        assert "succeeded" in output.lower(), output[-4000:]
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_placement_resources_reach_ray_and_must_exist(ray_session):
    """scaling.resources_per_worker goes to Ray Train's workers; a custom resource no node declares fails before
    anything waits for it, naming the key; with the actors on cpu_node nodes the CPU budget leaves them out."""
    from raydet.registry import ConfigError
    from raydet.train import check_cluster_resources, parse_sections, scaling_config, torch_config

    def sections(*overrides):
        return parse_sections(load_config(QUICKSTART, list(overrides)))

    gpu = sections("scaling.use_gpu=true", "scaling.num_workers=8", "scaling.resources_per_worker={gpu_node: 1}")
    sc = scaling_config(gpu)
    assert sc.num_workers == 8 and sc.use_gpu
    assert sc.resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "gpu_node": 1}
    assert torch_config(gpu).backend == "nccl" and torch_config(sections()).backend == "gloo"
    with pytest.raises(ConfigError, match=r"scaling\.resources_per_worker: no node of the cluster has the "
                                          r"resource\(s\) \['gpu_node'\] \(custom resources here: \['cpu_node'\]\)"):
        check_cluster_resources(gpu)
    with pytest.raises(ConfigError, match=r"scaling\.data_resources: .*\['data_node'\]"):
        check_cluster_resources(sections("scaling.data_resources={data_node: 0.1}"))
    # 2 workers x 1 CPU take both CPUs: with actors on the CPU the budget fails, with actors on cpu_node it fits
    with pytest.raises(ConfigError, match=r"the data pipeline would wait forever"):
        check_cluster_resources(sections("scaling.num_workers=2"))
    check_cluster_resources(sections("scaling.num_workers=2", "scaling.data_resources={cpu_node: 0.25}"))
