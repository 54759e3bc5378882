"""``python -m raydet.train [PIPELINE] [--set k=v ...] [--resume [CHECKPOINT]] [--work-dir DIR]``: train on Ray.

The driver loads and checks the pipeline, reads the datasets (so bad annotations fail before any worker starts),
connects to a Ray cluster (or starts a local one) and runs a Ray Train ``TorchTrainer``. Each worker builds the
model, wraps it in DDP (NCCL on GPU, gloo on CPU), streams its shard of the images through a Ray Data actor pool
(decode + augment) and runs the hook-driven ``Runner``. With no pipeline, a small quickstart on a generated
dataset runs.

Outputs go to a run folder in the work dir (see :mod:`raydet.workspace`: where a relative work dir resolves under
``ray job submit``, and the layout). ``--resume`` continues the latest checkpoint of the pipeline's runs in the work
dir, in that checkpoint's run folder; ``--resume PATH`` continues from a given checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import raydet.data  # noqa: F401  (registers the dataset and transform types)
import raydet.models  # noqa: F401  (registers the model components)
from raydet.config import Config, load_config
from raydet.engine.checkpoint import load_checkpoint
from raydet.engine.hooks import (CHECKPOINT_SCORE, CheckpointHook, EpochGateHook, EvalHook, LoggerHook, LrSchedulerHook,
                                 OptimizerHook, ProgressBarHook)
from raydet.engine.optim import build_optimizer, parse_lr_schedule, parse_optimizer, scaled_lr
from raydet.engine.runner import Runner
from raydet.errors import find_user_error, wrapped_errors
from raydet.evaluation.evaluator import DatasetEvaluator
from raydet.evaluation.metric_names import TRAIN_METRIC, metric_problem
from raydet.registry import ConfigError, build, build_context, build_dataclass
from raydet.workspace import (CHECKPOINT_INFO_FILE, check_shared_storage, checkpoint_record, cluster_node_count,
                              latest_checkpoint, new_attempt_name, new_run_dir, resolve_work_dir,
                              schedule_differences)

__all__ = ["main", "build_runner", "TrainSettings", "QUICKSTART", "parse_sections", "train_loop_per_worker", "fit",
           "prepare_run", "RunPlan", "work_dir_of"]

log = logging.getLogger("raydet")

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------------- settings
@dataclass
class TrainSettings:
    """``train:`` section."""

    max_epochs: int = 12
    amp: str | None = None               # null, fp16 or bf16
    sync_bn: bool = False                # convert BatchNorm to SyncBatchNorm when training on several workers
    nonfinite_loss: str = "stop"         # stop (error naming the iteration and loss term) or skip the step
    max_iters_per_epoch: int | None = None  # cap for quick runs and benchmarks


@dataclass
class EvaluationSettings:
    """``evaluation:`` section."""

    interval: int = 1
    metric: list[str] = field(default_factory=lambda: ["bbox"])
    proposal_nums: list[int] = field(default_factory=lambda: [100, 300, 1000])


@dataclass
class ScalingSettings:
    """``scaling:`` section: Ray Train workers and the Ray Data augmentation actors."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict | None = None   # extra custom resources, e.g. {gpu_node: 1}
    data_actors: list[int] = field(default_factory=lambda: [1, 2])   # [min, max] actors per worker's stream
    data_cpus_per_actor: float = 0.5
    data_resources: dict | None = None         # e.g. {cpu_node: 0.1} to keep decoding on CPU-only nodes
    data_batch_size: int = 8                   # images per actor call
    max_failures: int = 0                      # worker-group restarts from the last checkpoint


@dataclass
class CheckpointSettings:
    """``checkpoint:`` section."""

    interval: int = 1
    num_to_keep: int | None = 3          # Ray keeps this many, and always the latest (resume needs it)
    score_attribute: str | None = None   # e.g. bbox/AP: the kept ones are the best evaluated ones by it
    score_order: str = "max"


