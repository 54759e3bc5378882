"""Ray start-up, the console, and the cluster checks every command makes before it asks Ray for workers.

:func:`init_ray` joins the cluster in ``RAY_ADDRESS`` (``ray job submit``) or starts a local one;
:func:`check_cluster_resources` fails clearly, instead of waiting forever, on a pipeline the cluster cannot place;
:func:`scaling_config` and :func:`torch_config` turn the ``scaling:`` section into Ray Train's configs.

The console reads like an MMDetection log: raydet's iteration lines, evaluation tables and summary, Ray's start-up
warnings and its core failures (a dead node or worker, an out-of-memory kill). Ray's library logs go to their files
in Ray's session folder (``<session>/logs``, printed when Ray starts), each through Ray's own setting:

* Ray Train (``Checkpoint successfully created`` every epoch, worker-group start-up, the failure policy's
  decisions, and the tracebacks of failed workers): ``RunConfig(logging_config=LoggingConfig(log_level=
  "CRITICAL"))`` (:func:`train_run_config_kwargs`); its records stay in ``logs/train/ray-train-sys-*.log``. raydet
  announces a worker-group restart itself (:class:`raydet.commands.restart_notice.RestartNotice`), and a failure
  in the command's one ``error:`` line (:func:`raydet.errors.report_failure`).
* Ray Data (``Dataset ... execution finished`` every pass, ``Progress bars disabled``, user-code exception
  notices): ``RAY_DATA_LOGGING_CONFIG`` = ``ray_data_logging.yaml`` beside this module (the ``ray.data`` logger
  writes only to ``logs/ray-data/ray-data.log``), set in every process that runs a Ray Data executor (the drivers
  and the Ray Train workers) unless the user set it.
* Ray Tune (a failed trial's traceback, status tables): ``TUNE_PRINT_ALL_TRIAL_ERRORS=0`` (the traceback stays in
  the trial's ``error.txt``) and ``RunConfig(verbose=0)`` in :mod:`raydet.tune`, which prints its own progress bar,
  one line per failed trial and the study's table.
* Two kinds of line no level setting reaches, skipped by the driver with Ray's ``RAY_DEDUP_LOGS_SKIP_REGEX`` (added
  to the user's own, if any; the worker's ``.out`` / ``.err`` files in the session folder keep them):
  the C++ core worker's ``core_worker.cc`` error lines (e.g. ``... has constructor arguments in the object store
  and max_restarts > 0``), which every actor writes to its stderr besides its ``python-core-worker-*.log`` (only
  ``RAY_BACKEND_LOG_LEVEL`` would silence them, and in the files too), and Ray Train's ``Reporting training result
  N: TrainingReport(...)`` line, whose logger is named after its file instead of ``ray.train.*``, so
  ``LoggingConfig`` misses it (Ray 2.60).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from raydet.commands.sections import Sections
from raydet.registry import ConfigError

__all__ = ["setup_logging", "configure_ray_console", "init_ray", "release_ray", "check_cluster_resources",
           "scaling_config", "torch_config", "train_run_config_kwargs", "RAY_DATA_LOGGING_CONFIG", "CONSOLE_SKIP"]

log = logging.getLogger("raydet")

RAY_DATA_LOGGING_CONFIG = Path(__file__).resolve().with_name("ray_data_logging.yaml")
# worker output lines the driver does not print (RAY_DEDUP_LOGS_SKIP_REGEX): a C++ error or warning line of a worker's
# core worker ("[2026-11-29 23:50:03,129 E 29428 29472] core_worker.cc:2465: ..."; a fatal one still shows) and
# Ray Train's line for every report ("Reporting training result 1: TrainingReport(checkpoint=..., metrics={...})")
CONSOLE_SKIP = (r"^\[[0-9-]+ [0-9:,.]+ [EW] \d+ \d+\] core_worker\.cc:\d+:"
                r"|^Reporting training result \d+: TrainingReport\(")
RAY_TRAIN_CONSOLE_LEVEL = "CRITICAL"  # Ray Train's records go to its log files only (see the module docstring)
_CONNECTED = False  # init_ray connected this process to Ray (not a caller, e.g. a test session)


def configure_ray_console() -> None:
    """Route Ray's library logs off the console (see the module docstring): ``RAY_DEDUP_LOGS_SKIP_REGEX`` for the
    driver (read when ``ray`` is first imported, so call this before) and ``RAY_DATA_LOGGING_CONFIG`` for this
    process's Ray Data (applied at once when ``ray.data`` is already imported, as in a Ray Train worker).
    Settings the user made are kept. Idempotent."""
    skip = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    if not skip:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = CONSOLE_SKIP
    elif CONSOLE_SKIP not in skip:
        os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"(?:{skip})|{CONSOLE_SKIP}"
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # a trial's traceback: its error.txt (raydet tune)
    if os.environ.get("RAY_DATA_LOGGING_CONFIG") is None:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING_CONFIG)
        if "ray.data" in sys.modules:  # it read the environment at its import: read it again
            try:
                from ray.data._internal.logging import configure_logging
            except ImportError:  # another Ray version: Ray Data keeps its console output
                return
            configure_logging()


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning raydet's code raises (a skipped record, an image left out) as one ``warning: <message>`` line;
    anyone else's in Python's usual form (file, line, source line)."""
    from raydet.errors import package_path

    if issubclass(category, UserWarning) and package_path(filename) is not None:
        return f"warning: {message}\n"
    return _PYTHON_FORMATWARNING(message, category, filename, lineno, line)


