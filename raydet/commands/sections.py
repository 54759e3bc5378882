"""The pipeline's non-model sections as typed settings, shared by every command.

``train:``, ``evaluation:``, ``scaling:``, ``checkpoint:``, ``runtime:`` and ``data:`` are read into dataclasses
(unknown keys are errors naming the file and key, with a "did you mean"); :func:`parse_sections` returns them
together as :class:`Sections`. Plain Python: no Ray.
"""
from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import raydet.data  # noqa: F401  (registers the dataset and transform types built by build_datasets)
from raydet import fileio
from raydet.config import Config
from raydet.engine.elastic import ON_RESIZE, accumulation_problem
from raydet.engine.optim import OptimizerConfig
from raydet.evaluation.metric_names import TRAIN_METRIC, evaluation_metric_problem, metric_problem
from raydet.registry import ConfigError, build, build_context, build_dataclass, closest, error
from raydet.workspace import resolve_work_dir

__all__ = ["TrainSettings", "EvaluationSettings", "ScalingSettings", "CheckpointSettings", "RuntimeSettings",
           "DataSettings", "Sections", "parse_sections", "build_datasets", "resolve_progress", "work_dir_of"]

log = logging.getLogger("raydet")


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
    voc_mode: str = "area"               # voc_map's AP: area (VOC2010+) or 11points (VOC2007; MMDetection's eval_mode)


@dataclass
class ScalingSettings:
    """``scaling:`` section: Ray Train workers and the Ray Data augmentation actors.

    ``num_workers``: ``N``, or ``[min, max]`` for elastic training (Ray Train's ``ScalingConfig(num_workers=(min,
    max))``): a run that loses a worker or node goes on from its latest checkpoint with the workers that remain
    (at least ``min``), and grows back to at most ``max`` when capacity returns, checked every
    ``elastic_resize_monitor_interval_s`` seconds. ``on_resize`` says what a world size does to the batch and the
    LR (:mod:`raydet.engine.elastic`). Lost workers and nodes still count against ``max_failures``.
    """

    num_workers: int | list[int] = 1
    on_resize: str = "scale_lr"                # scale_lr or keep_global_batch (raydet.engine.elastic)
    elastic_resize_monitor_interval_s: float = 60.0  # Ray Train's: how often a healthy elastic run looks for room
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict | None = None   # extra custom resources, e.g. {gpu_node: 1}
    data_actors: list[int] = field(default_factory=lambda: [1, 2])   # [min, max] actors per worker's stream
    data_cpus_per_actor: float = 0.5
    data_resources: dict | None = None         # e.g. {cpu_node: 0.1} to keep decoding on CPU-only nodes
    data_batch_size: int = 8                   # images per actor call
    max_failures: int = 0                      # worker-group restarts from the last checkpoint

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[-1] if self.elastic else self.num_workers


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
    curves: bool = True                  # draw curves.png (losses, lr, metrics) from log.jsonl at the end of a run
    progress: bool | str = "auto"        # progress bars with ETA on rank 0: true, false, or auto (when the
                                         # command's stderr is a terminal; not in log files or ray job logs)
    imports: list[str] = field(default_factory=list)   # modules registering user hooks / components (the decode
                                                       # actors import them when a transform type needs them)
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
            seed=cfg.get("seed", 0), work_dir=cfg.get("work_dir", "work_dirs/"))
        for key, value, allowed in (("train.amp", sections.train.amp, (None, "fp16", "bf16")),
                                    ("runtime.progress", sections.runtime.progress, (True, False, "auto")),
                                    ("train.nonfinite_loss", sections.train.nonfinite_loss, ("stop", "skip")),
                                    ("checkpoint.score_order", sections.checkpoint.score_order, ("max", "min")),
                                    ("scaling.on_resize", sections.scaling.on_resize, ON_RESIZE),
                                    ("evaluation.voc_mode", sections.evaluation.voc_mode, ("area", "11points"))):
            if value not in allowed:
                names = [a for a in allowed if isinstance(a, str)]
                shown = ", ".join(a if isinstance(a, str) else str(a).lower().replace("none", "null") for a in allowed)
                raise error(key, f"expected one of {shown}, got {value!r}{closest(str(value), names)}")
        _check_values(sections)
        _check_world_sizes(cfg, sections)
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
        for i, module in enumerate(sections.runtime.imports):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise error(f"runtime.imports[{i}]", f"cannot import {module!r}: {exc}") from None
    return sections


