"""Where outputs go (raydet.workspace): a relative work dir under a Ray job resolves to a persistent root, never to
a folder Ray deletes; on a cluster of several nodes a node-local work dir is refused naming the key; --resume finds
the latest loadable checkpoint of a work dir's runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raydet.registry import ConfigError
from raydet.workspace import (DEFAULT_WORK_ROOT, WORK_ROOT_ENV, check_shared_storage, find_checkpoints,
                              latest_checkpoint, mount_of, ray_owned_folder, resolve_work_dir)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
PKG = "/tmp/ray/session_2026-11-29_20-52-48_123456_777/runtime_resources/working_dir_files/_ray_pkg_0a1b2c3d"


@pytest.fixture(autouse=True)
def no_root_env(monkeypatch):
    monkeypatch.delenv(WORK_ROOT_ENV, raising=False)


# ----------------------------------------------------------------------------------------------- work dirs
@pytest.mark.parametrize("path, owner", [
    (PKG + "/work_dirs/quickstart", "/tmp/ray/session_2026-11-29_20-52-48_123456_777"),
    ("/home/u/.ray_tmp/runtime_resources/py_modules_files/x", "/home/u/.ray_tmp/runtime_resources"),
    ("/data/_ray_pkg_abc/work", "/data/_ray_pkg_abc"),
    ("/home/u/runs/quickstart", None),
    ("/home/u/session_notes/x", None),
])
def test_ray_owned_folders_are_recognised(path, owner):
    assert ray_owned_folder(path) == owner


def test_a_relative_work_dir_outside_ray_resolves_against_the_current_directory(tmp_path):
    assert resolve_work_dir("work_dirs/quickstart", cwd=str(tmp_path)) == str(tmp_path / "work_dirs" / "quickstart")
    assert resolve_work_dir(str(tmp_path / "abs"), cwd="/elsewhere") == str(tmp_path / "abs")


def test_under_a_ray_job_a_relative_work_dir_goes_to_the_persistent_root(tmp_path, monkeypatch):
    home = os.path.expanduser(DEFAULT_WORK_ROOT)
    assert resolve_work_dir("work_dirs/quickstart", cwd=PKG) == os.path.join(home, "work_dirs", "quickstart")
    monkeypatch.setenv(WORK_ROOT_ENV, str(tmp_path / "env_root"))
    assert resolve_work_dir("work_dirs/q", cwd=PKG) == str(tmp_path / "env_root" / "work_dirs" / "q")
    # the pipeline's runtime.work_root comes first, and applies outside Ray jobs too
    assert resolve_work_dir("work_dirs/q", cwd=PKG, work_root=str(tmp_path / "r")) == str(tmp_path / "r/work_dirs/q")
    assert resolve_work_dir("q", cwd=str(tmp_path), work_root=str(tmp_path / "r")) == str(tmp_path / "r" / "q")


def test_a_work_dir_inside_a_ray_folder_or_a_uri_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"^--out: .*_ray_pkg_0a1b2c3d/out is inside /tmp/ray/session_.*a folder Ray "
                                          r"creates for a job and deletes with it"
                                          r".*runtime\.work_root.*RAYDET_WORK_ROOT"):
        resolve_work_dir(PKG + "/out", key="--out")
    monkeypatch.setenv(WORK_ROOT_ENV, "../../x")  # a relative root still inside the package
    with pytest.raises(ConfigError, match=r"^work_dir: .* is inside /tmp/ray/session_"):
        resolve_work_dir("w", cwd=PKG)
    monkeypatch.delenv(WORK_ROOT_ENV)
    with pytest.raises(ConfigError, match=r"^work_dir: s3://bucket/runs: a URI is not supported as a work dir yet"):
        resolve_work_dir("s3://bucket/runs")


def test_the_train_command_resolves_its_work_dir_by_the_rule(tmp_path, monkeypatch):
    from raydet.config import load_config
    from raydet.commands.sections import parse_sections, work_dir_of

    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART)
    assert work_dir_of(cfg, parse_sections(cfg)) == str(tmp_path / "work_dirs" / "quickstart")
    rooted = load_config(QUICKSTART, [f"runtime.work_root={tmp_path / 'root'}"])
    assert work_dir_of(rooted, parse_sections(rooted)) == str(tmp_path / "root" / "work_dirs" / "quickstart")
    assert work_dir_of(rooted, parse_sections(rooted), "mine") == str(tmp_path / "root" / "mine")


# ----------------------------------------------------------------------------------------------- shared storage
MOUNTS = """overlay / overlay rw,relatime 0 0
/dev/nvme0n1p1 /home ext4 rw 0 0
fs-01.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
10.0.0.2:/raydet /mnt/file\\040store nfs rw 0 0
bucket /mnt/bucket fuse.gcsfuse rw 0 0
tmpfs /mnt/shared/scratch tmpfs rw 0 0
"""


def test_the_mount_of_a_path_is_the_longest_prefix(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert mount_of("/mnt/shared/runs/q", str(mounts)) == ("/mnt/shared", "nfs4")
    assert mount_of("/mnt/shared/scratch/x", str(mounts)) == ("/mnt/shared/scratch", "tmpfs")
    assert mount_of("/mnt/file store/runs", str(mounts)) == ("/mnt/file store", "nfs")
    assert mount_of("/mnt/sharedx", str(mounts)) == ("/", "overlay")
    assert mount_of("/home/u/runs", str(mounts)) == ("/home", "ext4")


def test_several_nodes_need_shared_storage(tmp_path):
    mounts = str(tmp_path / "mounts")
    Path(mounts).write_text(MOUNTS)
    for path in ("/mnt/shared/runs", "/mnt/file store/r", "/mnt/bucket/runs"):
        check_shared_storage(path, "work_dir", 3, mounts_file=mounts)
    check_shared_storage("/home/u/runs", "work_dir", 1, mounts_file=mounts)  # one node: anything goes
    check_shared_storage("/home/u/runs", "work_dir", 3, declared_shared=True, mounts_file=mounts)
    with pytest.raises(ConfigError, match=r"^work_dir: /home/u/runs is on a node-local file system \(ext4 at /home\), "
                                          r"but the Ray cluster has 3 nodes.*Set work_dir \(or runtime\.work_root, or "
                                          r"RAYDET_WORK_ROOT\)"):
        check_shared_storage("/home/u/runs", "work_dir", 3, mounts_file=mounts)
    with pytest.raises(ConfigError, match=r"tmpfs at /mnt/shared/scratch"):
        check_shared_storage("/mnt/shared/scratch/r", "--out", 2, mounts_file=mounts)


MULTI_NODE = r'''
import sys
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    from raydet.train import main
    code = main(sys.argv[1:])
finally:
    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
'''


def test_a_node_local_work_dir_on_a_two_node_cluster_fails_naming_the_key(tmp_path):
    """A head and a second node (ray.cluster_utils.Cluster, in a child process: the test session holds its own Ray):
    training into the test's temporary folder, on this machine's local file system, stops before any worker starts
    with one line naming work_dir and what to set."""
    from test_train_ray import SMALL

    point, fstype = mount_of(tmp_path)
    if fstype in ("nfs", "nfs4"):
        pytest.skip(f"the temporary folder is on {fstype}: shared storage here")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", WORK_ROOT_ENV)}
    child = subprocess.run([sys.executable, "-c", MULTI_NODE, str(QUICKSTART), "--work-dir", str(tmp_path / "w"),
                            "--set", *SMALL, "train.max_epochs=1"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 2, child.stdout[-2000:] + child.stderr[-3000:]
    lines = [line for line in child.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in child.stderr, child.stderr[-3000:]
    assert lines[0].startswith(f"error: work_dir: {tmp_path / 'w'}/") and "node-local file system" in lines[0]
    assert "the Ray cluster has 2 nodes" in lines[0] and "RAYDET_WORK_ROOT" in lines[0]


# ----------------------------------------------------------------------------------------------- finding runs
def _checkpoint(run_dir: Path, attempt: str, epoch: int, mtime: float, body: bytes | None = None) -> Path:
    from raydet.engine.checkpoint import save_checkpoint

    folder = run_dir / "ray" / attempt / f"checkpoint_{epoch:06d}"
    path = save_checkpoint({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch, "iter": 4 * epoch},
                           folder / "checkpoint.pt")
    if body is not None:
        path.write_bytes(body)
    (folder / "checkpoint.json").write_text(json.dumps({"epoch": epoch, "iter": 4 * epoch, "metrics": {}}))
    os.utime(path, (mtime, mtime))
    return path


def test_resume_finds_the_latest_loadable_checkpoint_across_runs_and_attempts(tmp_path):
    from raydet.train import prepare_run

    work_dir = tmp_path / "work"
    now = time.time()
    _checkpoint(work_dir / "20261101_100000", "a1", 1, now - 50)
    _checkpoint(work_dir / "20261101_100000", "a2", 3, now - 30)   # the same run, resumed by a second command
    _checkpoint(work_dir / "20261102_090000", "b1", 1, now - 40)   # a later-started run, older checkpoint
    latest = latest_checkpoint(work_dir)
    assert (latest.epoch, latest.iter, latest.run_dir) == (3, 12, str(work_dir / "20261101_100000"))
    assert [c.epoch for c in find_checkpoints(work_dir)] == [1, 1, 3]
    # a newer checkpoint cut short (e.g. killed while copied) is skipped: the previous one is continued
    _checkpoint(work_dir / "20261102_090000", "b1", 2, now - 10, body=b"PK\x03\x04 cut")
    assert latest_checkpoint(work_dir).epoch == 3

    plan = prepare_run(str(work_dir), resume=True)
    assert plan.run_dir == str(work_dir / "20261101_100000") and plan.resume_from == latest.path
    assert plan.note == f"resuming run {plan.run_dir} from checkpoint {latest.path} (epoch 3, iteration 12)"
    # --resume PATH: that checkpoint, in its own run folder
    given = str(work_dir / "20261102_090000" / "ray" / "b1" / "checkpoint_000001")
    plan = prepare_run(str(work_dir), resume=given)
    assert plan.run_dir == str(work_dir / "20261102_090000") and plan.resume_from == given + "/checkpoint.pt"
    # a checkpoint file outside any run folder starts a new run folder
    loose = _checkpoint(tmp_path / "elsewhere", "x", 5, now)
    loose = loose.rename(tmp_path / "model.pt")
    plan = prepare_run(str(work_dir), resume=str(loose))
    assert plan.resume_from == str(loose) and Path(plan.run_dir).parent == work_dir
    assert not any(Path(plan.run_dir).iterdir())
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        prepare_run(str(work_dir), resume=str(tmp_path / "missing.pt"))


def test_resume_with_nothing_to_resume_says_so_and_starts_a_new_run(tmp_path):
    from raydet.train import prepare_run

    plan = prepare_run(str(tmp_path / "empty"), resume=True)
    assert plan.resume_from is None and Path(plan.run_dir).parent == tmp_path / "empty"
    assert plan.note == f"--resume: no checkpoint found in {tmp_path / 'empty'}; starting a new run in {plan.run_dir}"
    fresh = prepare_run(str(tmp_path / "empty"))
    assert fresh.run_dir != plan.run_dir and fresh.note == f"new run in {fresh.run_dir}"
