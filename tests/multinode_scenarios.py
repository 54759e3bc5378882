"""Multi-node scenarios on one machine, for ``tests/test_multinode.py``.

``python tests/multinode_scenarios.py OUT_DIR [SCENARIO ...]`` starts a Ray cluster of several nodes in this process
tree (``ray.cluster_utils.Cluster``): a head that is the CPU-only node (3 CPUs, ``cpu_node: 4``: the decode actors)
and two ``gpu_node`` nodes (2 CPUs and ``gpu_node: 1`` each: one training worker fits). It runs the scenarios in
order (default: all) and writes each one's facts to ``OUT_DIR/<scenario>.json`` for the test to check:

* ``fixed``: 1 worker (``scaling.num_workers: 1``, ``max_failures: 2``) on a gpu node, decode actors on the cpu
  node; during epoch 2 the worker's node is removed and a new gpu node added (a spot node replaced): the run
  continues from the epoch-1 checkpoint on a gpu node that is left and finishes.
* ``elastic``: ``scaling.num_workers: [1, 2]``, 2 workers on the two gpu nodes: the node of rank 0 is removed
  during epoch 2 and no node replaces it: the run continues from the epoch-1 checkpoint with 1 worker; when that
  worker is in its epoch 2, a gpu node is added, and the run grows back to 2 workers (again from the checkpoint)
  and finishes.
* ``tune``: a study of two trials (1 worker each) at once (their workers wait for each other after their first
  iteration): each trial's worker on a gpu node of its own.

Where things ran is what the workers and actors say themselves: each worker group's ``workers`` record in the run
log (every rank's node id, see ``raydet.train``) and the ``RecordNode`` transform of ``tests/_data_hooks.py``
(one file per decode actor process with its node id). A node is removed at a fixed point of the run (a
``PauseOnceAfterIteration`` hook holds rank 0 there, and the removal also waits for Ray Train to have registered
the epoch-1 checkpoint); every wait polls for its event with a generous deadline.

Not a test module (pytest collects ``test_*.py`` only). It needs the ``tests`` package importable by Ray's
workers: run it from the repository root with the root on ``PYTHONPATH`` (the test does), and a ``RAY_TMPDIR`` of
its own, so that no other process on the machine finds this cluster as "the running local cluster".
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _polling import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
EVENT_TIMEOUT_S = 240.0
GPU_NODE = {"num_cpus": 2, "resources": {"gpu_node": 1}, "object_store_memory": 80 * 2**20}
CPU_NODE = {"num_cpus": 3, "resources": {"cpu_node": 4}, "object_store_memory": 120 * 2**20}
SCENARIOS = ("fixed", "elastic", "tune")

# The quickstart at its smallest (4 training images of 96x96 at 2 per worker: 1 iteration per epoch with 2
# workers, 2 with 1), no evaluation; workers need a gpu_node each, decode actors a share of a cpu_node.
PIPELINE = [
    "data.train.num_images=4", "data.train.height=96", "data.train.width=96", "data.val=null", "data.test=null",
    "data.images_per_worker=2", "train.max_epochs=2", "runtime.log_interval=1", "runtime.tensorboard=false",
    "runtime.curves=false",
    "checkpoint.interval=1", "checkpoint.score_attribute=null", "runtime.shared_storage=true",
    "lr_schedule.warmup=null",  # the logged LR is the base LR of the world size
    "runtime.imports=[tests._data_hooks, tests._worker_hooks]",  # the decode actors need only the first
    "scaling.cpus_per_worker=1", "scaling.resources_per_worker={gpu_node: 1}", "scaling.data_actors=[1, 1]",
    "scaling.data_cpus_per_actor=0.5", "scaling.data_resources={cpu_node: 1}", "scaling.max_failures=2",
]


def _train_pipeline(folder: Path) -> str:
    return (f"train_pipeline=[{{type: RecordNode, folder: '{folder}'}}, {{type: Resize, scale: [96, 96]}}, "
            "{type: RandomFlip, prob: 0.5}, "
            "{type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}, "
            "{type: Pad, size_divisor: 32}]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(condition, what: str, stop: threading.Event | None = None, timeout_s: float = EVENT_TIMEOUT_S):
    """:func:`_polling.wait_for` with this script's deadline."""
    return wait_for(condition, what, timeout_s, stop)


def _records(log_file: Path, mode: str | None = None) -> list[dict]:
    if not log_file.exists():
        return []
    out = []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if mode is None or record.get("mode") == mode:
            out.append(record)
    return out


