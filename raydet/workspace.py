"""Where a run's outputs go, and how ``--resume`` finds a run again.

A command's outputs (logs, curves, TensorBoard files, checkpoints, results) live in a **work dir**, by default
``<work_dir>/<pipeline name>`` (``work_dir:`` in the pipeline, ``work_dirs/`` unless set). Inside it each training run
has its own **run folder**, named by its start time::

    <work dir>/
      20261129_204512/              one run (a resumed run continues in the folder of the checkpoint it loads)
        pipeline.yaml               the resolved pipeline
        log.jsonl  curves.png  tb/  the log (appended across resumes), its curves, TensorBoard
        ray/<attempt>/checkpoint_*/ Ray Train's checkpoints, one attempt folder per command that ran the run:
          checkpoint.pt             the state (model, optimizer, scaler, epoch, iteration, RNG)
          checkpoint.json           {"epoch", "iter", "evaluated", metrics}: what the checkpoint is, read without
                                    loading it

**Relative work dirs and Ray jobs.** ``ray job submit --working-dir .`` runs the command inside a copy of the
working dir that Ray unpacks under its session folder (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``)
and deletes with the session; a relative path there would put the trained model in a folder that disappears, and a
changed working dir (a new hash) would hide the previous run from ``--resume``. So a relative work dir is resolved
against, in order: ``runtime.work_root`` in the pipeline, the ``RAYDET_WORK_ROOT`` environment variable, and, only
when the current directory is such a Ray-owned folder, ``~/raydet_runs`` (on the node that runs the job's driver);
otherwise against the current directory. A work dir that still lands in a Ray-owned folder is an error.

**Several nodes.** Ray Train's workers on every node write checkpoints into the work dir and read them back after a
restart, so on a cluster of more than one node the work dir must be storage that every node mounts (NFS, EFS,
Filestore, Lustre, a FUSE-mounted bucket ...). A node-local file system (ext4, xfs, overlay, tmpfs ...) is an error
naming the key to set; ``runtime.shared_storage: true`` declares a path shared that raydet does not recognise.

**Object storage.** ``raydet train``, ``test`` and ``infer`` also take a URI (``s3://bucket/runs``, ``gs://...``) as
the work dir, ``--work-dir`` / ``--out``, ``runtime.work_root`` or ``RAYDET_WORK_ROOT`` (a relative work dir under a
URI root becomes a URI): every node reaches it. Ray Train writes the checkpoints there itself
(``RunConfig(storage_path=<run folder>/ray)``); raydet's own files (``pipeline.yaml``, ``log.jsonl``, ``tb/``,
``curves.png``, an ``error-*.txt``) are written into a scratch folder on the node that writes them and copied to the
run folder (:class:`raydet.fileio.MirroredFolder`; when, see :class:`raydet.engine.hooks.WorkDirSyncHook`).
``--resume`` finds the checkpoints by listing the URI. Other commands (``raydet tune``, ``benchmark``) refuse a URI.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from raydet import fileio
from raydet.registry import ConfigError

__all__ = ["WORK_ROOT_ENV", "DEFAULT_WORK_ROOT", "SHARED_FILESYSTEMS", "CHECKPOINT_INFO_FILE", "ray_owned_folder",
           "resolve_work_dir", "mount_of", "check_shared_storage", "cluster_node_count", "new_run_dir",
           "new_attempt_name", "CheckpointRecord", "find_checkpoints", "latest_checkpoint", "checkpoint_record",
           "schedule_differences", "SCHEDULE_KEYS"]

WORK_ROOT_ENV = "RAYDET_WORK_ROOT"
DEFAULT_WORK_ROOT = "~/raydet_runs"
CHECKPOINT_INFO_FILE = "checkpoint.json"

# File systems every node of a cluster can mount: network and cluster file systems, and FUSE mounts of buckets.
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "cephfs", "glusterfs", "beegfs", "orangefs",
    "ocfs2", "gfs2", "panfs", "wekafs", "virtiofs", "efs",
})
SHARED_FUSE = ("fuse.s3fs", "fuse.gcsfuse", "fuse.goofys", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.glusterfs",
               "fuse.sshfs", "fuse.rclone", "fuse.blobfuse", "fuse.blobfuse2", "fuse.lustre", "fuse.weka",
               "fuse.alluxio", "fuse.cephfs", "fuse.ceph-fuse", "fuse.beegfs", "fuse.efs")

_SESSION = re.compile(r"session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+")


# --------------------------------------------------------------------------------------------------- work dirs
def ray_owned_folder(path: str | os.PathLike) -> str | None:
    """The folder Ray created, and deletes, that holds ``path``: a runtime-env package (``.../runtime_resources``,
    where ``ray job submit --working-dir`` unpacks the working dir, or a ``_ray_pkg_<hash>`` folder) or a Ray
    session folder (``<ray temp dir>/session_<date>_<pid>``); None when ``path`` is elsewhere."""
    parts = Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).parts
    for i, part in enumerate(parts):
        if part == "runtime_resources" or part.startswith("_ray_pkg_") or _SESSION.fullmatch(part):
            return str(Path(*parts[: i + 1]))
    return None


def _is_uri(path: str) -> bool:
    return fileio.is_uri(path)


def resolve_work_dir(work_dir: str | os.PathLike, *, work_root: str | None = None, key: str = "work_dir",
                     cwd: str | None = None, allow_uri: bool = False) -> str:
    """The absolute folder a command writes to (see the module docstring for the rule).

    Args:
        work_dir: the pipeline's work dir (or ``--work-dir`` / ``--out``), absolute or relative.
        work_root: ``runtime.work_root`` of the pipeline, if set.
        key: what to name in errors (``work_dir``, ``--out`` ...).
        cwd: the directory relative paths mean (default: the current one).
        allow_uri: the command writes to object storage too (``train``, ``test``, ``infer``): a URI work dir, or a
            relative one under a URI root, is returned as a URI (without a trailing ``/``).

    Raises:
        ConfigError: a URI where ``allow_uri`` is false, or a folder inside one Ray owns.
    """
    text = os.fspath(work_dir)
    if not allow_uri:
        for name, value in ((key, text), ("runtime.work_root", work_root or ""),
                            (WORK_ROOT_ENV, os.environ.get(WORK_ROOT_ENV, ""))):
            if value and _is_uri(value):
                raise ConfigError(f"{name}: {value}: a URI is not supported as a work dir yet by this command; use a "
                                  f"file-system path (on a cluster, a shared mount such as NFS, EFS or Filestore)")
    if _is_uri(text):
        return text.rstrip("/")
    cwd = os.path.abspath(cwd or os.getcwd())
    path = os.path.expanduser(text)
    if not os.path.isabs(path):
        root = work_root or os.environ.get(WORK_ROOT_ENV)
        if root and _is_uri(root):
            return fileio.join(root, text).rstrip("/")
        if root:
            base = os.path.join(cwd, os.path.expanduser(root))
        elif ray_owned_folder(cwd):
            base = os.path.expanduser(DEFAULT_WORK_ROOT)
        else:
            base = cwd
        path = os.path.join(base, path)
    path = os.path.normpath(os.path.abspath(path))
    owner = ray_owned_folder(path)
    if owner is not None:
        raise ConfigError(f"{key}: {path} is inside {owner}, a folder Ray creates for a job and deletes with it: "
                          f"the run's checkpoints and logs would be lost. Set runtime.work_root in the pipeline or "
                          f"the {WORK_ROOT_ENV} environment variable (or an absolute {key}) to a persistent folder")
    return path


# --------------------------------------------------------------------------------------------------- storage
def mount_of(path: str | os.PathLike, mounts_file: str = "/proc/mounts") -> tuple[str, str]:
    """``(mount point, file-system type)`` of the mount holding ``path`` (or its nearest existing parent), read from
    ``/proc/mounts``; ``("", "unknown")`` where that file does not exist (not Linux)."""
    p = os.path.realpath(os.path.abspath(os.fspath(path)))
    try:
        with open(mounts_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return "", "unknown"
    best = ("", "unknown")
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # \040 is a space
        inside = p == point or p.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def _is_shared(fstype: str) -> bool:
    return fstype in SHARED_FILESYSTEMS or fstype in SHARED_FUSE


def cluster_node_count() -> int:
    """Alive nodes of the Ray cluster this process is connected to (Ray must be initialised)."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_shared_storage(path: str, key: str, num_nodes: int, declared_shared: bool = False,
                         mounts_file: str = "/proc/mounts") -> None:
    """On a cluster of more than one node, refuse a ``path`` on a node-local file system.

    Raises:
        ConfigError: naming ``key``, the path, its file system and what to set instead.
    """
    if num_nodes <= 1 or declared_shared or _is_uri(path):  # object storage: every node reaches it
        return
    point, fstype = mount_of(path, mounts_file)
    if _is_shared(fstype):
        return
    raise ConfigError(
        f"{key}: {path} is on a node-local file system ({fstype} at {point or '?'}), but the Ray cluster has "
        f"{num_nodes} nodes: workers on the other nodes could neither write checkpoints there nor read them back "
        f"after a restart. Set {key} (or runtime.work_root, or {WORK_ROOT_ENV}) to storage that every node mounts "
        f"(NFS, EFS, Filestore, ...; the cluster files in clusters/ mount one at /mnt/shared), or set "
        f"runtime.shared_storage: true if this path is shared in a way raydet does not recognise")