@dataclass
class RuntimeSettings:
    """``runtime:`` section."""

    log_interval: int = 50
    tensorboard: bool = True
    progress: bool | str = "auto"        # progress bars with ETA on rank 0: true, false, or auto (when the
                                         # command's stderr is a terminal; not in log files or ray job logs)
    imports: list[str] = field(default_factory=list)   # modules registering user hooks / components
    work_root: str | None = None         # where a relative work_dir resolves (else $RAYDET_WORK_ROOT; under a Ray
                                         # job ~/raydet_runs; else the current directory): see raydet.workspace
    shared_storage: bool = False         # declare the work dir shared by all nodes (a mount raydet does not know)


@dataclass
class DataSettings:
    """``data:`` section; ``train`` / ``val`` / ``test`` are dataset configs built by the registry."""

    train: dict
    val: dict | None = None
    test: dict | None = None
    num_classes: int | None = None
    images_per_worker: int = 2


@dataclass
class Sections:
    train: TrainSettings
    evaluation: EvaluationSettings
    scaling: ScalingSettings
    checkpoint: CheckpointSettings
    runtime: RuntimeSettings
    data: DataSettings
    seed: int
    work_dir: str


def parse_sections(cfg: Config) -> Sections:
    """Typed, checked views of the pipeline's non-model sections (unknown keys are errors naming the file)."""
    with build_context(file=cfg.path, origins=cfg.origins):
        def typed(cls, key):
            return build_dataclass(cls, dict(cfg.get(key) or {}), key)

        if not cfg.get("data"):
            raise ConfigError(f"{cfg.path}: data: the pipeline has no data section")
        sections = Sections(
            train=typed(TrainSettings, "train"), evaluation=typed(EvaluationSettings, "evaluation"),
            scaling=typed(ScalingSettings, "scaling"), checkpoint=typed(CheckpointSettings, "checkpoint"),
            runtime=typed(RuntimeSettings, "runtime"), data=typed(DataSettings, "data"),
            seed=int(cfg.get("seed", 0)), work_dir=str(cfg.get("work_dir", "work_dirs/")))
        for key, value, allowed in (("train.amp", sections.train.amp, (None, "fp16", "bf16")),
                                    ("runtime.progress", sections.runtime.progress, (True, False, "auto")),
                                    ("train.nonfinite_loss", sections.train.nonfinite_loss, ("stop", "skip")),
                                    ("checkpoint.score_order", sections.checkpoint.score_order, ("max", "min"))):
            if value not in allowed:
                raise ConfigError(f"{cfg.origins.get(key, cfg.path)}: {key}: expected one of "
                                  f"{', '.join(map(str, allowed))}, got {value!r}")
        score, key = sections.checkpoint.score_attribute, "checkpoint.score_attribute"
        if score and sections.data.val is None and not TRAIN_METRIC.fullmatch(score):
            # e.g. `--set data.val=null` on a pipeline that ranks by bbox/AP: nothing is evaluated, so nothing
            # to rank by; the latest num_to_keep checkpoints are kept
            log.warning("%s: %s: %s is not evaluated (no data.val): checkpoints are kept by recency", cfg.path, key,
                        score)
            sections.checkpoint.score_attribute = None
        problem = metric_problem(score, sections) if sections.checkpoint.score_attribute else None
        if problem:
            raise ConfigError(f"{cfg.origins.get(key, cfg.path)}: {key}: {problem}")
    for module in sections.runtime.imports:
        importlib.import_module(module)
    return sections


def build_datasets(cfg: Config, sections: Sections, splits=("train", "val")) -> dict:
    """Build (read and validate) the datasets of the given splits."""
    out = {}
    for split in splits:
        spec = getattr(sections.data, split)
        if spec is not None:
            spec = dict(spec)
            if sections.data.num_classes is not None:
                spec.setdefault("num_classes", sections.data.num_classes)
            with build_context(file=cfg.path, origins=cfg.origins):
                out[split] = build(spec, f"data.{split}")
    return out


