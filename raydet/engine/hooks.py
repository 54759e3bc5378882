"""Hooks: small objects called by the Runner at fixed points of the loop, in priority order.

Users add their own from the pipeline (``hooks: [{type: MyHook, priority: 60, ...}]``) after registering the class
with ``raydet.registry.register`` in a module listed under ``runtime.imports``. ``priority`` (an int from 0 to 100 or a
:class:`Priority` name such as ``NORMAL``, as in MMEngine's ``custom_hooks``) is taken by :func:`build_hook`, so a plain
``Hook`` subclass needs no ``priority`` argument; the other keys are the class's arguments.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections import defaultdict
from enum import IntEnum

import torch

from raydet.engine.dist import all_gather_object, any_rank, broadcast_object
from raydet.errors import RaydetError
from raydet.engine.optim import LrScheduleConfig, lr_at
from raydet.registry import REGISTRY, build, closest, error

__all__ = ["HOOK_POINTS", "Priority", "Hook", "parse_priority", "build_hook", "LrSchedulerHook", "OptimizerHook",
           "CheckpointHook", "LoggerHook", "ProgressBarHook", "EvalHook", "EpochGateHook", "WorkDirSyncHook",
           "NonFiniteLossError", "CHECKPOINT_SCORE"]

log = logging.getLogger("raydet")

HOOK_POINTS = ("before_run", "before_train_epoch", "before_train_iter", "after_train_iter", "after_train_epoch",
               "before_val_epoch", "before_val_iter", "after_val_iter", "after_val_epoch", "after_run")


class Priority(IntEnum):
    """Lower runs first."""

    HIGHEST = 0
    VERY_HIGH = 10
    HIGH = 30
    ABOVE_NORMAL = 40
    NORMAL = 50
    BELOW_NORMAL = 60
    LOW = 70
    VERY_LOW = 90
    LOWEST = 100


class Hook:
    """Override any of the ten hook points; each receives the Runner. ``state_dict`` is saved in checkpoints."""

    priority: int = Priority.NORMAL

    def before_run(self, runner): pass
    def before_train_epoch(self, runner): pass
    def before_train_iter(self, runner): pass
    def after_train_iter(self, runner): pass
    def after_train_epoch(self, runner): pass
    def before_val_epoch(self, runner): pass
    def before_val_iter(self, runner): pass
    def after_val_iter(self, runner): pass
    def after_val_epoch(self, runner): pass
    def after_run(self, runner): pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def parse_priority(value, path: str = "priority") -> int:
    """A hook priority from a pipeline: an int in [0, 100] or a :class:`Priority` name (any case).

    Raises:
        ConfigError: naming ``path``, with the closest name for a misspelt one.
    """
    if isinstance(value, str):
        name = value.strip().upper()
        if name in Priority.__members__:
            return int(Priority[name])
        raise error(path, f"unknown priority '{value}'{closest(name, Priority.__members__)} (an int from 0 to 100 "
                          f"or one of {', '.join(Priority.__members__)})")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
        return int(value)
    raise error(path, f"expected an int from 0 to 100 or a name such as NORMAL, got {value!r}")


def build_hook(spec, path: str) -> Hook:
    """A :class:`Hook` from a ``hooks:`` entry ``{type: Name, priority: P, **arguments}`` (``priority`` optional,
    see :func:`parse_priority`; it overrides the class's). A built Hook is returned as is.

    Raises:
        ConfigError: naming ``path`` and the key (unknown type or argument, bad priority, a type that is no Hook).
    """
    if isinstance(spec, Hook):
        return spec
    if not isinstance(spec, dict):
        raise error(path, f"expected a mapping {{type: HookName, ...}}, got {spec!r}")
    spec = dict(spec)
    priority = parse_priority(spec.pop("priority"), f"{path}.priority") if "priority" in spec else None
    name = spec.get("type")
    if isinstance(name, str) and name not in REGISTRY:
        hooks = [k for k, v in REGISTRY.items() if isinstance(v, type) and issubclass(v, Hook)]
        raise error(f"{path}.type", f"unknown hook type '{name}'{closest(name, hooks)} (a hook class must be "
                                    f"registered with raydet.registry.register in a module listed in runtime.imports)")
    factory = REGISTRY.get(name)
    takes_priority = factory is not None and "priority" in inspect.signature(factory).parameters
    if priority is not None and takes_priority:  # the class takes it itself
        spec["priority"] = priority
    hook = build(spec, path)
    if not isinstance(hook, Hook):
        raise error(f"{path}.type", f"{spec['type']} is not a hook (subclass raydet.engine.hooks.Hook)")
    if priority is not None:
        hook.priority = priority
    return hook


class NonFiniteLossError(RaydetError, FloatingPointError):
    """A loss became NaN or infinite; the message names the iteration and the loss terms."""

    exit_code = 1  # the run failed, wherever it ran


# --------------------------------------------------------------------------------------------------- schedule
class LrSchedulerHook(Hook):
    """Sets every parameter group's lr before each iteration: warmup, then step decay by epoch, times the group's
    ``lr_mult`` (optimizer.paramwise_cfg)."""

    priority = Priority.VERY_HIGH

    def __init__(self, base_lr: float, schedule: LrScheduleConfig):
        self.base_lr = base_lr
        self.schedule = schedule

    def before_train_iter(self, runner):
        lr = lr_at(self.base_lr, self.schedule, runner.epoch, runner.iter)
        for group in runner.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)


# --------------------------------------------------------------------------------------------------- optimizer
def _all_reduce_mean_gradients(model: torch.nn.Module) -> None:
    """Average every trainable parameter's gradient over the process group, as DDP's all-reduce would (a missing
    gradient counts as zeros)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class OptimizerHook(Hook):
    """Backward, optional gradient clipping, optimizer step; a GradScaler for fp16.

    Args:
        grad_clip: ``{max_norm, norm_type}`` or None.
        fp16_scaler: use a GradScaler (set for ``amp: fp16``).
        nonfinite: "stop" raises NonFiniteLossError naming the iteration and loss terms; "skip" drops the step
            (with ``accumulation``, the gradients gathered so far in its group too). With several workers they
            decide together: a non-finite loss on one stops, or skips the step on, every worker.
        device: the device type the model trains on ("cuda", "cpu"); the GradScaler works on it.
        accumulation: iterations per optimizer step (``scaling.on_resize: keep_global_batch``,
            :mod:`raydet.engine.elastic`): each iteration's loss is divided by it and its gradients add up, so a
            step sees the mean over ``accumulation`` batches; the last group of an epoch steps at the epoch's end
            even when it is shorter, with its gradients rescaled to the mean over its batches. Gradient clipping
            applies to that mean.
    """

    priority = Priority.HIGH

    def __init__(self, grad_clip: dict | None = None, fp16_scaler: bool = False, nonfinite: str = "stop",
                 device: str = "cuda", accumulation: int = 1):
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {accumulation}")
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device) if fp16_scaler else None
        self.nonfinite = nonfinite
        self.skipped = 0
        self.accumulation = int(accumulation)
        self.pending = 0  # iterations whose gradients wait for the next step
        self.unsynced = False  # the accumulated gradients skipped DDP's all-reduce (see before_train_iter)

    def before_train_iter(self, runner):
        """Under DistributedDataParallel with accumulation, only a group's last backward all-reduces (what
        ``DDP.no_sync()`` does, set per iteration because the forward runs in the Runner and the backward here):
        the others accumulate locally, and the last one reduces the sum. DDP decides in the forward."""
        model = runner.model
        if self.accumulation > 1 and hasattr(model, "require_backward_grad_sync"):
            model.require_backward_grad_sync = self.pending + 1 >= self.accumulation
            self.unsynced = not model.require_backward_grad_sync

    def after_train_iter(self, runner):
        bad = [k for k, v in runner.losses.items() if k.startswith("loss") and not torch.isfinite(v).all()]
        # every rank decides together: under DDP a rank that skipped its backward (or stopped) while the others
        # went on would leave them waiting in the gradient all-reduce for ever
        device = runner.loss.device if torch.is_tensor(runner.loss) else None
        if any_rank(bool(bad), device):
            values = ", ".join(f"{k}={float(runner.losses[k].detach()):.4g}" for k in bad) or "on another worker"
            message = f"non-finite loss at epoch {runner.epoch + 1}, iteration {runner.iter + 1}: {values}"
            if self.nonfinite == "stop":
                raise NonFiniteLossError(message + " (set train.nonfinite_loss: skip to skip such steps)")
            self.skipped += 1
            log.warning("%s; step skipped", message)
            runner.optimizer.zero_grad(set_to_none=True)
            self.pending, self.unsynced = 0, False
            return
        opt = runner.optimizer
        if self.pending == 0:
            opt.zero_grad(set_to_none=True)
        loss = runner.loss / self.accumulation if self.accumulation > 1 else runner.loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self.pending += 1
        if self.pending >= self.accumulation:
            self.step(runner)

    def after_train_epoch(self, runner):
        if self.pending:  # the epoch's last, shorter accumulation group
            self.step(runner)

    def step(self, runner):
        opt = runner.optimizer
        if self.unsynced:  # an epoch's last, shorter group under DDP: average its gradients over the workers
            _all_reduce_mean_gradients(runner.model)
            self.unsynced = False
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if 0 < self.pending < self.accumulation:  # a short group: the mean over the batches it has
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(self.accumulation / self.pending)
        self.pending = 0
        if self.grad_clip:
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, **self.grad_clip)
            runner.losses = dict(runner.losses, grad_norm=norm.detach())
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self):
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state):
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# --------------------------------------------------------------------------------------------------- evaluation
class EvalHook(Hook):
    """Every ``interval`` epochs (and after the last one): run the evaluation pass, gather every worker's
    predictions to rank 0, score them, and share the metrics with all ranks (``runner.metrics``).

    Args:
        evaluator: object with ``convert(img_metas, predictions) -> list`` (compact, picklable per-image results)
            and ``evaluate(results) -> dict[str, float]``.
    """

    priority = Priority.ABOVE_NORMAL

    def __init__(self, evaluator, interval: int = 1):
        self.evaluator = evaluator
        self.interval = interval
        self.results: list = []

    def after_train_epoch(self, runner):
        last = runner.epoch + 1 == runner.max_epochs
        if (runner.epoch + 1) % self.interval == 0 or last:
            runner.val()

    def before_val_epoch(self, runner):
        self.results = []

    def after_val_iter(self, runner):
        self.results.extend(self.evaluator.convert(runner.batch["img_metas"], runner.predictions))

    def after_val_epoch(self, runner):
        gathered = all_gather_object(self.results)
        metrics = None
        if runner.rank == 0:
            results = [r for part in gathered for r in part]
            metrics = self.evaluator.evaluate(results)
        runner.metrics = broadcast_object(metrics)
        runner.eval_epoch = runner.epoch
        self.results = []