# --------------------------------------------------------------------------------------------------- runs
def new_run_dir(work_dir: str) -> str:
    """A new, empty run folder ``<work_dir>/<YYYYmmdd_HHMMSS>`` (a suffix keeps two runs of one second apart). In
    object storage, where a folder is only a prefix, a name that no object starts with (the bucket must exist)."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if _is_uri(work_dir):
        work_dir = work_dir.rstrip("/")
        taken = {e.path[len(work_dir) + 1:].split("/", 1)[0] for e in fileio.list_files(work_dir)}
        for k in range(1000):
            name = stamp if k == 0 else f"{stamp}_{k}"
            if name not in taken:
                return fileio.join(work_dir, name)
        raise RuntimeError(f"cannot choose a run folder in {work_dir}")
    os.makedirs(work_dir, exist_ok=True)
    for k in range(1000):
        path = os.path.join(work_dir, stamp if k == 0 else f"{stamp}_{k}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run folder in {work_dir}")


def new_attempt_name() -> str:
    """The Ray Train run name of one command's part of a run (unique: Ray resumes a name it has seen)."""
    return f"{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"


@dataclass
class CheckpointRecord:
    """A checkpoint found on disk: ``path`` (the ``checkpoint.pt`` file), ``run_dir`` (its run folder; None for a
    checkpoint outside a run folder),
    ``epoch`` / ``iter`` (training done when it was written; None if its ``checkpoint.json`` is missing), and
    ``mtime`` (seconds since the epoch)."""

    path: str
    run_dir: str | None
    epoch: int | None
    iter: int | None
    mtime: float


