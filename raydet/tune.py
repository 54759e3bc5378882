"""``raydet tune SPACE.yaml [--set k=v ...] [--resume] [--work-dir DIR]``: hyperparameter studies on Ray Tune.

A space file names a pipeline, a metric and the pipeline keys to search::

    pipeline: ../pipelines/rpn_r50_fpn_1x_coco.yaml    # relative to the space file (or the working directory)
    metric: proposal/AR@1000                            # a key the evaluation reports (or train/loss)
    mode: max                                           # max | min
    search:                                             # dotted pipeline key (or top-level variable) -> distribution
      model.rpn_head.sampler.neg_pos_ub: {grid: [-1, 3, 5]}
      model.rpn_head.loss_bbox:
        grid: [{type: SmoothL1Loss, beta: 0.2}, {type: SmoothL1Loss, beta: 0.1111}]
        labels: [beta 1/5, beta 1/9]                    # optional names for the table and the plots
      optimizer.lr: {loguniform: [0.001, 0.1]}          # also choice: [..], uniform / quniform: [lo, hi(, q)]
    num_samples: 1                 # repeats of the grid; samples of choice / continuous distributions
    scheduler: {type: fifo}        # or {type: asha, grace_period: 1, reduction_factor: 2(, max_t: epochs)}
    resources: {num_workers: 1, use_gpu: false, cpus_per_worker: 1, gpus_per_worker: 1, driver_cpus: 0.5}
    max_concurrent_trials: 2       # default: as many as the cluster's CPUs / GPUs hold at once
    set: [train.max_epochs=24]     # overrides applied to every trial (like --set)

Values may be whole pipeline fragments. A mapping merges into the mapping already at that key, like a child
pipeline file (``{norm_eval: true}`` at ``model.backbone`` changes only that argument); a mapping with another
``type`` than the one there, or with ``_delete_: true``, replaces it. Anything else replaces the value. A
top-level variable (``train_pipeline``) may be searched: every key that refers to it follows.

Everything is checked before a trial starts: the space's keys, distributions, searched keys (did-you-mean
suggestions), the metric against the pipeline's evaluation, and every searched value (or both bounds) applied to
the pipeline and built.

Each trial is a small driver (``ray.tune.with_resources(driver, {"cpu": driver_cpus})``) that builds the trial's
pipeline and runs :func:`raydet.train.fit` (a Ray Train ``TorchTrainer`` running raydet's own worker loop) with
Tune's ``TuneReportCallback``: every epoch's report (``epoch``, ``iter``, ``train/...`` and the evaluation metrics)
reaches Tune. Each trial trains in its own run folder; a trial restarted by ``--resume`` continues from the latest
checkpoint there. With ASHA, ``evaluation.interval`` is set to 1 so that every report ASHA sees carries the study
metric (ASHA compares trials at epochs ``grace_period * reduction_factor**k``); with FIFO the pipeline's interval
is kept (the last epoch always evaluates) and only the final report matters.

When Tune stops a trial at one of its reports (ASHA at a rung), raydet guarantees: the trial trains no iteration
past the epoch whose report Tune stopped it at (each epoch but the last waits for Tune's decision on its report
before the next one starts); its result in the study is that epoch's; its checkpoint of that epoch (when
``checkpoint.interval`` writes one then) is the last it writes and is kept; and its Ray Train workers and their
resources are released, so the next trials start.

The study lives in ``<work_dir>/tune/<space name>/``: Ray Tune's state, ``runs/<trial id>/`` (the trial's
``pipeline.yaml``, ``log.jsonl``, ``starts.jsonl`` and Ray Train checkpoints), and at the end ``results.csv``,
``results.md`` (every trial, best first), ``metric_vs_<key>.png`` and ``best_pipeline.yaml``, ready for
``python -m raydet.train best_pipeline.yaml``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydet.config import (FLOAT_EXP, Config, apply_override, differences, format_path, get_by_path, load_config,
                           merges_into, parse_path, parse_yaml)
from raydet.evaluation.metric_names import TRAIN_METRIC, metric_problem
from raydet.commands.ray_setup import configure_ray_console, release_ray
from raydet.errors import describe_failure, report_failure
from raydet.registry import ConfigError, build_context, closest
from raydet.workspace import check_shared_storage, cluster_node_count, latest_checkpoint, resolve_work_dir

__all__ = ["SPACE_KEYS", "DISTRIBUTIONS", "Dimension", "Space", "load_space", "validate_space", "base_overrides",
           "fragment_overrides", "trial_config", "build_scheduler", "run_study", "trial_driver", "write_report",
           "main"]

log = logging.getLogger("raydet")

SPACE_KEYS = ("pipeline", "metric", "mode", "search", "num_samples", "scheduler", "resources",
              "max_concurrent_trials", "set")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "quniform")
RESOURCE_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker", "driver_cpus")
SCHEDULERS = {"fifo": (), "asha": ("grace_period", "reduction_factor", "max_t")}
DEFAULT_DRIVER_CPUS = 0.5
STUDY_FILE = "study.json"

# --------------------------------------------------------------------------------------------------- the space
@dataclass
class Dimension:
    """One searched key: ``kind`` in :data:`DISTRIBUTIONS`; ``values`` for grid / choice, ``bounds`` (lo, hi[, q])
    for the continuous ones; ``labels`` name the values in the table and plots."""

    key: str
    kind: str
    values: list | None = None
    bounds: tuple | None = None
    labels: list[str] | None = None

    @property
    def categorical(self) -> bool:
        return self.kind in ("grid", "choice")

    def domain(self):
        """The Ray Tune search space object."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(copy.deepcopy(self.values))
        if self.kind == "choice":
            return tune.choice(copy.deepcopy(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.bounds)
        if self.kind == "loguniform":
            return tune.loguniform(*self.bounds)
        return tune.quniform(*self.bounds)

    def probe_values(self) -> list:
        """The values checked before the study: every grid / choice value, else both bounds."""
        return list(self.values) if self.categorical else list(self.bounds[:2])

    def label(self, value) -> str:
        """A short name for ``value``: its label if given, else a compact rendering."""
        if self.categorical:
            for i, v in enumerate(self.values):
                if _plain(v) == _plain(value):
                    return self.labels[i] if self.labels else _short(v)
        return _short(value)

    def position(self, value) -> int | None:
        """The index of ``value`` among the grid / choice values."""
        for i, v in enumerate(self.values or []):
            if _plain(v) == _plain(value):
                return i
        return None


@dataclass
class Space:
    """A parsed space file (see the module docstring)."""

    path: str
    pipeline: str
    metric: str
    mode: str
    dims: list[Dimension]
    num_samples: int = 1
    scheduler: dict = field(default_factory=lambda: {"type": "fifo"})
    resources: dict = field(default_factory=dict)
    max_concurrent_trials: int | None = None
    set: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)   # from the command line

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def driver_cpus(self) -> float:
        return float(self.resources.get("driver_cpus", DEFAULT_DRIVER_CPUS))


