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

import numpy as np
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
    "runtime.curves=false",
    "checkpoint.interval=1", "checkpoint.score_attribute=null", "evaluation.interval=2",
]


def _log_records(work_dir: Path, mode: str) -> list[dict]:
    lines = (work_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["mode"] == mode]


def test_two_worker_training_loss_falls_and_evaluates(ray_session, tmp_path):
    from raydet.train import fit

    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2", "train.max_epochs=3", "evaluation.interval=3"])
    result = fit(cfg, run_dir=str(tmp_path))
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
    """One epoch of the small quickstart in a run folder: (run_dir, result)."""
    from raydet.train import fit

    import glob
    import tempfile

    staged = os.path.join(tempfile.gettempdir(), "raydet-ckpt-*")  # where a worker stages a checkpoint it reports
    before = set(glob.glob(staged))
    run_dir = tmp_path_factory.mktemp("resumable")
    result = fit(load_config(QUICKSTART, SMALL + ["train.max_epochs=1"]), run_dir=str(run_dir))
    # the staged copy goes once Ray has it in the run folder: ~100 MB per checkpoint would stay in /tmp otherwise
    assert set(glob.glob(staged)) <= before
    return run_dir, result


def test_resume_continues_from_the_last_checkpoint(one_epoch_run):
    from raydet.engine.checkpoint import load_checkpoint
    from raydet.registry import ConfigError
    from raydet.train import fit
    from raydet.workspace import latest_checkpoint

    run_dir, first = one_epoch_run
    assert first.return_value["epoch"] == 1 and first.return_value["iter"] == 8
    state = load_checkpoint(first.checkpoint.path)
    assert state["epoch"] == 1 and state["iter"] == 8
    latest = latest_checkpoint(run_dir)
    assert latest.path == str(Path(first.checkpoint.path) / "checkpoint.pt") and (latest.epoch, latest.iter) == (1, 8)

    longer = load_config(QUICKSTART, SMALL + ["train.max_epochs=2"])
    # more epochs is a schedule change: refused, naming the key, unless allowed (checked before Ray runs anything)
    with pytest.raises(ConfigError, match=r"differs from the one checkpoint .* in train\.max_epochs; continue anyway "
                                          r"with --allow-changes"):
        fit(longer, run_dir=str(run_dir), resume_from=latest.path)
    second = fit(longer, run_dir=str(run_dir), resume_from=latest.path, allow_changes=True)
    # started at epoch 1 from the checkpoint: one more epoch of 8 iterations, not two
    assert second.return_value["epoch"] == 2 and second.return_value["iter"] == 16
    iters = [r["iter"] for r in _log_records(run_dir, "train")]
    assert iters == list(range(1, 17))
    (resume,) = _log_records(run_dir, "resume")
    assert (resume["epoch"], resume["iter"], resume["checkpoint"]) == (1, 8, latest.path)
    resumed = load_checkpoint(second.checkpoint.path)
    assert not torch.equal(resumed["model"]["roi_head.bbox_head.fc_cls.weight"],
                           state["model"]["roi_head.bbox_head.fc_cls.weight"])


def test_test_command_evaluates_a_checkpoint_and_writes_results(one_epoch_run, tmp_path):
    from raydet.test import evaluate

    _, trained = one_epoch_run
    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2"])
    metrics = evaluate(cfg, trained.checkpoint.path, split="test", out_dir=str(tmp_path / "test"),
                       out_proposals=str(tmp_path / "proposals.npz"))
    assert set(metrics) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    written = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert all(set(r) >= {"image_id", "category_id", "bbox", "score"} for r in results)
    assert {r["image_id"] for r in results} <= set(range(100001, 100007))
    # --out-proposals: every test image's predicted boxes and scores (labels dropped), as results.json has them
    from raydet.data.proposals import read_proposals

    proposals = read_proposals(str(tmp_path / "proposals.npz"))
    assert sorted(proposals) == list(range(100001, 100007))
    for image_id, (boxes, scores) in proposals.items():
        mine = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
        assert scores.tolist() == pytest.approx([r["score"] for r in mine], abs=1e-6)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).reshape(-1, 4)
        np.testing.assert_allclose(xywh, np.array([r["bbox"] for r in mine]).reshape(-1, 4), atol=1e-2)