# --------------------------------------------------------------------------------------------------- the runner
def shard_records(records: list, rank: int, world_size: int, seed: int | None, epoch: int, pad: bool) -> list:
    """This rank's share of the records; shuffled by (seed, epoch) when seed is given; padded (by repeating) so
    every rank gets the same count when ``pad`` (training: every rank must run the same number of iterations)."""
    order = np.arange(len(records))
    if seed is not None:
        order = np.random.default_rng([seed, epoch]).permutation(len(records))
    if pad and world_size > 1:
        total = math.ceil(len(order) / world_size) * world_size
        order = np.concatenate([order, order[: total - len(order)]])
    return [records[i] for i in order[rank::world_size]]


def with_records(dataset, records: list):
    """A shallow copy of ``dataset`` holding only ``records``."""
    shard = copy.copy(dataset)
    shard.records = records
    return shard


def build_runner(cfg: Config, datasets: dict, *, device, rank: int = 0, world_size: int = 1, train_loader=None,
                 val_loader=None, report=None, work_dir: str | None = None, wrap_model=None, sections=None,
                 extra_hooks=()) -> Runner:
    """Model, optimizer, hooks and Runner from a pipeline (plain PyTorch; no Ray needed).

    ``train_loader(epoch)`` / ``val_loader()`` yield batches of this worker; ``wrap_model`` wraps the model for
    distributed training (e.g. ``ray.train.torch.prepare_model``).
    """
    sections = sections or parse_sections(cfg)
    torch.manual_seed(sections.seed)  # identical initial weights on every rank
    model = cfg.build("model")
    if sections.train.sync_bn and world_size > 1:
        if torch.device(device).type == "cpu":  # torch's SyncBatchNorm runs on accelerators only
            log.warning("train.sync_bn: SyncBatchNorm needs GPUs; the CPU workers keep per-worker BatchNorm")
        else:
            from raydet.models.norm import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
    model = wrap_model(model) if wrap_model is not None else model.to(device)
    torch.manual_seed(sections.seed + rank)  # different sampling on every rank

    with build_context(file=cfg.path, origins=cfg.origins):
        opt_cfg = parse_optimizer(cfg.get("optimizer"))
        schedule = parse_lr_schedule(cfg.get("lr_schedule"))
    total_batch = sections.data.images_per_worker * world_size
    lr = scaled_lr(opt_cfg, total_batch)
    optimizer = build_optimizer(model, opt_cfg, lr)

    hooks = [LrSchedulerHook(lr, schedule),
             OptimizerHook(opt_cfg.grad_clip, fp16_scaler=sections.train.amp == "fp16",
                           nonfinite=sections.train.nonfinite_loss, device=torch.device(device).type),
             CheckpointHook(sections.checkpoint.interval, sections.checkpoint.score_attribute,
                            sections.checkpoint.score_order),
             LoggerHook(sections.runtime.log_interval, sections.runtime.tensorboard)]
    if sections.runtime.progress is True:  # fit() / evaluate() resolve "auto" on the driver
        hooks.append(ProgressBarHook())
    if "val" in datasets:
        evaluator = DatasetEvaluator(datasets["val"], sections.evaluation.metric, sections.evaluation.proposal_nums)
        hooks.append(EvalHook(evaluator, sections.evaluation.interval))
    for i, spec in enumerate(cfg.get("hooks") or []):
        with build_context(file=cfg.path, origins=cfg.origins):
            hooks.append(build(spec, f"hooks[{i}]"))
    hooks.extend(extra_hooks)

    n_train = len(datasets["train"].records)
    per_rank = math.ceil(n_train / world_size)
    iters = max(per_rank // sections.data.images_per_worker, 1)
    if sections.train.max_iters_per_epoch:
        iters = min(iters, sections.train.max_iters_per_epoch)
    meta = {"pipeline": cfg.to_yaml(), "classes": list(datasets["train"].classes),
            "cat_ids": list(datasets["train"].cat_ids)}
    val_images = len(datasets["val"].records[rank::world_size]) if "val" in datasets else None
    return Runner(model, optimizer, train_loader=train_loader, val_loader=val_loader,
                  max_epochs=sections.train.max_epochs, hooks=hooks, device=device, amp=sections.train.amp,
                  report=report, work_dir=work_dir, iters_per_epoch=iters, meta=meta, val_images=val_images)


def take(iterable, n: int):
    """The first ``n`` items of ``iterable``; a generator is closed right after (so a Ray Data stream stops now,
    not when it is garbage-collected)."""
    try:
        for i, item in enumerate(iterable):
            if i >= n:
                return
            yield item
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------------------------------- Ray worker
def ray_stream(sections: Sections):
    """``(dataset, records, train, epoch) -> batches``: records -> Ray Data actor pool (decode + augment) ->
    aspect-ratio-grouped (training) or in-order (evaluation) batches."""
    from raydet.data.pipeline import build_transforms
    from raydet.data.ray_data import build_ray_dataset, iter_detection_batches

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the LoggerHook reports progress; bars only add blank lines to worker logs
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # a bad image reaches the command as our error, not UserCodeException
    sc, batch_size = sections.scaling, sections.data.images_per_worker
    actors = tuple(sc.data_actors) if len(sc.data_actors) > 1 else sc.data_actors[0]

    def stream(dataset, records, train: bool, epoch: int):
        ds = build_ray_dataset(with_records(dataset, records), train=train, seed=sections.seed, epoch=epoch,
                               num_actors=actors, num_cpus_per_actor=sc.data_cpus_per_actor,
                               actor_batch_size=sc.data_batch_size, resources=sc.data_resources)
        _, collate_cfg = build_transforms(dataset.pipeline)
        return iter_detection_batches(ds, batch_size, collate_cfg, with_masks=getattr(dataset, "with_masks", False),
                                      train=train)

    return stream


def ray_loaders(datasets: dict, sections: Sections, rank: int, world_size: int, iters_per_epoch: int):
    """This rank's per-epoch training stream (exactly ``iters_per_epoch`` batches) and evaluation stream."""
    stream = ray_stream(sections)
    train_loader = val_loader = None
    if "train" in datasets:
        train_ds = datasets["train"]

        def train_loader(epoch: int):
            records = shard_records(train_ds.records, rank, world_size, sections.seed, epoch, pad=True)
            return take(stream(train_ds, records, True, epoch), iters_per_epoch)

    if "val" in datasets:
        val_ds = datasets["val"]

        def val_loader():
            return stream(val_ds, shard_records(val_ds.records, rank, world_size, None, 0, pad=False), False, 0)

    return train_loader, val_loader


def worker_setup(config: dict):
    """Inside a Ray Train worker: (pipeline Config, its Sections, rank, world size, device)."""
    import ray.train
    import ray.train.torch

    _setup_logging()
    cfg = Config(config["pipeline"], config["path"], config["origins"])
    ctx = ray.train.get_context()
    return cfg, parse_sections(cfg), ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker entry point: config carries the resolved pipeline, an object ref to the datasets, the run
    folder, and the checkpoint to resume from (None for a new run)."""
    import json
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    cfg, sections, rank, world, device = worker_setup(config)
    datasets = ray.get(config["datasets"][0])

    def report(metrics: dict, state: dict | None):
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if state is None:
            ray.train.report(metrics)
            return
        from raydet.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint

        tmp = tempfile.mkdtemp(prefix="raydet-ckpt-")
        save_checkpoint(state, os.path.join(tmp, CHECKPOINT_FILE))
        with open(os.path.join(tmp, CHECKPOINT_INFO_FILE), "w") as f:  # what it is, readable without loading it
            json.dump({"epoch": metrics.get("epoch"), "iter": metrics.get("iter"), "metrics": metrics}, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    run_dir = config["run_dir"]
    gate = [EpochGateHook(config["gate_dir"])] if config.get("gate_dir") else []
    wrap = ray.train.torch.prepare_model if world > 1 or device.type == "cuda" else None
    runner = build_runner(cfg, datasets, device=device, rank=rank, world_size=world, report=report,
                          work_dir=run_dir if rank == 0 else None, wrap_model=wrap, sections=sections,
                          extra_hooks=gate)
    runner.train_loader, runner.val_loader = ray_loaders(datasets, sections, rank, world, runner.iters_per_epoch)
    # a restart of this command's worker group (scaling.max_failures) continues from Ray's latest checkpoint; the
    # command's first start from the checkpoint it was asked to resume
    checkpoint = ray.train.get_checkpoint()
    source = checkpoint.path if checkpoint is not None else config.get("resume_from")
    if source is not None:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = load_checkpoint(d, map_location=device)
        else:
            state = load_checkpoint(source, map_location=device)
        runner.load_state_dict(state, source=str(source))
        log.info("resumed from %s at epoch %d (iteration %d)", source, runner.epoch, runner.iter)
        if rank == 0:
            with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps({"mode": "resume", "epoch": runner.epoch, "iter": runner.iter,
                                    "checkpoint": str(source)}) + "\n")
    runner.run()
    return {"metrics": runner.metrics, "epoch": runner.epoch, "iter": runner.iter}


# --------------------------------------------------------------------------------------------------- driver
def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=False)
    logging.getLogger("raydet").setLevel(logging.INFO)


def init_ray():
    """Connect to the cluster in RAY_ADDRESS (``ray job submit``) or a running local one; else start one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(logging_level=logging.WARNING, log_to_driver=True)


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
    workers = sc.num_workers * sc.cpus_per_worker
    actors = sc.num_workers * sc.data_actors[0] * sc.data_cpus_per_actor
    total = total_resources.get("CPU", 0.0)
    if workers + actors <= total + 1e-9:
        return
    message = (f"scaling: {sc.num_workers} workers x {sc.cpus_per_worker} CPU + {sc.num_workers} x "
               f"{sc.data_actors[0]} decode actors x {sc.data_cpus_per_actor} CPU = {workers + actors:g} CPUs, but the "
               f"cluster has {total:g}; the data pipeline would wait forever. Lower scaling.cpus_per_worker or "
               f"scaling.data_cpus_per_actor, or use fewer workers.")
    if os.environ.get("RAY_ADDRESS"):
        log.warning(message)
    else:
        raise ConfigError(message)


def scaling_config(sections: Sections):
    """Ray Train's ScalingConfig from the pipeline's ``scaling:`` section."""
    from ray.train import ScalingConfig

    sc = sections.scaling
    resources = {"CPU": sc.cpus_per_worker, **(sc.resources_per_worker or {})}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources)