_PYTHON_FORMATWARNING = warnings.formatwarning


def setup_logging():
    """raydet's log lines (``INFO``) on stdout, its warnings as one ``warning: ...`` line each, and Ray's library
    logs off the console (:func:`configure_ray_console`). Called first by every command and in every Ray Train
    worker."""
    configure_ray_console()
    warnings.formatwarning = _format_warning
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=False)
    logging.getLogger("raydet").setLevel(logging.INFO)


def init_ray():
    """Connect to the cluster in RAY_ADDRESS (``ray job submit``) or a running local one; else start one. Says which,
    with the cluster's CPUs and GPUs and where Ray's own logs are."""
    global _CONNECTED
    configure_ray_console()
    import ray

    if ray.is_initialized():
        return
    ray.init(logging_level=logging.WARNING, log_to_driver=True)
    _CONNECTED = True
    resources = ray.cluster_resources()
    logs = _ray_log_dir()
    log.info("raydet: Ray %s at %s: %g CPUs, %g GPUs%s", ray.__version__, ray.get_runtime_context().gcs_address,
             resources.get("CPU", 0), resources.get("GPU", 0), f"; Ray's own logs in {logs}" if logs else "")


def release_ray() -> None:
    """Disconnect from Ray (stopping the local instance :func:`init_ray` started) when :func:`init_ray` connected
    this process, so that no more worker output reaches the console: a failed command's ``error:`` line stays its
    last. Ray that a caller started is left alone."""
    global _CONNECTED
    if _CONNECTED:
        import ray

        _CONNECTED = False
        ray.shutdown()


def _ray_log_dir() -> str | None:
    """This node's folder of Ray's log files (``<session>/logs``), or None when Ray does not say."""
    try:
        from ray._private.worker import _global_node
        return _global_node.get_logs_dir_path() if _global_node is not None else None
    except (ImportError, AttributeError):
        return None


def train_run_config_kwargs() -> dict:
    """``RunConfig`` keyword arguments that keep Ray Train's console output to ``CRITICAL`` (its records go to
    ``<session>/logs/train/``); none with a Ray Train that has no ``LoggingConfig``."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(log_level=RAY_TRAIN_CONSOLE_LEVEL)}


def check_cluster_resources(sections: Sections) -> None:
    """Fail clearly, instead of waiting forever, when no node has a custom resource the pipeline places workers or
    actors with, or when the training workers leave no CPU for the decode actors.

    Ray Train workers hold their CPUs for the whole run; each worker's Ray Data stream needs at least
    ``data_actors[0]`` actors of ``data_cpus_per_actor`` CPUs on top. On a cluster we connected to (RAY_ADDRESS,
    e.g. under ``ray job submit``), which may autoscale, this is only a warning.
    """
    import ray

    sc = sections.scaling
    total_resources = ray.cluster_resources()
    for key, wanted in (("scaling.resources_per_worker", sc.resources_per_worker),
                        ("scaling.data_resources", sc.data_resources)):
        missing = sorted(set(wanted or {}) - set(total_resources))
        if missing:
            custom = sorted(k for k in total_resources if k not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not k.startswith("node:"))
            message = (f"{key}: no node of the cluster has the resource(s) {missing} (custom resources here: "
                       f"{custom or 'none'}); the Ray Train workers or decode actors would wait forever. Declare "
                       f"them on the node types (see clusters/) or remove them from the pipeline.")
            if os.environ.get("RAY_ADDRESS"):  # a cluster we joined may autoscale such nodes in
                log.warning(message)
            else:
                raise ConfigError(message)
    if sc.data_resources:  # actors go to other (CPU-only) nodes
        return
    n = sc.min_workers  # an elastic run starts with what fits, from min_workers
    workers = n * sc.cpus_per_worker
    actors = n * sc.data_actors[0] * sc.data_cpus_per_actor
    total = total_resources.get("CPU", 0.0)
    if workers + actors <= total + 1e-9:
        return
    message = (f"scaling: {n} workers x {sc.cpus_per_worker} CPU + {n} x "
               f"{sc.data_actors[0]} decode actors x {sc.data_cpus_per_actor} CPU = {workers + actors:g} CPUs, but the "
               f"cluster has {total:g}; the data pipeline would wait forever. Lower scaling.cpus_per_worker or "
               f"scaling.data_cpus_per_actor, or use fewer workers.")
    if os.environ.get("RAY_ADDRESS"):
        log.warning(message)
    else:
        raise ConfigError(message)


def scaling_config(sections: Sections):
    """Ray Train's ScalingConfig from the pipeline's ``scaling:`` section: ``num_workers: [min, max]`` is Ray
    Train's elastic ``num_workers=(min, max)``, with ``elastic_resize_monitor_interval_s``."""
    from ray.train import ScalingConfig

    sc = sections.scaling
    resources = {"CPU": sc.cpus_per_worker, **(sc.resources_per_worker or {})}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    if sc.elastic:
        return ScalingConfig(num_workers=(sc.min_workers, sc.max_workers), use_gpu=sc.use_gpu,
                             resources_per_worker=resources,
                             elastic_resize_monitor_interval_s=sc.elastic_resize_monitor_interval_s)
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources)


def torch_config(sections: Sections):
    """Ray Train's TorchConfig: the DDP process-group backend, NCCL between GPU workers, gloo between CPU ones."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if sections.scaling.use_gpu else "gloo")