def test_a_cpu_budget_that_would_deadlock_fails_clearly(ray_session, tmp_path):
    from raydet.registry import ConfigError
    from raydet.train import fit

    cfg = load_config(QUICKSTART, SMALL + ["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"= 3 CPUs, but the cluster has 2; the data pipeline would wait forever"):
        fit(cfg, run_dir=str(tmp_path))


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    from raydet.test import main

    assert main([str(QUICKSTART), str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (every socket stays bound until all are chosen, so none is picked twice)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.skipif(shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists(),
                    reason="the ray CLI is not installed")
def test_ray_job_submit_keeps_outputs_and_resumes_across_jobs(tmp_path):
    """`ray start --head` + `ray job submit --working-dir WD -- python -m raydet.train ...` against our own head,
    whose environment sets RAYDET_WORK_ROOT as the cluster files do. The run's checkpoint, log and curves land under
    that root, not in the job's package that Ray unpacks under its session folder; after a file of WD changed (a new
    package, another folder), a second job with --resume continues from the first job's last checkpoint."""
    import tempfile

    from raydet.workspace import find_checkpoints, ray_owned_folder

    ray_cli = str(Path(sys.executable).parent / "ray")
    working_dir = tmp_path / "wd"
    for name in ("raydet", "ops", "pipelines"):
        shutil.copytree(ROOT / name, working_dir / name, ignore=shutil.ignore_patterns("__pycache__"))
    work_root = tmp_path / "runs"
    port, dash, *others = _free_ports(7)
    # every port the head's processes listen on, free ones: the defaults (the dashboard agent's 52365 ...) are
    # taken by the test session's own Ray instance, and an agent that cannot bind never registers for jobs
    agent_ports = [f"--{name}={p}" for name, p in zip((
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "ray-client-server-port"), others)]
    temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    # the job entrypoint's `python` comes from the PATH the head was started with: this interpreter's folder first
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: the head's SIGTERM handler stops its processes at once instead of
    # waiting 30 s for a drain a head node never finishes; the health-check interval is the test session's (conftest)
    env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1", RAYDET_WORK_ROOT=str(work_root),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    env.pop("RAY_ADDRESS", None)
    head_log = open(tmp_path / "head.log", "w")  # a file: a pipe nobody reads would block the head once full
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
         *agent_ports],
        env=env, stdout=head_log, stderr=subprocess.STDOUT, text=True)
    client_env = {k: v for k, v in env.items() if k != "RAYDET_WORK_ROOT"}  # the root comes from the cluster
    address = f"http://127.0.0.1:{dash}"

    def submit(*args: str) -> str:
        cmd = [ray_cli, "job", "submit", f"--address={address}", "--working-dir", str(working_dir), "--",
               "python", "-m", "raydet.train", "pipelines/quickstart.yaml", *args]
        deadline = time.time() + 300
        while True:  # the head answers `job list` before its job agent is ready (slow under load)
            job = subprocess.run(cmd, env=client_env, capture_output=True, text=True, timeout=900)
            output = job.stdout + job.stderr
            if "No available agent to submit job" not in output or time.time() > deadline:
                break
            time.sleep(3)
        assert "No available agent to submit job" not in output, "the head's job agent never registered"
        assert job.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
        return output

    try:
        deadline, problem = time.time() + 300, ""
        while time.time() < deadline:
            try:
                status = subprocess.run([ray_cli, "job", "list", f"--address={address}"], env=client_env,
                                        capture_output=True, text=True, timeout=60)
            except subprocess.TimeoutExpired:
                problem = "`ray job list` did not answer within 60 s"
                continue
            if status.returncode == 0:
                break
            problem = status.stderr[-2000:]
            time.sleep(2)
        else:
            pytest.fail(f"the Ray head did not come up within 300 s: {problem}")

        first = submit("--set", *SMALL, "train.max_epochs=1", "evaluation.interval=1", "runtime.curves=true")
        assert "AP50" in first, first[-4000:]
        # the job's console reads like an MMDetection log: raydet's iteration lines, evaluation and summary; Ray's
        # per-epoch reports, Ray Data's per-pass lines and the core worker's error lines stay in Ray's log files
        assert "epoch 1/1 iter 8/8" in first and "epoch 1/1 val bbox/AP" in first
        assert "raydet: trained 1 epochs (8 iterations)" in first
        for ray_line in ("TrainingReport", "core_worker.cc", "execution finished", "Checkpoint successfully created"):
            assert ray_line not in first, (ray_line, first[-4000:])
        work_dir = work_root / "work_dirs" / "quickstart"
        (run_dir,) = [p for p in work_dir.iterdir() if p.is_dir()]
        assert f"new run in {run_dir}" in first and f"run folder {run_dir}" in first
        (checkpoint,) = find_checkpoints(work_dir)
        assert (checkpoint.epoch, checkpoint.iter, checkpoint.run_dir) == (1, 8, str(run_dir))
        outputs = [Path(checkpoint.path), run_dir / "log.jsonl", run_dir / "curves.png"]
        for path in outputs:
            assert path.is_file() and ray_owned_folder(path) is None and not str(path).startswith(temp_dir), path

        (working_dir / "NOTES.txt").write_text("a changed working dir is a new package for Ray\n")
        second = submit("--resume", "--allow-changes", "--set", *SMALL, "train.max_epochs=2",
                        "evaluation.interval=1")
        assert f"resuming run {run_dir} from checkpoint {checkpoint.path} (epoch 1, iteration 8)" in second
        records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        at = next(i for i, r in enumerate(records) if r["mode"] == "resume")
        assert (records[at]["epoch"], records[at]["iter"]) == (1, 8)
        before = [r["iter"] for r in records[:at] if r["mode"] == "train"]
        after = [(r["epoch"], r["iter"]) for r in records[at:] if r["mode"] == "train"]
        assert before == list(range(1, 9)) and after == [(2, i) for i in range(9, 17)]
        assert max(c.epoch for c in find_checkpoints(work_dir)) == 2
    finally:
        import psutil

        children = psutil.Process(head.pid).children(recursive=True) if head.poll() is None else []
        head.terminate()  # `ray start --block` drains and stops its own processes
        try:
            head.wait(timeout=300)
        except subprocess.TimeoutExpired:
            head.kill()
        for child in children:  # whatever it did not stop in time
            try:
                child.wait(timeout=10)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_placement_resources_reach_ray_and_must_exist(ray_session):
    """scaling.resources_per_worker goes to Ray Train's workers; a custom resource no node declares fails before
    anything waits for it, naming the key; with the actors on cpu_node nodes the CPU budget leaves them out."""
    from raydet.registry import ConfigError
    from raydet.commands.ray_setup import check_cluster_resources, scaling_config, torch_config
    from raydet.commands.sections import parse_sections

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


def test_the_checkpoint_score_must_be_a_metric_the_pipeline_reports(caplog):
    """checkpoint.score_attribute ranks the kept checkpoints: a name raydet never reports, or one the pipeline's
    evaluation does not compute, fails naming the key; with no data.val nothing is ranked (recency, one warning)."""
    from raydet.registry import ConfigError
    from raydet.commands.sections import parse_sections

    def sections(*overrides):
        return parse_sections(load_config(QUICKSTART, list(overrides)))

    assert sections().checkpoint.score_attribute == "bbox/AP50"
    by_loss = sections("checkpoint.score_attribute=train/loss", "checkpoint.score_order=min")
    assert (by_loss.checkpoint.score_attribute, by_loss.checkpoint.score_order) == ("train/loss", "min")
    with pytest.raises(ConfigError, match=r"checkpoint\.score_attribute: 'bbox/AP5' is not a metric raydet reports; "
                                          r"did you mean .*'bbox/AP50'"):
        sections("checkpoint.score_attribute=bbox/AP5")
    with pytest.raises(ConfigError, match=r"checkpoint\.score_attribute: 'segm/AP' needs 'segm' in the pipeline's "
                                          r"evaluation\.metric"):
        sections("checkpoint.score_attribute=segm/AP")
    with pytest.raises(ConfigError, match=r"checkpoint\.score_order: expected one of max, min, got 'best'"):
        sections("checkpoint.score_order=best")
    with caplog.at_level("WARNING", logger="raydet"):
        assert sections("data.val=null").checkpoint.score_attribute is None
    assert "bbox/AP50 is not evaluated (no data.val): checkpoints are kept by recency" in caplog.text