def _check_values(s: Sections) -> None:
    """The ranges of the sections' values (types are checked by the dataclasses); errors name the dotted key."""
    def need(ok: bool, key: str, what: str, value) -> None:
        if not ok:
            raise error(key, f"must be {what}, got {value!r}")

    for key, value in (("train.max_epochs", s.train.max_epochs), ("evaluation.interval", s.evaluation.interval),
                       ("checkpoint.interval", s.checkpoint.interval), ("runtime.log_interval", s.runtime.log_interval),
                       ("data.images_per_worker", s.data.images_per_worker),
                       ("scaling.data_batch_size", s.scaling.data_batch_size)):
        need(value >= 1, key, ">= 1", value)
    for key, value in (("train.max_iters_per_epoch", s.train.max_iters_per_epoch),
                       ("checkpoint.num_to_keep", s.checkpoint.num_to_keep), ("data.num_classes", s.data.num_classes)):
        need(value is None or value >= 1, key, ">= 1 or null", value)
    for key, value in (("scaling.cpus_per_worker", s.scaling.cpus_per_worker),
                       ("scaling.gpus_per_worker", s.scaling.gpus_per_worker),
                       ("scaling.data_cpus_per_actor", s.scaling.data_cpus_per_actor)):
        need(value >= 0, key, ">= 0", value)
    need(not s.scaling.use_gpu or s.scaling.gpus_per_worker > 0, "scaling.gpus_per_worker", "> 0 with use_gpu: true",
         s.scaling.gpus_per_worker)
    workers = s.scaling.num_workers
    need(workers >= 1 if isinstance(workers, int) else len(workers) == 2 and 1 <= workers[0] <= workers[1],
         "scaling.num_workers", "an int >= 1, or [min, max] with 1 <= min <= max (elastic)", workers)
    need(s.scaling.elastic_resize_monitor_interval_s >= 0, "scaling.elastic_resize_monitor_interval_s", ">= 0",
         s.scaling.elastic_resize_monitor_interval_s)
    need(s.scaling.max_failures >= -1, "scaling.max_failures", ">= 0 (or -1: no limit)", s.scaling.max_failures)
    actors = s.scaling.data_actors
    need(len(actors) == 2 and 1 <= actors[0] <= actors[1], "scaling.data_actors", "[min, max] with 1 <= min <= max",
         actors)
    for key in ("resources_per_worker", "data_resources"):
        for name, amount in (getattr(s.scaling, key) or {}).items():
            need(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0,
                 f"scaling.{key}.{name}", "a number >= 0", amount)
    for i, name in enumerate(s.evaluation.metric):
        problem = evaluation_metric_problem(name)
        if problem:
            raise error(f"evaluation.metric[{i}]", problem)
    for i, n in enumerate(s.evaluation.proposal_nums):
        need(n >= 1, f"evaluation.proposal_nums[{i}]", ">= 1", n)
    need(isinstance(s.seed, int) and not isinstance(s.seed, bool), "seed", "an int", s.seed)
    need(isinstance(s.work_dir, str) and bool(s.work_dir), "work_dir", "a folder path", s.work_dir)


def _check_world_sizes(cfg: Config, s: Sections) -> None:
    """``scaling.on_resize: keep_global_batch`` needs every world size the run may take to divide the reference
    batch (``optimizer.base_batch_size``); the error names the keys and a reference batch that works."""
    if s.scaling.on_resize != "keep_global_batch":
        return
    base = (cfg.get("optimizer") or {}).get("base_batch_size", OptimizerConfig.base_batch_size)
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        return  # parse_optimizer names it
    problem = accumulation_problem(base, s.data.images_per_worker,
                                   list(range(s.scaling.min_workers, s.scaling.max_workers + 1)))
    if problem:
        raise error("scaling.on_resize", problem)


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


def resolve_progress(cfg: Config) -> Config:
    """``runtime.progress: auto`` -> true when this (driver) process's stderr is a terminal, else false: the
    workers, whose output Ray forwards, cannot tell."""
    if cfg.get("runtime.progress", "auto") == "auto":
        return cfg.with_overrides([f"runtime.progress={'true' if sys.stderr.isatty() else 'false'}"])
    return cfg


def work_dir_of(cfg: Config, sections: Sections, work_dir: str | None = None, key: str = "--work-dir",
                allow_uri: bool = False) -> str:
    """The command's work dir: ``work_dir`` (``--work-dir``) if given, else ``<pipeline work_dir>/<pipeline name>``,
    resolved by :func:`raydet.workspace.resolve_work_dir` (never inside a folder Ray deletes; a URI where
    ``allow_uri``, for the commands that write to object storage)."""
    if work_dir is None:
        work_dir, key = fileio.join(sections.work_dir, Path(cfg.path or "pipeline").stem), "work_dir"
    return resolve_work_dir(work_dir, work_root=sections.runtime.work_root, key=key, allow_uri=allow_uri)