def _err(space_path: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{space_path}: {key}: {message}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_dimension(path: str, key, spec) -> Dimension:
    where = f"search.{key}"
    if not isinstance(key, str) or not key:
        raise _err(path, "search", f"keys must be dotted pipeline keys, got {key!r}")
    try:
        parse_path(key)
    except ConfigError:
        raise _err(path, where, "malformed key (expected e.g. 'model.rpn_head.loss_bbox' or 'train_pipeline')") from None
    if not isinstance(spec, dict):
        raise _err(path, where, f"expected a distribution such as {{grid: [..]}} or {{uniform: [lo, hi]}}, "
                                f"got {spec!r}")
    kinds = [k for k in spec if k != "labels"]
    unknown = [k for k in kinds if k not in DISTRIBUTIONS]
    if unknown:
        raise _err(path, f"{where}.{unknown[0]}", f"unknown distribution '{unknown[0]}'"
                   f"{closest(unknown[0], DISTRIBUTIONS)} (valid: {', '.join(DISTRIBUTIONS)}, and labels)")
    if len(kinds) != 1:
        raise _err(path, where, f"expected exactly one distribution ({', '.join(DISTRIBUTIONS)}), got "
                                f"{', '.join(kinds) or 'none'}")
    kind = kinds[0]
    arg = spec[kind]
    labels = spec.get("labels")
    if kind in ("grid", "choice"):
        if not isinstance(arg, list):
            raise _err(path, f"{where}.{kind}", f"expected a list of values, got {arg!r}")
        if not arg:
            raise _err(path, f"{where}.{kind}", "empty list: give at least one value")
        if labels is not None:
            if not isinstance(labels, list) or len(labels) != len(arg) or not all(
                    isinstance(x, (str, int, float)) for x in labels):
                raise _err(path, f"{where}.labels", f"expected {len(arg)} names, one per value, got {labels!r}")
            labels = [str(x) for x in labels]
            if len(set(labels)) != len(labels):
                raise _err(path, f"{where}.labels", f"names must differ, got {labels}")
        return Dimension(key, kind, values=arg, labels=labels)
    if labels is not None:
        raise _err(path, f"{where}.labels", f"labels name the values of grid / choice, not of {kind}")
    n = 3 if kind == "quniform" else 2
    form = "[lo, hi, q]" if n == 3 else "[lo, hi]"
    if not isinstance(arg, list) or len(arg) != n or not all(_is_number(v) for v in arg):
        raise _err(path, f"{where}.{kind}", f"expected {form} numbers, got {arg!r}")
    lo, hi = float(arg[0]), float(arg[1])
    if not lo < hi:
        raise _err(path, f"{where}.{kind}", f"lo must be below hi, got lo={arg[0]}, hi={arg[1]}")
    if kind == "loguniform" and lo <= 0:
        raise _err(path, f"{where}.{kind}", f"loguniform needs lo > 0, got lo={arg[0]}")
    if kind == "quniform" and not float(arg[2]) > 0:
        raise _err(path, f"{where}.{kind}", f"q must be positive, got q={arg[2]}")
    return Dimension(key, kind, bounds=tuple(float(v) for v in arg))


def _resolve_pipeline(space_path: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise _err(space_path, "pipeline", f"expected a pipeline file name, got {value!r}")
    candidates = [os.path.normpath(os.path.join(os.path.dirname(space_path), os.path.expanduser(value))),
                  os.path.normpath(os.path.expanduser(value))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise _err(space_path, "pipeline", f"file not found: {value} (looked in {' and '.join(dict.fromkeys(candidates))})")


def load_space(path: str | os.PathLike, overrides=(), text: str | None = None) -> Space:
    """Read and check a space file's structure (no pipeline needed; see :func:`validate_space` for the rest).

    ``overrides``: command-line ``KEY=VALUE`` pipeline overrides, applied after the space's ``set``.
    """
    path = os.fspath(path)
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
    doc = parse_yaml(text, path)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {', '.join(SPACE_KEYS)}")
    for key in doc:
        if key not in SPACE_KEYS:
            raise _err(path, str(key), f"unknown key of a space file{closest(key, SPACE_KEYS)} "
                                       f"(valid: {', '.join(SPACE_KEYS)})")
    for key in ("pipeline", "metric", "search"):
        if key not in doc:
            raise _err(path, key, "missing (a space needs pipeline, metric and search)")

    pipeline = _resolve_pipeline(path, doc["pipeline"])
    metric = doc["metric"]
    if not isinstance(metric, str) or not metric:
        raise _err(path, "metric", f"expected a metric name such as bbox/AP, got {metric!r}")
    mode = doc.get("mode", "max")
    if mode not in ("max", "min"):
        raise _err(path, "mode", f"expected max or min, got {mode!r}")

    search = doc["search"]
    if not isinstance(search, dict) or not search:
        raise _err(path, "search", "expected a mapping of pipeline keys to distributions, e.g. "
                                   "{optimizer.lr: {choice: [0.01, 0.02]}}")
    dims = [_parse_dimension(path, k, v) for k, v in search.items()]

    num_samples = doc.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _err(path, "num_samples", f"expected a positive integer, got {num_samples!r}")

    scheduler = doc.get("scheduler") or {"type": "fifo"}
    if not isinstance(scheduler, dict) or "type" not in scheduler:
        raise _err(path, "scheduler", f"expected {{type: fifo}} or {{type: asha, grace_period: 1, "
                                      f"reduction_factor: 2}}, got {scheduler!r}")
    stype = str(scheduler["type"]).lower()
    if stype not in SCHEDULERS:
        raise _err(path, "scheduler.type", f"unknown scheduler '{scheduler['type']}'{closest(stype, SCHEDULERS)} "
                                           f"(valid: {', '.join(SCHEDULERS)})")
    for k, v in scheduler.items():
        if k == "type":
            continue
        if k not in SCHEDULERS[stype]:
            raise _err(path, f"scheduler.{k}", f"unknown argument of {stype}{closest(k, SCHEDULERS[stype])} "
                                               f"(valid: {', '.join(SCHEDULERS[stype]) or 'none'})")
        if k in ("grace_period", "max_t") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _err(path, f"scheduler.{k}", f"expected a positive number of epochs, got {v!r}")
        if k == "reduction_factor" and (not _is_number(v) or v <= 1):
            raise _err(path, f"scheduler.{k}", f"expected a number above 1, got {v!r}")
    scheduler = {**scheduler, "type": stype}

    resources = doc.get("resources") or {}
    if not isinstance(resources, dict):
        raise _err(path, "resources", f"expected a mapping of {', '.join(RESOURCE_KEYS)}, got {resources!r}")
    for k, v in resources.items():
        if k not in RESOURCE_KEYS:
            raise _err(path, f"resources.{k}", f"unknown key{closest(k, RESOURCE_KEYS)} "
                                               f"(valid: {', '.join(RESOURCE_KEYS)})")
        ok = {"num_workers": isinstance(v, int) and not isinstance(v, bool) and v >= 1,
              "use_gpu": isinstance(v, bool),
              "cpus_per_worker": _is_number(v) and v > 0, "gpus_per_worker": _is_number(v) and v > 0,
              "driver_cpus": _is_number(v) and v >= 0}[k]
        if not ok:
            want = {"num_workers": "a positive integer", "use_gpu": "true or false", "driver_cpus": "a number >= 0"}
            raise _err(path, f"resources.{k}", f"expected {want.get(k, 'a positive number')}, got {v!r}")

    mct = doc.get("max_concurrent_trials")
    if mct is not None and (not isinstance(mct, int) or isinstance(mct, bool) or mct < 1):
        raise _err(path, "max_concurrent_trials", f"expected a positive integer, got {mct!r}")

    sets = doc.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise _err(path, "set", f"expected a list of 'KEY=VALUE' strings (like --set), got {sets!r}")
    return Space(path=path, pipeline=pipeline, metric=metric, mode=mode, dims=dims, num_samples=num_samples,
                 scheduler=scheduler, resources=dict(resources), max_concurrent_trials=mct, set=list(sets),
                 overrides=list(overrides))


# --------------------------------------------------------------------------------------------------- overrides
class _FlowDumper(yaml.SafeDumper):
    """One-line YAML for override values; strings that read as floats (``1e-4``) are quoted."""

    def ignore_aliases(self, data):
        return True


_FlowDumper.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_EXP, list("-+0123456789"))


def _plain(value):
    """NumPy scalars -> Python, tuples -> lists (Tune samples NumPy floats)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _short(value, limit: int = 48) -> str:
    """A compact one-line name of a value: ``0.002``, ``SmoothL1Loss(beta=0.2, loss_weight=1)``, flow YAML."""
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        text = value["type"] + "(" + ", ".join(f"{k}={_short(v)}" for k, v in value.items() if k != "type") + ")"
    else:
        text = _yaml_value(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _yaml_value(value) -> str:
    return yaml.dump(_plain(value), Dumper=_FlowDumper, default_flow_style=True, sort_keys=False,
                     width=float("inf"), allow_unicode=True).strip().removesuffix("...").strip()


def _strip_delete(value):
    if isinstance(value, dict):
        return {k: _strip_delete(v) for k, v in value.items() if k != "_delete_"}
    if isinstance(value, list):
        return [_strip_delete(v) for v in value]
    return value


def fragment_overrides(raw: dict, key: str, value) -> list[str]:
    """``KEY=VALUE`` overrides that put ``value`` at ``key`` of the (unresolved) pipeline data ``raw``.

    A mapping merges into the mapping already there (one override per leaf) unless it sets another ``type`` or
    ``_delete_: true``, in which case it replaces it; any other value replaces.
    """
    value = _plain(value)
    current = get_by_path(raw, key, None)
    if merges_into(current, value):  # the same rule as --set (raydet.config.merges_into)
        out = []
        for k, v in value.items():
            if k == "_delete_":
                continue
            out.extend(fragment_overrides(raw, format_path([key, str(k)]), v))
        return out
    value = _strip_delete(value)
    if merges_into(current, value):  # `--set KEY={...}` would merge it: the marker keeps the replacement
        value = {"_delete_": True, **value}
    return [f"{key}={_yaml_value(value)}"]


def raw_data(cfg: Config) -> dict:
    """The merged pipeline of ``cfg`` with its overrides applied but references not resolved (variables kept)."""
    raw, origins, _, overrides = cfg._source
    data = copy.deepcopy(raw)
    for text in overrides:
        apply_override(data, dict(origins), text)
    return data


def trial_overrides(raw: dict, dims: list[Dimension], config: dict) -> list[str]:
    """The overrides of one trial (``config``: searched key -> value)."""
    out = []
    for dim in dims:
        if dim.key in config:
            out.extend(fragment_overrides(raw, dim.key, config[dim.key]))
    return out


def base_overrides(space: Space, pipeline: Config) -> list[str]:
    """Overrides every trial gets: the space's ``set``, ``resources`` (as ``scaling``), then the command line's,
    and with ASHA ``evaluation.interval=1`` (every report must carry the metric ASHA compares).

    ``pipeline``: the pipeline with the space's ``set`` applied (a ``scaling`` section is added if it has none).
    """
    out = list(space.set)
    if any(k != "driver_cpus" for k in space.resources) and pipeline.get("scaling") is None:
        out.append("scaling={}")
    for k, v in space.resources.items():
        if k != "driver_cpus":
            out.append(f"scaling.{k}={_yaml_value(v)}")
    out.extend(space.overrides)
    if space.scheduler["type"] == "asha":
        out.append("evaluation.interval=1")
    return out


def load_base(space: Space) -> Config:
    """The pipeline with every trial's common overrides; errors in the space's ``set`` name the space file."""
    cfg = load_config(space.pipeline)
    if space.set:
        try:
            cfg = cfg.with_overrides(space.set)
        except ConfigError as exc:
            raise ConfigError(f"{space.path}: set: {exc}") from None
    return cfg.with_overrides(base_overrides(space, cfg)[len(space.set):])


def trial_config(base: Config, dims: list[Dimension], config: dict) -> Config:
    """The full pipeline of one trial."""
    return base.with_overrides(trial_overrides(raw_data(base), dims, config))


# --------------------------------------------------------------------------------------------------- checks
_DATASET_PIPELINE = re.compile(r"data\.(train|val|test)\.pipeline(\[\d+\])?")


def _check_changed(cfg: Config, path: str) -> None:
    """Build the component that holds the changed key ``path``: its nearest model component, or the data
    transforms; the other sections are checked by parsing them."""
    from raydet.data.pipeline import build_transforms

    m = _DATASET_PIPELINE.match(path)
    if m:
        split = m.group(1)
        with build_context(f"data.{split}", file=cfg.path, origins=cfg.origins):
            build_transforms(cfg.get(f"data.{split}.pipeline"))
        return
    if not path.startswith("model."):
        return
    parts = path.split(".")
    for i, part in enumerate(parts):  # arguments named *_cfg stay dicts: their owner builds them
        if re.sub(r"\[\d+\]$", "", part).endswith("_cfg"):
            parts = parts[:i]
            break
    tokens = ".".join(parts)
    while tokens:
        node = cfg.get(tokens)
        if isinstance(node, dict) and "type" in node:
            cfg.build(tokens)
            return
        tokens = tokens[:tokens.rindex("[")] if tokens.endswith("]") else tokens.rpartition(".")[0]


def _check_sections(cfg: Config) -> Any:
    from raydet.commands.validation import validate_pipeline

    return validate_pipeline(cfg, model=False)  # every section but the model, which validate_space builds


def validate_space(space: Space, build_models: bool = True) -> Config:
    """Everything a study needs before its first trial: the base pipeline loads; every searched key exists; the
    metric is one the pipeline's evaluation reports; every grid / choice value (or both bounds) applies and its
    component builds. The whole model is built for the base pipeline and the first value of each key (for every
    value when the model builds in under 0.25 s). Returns the base pipeline."""
    import raydet.data  # noqa: F401  (registers the transforms and datasets)
    import raydet.models  # noqa: F401

    base = load_base(space)
    sections = _check_sections(base)
    problem = metric_problem(space.metric, sections)
    if problem:
        raise _err(space.path, "metric", problem)
    t0 = time.perf_counter()
    if build_models:
        base.build("model")
    small = time.perf_counter() - t0 < 0.25
    raw = raw_data(base)
    for dim in space.dims:
        try:
            get_by_path(raw, dim.key)
        except ConfigError as exc:
            hint = ""
            if get_by_path(base.data, dim.key, None) is not None:
                hint = "; it comes from a ${...} reference: search the variable it refers to (e.g. train_pipeline)"
            raise _err(space.path, f"search.{dim.key}",
                       f"not a key of the pipeline {space.pipeline} ({exc}){hint}") from None
        for i, value in enumerate(dim.probe_values()):
            what = f"search.{dim.key}" + (f" value {dim.label(value)!r}" if dim.categorical else f" bound {value:g}")
            try:
                cfg = base.with_overrides(fragment_overrides(raw, dim.key, value))
                _check_sections(cfg)
                if build_models:
                    for path in differences(base.data, cfg.data):
                        _check_changed(cfg, path)
                    if i == 0 or small:
                        cfg.build("model")
            except ConfigError as exc:
                raise ConfigError(f"{space.path}: {what}: {exc}") from None
    return base


# --------------------------------------------------------------------------------------------------- the study
def build_scheduler(space: Space, base: Config):
    """Ray Tune's scheduler for the space (ASHA compares trials by the reported ``epoch``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler["type"] == "fifo":
        return FIFOScheduler()
    max_t = space.scheduler.get("max_t") or _max_epochs(space, base)
    grace = space.scheduler.get("grace_period", 1)
    if grace > max_t:
        raise _err(space.path, "scheduler.grace_period", f"{grace} epochs is more than the {max_t} epochs trained")
    return ASHAScheduler(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=max_t, grace_period=grace,
                         reduction_factor=space.scheduler.get("reduction_factor", 2))


def _max_epochs(space: Space, base: Config) -> int:
    """The longest training of any probed value (a searched schedule may change it)."""
    epochs = [int(base.get("train.max_epochs", 12))]
    raw = raw_data(base)
    for dim in space.dims:
        for value in dim.probe_values():
            cfg = base.with_overrides(fragment_overrides(raw, dim.key, value))
            epochs.append(int(cfg.get("train.max_epochs", 12)))
    return max(epochs)


def _concurrency(space: Space, base: Config) -> int:
    """Trials that fit at once: each holds its driver, its workers and their decode actors for the whole run."""
    import ray
    from raydet.commands.sections import parse_sections

    sc = parse_sections(base).scaling
    n = sc.max_workers  # an elastic trial holds up to max_workers
    cpus = space.driver_cpus + n * sc.cpus_per_worker
    if not sc.data_resources:
        cpus += n * sc.data_actors[0] * sc.data_cpus_per_actor
    gpus = n * sc.gpus_per_worker if sc.use_gpu else 0.0
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0.0) / cpus + 1e-9) if cpus > 0 else 10**6
    if gpus > 0:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / gpus + 1e-9))
    need = (f"a trial needs {cpus:g} CPUs (driver {space.driver_cpus:g} + {n} workers x "
            f"{sc.cpus_per_worker:g} + decode actors)" + (f" and {gpus:g} GPUs" if gpus else "") +
            f"; the cluster has {total.get('CPU', 0.0):g} CPUs and {total.get('GPU', 0.0):g} GPUs")
    wanted = space.max_concurrent_trials
    if fits < 1 or (wanted is not None and wanted > fits):
        message = (f"{space.path}: " + (f"max_concurrent_trials: {wanted} trials do not fit at once: "
                                         if fits >= 1 else "resources: no trial fits: ") + need +
                   ". Lower resources (cpus_per_worker, num_workers, driver_cpus) or max_concurrent_trials.")
        if not os.environ.get("RAY_ADDRESS"):  # a cluster we joined may autoscale: only warn there
            raise ConfigError(message)
        log.warning(message)
    return wanted or max(fits, 1)