def _decode_nodes(folder: Path) -> list[str]:
    return sorted(json.loads(p.read_text())["node"] for p in folder.glob("decode_*.json"))


class _Nodes:
    """The cluster's nodes by role; ``remove(node_id)`` / ``add_gpu()`` change it."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        # the head is the CPU-only node (a node fewer to start on a 2-core machine): 3 CPUs, for the decode
        # actors and Tune's trial drivers
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **CPU_NODE, "include_dashboard": False, "dashboard_port": _free_port()})
        self.gpu = [self.cluster.add_node(**GPU_NODE) for _ in range(2)]
        self.cpu = [self.cluster.head_node]
        self.cluster.wait_for_nodes()

    def ids(self) -> dict:
        return {"head": self.cluster.head_node.node_id, "gpu": [n.node_id for n in self.gpu],
                "cpu": [n.node_id for n in self.cpu]}

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.gpu if n.node_id == node_id)
        self.gpu.remove(node)
        self.cluster.remove_node(node, allow_graceful=True)

    def add_gpu(self) -> str:
        node = self.cluster.add_node(**GPU_NODE)
        self.gpu.append(node)
        self.cluster.wait_for_nodes()
        return node.node_id


def _fast_autoscaling_coordinator() -> None:
    """Ray Train's elastic scaling policy reads the cluster's nodes through Ray Data's AutoscalingCoordinator
    actor, which refreshes its view every 20 s; this cluster's one (created here first, under the name Ray looks
    up) refreshes 5 times a second, so that a removed or added node counts within a second, not tens of seconds.
    (A restart decided on a view from before a node was lost asks for one worker too many and retries after
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, which the test sets short.)"""
    import ray
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class FastTickCoordinator(coordinator._AutoscalingCoordinatorActor):
        TICK_INTERVAL_S = 0.2

    # on the head (this driver's node), which no scenario removes: on a gpu node it would die with it, and its
    # restart would know no requests, so Ray Train would see no room for workers until it asked again (seconds)
    head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(FastTickCoordinator).options(
        name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", get_if_exists=True, lifetime="detached",
        scheduling_strategy=head)
    ray.get(actor.remote().get_reserved_resources.remote("raydet-multinode-test"))


def _checkpoint_signal(folder: Path):
    """A Ray Train callback (on the controller) that touches ``<folder>/registered_epoch_<epoch>`` once Ray Train
    has registered a report's checkpoint."""
    from ray.train import UserCallback

    class CheckpointTaken(UserCallback):
        def __init__(self, folder: str):
            self.folder = folder

        def after_report(self, run_context, metrics, checkpoint):
            import os

            if checkpoint is not None:
                open(os.path.join(self.folder, f"registered_epoch_{metrics[0]['epoch']}"), "w").close()

    return CheckpointTaken(str(folder))


