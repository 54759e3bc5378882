"""Multi-node behaviour on one machine: a Ray cluster of a head that is the CPU-only (``cpu_node``) node and two
``gpu_node`` nodes (``ray.cluster_utils.Cluster``), started by ``tests/multinode_scenarios.py`` in a process of its
own (the pytest process holds its one Ray instance) and stopped by its process id. The script runs every scenario
once and writes each one's facts as JSON; the tests below check them:

* placement: training workers ran on gpu nodes only, each on its own, decode actors on the cpu node only (the node
  ids the workers and actors recorded themselves);
* a fixed-size run (1 worker) that loses its node during epoch 2 continues from the epoch-1 checkpoint on a
  replacement node and finishes;
* an elastic run (``scaling.num_workers: [1, 2]``) that loses a node goes on with 1 worker from the checkpoint,
  then grows back to 2 when a node joins, logging each resize with the LR the linear scaling rule gives;
* a Tune study whose two trials run at once, each on a gpu node of its own.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multinode_scenarios.py"
SCENARIO_TIMEOUT_S = 900  # all scenarios; a busy machine makes them slower, not different

# the quickstart's optimizer: AdamW, lr 0.001 for base_batch_size 4; 2 images per worker (multinode_scenarios)
LR, BASE_BATCH, PER_WORKER = 0.001, 4, 2


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> Path:
    """Run every scenario in one child process (its own Ray cluster); the folder of their JSON facts."""
    out = tmp_path_factory.mktemp("multinode")
    # a Ray temp dir of its own: no other process takes this cluster for "the running local cluster"; short, as
    # Ray's socket paths under it must stay below the OS limit
    ray_tmp = tempfile.mkdtemp(prefix="rdmn")
    # PYTHONPATH: Ray's workers import tests._worker_hooks / tests._data_hooks (runtime.imports).
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S: a restart decided just after a node loss, on Ray Train's view of the
    # cluster from before it (cached up to 1 s), waits this long for the lost node's worker before it counts again
    # (default 60 s); it bounds only the placement group's wait, ready within 0.6 s here when the room exists.
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: how often the controller polls its workers: a lost node, a report's
    # checkpoint and a run's end are seen within it (tests/conftest.py sets 0.5 s for the session; halved here).
    # RAY_enable_worker_prestart=0: no idle Python workers started on every new node; the 2 CPUs are the limit here.
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="1.5",
        RAY_enable_worker_prestart="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env,
                            stdout=open(out / "stdout.txt", "w"), stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=SCENARIO_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


def _facts(folder: Path, name: str) -> dict:
    path = folder / f"{name}.json"
    if not path.exists():
        tail = (folder / "stdout.txt").read_text()[-3000:] if (folder / "stdout.txt").exists() else ""
        pytest.fail(f"scenario {name} wrote no result; the script's output ends with:\n{tail}")
    facts = json.loads(path.read_text())
    assert "error" not in facts, facts.get("traceback") or facts["error"]
    return facts


def _of(log: list[dict], mode: str) -> list[dict]:
    return [r for r in log if r["mode"] == mode]


def _restarts(iters: list[int]) -> list[int]:
    """Where the iteration count goes back (a new worker group continuing from a checkpoint)."""
    return [i for i in range(1, len(iters)) if iters[i] <= iters[i - 1]]


def test_placement_and_a_fixed_size_run_recovers_from_a_lost_node(scenarios):
    """1 worker, 4 images at 2 per worker: 2 iterations per epoch. The worker's node goes during epoch 2 (after
    iteration 3), and a replacement joins; the new worker continues from the epoch-1 checkpoint (iteration 2)."""
    facts = _facts(scenarios, "fixed")
    start = facts["nodes_at_start"]
    groups = _of(facts["log"], "workers")
    assert [g["world"] for g in groups] == [1, 1]
    # the new worker on a gpu node still there: the other one, or the replacement (whichever Ray picks)
    assert groups[0]["nodes"] == [facts["removed"]] and facts["removed"] in start["gpu"]
    assert groups[1]["nodes"][0] in set(start["gpu"]) - {facts["removed"]} | set(facts["added"])
    # decode actors: on the cpu node only (data_resources: {cpu_node: 1}), never beside the training worker
    assert facts["decode_nodes"] and set(facts["decode_nodes"]) == set(start["cpu"])

    iters = [r["iter"] for r in _of(facts["log"], "train")]
    assert _restarts(iters) == [3] and iters == [1, 2, 3, 3, 4], iters
    resume = _of(facts["log"], "resume")
    assert [(r["epoch"], r["iter"]) for r in resume] == [(1, 2)]
    assert not _of(facts["log"], "resize")
    assert facts["return_value"]["epoch"] == 2 and facts["return_value"]["iter"] == 4


def test_an_elastic_run_shrinks_on_a_lost_node_and_grows_back(scenarios):
    """num_workers [1, 2], on_resize scale_lr, 4 images at 2 per worker: 2 workers (lr 0.001 x 2 x 2 / 4 = 0.001,
    1 iteration per epoch); rank 0's node goes during epoch 2 -> 1 worker from the epoch-1 checkpoint (lr 0.0005,
    2 iterations per epoch); a node joins while that worker is in its epoch 2 -> 2 workers again from the
    checkpoint, and the run finishes."""
    facts = _facts(scenarios, "elastic")
    log = facts["log"]
    assert [g["world"] for g in _of(log, "workers")] == [2, 1, 2]
    resizes = _of(log, "resize")
    assert [(r["old_world"], r["new_world"]) for r in resizes] == [(2, 1), (1, 2)]
    for r in resizes:  # both continue from the epoch-1 checkpoint; the LR of the linear scaling rule
        assert (r["epoch"], r["iter"]) == (1, 1), r
        assert r["on_resize"] == "scale_lr" and r["accumulation"] == 1
        assert r["lr"] == pytest.approx(LR * PER_WORKER * r["new_world"] / BASE_BATCH)
        assert r["global_batch"] == PER_WORKER * r["new_world"]
    groups = _of(log, "workers")
    gpu_nodes = set(facts["nodes_at_start"]["gpu"]) | set(facts["added"])
    for group in groups:  # each rank on a gpu node of its own (one gpu_node unit each)
        assert set(group["nodes"]) <= gpu_nodes and len(set(group["nodes"])) == len(group["nodes"]), group
    assert facts["removed"] == groups[0]["nodes"][0] and facts["removed"] not in groups[1]["nodes"]
    assert facts["added"][0] in groups[2]["nodes"]
    # what each group trained: [1, 2] at 2 workers, then from iteration 1: [2, 3] at 1 worker (paused after 3
    # until the node joined), then from iteration 1 again at 2 workers: [2]
    train = _of(log, "train")
    iters = [r["iter"] for r in train]
    assert _restarts(iters) == [2, 4] and iters == [1, 2, 2, 3, 2], iters
    # the logged LR (no warmup in these runs): 0.001 at 2 workers, 0.0005 at 1
    assert [r["lr"] for r in train] == pytest.approx([LR] * 2 + [LR / 2] * 2 + [LR])
    assert facts["return_value"]["epoch"] == 2 and facts["return_value"]["iter"] == 2
    assert set(facts["decode_nodes"]) == set(facts["nodes_at_start"]["cpu"])


def test_a_tune_study_spreads_its_trials_over_the_nodes(scenarios):
    facts = _facts(scenarios, "tune")
    assert facts["exit_code"] == 0
    trials = facts["trials"]
    assert len(trials) == 2
    nodes = [_of(log, "workers")[0]["nodes"] for log in trials.values()]
    assert all(len(n) == 1 for n in nodes)
    # two trials at once, one gpu_node unit per worker: each on a gpu node of its own
    assert {n[0] for n in nodes} <= set(facts["nodes"]["gpu"]) and nodes[0][0] != nodes[1][0]
    for log in trials.values():
        assert [r["iter"] for r in _of(log, "train")] == [1, 2]  # 4 images / 2 per worker, 1 epoch
    assert set(facts["decode_nodes"]) == set(facts["nodes"]["cpu"])