# --------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_SCORE = "checkpoint_score"


class CheckpointHook(Hook):
    """After each epoch: report the epoch's numbers, with a checkpoint every ``interval`` epochs and at the end.

    The report goes through ``runner.report`` (``ray.train.report`` under Ray Train); only rank 0 passes the
    checkpoint state. It holds ``epoch``, ``iter``, the epoch's mean losses (``train/...``) and, when this epoch was
    evaluated, the evaluation metrics (an epoch without evaluation reports none: no stale metric of an earlier
    epoch).

    Retention (Ray Train keeps ``checkpoint.num_to_keep`` checkpoints, and always the latest one, which resume
    needs): with a ``score_attribute`` the report also carries :data:`CHECKPOINT_SCORE`, the attribute's value when
    the epoch was evaluated, else the worst value (-inf for ``max``, +inf for ``min``). Ray ranks checkpoints by it,
    so the kept ones are the best evaluated ones plus the latest.
    """

    priority = Priority.BELOW_NORMAL

    def __init__(self, interval: int = 1, score_attribute: str | None = None, score_order: str = "max"):
        if score_order not in ("max", "min"):
            raise ValueError(f"score_order must be max or min, got {score_order!r}")
        self.interval = interval
        self.score_attribute = score_attribute
        self.score_order = score_order

    def after_train_epoch(self, runner):
        epoch = runner.epoch + 1
        evaluated = runner.eval_epoch == runner.epoch
        metrics = {"epoch": epoch, "iter": runner.iter, **runner.epoch_log, **(runner.metrics if evaluated else {})}
        if self.score_attribute:
            worst = -math.inf if self.score_order == "max" else math.inf
            score = metrics.get(self.score_attribute, worst)
            metrics[CHECKPOINT_SCORE] = score if isinstance(score, (int, float)) and math.isfinite(score) else worst
        save = epoch % self.interval == 0 or epoch == runner.max_epochs
        state = None
        if save and runner.rank == 0:
            state = runner.state_dict()
            state["epoch"] = epoch  # the next run starts after this epoch
        runner.report(metrics, state)