def checkpoint_record(path: str | os.PathLike) -> CheckpointRecord:
    """What a checkpoint file (or a Ray checkpoint folder holding ``checkpoint.pt``) is, without loading it; a URI
    too."""
    from raydet.engine.checkpoint import resolve_checkpoint

    if _is_uri(os.fspath(path)):
        file = str(resolve_checkpoint(path))
        return _uri_checkpoint_record(file, fileio.stat(file).mtime)
    file = resolve_checkpoint(path)
    info = {}
    try:
        with open(file.parent / CHECKPOINT_INFO_FILE, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        pass
    # <run>/ray/<attempt>/checkpoint_*/checkpoint.pt: the run folder is three levels up
    parents = file.parents
    run_dir = str(parents[3]) if len(parents) > 3 and parents[2].name == "ray" else None
    return CheckpointRecord(str(file), run_dir, info.get("epoch"), info.get("iter"), file.stat().st_mtime)


def _uri_checkpoint_record(file: str, mtime: float) -> CheckpointRecord:
    """:func:`checkpoint_record` of a ``checkpoint.pt`` URI (its ``checkpoint.json`` fetched)."""
    info = {}
    try:
        info = json.loads(fileio.read_text(fileio.join(fileio.dirname(file), CHECKPOINT_INFO_FILE)))
    except (OSError, ValueError):
        pass
    ray_dir = fileio.dirname(fileio.dirname(fileio.dirname(file)))  # <run>/ray/<attempt>/checkpoint_*/checkpoint.pt
    run_dir = fileio.dirname(ray_dir) if fileio.basename(ray_dir) == "ray" else None
    return CheckpointRecord(file, run_dir, info.get("epoch"), info.get("iter"), mtime)


_URI_CHECKPOINT = re.compile(r"^(?:[^/]+/)?ray/[^/]+/checkpoint_[^/]+/checkpoint\.pt$")


def _find_uri_checkpoints(folder: str) -> list[CheckpointRecord]:
    """:func:`find_checkpoints` in object storage: one listing of the folder. A checkpoint folder without its
    ``checkpoint.json`` (an upload cut short: Ray copies the files one by one) is left out with a warning."""
    import logging

    folder = folder.rstrip("/")
    entries = fileio.list_files(folder)
    names = {e.path for e in entries}
    records = []
    for e in entries:
        if not _URI_CHECKPOINT.match(e.path[len(folder) + 1:]):
            continue
        if fileio.join(fileio.dirname(e.path), CHECKPOINT_INFO_FILE) not in names:
            logging.getLogger("raydet").warning("skipping an incomplete checkpoint (no %s beside it): %s",
                                                CHECKPOINT_INFO_FILE, e.path)
            continue
        records.append(_uri_checkpoint_record(e.path, e.mtime))
    return sorted(records, key=lambda r: (r.mtime, r.path))


def find_checkpoints(folder: str | os.PathLike) -> list[CheckpointRecord]:
    """Every checkpoint of the runs in ``folder`` (a work dir, or one run folder; a URI too), oldest first."""
    if _is_uri(os.fspath(folder)):
        return _find_uri_checkpoints(os.fspath(folder))
    root = Path(folder)
    files = {str(p) for pattern in ("ray/*/checkpoint_*/checkpoint.pt", "*/ray/*/checkpoint_*/checkpoint.pt")
             for p in root.glob(pattern)}
    records = []
    for f in files:
        try:
            records.append(checkpoint_record(f))
        except (OSError, FileNotFoundError):  # deleted by Ray's retention while we looked
            continue
    return sorted(records, key=lambda r: (r.mtime, r.path))


def latest_checkpoint(folder: str | os.PathLike) -> CheckpointRecord | None:
    """The most recently written checkpoint in ``folder`` that loads (an unreadable one, e.g. cut by a crash while
    it was copied, is skipped with a warning), or None. In object storage, where an object is written whole or not
    at all, the latest complete one (see :func:`_find_uri_checkpoints`), without downloading it."""
    import logging

    from raydet.engine.checkpoint import CheckpointError, load_checkpoint

    if _is_uri(os.fspath(folder)):
        found = find_checkpoints(folder)
        return found[-1] if found else None
    for record in reversed(find_checkpoints(folder)):
        try:
            load_checkpoint(record.path, mmap=True)
        except CheckpointError as exc:
            logging.getLogger("raydet").warning("skipping an unreadable checkpoint: %s", exc)
            continue
        return record
    return None


# --------------------------------------------------------------------------------------------------- resume
# Pipeline keys whose change makes a resumed run a different run: the model, the optimisation schedule, and what
# sets the batch, the LR scaling and the data order.
SCHEDULE_KEYS = ("model", "optimizer", "lr_schedule", "train.max_epochs", "train.amp", "seed",
                 "data.images_per_worker", "scaling.num_workers", "scaling.on_resize", "num_classes")


def schedule_differences(old: dict, new: dict) -> list[str]:
    """The :data:`SCHEDULE_KEYS` paths (down to the changed leaves) where two resolved pipelines differ."""
    from raydet.config import differences, get_by_path

    missing = object()
    out = []
    for key in SCHEDULE_KEYS:
        a, b = get_by_path(old, key, missing), get_by_path(new, key, missing)
        if a is missing and b is missing:
            continue
        if a is missing or b is missing:
            out.append(key)
            continue
        out.extend(differences(a, b, key))
    return out