def _trial_name(trial) -> str:
    return str(trial.trial_id)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


# When Tune stops a running trial (ASHA, Ctrl-C), it ends the trial's actor; the Ray Train run that the driver
# started would die with it without releasing its workers' placement group (Ray leaves that to a helper that
# needs the dashboard's state API, which fails with no dashboard or several Ray instances on a host), and the
# next trials would wait forever for the CPUs. So the trainable's cleanup first asks the run to abort: it writes
# a stop file that a callback inside the Ray Train controller watches, and waits for the driver to return.
STOP_FILE = "stop_requested"
STOP_TIMEOUT_S = 60.0
_CURRENT_RUN: dict = {}   # in a trial's actor: {"stop_file": path, "done": threading.Event}

configure_ray_console()  # before this module imports Ray: Ray's library logs off the console (python -m raydet.tune)
try:
    from ray.train.v2._internal.execution.callback import ControllerCallback as _ControllerCallback
except ImportError:  # another Ray version: trials that Tune stops early rely on Ray's own cleanup
    _ControllerCallback = None


class _StopTrainOnCleanup:
    """Mixin of the trial's Tune trainable (see above). It also tells the trial's workers Tune's decision on each
    epoch's result: Tune asks the trainable for its next result (``step``) only once it has decided to continue
    the trial, so ``step`` first writes ``continue_<epoch>`` for the epoch it returned last; the workers'
    :class:`~raydet.engine.hooks.EpochGateHook` waits for that file (or the stop file) before the next epoch."""

    _raydet_last_epoch = None

    def step(self):
        run = dict(_CURRENT_RUN)
        if self._raydet_last_epoch is not None and run.get("gate_dir"):
            Path(run["gate_dir"], f"continue_{int(self._raydet_last_epoch)}").touch()
        result = super().step()
        self._raydet_last_epoch = result.get("epoch") if isinstance(result, dict) else None
        return result

    def cleanup(self):
        run = dict(_CURRENT_RUN)
        if run and not run["done"].is_set():
            Path(run["stop_file"]).touch()
            if not run["done"].wait(STOP_TIMEOUT_S):
                log.warning("the trial's Ray Train run did not stop within %.0f s", STOP_TIMEOUT_S)
        super().cleanup()