def _train_with_node_loss(nodes: _Nodes, out: Path, name: str, elastic: bool) -> dict:
    """Train with a node loss during epoch 2 (see the module docstring); returns the run's facts."""
    from raydet.config import load_config
    from raydet.train import fit

    folder = out / name
    signals, decode = folder / "signals", folder / "decode"
    for d in (signals, decode):
        d.mkdir(parents=True, exist_ok=True)
    run_dir, release = folder / "run", signals / "release"
    log_file = run_dir / "log.jsonl"
    # rank 0 waits after the first iteration of epoch 2 (2 with 2 workers, 3 with 1); in the elastic run the
    # 1-worker group waits again after iteration 3 (its second of epoch 2) until the cluster grows
    hooks = [f"{{type: PauseOnceAfterIteration, marker: '{signals / 'lost.json'}', iteration: {2 if elastic else 3}, "
             f"release: '{release}', timeout_s: {EVENT_TIMEOUT_S}}}"]
    if elastic:
        hooks.append(f"{{type: PauseOnceAfterIteration, marker: '{signals / 'shrunk.json'}', iteration: 3, "
                     f"release: '{release}', timeout_s: {EVENT_TIMEOUT_S}}}")
    workers = ["scaling.num_workers=[1, 2]", "scaling.elastic_resize_monitor_interval_s=1"] if elastic else \
        ["scaling.num_workers=1"]
    cfg = load_config(QUICKSTART, PIPELINE + workers + [_train_pipeline(decode), f"hooks=[{', '.join(hooks)}]"])
    facts: dict = {"nodes_at_start": nodes.ids(), "added": []}
    done = threading.Event()
    outcome: dict = {}

    def train():  # in a thread: nodes are added and removed from the main thread (Ray sets signal handlers there)
        try:
            outcome["result"] = fit(cfg, run_dir=str(run_dir), callbacks=[_checkpoint_signal(signals)])
        except BaseException as exc:  # noqa: BLE001  (raised again below)
            outcome["error"] = exc
        finally:
            done.set()

    start = time.monotonic()
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        _wait_for((signals / "lost.json").exists, "rank 0 never reached epoch 2", done)
        _wait_for((signals / "registered_epoch_1").exists, "Ray Train never registered the epoch-1 checkpoint", done)
        rank0 = _records(log_file, "workers")[-1]["nodes"][0]
        nodes.remove(rank0)
        facts["removed"] = rank0
        if elastic:  # the run goes on with 1 worker; a node joins when that worker is in epoch 2
            _wait_for((signals / "shrunk.json").exists, "the 1-worker group never reached iteration 3", done)
        facts["added"].append(nodes.add_gpu())  # (fixed size: a replacement; the next scenarios need 2 gpu nodes)
    except BaseException:
        release.touch()  # no worker stays paused (the elastic run's paused worker ends when the group grows)
        raise
    finally:
        _wait_for(done.is_set, "the run never ended", timeout_s=2 * EVENT_TIMEOUT_S)
        release.touch()
    if "error" in outcome:
        raise outcome["error"]
    facts["return_value"] = outcome["result"].return_value
    facts["seconds"] = round(time.monotonic() - start, 1)
    facts["log"] = _records(log_file)
    facts["decode_nodes"] = _decode_nodes(decode)
    facts["nodes_at_end"] = nodes.ids()
    return facts


def scenario_fixed(nodes: _Nodes, out: Path) -> dict:
    return _train_with_node_loss(nodes, out, "fixed", elastic=False)


def scenario_elastic(nodes: _Nodes, out: Path) -> dict:
    return _train_with_node_loss(nodes, out, "elastic", elastic=True)


def scenario_tune(nodes: _Nodes, out: Path) -> dict:
    """Two trials at once (grid of two learning rates), one worker each on a gpu node, 1 epoch of 2 iterations."""
    from raydet.tune import main as tune_main

    folder = out / "tune"
    decode = folder / "decode"
    decode.mkdir(parents=True, exist_ok=True)
    space = folder / "space.yaml"
    space.write_text(
        f"pipeline: {QUICKSTART}\nmetric: train/loss\nmode: min\nsearch:\n  optimizer.lr: {{grid: [0.0005, 0.002]}}\n"
        "scheduler: {type: fifo}\nresources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, driver_cpus: 0.5}\n"
        "max_concurrent_trials: 2\n")
    # both trials' workers wait for each other after their first iteration: the trials run at once
    overrides = [o for o in PIPELINE if not o.startswith("scaling.cpus_per_worker")] + [
        "train.max_epochs=1", _train_pipeline(decode),
        f"hooks=[{{type: RendezvousAfterIteration, folder: '{folder / 'rendezvous'}', parties: 2, "
        f"timeout_s: {EVENT_TIMEOUT_S}}}]"]
    start = time.monotonic()
    code = tune_main([str(space), "--work-dir", str(folder / "work"), "--set", *overrides])
    runs = folder / "work" / "tune" / "space" / "runs"
    trials = {run.name: _records(run / "log.jsonl") for run in sorted(runs.iterdir())} if runs.exists() else {}
    return {"exit_code": code, "seconds": round(time.monotonic() - start, 1), "trials": trials,
            "decode_nodes": _decode_nodes(decode), "nodes": nodes.ids()}


def main(argv: list[str]) -> int:
    import ray

    out = Path(argv[0])
    wanted = argv[1:] or list(SCENARIOS)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    t0 = time.monotonic()
    nodes = _Nodes()
    try:
        ray.init(address=nodes.cluster.address, log_to_driver=False, configure_logging=False)
        _fast_autoscaling_coordinator()
        (out / "cluster.json").write_text(json.dumps({"seconds": round(time.monotonic() - t0, 1),
                                                      "nodes": nodes.ids()}))
        for name in wanted:
            try:
                facts = globals()[f"scenario_{name}"](nodes, out)
            except BaseException as exc:  # noqa: BLE001  (the test shows it)
                facts = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            (out / f"{name}.json").write_text(json.dumps(facts, indent=1))
    finally:
        ray.shutdown()
        nodes.cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