def resolve_progress(cfg: Config) -> Config:
    """``runtime.progress: auto`` -> true when this (driver) process's stderr is a terminal, else false: the
    workers, whose output Ray forwards, cannot tell."""
    if cfg.get("runtime.progress", "auto") == "auto":
        return cfg.with_overrides([f"runtime.progress={'true' if sys.stderr.isatty() else 'false'}"])
    return cfg


def torch_config(sections: Sections):
    """Ray Train's TorchConfig: the DDP process-group backend, NCCL between GPU workers, gloo between CPU ones."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if sections.scaling.use_gpu else "gloo")


def work_dir_of(cfg: Config, sections: Sections, work_dir: str | None = None, key: str = "--work-dir") -> str:
    """The command's work dir: ``work_dir`` (``--work-dir``) if given, else ``<pipeline work_dir>/<pipeline name>``,
    resolved by :func:`raydet.workspace.resolve_work_dir` (never inside a folder Ray deletes)."""
    if work_dir is None:
        work_dir, key = os.path.join(sections.work_dir, Path(cfg.path or "pipeline").stem), "work_dir"
    return resolve_work_dir(work_dir, work_root=sections.runtime.work_root, key=key)


@dataclass
class RunPlan:
    """Where a training command writes (``run_dir``) and what it continues from (``resume_from``, a checkpoint
    file, or None for a new run); ``note`` says which, for the console."""

    work_dir: str
    run_dir: str
    resume_from: str | None
    note: str


def prepare_run(work_dir: str, resume: bool | str = False) -> RunPlan:
    """The run folder and checkpoint for ``--resume`` (True: the latest checkpoint of the runs in ``work_dir``;
    a path: that checkpoint file or Ray checkpoint folder; False: none).

    A resumed run continues in the run folder its checkpoint belongs to (its log goes on); a checkpoint from
    elsewhere (a file outside any run folder) starts a new run folder. With ``--resume`` and no checkpoint in the
    work dir, a new run starts, and the note says so.

    Raises:
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
    """
    if resume is True:
        record = latest_checkpoint(work_dir)
        if record is None:
            run_dir = new_run_dir(work_dir)
            return RunPlan(work_dir, run_dir, None, f"--resume: no checkpoint found in {work_dir}; starting a new "
                                                   f"run in {run_dir}")
    elif resume:
        record = checkpoint_record(resume)
    else:
        run_dir = new_run_dir(work_dir)
        return RunPlan(work_dir, run_dir, None, f"new run in {run_dir}")
    run_dir = record.run_dir or new_run_dir(work_dir)
    at = f" (epoch {record.epoch}, iteration {record.iter})" if record.epoch is not None else ""
    return RunPlan(work_dir, run_dir, record.path,
                   f"resuming run {run_dir} from checkpoint {record.path}{at}")


def check_resume(cfg: Config, checkpoint: str, allow_changes: bool) -> None:
    """Refuse to resume ``checkpoint`` with a pipeline that differs from its own in keys that change the model or
    the schedule (:data:`raydet.workspace.SCHEDULE_KEYS`), naming them, unless ``allow_changes``.

    Raises:
        ConfigError: naming the checkpoint and the differing keys.
    """
    import yaml

    state = load_checkpoint(checkpoint, mmap=True)
    text = (state.get("meta") or {}).get("pipeline")
    if not text:
        return
    changed = schedule_differences(yaml.safe_load(text) or {}, cfg.data)
    if not changed:
        return
    message = (f"--resume: the pipeline differs from the one checkpoint {checkpoint} was trained with, in "
               f"{', '.join(changed[:8])}" + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""))
    if not allow_changes:
        raise ConfigError(message + "; continue anyway with --allow-changes, or start a new run without --resume")
    log.warning("%s; continuing (--allow-changes)", message)


_STORAGE_FAILURE = "Unable to set up cluster storage"


def fit(cfg: Config, *, run_dir: str, resume_from: str | None = None, callbacks=(), gate_dir: str | None = None,
        allow_changes: bool = False):
    """Run the pipeline's training on Ray Train, writing into ``run_dir``; returns Ray Train's ``Result`` (rank 0's
    final ``{"metrics", "epoch", "iter"}`` in ``return_value``).

    Args:
        run_dir: the run folder (``log.jsonl``, ``curves.png``, ``tb/``, ``pipeline.yaml``, ``ray/<attempt>/``
            checkpoints); see :func:`prepare_run`.
        resume_from: a checkpoint to continue from (model, optimizer, scaler, epoch, iteration, RNG).
        callbacks: Ray Train ``UserCallback`` objects for the run (``raydet.tune`` passes Tune's
            ``TuneReportCallback`` so every epoch's report reaches the study).
        gate_dir: with :class:`~raydet.engine.hooks.EpochGateHook`, each epoch but the last waits for a decision
            file in this folder (``raydet tune``).
        allow_changes: resume even when the pipeline's model or schedule keys differ from the checkpoint's.

    Raises:
        ConfigError: a bad pipeline, a cluster that cannot run it, a run folder other nodes cannot reach, or a
            resume with changed keys.
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    sections = parse_sections(cfg)
    cfg = resolve_progress(cfg)
    cfg.build("model")  # fail on a bad model section before any worker starts
    if resume_from is not None:
        check_resume(cfg, resume_from, allow_changes)
    datasets = build_datasets(cfg, sections)
    init_ray()
    check_cluster_resources(sections)
    run_dir = os.path.abspath(run_dir)
    check_shared_storage(run_dir, "work_dir", cluster_node_count(), sections.runtime.shared_storage)
    os.makedirs(run_dir, exist_ok=True)
    cfg.dump(os.path.join(run_dir, "pipeline.yaml"))
    ck = sections.checkpoint
    run_config = RunConfig(
        name=new_attempt_name(), storage_path=os.path.join(run_dir, "ray"),
        failure_config=FailureConfig(max_failures=sections.scaling.max_failures), callbacks=list(callbacks),
        checkpoint_config=CheckpointConfig(
            num_to_keep=ck.num_to_keep, checkpoint_score_order=ck.score_order,
            checkpoint_score_attribute=CHECKPOINT_SCORE if ck.score_attribute else None))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": cfg.data, "path": cfg.path, "origins": cfg.origins,
                           "datasets": [ray.put(datasets)], "run_dir": run_dir,
                           "resume_from": os.path.abspath(resume_from) if resume_from else None,
                           "gate_dir": gate_dir},
        scaling_config=scaling_config(sections), torch_config=torch_config(sections),
        run_config=run_config)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        # Ctrl-C: Ray Train's SIGINT handler aborts the run (workers stopped; the checkpoints already written stay)
        # and exits; the command reports it as an interrupt
        raise KeyboardInterrupt from None
    except Exception as exc:
        if any(_STORAGE_FAILURE in str(e) for e in wrapped_errors(exc)):
            raise ConfigError(f"work_dir: {run_dir}: Ray Train's workers cannot reach it from every node; set "
                              f"runtime.work_root or RAYDET_WORK_ROOT (or work_dir) to storage every node mounts "
                              f"(NFS, EFS, Filestore)") from None
        raise
    finally:
        if on_main_thread:  # Ray Train leaves its handler installed
            signal.signal(signal.SIGINT, previous_sigint)