if _ControllerCallback is not None:
    class AbortOnStopFile(_ControllerCallback):
        """Ray Train controller callback: abort the run (workers and placement group released) once ``path``
        exists."""

        def __init__(self, path: str, poll_s: float = 0.5):
            self.path, self.poll_s = path, poll_s

        def after_controller_start(self, train_run_context):
            import ray

            controller = ray.get_runtime_context().current_actor

            def watch():
                while not os.path.exists(self.path):
                    time.sleep(self.poll_s)
                controller.abort.remote()

            threading.Thread(target=watch, name="raydet-stop-watch", daemon=True).start()
else:
    AbortOnStopFile = None


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # no Ray Tune: validation and reports still work
    _TuneCallback = object


class StudyProgress(_TuneCallback):
    """A Ray Tune callback drawing one bar over the study's trials (finished or failed / all, with ETA), described
    by the best value of ``metric`` reported so far. Tune pickles it with the study; a resumed study draws a new
    bar that starts at the trials already finished."""

    def __init__(self, name: str, metric: str, mode: str):
        self.name, self.metric, self.sign = name, metric, 1.0 if mode == "max" else -1.0
        self.bar, self.best = None, None

    def __getstate__(self):
        return {**self.__dict__, "bar": None}

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        from raydet.engine.progress import progress_bar

        self.bar = progress_bar(total=total_num_samples, desc=f"study {self.name}", unit="trial")

    def _sync(self, trials):
        from ray.tune.experiment import Trial

        done = sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def on_step_begin(self, iteration, trials, **info):
        self._sync(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        better = self.best is None or self.sign * value > self.sign * self.best if _is_number(value) else False
        if better and math.isfinite(value):
            self.best = value
            if self.bar is not None:
                self.bar.set_description(f"study {self.name}: best {self.metric} {value:.4g}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._sync(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._sync(trials)

    def on_experiment_end(self, trials, **info):
        self._sync(trials)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def trial_driver(config: dict, study: dict) -> None:
    """One trial (runs as a Ray Tune function trainable): build the trial's pipeline and train it with Ray Train in
    the run folder ``runs/<trial id>``, forwarding every report to Tune. A trial started again (``--resume``)
    continues from the latest checkpoint in its run folder. Each epoch but the last waits for Tune's decision
    (see :class:`_StopTrainOnCleanup`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydet.commands.ray_setup import setup_logging
    from raydet.train import fit

    setup_logging()
    # Tune runs the trainable in its trial folder; the pipeline's relative paths (data_root) mean the start one.
    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))
    trial_id = tune.get_context().get_trial_id()
    base = load_config(study["pipeline"], study["overrides"])
    cfg = trial_config(base, [Dimension(**d) for d in study["dims"]], config)
    run_dir = os.path.join(study["dir"], "runs", trial_id)
    os.makedirs(run_dir, exist_ok=True)
    stop_file = os.path.join(run_dir, STOP_FILE)
    for stale in [stop_file, *Path(run_dir).glob("continue_*")]:  # left by an earlier, interrupted start of it
        if os.path.exists(stale):
            os.remove(stale)
    latest = latest_checkpoint(run_dir)  # a trial restarted by --resume continues from its last checkpoint
    with open(os.path.join(run_dir, "starts.jsonl"), "a") as f:
        f.write(json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                            "resumed": latest is not None,
                            "checkpoint": latest.path if latest else None}) + "\n")
    callbacks = [TuneReportCallback()] + ([AbortOnStopFile(stop_file)] if AbortOnStopFile is not None else [])
    done = threading.Event()
    _CURRENT_RUN.update(stop_file=stop_file, done=done, gate_dir=run_dir)
    try:
        fit(cfg, run_dir=run_dir, resume_from=latest.path if latest else None, callbacks=callbacks,
            gate_dir=run_dir)
    except Exception:
        if os.path.exists(stop_file):  # aborted because Tune stopped the trial: not an error
            log.info("trial %s stopped by the scheduler", trial_id)
            return
        raise
    finally:
        done.set()


trial_driver.__mixins__ = (_StopTrainOnCleanup,)


def study_dir(space: Space, base: Config, work_dir: str | None) -> str:
    """``<work_dir>/tune/<space name>`` (work_dir: --work-dir, else the pipeline's ``work_dir``), resolved like a
    training run's work dir (:func:`raydet.workspace.resolve_work_dir`: never inside a folder Ray deletes)."""
    root = os.path.join(work_dir or str(base.get("work_dir", "work_dirs/")), "tune", space.name)
    return resolve_work_dir(root, work_root=base.get("runtime.work_root"),
                            key="--work-dir" if work_dir else "work_dir")


def _study_record(space: Space) -> dict:
    with open(space.path, encoding="utf-8") as f:
        return {"space": os.path.abspath(space.path), "space_text": f.read(), "overrides": list(space.overrides)}


def run_study(space: Space, *, work_dir: str | None = None, resume: bool = False):
    """Validate, run (or resume) the study and write its report; returns ``(rows, study folder)``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydet.commands.ray_setup import init_ray

    base = validate_space(space)
    folder = study_dir(space, base, work_dir)
    if not resume and os.path.exists(os.path.join(folder, "tuner.pkl")):
        raise ConfigError(f"{space.path}: a study already exists in {folder}: continue it with --resume, or "
                          f"remove the folder or choose another --work-dir")
    init_ray()
    check_shared_storage(folder, "work_dir", cluster_node_count(), bool(base.get("runtime.shared_storage", False)))
    concurrent = _concurrency(space, base)
    scheduler = build_scheduler(space, base)
    study = {"pipeline": os.path.abspath(space.pipeline), "overrides": list(base._source[3]), "dir": folder,
             "dims": [vars(d) for d in space.dims]}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, study=study), {"cpu": space.driver_cpus})
    if resume:
        if not tune.Tuner.can_restore(folder):
            raise ConfigError(f"{space.path}: --resume: no study to resume in {folder}")
        tuner = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True)
    else:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STUDY_FILE), "w") as f:
            json.dump(_study_record(space), f, indent=1)
        seed = int(base.get("seed", 0) or 0)
        tuner = tune.Tuner(
            trainable, param_space={d.key: d.domain() for d in space.dims},
            # the generator limits the trials at once (Tune ignores TuneConfig.max_concurrent_trials with a
            # search_alg); it is seeded by the pipeline's seed, so choice / continuous samples repeat
            tune_config=tune.TuneConfig(num_samples=space.num_samples, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrent),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
            # verbose=0: no Tune status tables; raydet's progress bar and study table report the study
            run_config=tune.RunConfig(name=space.name, storage_path=os.path.dirname(folder), verbose=0,
                                      callbacks=[StudyProgress(space.name, space.metric, space.mode)]))
    grid = tuner.fit()
    rows = collect_rows(space, base, grid)
    write_report(space, base, rows, folder)
    return rows, folder


# --------------------------------------------------------------------------------------------------- report
def _report_metric(key: str) -> bool:
    if key.startswith(("bbox/", "segm/")):
        return not key.split("/", 1)[1].startswith("AP_")
    return key.startswith("proposal/AR@") or key == "voc/mAP" or bool(TRAIN_METRIC.fullmatch(key))


def collect_rows(space: Space, base: Config, grid) -> list[dict]:
    """One row per trial, best first: ``trial``, ``status`` (done / stopped early / error), ``epoch``, the
    searched ``values`` and their ``labels``, the final ``metrics`` and the trial's ``config``."""
    raw = raw_data(base)
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = {d.key: result.config[d.key] for d in space.dims if d.key in (result.config or {})}
        trial = metrics.get("trial_id") or os.path.basename(str(result.path)).removeprefix("trial_")
        cfg = base.with_overrides(trial_overrides(raw, space.dims, config))
        epoch = metrics.get("epoch")
        max_epochs = int(cfg.get("train.max_epochs", 0))
        status = ("error" if result.error is not None else "done" if epoch is not None and epoch >= max_epochs
                  else "stopped" if epoch is not None else "pending")
        rows.append({"trial": trial, "status": status, "epoch": epoch, "values": config, "path": str(result.path),
                     "error": result.error,
                     "labels": {d.key: d.label(config[d.key]) for d in space.dims if d.key in config},
                     "metrics": {k: float(v) for k, v in metrics.items() if _report_metric(k) and _is_number(v)},
                     "config": cfg})
    sign = 1.0 if space.mode == "max" else -1.0

    def order(row):
        v = row["metrics"].get(space.metric)
        return (0, -sign * v, row["trial"]) if v is not None and math.isfinite(v) else (1, 0.0, row["trial"])

    return sorted(rows, key=order)


def _metric_columns(space: Space, rows: list[dict], compact: bool) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    if compact:  # the printed / markdown table: the main numbers only
        keys = [k for k in keys if k.startswith("proposal/") or k == "voc/mAP" or k == "train/loss"
                or k.split("/", 1)[-1] in ("AP", "AP50", "AP75")]
    return [space.metric] + [k for k in keys if k != space.metric]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table_lines(space: Space, rows: list[dict]) -> list[str]:
    """The markdown table of the study (also what ``raydet tune`` prints)."""
    metrics = _metric_columns(space, rows, compact=True)
    header = ["rank", "trial", "status", "epoch", *[d.key for d in space.dims], *metrics]
    body = [[str(i + 1), r["trial"], r["status"], _fmt(r["epoch"]), *[r["labels"].get(d.key, "-") for d in space.dims],
             *[_fmt(r["metrics"].get(m)) for m in metrics]] for i, r in enumerate(rows)]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = [True, False, False, True, *[False] * len(space.dims), *[True] * len(metrics)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return [line(header), rule, *[line(b) for b in body]]


def _file_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def plot_metric(space: Space, dim: Dimension, rows: list[dict], path: str) -> None:
    """``metric`` against one searched key (numbers on their axis, categories at positions with their labels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [(r["values"][dim.key], r["metrics"][space.metric]) for r in rows
              if dim.key in r["values"] and math.isfinite(r["metrics"].get(space.metric, math.nan))]
    best = points[0] if points and rows[0]["metrics"].get(space.metric) is not None else None
    numeric = not dim.categorical or (not dim.labels and all(_is_number(v) for v in dim.values))
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if numeric:
        xs = [float(x) for x, _ in points]
        ax.scatter(xs, [y for _, y in points], color="tab:blue", zorder=2)
        if dim.kind == "loguniform" or (dim.categorical and xs and min(xs) > 0 and max(xs) / min(xs) >= 100):
            ax.set_xscale("log")
        if dim.categorical:
            ticks = sorted({float(v) for v in dim.values})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        if best:
            ax.scatter([float(best[0])], [best[1]], color="tab:red", marker="*", s=160, zorder=3, label="best")
    else:
        xs = [dim.position(x) for x, _ in points]
        ax.scatter(xs, [y for _, y in points], color="tab:blue", zorder=2)
        labels = dim.labels or [dim.label(v) for v in dim.values]
        ax.set_xticks(range(len(dim.values)), labels, rotation=20 if max(map(len, labels)) > 8 else 0,
                      ha="right" if max(map(len, labels)) > 8 else "center", fontsize=8)
        ax.set_xlim(-0.5, len(dim.values) - 0.5)
        if best:
            ax.scatter([dim.position(best[0])], [best[1]], color="tab:red", marker="*", s=160, zorder=3,
                       label="best")
    ax.set_xlabel(dim.key)
    ax.set_ylabel(space.metric)
    ax.set_title(f"{space.name}: {space.metric} ({space.mode}) vs {dim.key}", fontsize=10)
    ax.grid(alpha=0.3)
    if best:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def write_report(space: Space, base: Config, rows: list[dict], folder: str) -> dict:
    """``results.csv``, ``results.md``, ``metric_vs_<key>.png`` per searched key and ``best_pipeline.yaml``;
    returns their paths."""
    os.makedirs(folder, exist_ok=True)
    files = {"csv": os.path.join(folder, "results.csv"), "md": os.path.join(folder, "results.md")}
    metrics = _metric_columns(space, rows, compact=False)
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial", "status", "epoch", *[d.key for d in space.dims], *metrics])
        for i, r in enumerate(rows):
            writer.writerow([i + 1, r["trial"], r["status"], "" if r["epoch"] is None else r["epoch"],
                             *[r["labels"].get(d.key, "") if d.categorical else r["values"].get(d.key, "")
                               for d in space.dims],
                             *["" if r["metrics"].get(m) is None else repr(r["metrics"][m]) for m in metrics]])
    with open(files["md"], "w") as f:
        f.write(f"# Study `{space.name}`: {space.metric} ({space.mode}) on `{space.pipeline}`\n\n")
        f.write("\n".join(table_lines(space, rows)) + "\n")
    for dim in space.dims:
        path = os.path.join(folder, f"metric_vs_{_file_key(dim.key)}.png")
        plot_metric(space, dim, rows, path)
        files[f"plot:{dim.key}"] = path
    if rows and rows[0]["metrics"].get(space.metric) is not None:
        files["best"] = os.path.join(folder, "best_pipeline.yaml")
        rows[0]["config"].dump(files["best"])
    return files


# --------------------------------------------------------------------------------------------------- command
def _resume_space(path: str, overrides: list[str], folder_hint: str | None) -> Space:
    """On --resume: the study's recorded command-line overrides are used; the space file must be unchanged."""
    space = load_space(path, overrides)
    base = load_base(space)
    record_path = os.path.join(study_dir(space, base, folder_hint), STUDY_FILE)
    if not os.path.isfile(record_path):
        return space
    with open(record_path) as f:
        record = json.load(f)
    with open(path, encoding="utf-8") as f:
        if f.read() != record["space_text"]:
            raise ConfigError(f"{path}: the space file changed since the study in {os.path.dirname(record_path)} "
                              f"started; --resume continues the same study (restore the file, or start a new "
                              f"study with another --work-dir)")
    if overrides and overrides != record["overrides"]:
        raise ConfigError(f"--resume: the study started with --set {' '.join(record['overrides']) or '(none)'}; "
                          f"a resumed study keeps its settings (leave out --set)")
    return load_space(path, record["overrides"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raydet tune", description="Run a hyperparameter study on Ray Tune.")
    parser.add_argument("space", help="space YAML (see tune_spaces/)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override pipeline keys of every trial, values parsed as YAML")
    parser.add_argument("--resume", action="store_true",
                        help="continue the study: finished trials are kept, unfinished and errored ones rerun")
    parser.add_argument("--work-dir", default=None,
                        help="the study goes to WORK_DIR/tune/<space name> (default: the pipeline's work_dir)")
    args = parser.parse_args(argv)
    from raydet.commands.ray_setup import setup_logging

    setup_logging()
    # Tune's "Trials did not complete: [...]": the study's summary below lists the failed trials and why
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    try:
        space = (_resume_space(args.space, args.set, args.work_dir) if args.resume
                 else load_space(args.space, args.set))
        rows, folder = run_study(space, work_dir=args.work_dir, resume=args.resume)
    except Exception as exc:  # one line (ours, or the original behind Ray's wrapping); the traceback to a file
        release_ray()  # no trial output after the error line
        return report_failure(exc, None, "tune")
    errors = sum(r["status"] == "error" for r in rows)
    print(f"\nraydet: study {space.name}: {len(rows)} trials" + (f" ({errors} failed)" if errors else "") +
          f", {space.metric} ({space.mode}), best first; folder {folder}")
    print("\n".join(table_lines(space, rows)))
    for r in rows:
        if r["status"] == "error":
            why = f"{describe_failure(r['error'])}; " if r.get("error") is not None else ""
            print(f"trial {r['trial']} failed: {why}traceback: {os.path.join(r['path'], 'error.txt')}")
    if not rows or rows[0]["metrics"].get(space.metric) is None:
        failed = [r["error"] for r in rows if r.get("error") is not None]
        release_ray()
        if failed:  # every trial failed: the first failure, as any command reports one
            report_failure(failed[0], folder, "tune")
        else:
            print(f"error: no trial reported {space.metric}", file=sys.stderr)
        return 1
    print(f"\nbest pipeline: {os.path.join(folder, 'best_pipeline.yaml')}  "
          f"(train it with: python -m raydet.train {os.path.join(folder, 'best_pipeline.yaml')})")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s, so that Ray pickles the trial driver by reference to
    # raydet.tune (as raydet.train does for its worker function).
    import importlib

    sys.exit(importlib.import_module("raydet.tune").main())