class EpochGateHook(Hook):
    """After each epoch's report but the last: wait until ``<folder>/continue_<epoch>`` exists (go on) or
    ``<folder>/<stop_file>`` does (stop the run after this epoch, which ends normally).

    ``raydet tune`` uses it so that a trial waits for Ray Tune's decision on each epoch's result: a trial that a
    scheduler (ASHA) stops trains no iteration past the epoch it was stopped at and writes no later checkpoint.
    After ``timeout_s`` without either file the run goes on with a warning.
    """

    priority = Priority.LOW

    def __init__(self, folder: str, stop_file: str = "stop_requested", timeout_s: float = 3600.0,
                 poll_s: float = 0.05):
        self.folder, self.stop_file, self.timeout_s, self.poll_s = folder, stop_file, timeout_s, poll_s

    def after_train_epoch(self, runner):
        epoch = runner.epoch + 1
        if epoch >= runner.max_epochs:
            return
        go, stop = (os.path.join(self.folder, name) for name in (f"continue_{epoch}", self.stop_file))
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if os.path.exists(stop):
                log.info("stop requested after epoch %d: the run ends here", epoch)
                runner.stop_requested = True
                return
            if os.path.exists(go):
                return
            time.sleep(self.poll_s)
        log.warning("no decision to continue or stop after epoch %d within %.0f s: continuing", epoch,
                    self.timeout_s)


