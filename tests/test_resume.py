"""--resume and checkpoint retention on Ray Train: a run interrupted with Ctrl-C (SIGINT to its driver) after its
epoch-2 checkpoint continues at epoch 3 and ends with the weights of an uninterrupted run of the same seed; with
``num_to_keep: 1`` and a score attribute, the latest checkpoint and the best evaluated one are kept after every
epoch, and the latest is what resume finds."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raydet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


def _config() -> list[str]:
    from test_train_ray import SMALL

    # 8 training images at 2 per worker: 4 iterations per epoch; evaluated at epochs 2 and 4
    return SMALL + ["data.train.num_images=8", "train.max_epochs=4", "checkpoint.interval=1",
                    "evaluation.interval=2", "checkpoint.num_to_keep=1", "checkpoint.score_attribute=bbox/AP50"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _evaluated(run_dir: Path) -> dict[int, float]:
    if not (run_dir / "log.jsonl").exists():
        return {}
    return {r["epoch"]: r["bbox/AP50"] for r in _records(run_dir) if r["mode"] == "val"}


def expected_kept(epoch: int, ap50: dict[int, float]) -> set[int]:
    """Ray Train keeps the latest checkpoint and the ``num_to_keep`` (1) best by the score; an epoch without
    evaluation scores worst; equal scores rank the later checkpoint higher."""
    scored = {e: v for e, v in ap50.items() if e <= epoch}
    best = {max(scored, key=lambda e: (scored[e], e))} if scored else set()
    return {epoch} | best


def _kept(run_dir: Path) -> set[int]:
    from raydet.workspace import find_checkpoints

    return {c.epoch for c in find_checkpoints(run_dir)}


def _wait_for(condition, what: str, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def gated_run(ray_session, tmp_path_factory):
    """The uninterrupted run. After each epoch its workers wait (EpochGateHook) until this fixture has looked at the
    checkpoints on disk: ``(run_dir, result, seen)``, ``seen[epoch]`` = what was kept, what resume would pick and
    the latest checkpoint's ``checkpoint.json``."""
    from raydet.train import fit
    from raydet.workspace import CHECKPOINT_INFO_FILE, latest_checkpoint

    run_dir = tmp_path_factory.mktemp("gated")
    seen: dict[int, dict] = {}
    failures: list[BaseException] = []

    def look(epoch: int):
        # Ray copies the checkpoint into the run folder and registers it (deleting what it no longer keeps) after
        # the workers' report: wait until the folder holds what retention keeps and the epoch's checkpoint is
        # complete (loadable), or time out and record what is there
        def settled():
            if epoch not in _kept(run_dir) or _kept(run_dir) != expected_kept(epoch, _evaluated(run_dir)):
                return False
            latest = latest_checkpoint(run_dir)
            return latest is not None and latest.epoch == epoch

        try:
            _wait_for(settled, f"the checkpoints kept after epoch {epoch}")
        except AssertionError as exc:
            failures.append(exc)
        latest = latest_checkpoint(run_dir)
        info = json.loads((Path(latest.path).parent / CHECKPOINT_INFO_FILE).read_text()) if latest else None
        seen[epoch] = {"kept": _kept(run_dir), "latest": latest.epoch if latest else None, "info": info}

    def observer():
        for epoch in (1, 2, 3):
            look(epoch)
            (run_dir / f"continue_{epoch}").touch()

    watcher = threading.Thread(target=observer, daemon=True)
    watcher.start()
    result = fit(load_config(QUICKSTART, _config()), run_dir=str(run_dir), gate_dir=str(run_dir))
    watcher.join(timeout=60)
    look(4)
    return run_dir, result, seen, failures