def _discard_if_empty(plan: RunPlan | None) -> None:
    """A new run folder that a failed start left empty goes (a folder with anything in it stays)."""
    if plan is None or plan.resume_from is not None:
        return
    try:
        os.rmdir(plan.run_dir)
    except OSError:  # not empty, or already gone
        pass


def main(argv=None) -> int:
    from raydet.evaluation import format_coco_table

    parser = argparse.ArgumentParser(prog="raydet train", description="Train a detector on Ray Train.")
    parser.add_argument("pipeline", nargs="?", default=None, help="pipeline YAML (default: the quickstart)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override pipeline keys, values parsed as YAML")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the latest checkpoint of this pipeline's runs in the work dir (or the given "
                             "checkpoint file / folder); with none found, a new run starts")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume even if the pipeline's model or schedule keys differ from the checkpoint's")
    parser.add_argument("--work-dir", default=None,
                        help="folder of this pipeline's runs (default: <pipeline work_dir>/<pipeline name>)")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and args.resume.endswith((".yaml", ".yml")) and args.pipeline is None:
        args.pipeline, args.resume = args.resume, True  # `--resume PIPELINE.yaml`: the flag, then the pipeline
    _setup_logging()
    pipeline = Path(args.pipeline) if args.pipeline else QUICKSTART
    plan = None
    try:
        cfg = load_config(pipeline, args.set)
        sections = parse_sections(cfg)
        plan = prepare_run(work_dir_of(cfg, sections, args.work_dir), args.resume)
        log.info("raydet: %s", plan.note)
        result = fit(cfg, run_dir=plan.run_dir, resume_from=plan.resume_from, allow_changes=args.allow_changes)
    except KeyboardInterrupt:
        _discard_if_empty(plan)
        where = f" in {plan.run_dir}" if plan and os.path.isdir(plan.run_dir) else ""
        print(f"\nraydet: interrupted; the checkpoints written so far are kept{where}. Continue with: "
              f"python -m raydet.train {pipeline} --resume" + (f" --work-dir {plan.work_dir}" if args.work_dir else ""),
              file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _discard_if_empty(plan)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the run failed inside Ray: show our own error (image, loss, checkpoint), not Ray's
        _discard_if_empty(plan)
        cause = find_user_error(exc)
        if cause is None:
            raise
        print(f"error: training failed: {cause}", file=sys.stderr)
        return 1
    out = result.return_value or {}
    metrics = out.get("metrics") or {}
    print(f"\nraydet: trained {out.get('epoch')} epochs ({out.get('iter')} iterations); run folder {plan.run_dir}")
    if metrics:
        print(format_coco_table(metrics) if any(k.split("/")[0] in ("bbox", "segm") for k in metrics)
              else "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles the worker function by reference to
    # raydet.train (a function defined in __main__ would be pickled by value, with everything it touches).
    sys.exit(importlib.import_module("raydet.train").main())