# --------------------------------------------------------------------------------------------------- logging
class LoggerHook(Hook):
    """Every ``interval`` iterations on rank 0: each loss term (averaged over the interval), lr, data time, iteration
    time, ETA and peak memory, to the console, ``<run folder>/log.jsonl`` and TensorBoard (``<run folder>/tb``);
    ``skipped_images`` (also ``train/skipped_images`` of the epoch's metrics) when images that failed to decode were
    replaced under ``data.train.on_error: skip`` (this worker's count in the epoch so far).

    ``data_time`` is the seconds an iteration waited for its batch (``runner.data_time``), ``time`` the whole
    iteration (that wait + forward, backward, step and the hooks before this one). ``data_wait_fraction`` is the
    share of training time spent waiting for data, summed data_time / summed time over this worker's epoch so far
    (in each log record: from the epoch's first iteration to the record's; 0 = never waited, 1 = only waited). The
    whole epoch's value is ``train/data_wait_fraction`` of the epoch's metrics (``runner.epoch_log``, reported after
    the epoch), and rank 0 prints it on a console line at the end of each epoch.

    ``destination``: where the run folder's files end up when ``runner.work_dir`` is a local copy of it (a URI, see
    :class:`WorkDirSyncHook`); the log names it instead of the local copy."""

    priority = Priority.VERY_LOW

    def __init__(self, interval: int = 50, tensorboard: bool = True, curves: bool = True):
        self.interval = interval
        self.tensorboard = tensorboard
        self.curves = curves  # draw curves.png at the end of the run (runtime.curves)
        self.destination: str | None = None
        self.window: dict[str, list[float]] = defaultdict(list)
        self.jsonl = None
        self.writer = None
        self.t_iter = self.t_start = 0.0
        self.epoch_sums: dict[str, float] = defaultdict(float)
        self.epoch_count = 0
        self.epoch_skipped = 0  # images replaced by copies under data.train.on_error=skip (raydet.data.ray_data)
        self.epoch_data_s = self.epoch_iter_s = 0.0  # summed data_time and iteration time of the epoch, seconds

    def before_run(self, runner):
        self.t_start = time.perf_counter()
        self.start_iter = runner.iter
        if runner.rank != 0 or not runner.work_dir:
            return
        os.makedirs(runner.work_dir, exist_ok=True)
        self.jsonl = open(os.path.join(runner.work_dir, "log.jsonl"), "a", buffering=1)
        if self.tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # tensorboardX comes with ray[tune]; without it, TensorBoard logging is off
                log.warning("tensorboardX is not installed: TensorBoard logging disabled")
            else:
                self.writer = SummaryWriter(os.path.join(runner.work_dir, "tb"))

    def before_train_epoch(self, runner):
        self.epoch_sums.clear()
        self.epoch_count = 0
        self.epoch_skipped = 0
        self.epoch_data_s = self.epoch_iter_s = 0.0

    def before_train_iter(self, runner):
        self.t_iter = time.perf_counter()

    def after_train_iter(self, runner):
        for k, v in runner.losses.items():
            value = float(v.detach())
            self.window[k].append(value)
            if k.startswith("loss"):
                self.epoch_sums[k] += value
        self.epoch_sums["loss"] += float(runner.loss.detach())
        self.epoch_count += 1
        # kept current every iteration: hooks that run before this one at after_train_epoch (checkpoint reports) see it
        runner.epoch_log = {f"train/{k}": v / self.epoch_count for k, v in self.epoch_sums.items()}
        self.epoch_skipped += int((getattr(runner, "batch", None) or {}).get("skipped_images", 0))
        if self.epoch_skipped:  # this worker's count of the epoch so far
            runner.epoch_log["train/skipped_images"] = self.epoch_skipped
        iter_s = time.perf_counter() - self.t_iter + runner.data_time
        self.window["time"].append(iter_s)
        self.window["data_time"].append(runner.data_time)
        self.epoch_data_s += runner.data_time
        self.epoch_iter_s += iter_s
        runner.epoch_log["train/data_wait_fraction"] = self.data_wait_fraction()
        if (runner.iter + 1) % self.interval == 0:
            self.flush(runner)

    def data_wait_fraction(self) -> float:
        """Summed data_time / summed iteration time over the epoch so far (0.0 before its first iteration)."""
        return self.epoch_data_s / self.epoch_iter_s if self.epoch_iter_s > 0 else 0.0

    def after_train_epoch(self, runner):
        if runner.rank == 0 and self.epoch_iter_s > 0:
            log.info("epoch %d/%d: waited for data %.1f%% of the training time (%.1fs of %.1fs, data_wait_fraction "
                     "%.4f)", runner.epoch + 1, runner.max_epochs, 100 * self.data_wait_fraction(), self.epoch_data_s,
                     self.epoch_iter_s, self.data_wait_fraction())

    def flush(self, runner):
        if not self.window:
            return
        record = {k: sum(v) / len(v) for k, v in self.window.items()}
        record["loss"] = sum(v for k, v in record.items() if k.startswith("loss"))
        record["data_wait_fraction"] = self.data_wait_fraction()
        self.window.clear()
        record.update(mode="train", epoch=runner.epoch + 1, iter=runner.iter + 1,
                      lr=runner.optimizer.param_groups[0]["lr"], memory_mb=_peak_memory_mb(runner.device))
        if self.epoch_skipped:
            record["skipped_images"] = self.epoch_skipped
        if runner.iters_per_epoch:
            done = runner.iter + 1 - self.start_iter
            remaining = runner.max_epochs * runner.iters_per_epoch - (runner.iter + 1)
            record["eta_s"] = (time.perf_counter() - self.t_start) / max(done, 1) * max(remaining, 0)
        self.write(runner, record)

    def after_val_epoch(self, runner):
        if runner.metrics:
            self.write(runner, {"mode": "val", "epoch": runner.epoch + 1, "iter": runner.iter, **runner.metrics})

    def after_run(self, runner):
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
            if not self.curves:
                return
            from raydet.engine.curves import plot_curves

            try:  # the curves are a convenience: a plotting problem must not fail a finished run
                if plot_curves(self.jsonl.name):
                    where = f"{self.destination.rstrip('/')}/curves.png" if self.destination else \
                        os.path.join(runner.work_dir, "curves.png")
                    log.info("loss and metric curves: %s", where)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not draw the curves of %s: %s", self.jsonl.name, exc)

    def write(self, runner, record: dict):
        if runner.rank != 0:
            return
        epoch_part = f"epoch {record['epoch']}/{runner.max_epochs}"
        if record["mode"] == "train":
            it = f"iter {record['iter']}" + (f"/{runner.max_epochs * runner.iters_per_epoch}"
                                              if runner.iters_per_epoch else "")
            terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss") or k == "grad_norm")
            eta = f" eta {_fmt_seconds(record['eta_s'])}" if "eta_s" in record else ""
            log.info("%s %s lr %.3g %s time %.3fs data %.3fs mem %dMB%s", epoch_part, it, record["lr"], terms,
                     record["time"], record["data_time"], record["memory_mb"], eta)
        else:
            terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if isinstance(v, float))
            log.info("%s val %s", epoch_part, terms)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iter") and math.isfinite(v):
                    self.writer.add_scalar(f"{record['mode']}/{k}" if "/" not in k else k, v, record["iter"])