def test_retention_keeps_the_latest_and_the_best_evaluated_checkpoint(gated_run):
    run_dir, result, seen, failures = gated_run
    assert result.return_value["epoch"] == 4 and result.return_value["iter"] == 16
    ap50 = _evaluated(run_dir)
    assert sorted(ap50) == [2, 4]
    for epoch in (1, 2, 3, 4):
        assert seen[epoch]["kept"] == expected_kept(epoch, ap50), (epoch, seen[epoch], ap50, failures)
        assert seen[epoch]["latest"] == epoch  # what --resume would continue from
    # epoch 1 is kept only while it is the latest; epoch 3 (not evaluated) stays while it is the latest
    assert 1 not in seen[2]["kept"] and seen[3]["kept"] == {2, 3}
    # an epoch without evaluation reports the worst score and no (stale) metric, so Ray never lacks the key
    info = seen[3]["info"]
    assert info["epoch"] == 3 and info["metrics"]["checkpoint_score"] == -math.inf
    assert not any(k.startswith("bbox/") for k in info["metrics"])
    assert seen[4]["info"]["metrics"]["checkpoint_score"] == pytest.approx(ap50[4])


def test_an_interrupted_run_resumes_at_the_next_epoch_and_ends_like_an_uninterrupted_one(gated_run, tmp_path, capsys):
    """The command runs in a child process on the test session's Ray. A test hook pauses its worker at the first
    iteration of epoch 3 (after the epoch-2 checkpoint), so that the Ctrl-C lands in epoch 3 however busy the
    machine is; the same command with --resume (no hook) then finishes the run."""
    import ray

    from raydet.engine.checkpoint import load_checkpoint
    from raydet.train import main
    from raydet.workspace import latest_checkpoint

    gated_dir, gated_result, _, _ = gated_run
    work_dir, marker = tmp_path / "work", tmp_path / "paused.json"
    pause = ["runtime.imports=[tests._worker_hooks]",  # the child runs from the repository root
             f"hooks=[{{type: PauseOnceAfterIteration, marker: '{marker}', iteration: 9}}]"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "raydet.train", str(QUICKSTART), "--work-dir", str(work_dir),
           "--set", *_config(), *pause]
    log_file = tmp_path / "driver.log"
    with open(log_file, "w") as out:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            def paused():
                assert driver.poll() is None, f"the run ended before epoch 3: {log_file.read_text()[-3000:]}"
                return marker.exists()

            _wait_for(paused, "the worker's pause at the first iteration of epoch 3")
            driver.send_signal(signal.SIGINT)  # Ctrl-C during epoch 3
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
    output = log_file.read_text()
    assert json.loads(marker.read_text())["epoch"] == 3
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted; the checkpoints written so far are kept" in output and "--resume" in output
    (run_dir,) = [p for p in work_dir.iterdir() if p.is_dir()]
    interrupted = latest_checkpoint(work_dir)
    assert (interrupted.epoch, interrupted.iter, interrupted.run_dir) == (2, 8, str(run_dir))

    # the same command with --resume: the run folder and checkpoint are found, training goes on at epoch 3
    assert main([str(QUICKSTART), "--work-dir", str(work_dir), "--resume", "--set", *_config()]) == 0
    assert f"run folder {run_dir}" in capsys.readouterr().out
    assert [p for p in work_dir.iterdir() if p.is_dir()] == [run_dir]
    records = _records(run_dir)
    at = next(i for i, r in enumerate(records) if r["mode"] == "resume")
    assert (records[at]["epoch"], records[at]["iter"], records[at]["checkpoint"]) == (2, 8, interrupted.path)
    assert [r["iter"] for r in records[:at] if r["mode"] == "train"][:8] == list(range(1, 9))
    after = [(r["epoch"], r["iter"]) for r in records[at:] if r["mode"] == "train"]
    assert after == [(3, i) for i in range(9, 13)] + [(4, i) for i in range(13, 17)]

    # the end state is the uninterrupted run's: weights, position, and the epoch-4 evaluation
    final = load_checkpoint(latest_checkpoint(work_dir).path)
    reference = load_checkpoint(gated_result.checkpoint.path)
    assert (final["epoch"], final["iter"]) == (reference["epoch"], reference["iter"]) == (4, 16)
    assert final["model"].keys() == reference["model"].keys()
    differing = [k for k, v in reference["model"].items() if not torch.equal(v, final["model"][k])]
    assert not differing, differing[:5]
    assert _evaluated(run_dir)[4] == _evaluated(gated_dir)[4]