class WorkDirSyncHook(Hook):
    """When the run folder is in object storage: copy what rank 0's hooks write into its local scratch folder
    (``log.jsonl``, ``tb/``, ``curves.png``) to the run folder's URI, file by file as they change
    (:class:`raydet.fileio.MirroredFolder`):

    * during an epoch, after an iteration, when ``interval_s`` seconds have passed since the previous copy (so the
      log in the bucket is at most that much behind the console, plus the time to the next log line);
    * after every epoch, with its evaluation (after the epoch's checkpoint is reported);
    * at the end of the run (``curves.png`` is drawn then); the training command also copies them when the run
      fails, before it reports the error.

    Runs last (``LOWEST``), after the hooks that write the files.
    """

    priority = Priority.LOWEST

    def __init__(self, folder, interval_s: float = 10.0):
        self.folder = folder
        self.interval_s = interval_s
        self.last = time.monotonic()

    def sync(self) -> None:
        self.folder.sync()
        self.last = time.monotonic()

    def after_train_iter(self, runner):
        if time.monotonic() - self.last >= self.interval_s:
            self.sync()

    def after_train_epoch(self, runner):
        self.sync()

    def after_run(self, runner):
        self.sync()


# --------------------------------------------------------------------------------------------------- progress
class ProgressBarHook(Hook):
    """On rank 0: one bar over the whole training (iterations done / ``max_epochs x iters_per_epoch``, with rate
    and ETA; a resumed run starts where it stands) described by the epoch and the latest loss, and one bar per
    evaluation pass over this rank's images (``runner.val_images``). See :mod:`raydet.engine.progress`."""

    priority = Priority.LOWEST

    def __init__(self, bar_factory=None):
        from raydet.engine.progress import progress_bar

        self.bar_factory = bar_factory or progress_bar
        self.train_bar = self.val_bar = None

    def _describe(self, runner) -> str:
        text = f"epoch {runner.epoch + 1}/{runner.max_epochs}"
        if runner.loss is not None:
            text += f" loss {float(runner.loss.detach()):.4f}"
        return text

    def before_run(self, runner):
        if runner.rank != 0 or runner.train_loader is None or runner.epoch >= runner.max_epochs:
            return
        total = runner.max_epochs * runner.iters_per_epoch if runner.iters_per_epoch else None
        self.train_bar = self.bar_factory(total=total, desc=self._describe(runner), unit="it")
        if runner.iter:
            self.train_bar.update(runner.iter)

    def after_train_iter(self, runner):
        if self.train_bar is not None:
            self.train_bar.set_description(self._describe(runner))
            self.train_bar.update(1)

    def before_val_epoch(self, runner):
        if runner.rank == 0:
            self.val_bar = self.bar_factory(total=runner.val_images, desc=f"evaluate (epoch {runner.epoch + 1})"
                                            if runner.max_epochs else "evaluate", unit="img")

    def after_val_iter(self, runner):
        if self.val_bar is not None:
            self.val_bar.update(len(runner.batch["img_metas"]))

    def after_val_epoch(self, runner):
        if self.val_bar is not None:
            self.val_bar.close()
            self.val_bar = None

    def after_run(self, runner):
        if self.train_bar is not None:
            self.train_bar.close()
            self.train_bar = None


def _peak_memory_mb(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device) / 2**20)
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    except ImportError:  # not on POSIX
        return 0


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

