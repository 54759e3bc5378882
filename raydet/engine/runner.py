"""The per-worker training loop, organised around hooks (the MMDetection report's design).

``Runner.run()`` calls, in order::

    before_run
    for each epoch:  before_train_epoch, [before_train_iter, after_train_iter] * iters, after_train_epoch
                     (an EvalHook runs before_val_epoch, [before_val_iter, after_val_iter] * iters, after_val_epoch
                      from inside after_train_epoch)
    after_run

Each hook point calls the registered hooks in priority order (lower number first).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch import nn

from raydet.engine.dist import get_rank, get_world_size
from raydet.engine.hooks import HOOK_POINTS, Hook

__all__ = ["Runner", "move_batch"]


def move_batch(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch (and the tensors inside its lists) to ``device``."""
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list):
            return [move(x) for x in v]
        return v
    return {k: move(v) for k, v in batch.items()}


class Runner:
    """Holds the training state and runs the hook-driven loop.

    Args:
        model: the detector, possibly wrapped in DistributedDataParallel.
        optimizer: its optimizer.
        train_loader: ``epoch -> iterable of batches`` (a new pass over this worker's shard each epoch).
        val_loader: ``() -> iterable of batches`` over this worker's share of the evaluation set, or None.
        max_epochs: epochs to train.
        hooks: hooks to register (more can be added with ``register_hook``).
        device: where batches go.
        amp: None, "fp16" or "bf16": forward passes run under autocast with that dtype.
        report: ``(metrics: dict, checkpoint_state: dict | None) -> None``; under Ray Train it calls
            ``ray.train.report`` (every rank, the same number of times); locally it may save files.
        iters_per_epoch: known iterations per epoch (for ETA and warmup bookkeeping), if any.
        val_images: images this worker evaluates in one evaluation pass (for the progress bar), if known.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 train_loader: Callable[[int], Iterable[dict]] | None, val_loader: Callable[[], Iterable[dict]] | None,
                 max_epochs: int, hooks: list[Hook] = (), device: torch.device | str = "cpu", amp: str | None = None,
                 report: Callable[[dict, dict | None], None] | None = None, work_dir: str | None = None,
                 iters_per_epoch: int | None = None, meta: dict | None = None, val_images: int | None = None):
        if amp not in (None, "fp16", "bf16"):
            raise ValueError(f"amp must be null, fp16 or bf16, got {amp!r}")
        self.model = model
        self.module = model.module if hasattr(model, "module") else model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.max_epochs = max_epochs
        self.device = torch.device(device)
        self.amp = amp
        self.report_fn = report
        self.work_dir = work_dir
        self.iters_per_epoch = iters_per_epoch
        self.val_images = val_images
        self.meta = dict(meta or {})
        self.rank, self.world_size = get_rank(), get_world_size()

        self.epoch = 0          # 0-based epoch being (or about to be) trained
        self.iter = 0           # global iterations done
        self.inner_iter = 0     # iterations done in the current epoch
        self.batch: dict | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.loss: torch.Tensor | None = None
        self.predictions: list[dict] = []
        self.metrics: dict[str, float] = {}      # latest evaluation metrics
        self.eval_epoch: int | None = None       # the (0-based) epoch they were computed after
        self.epoch_log: dict[str, float] = {}    # what after_train_epoch reports
        self.data_time = 0.0
        self.stop_requested = False
        self.hooks: list[Hook] = []
        for hook in hooks:
            self.register_hook(hook)

    # ----------------------------------------------------------------------------------------------- hooks
    def register_hook(self, hook: Hook) -> None:
        """Insert ``hook`` after the hooks of equal or higher priority (lower number)."""
        index = len(self.hooks)
        for i, h in enumerate(self.hooks):
            if hook.priority < h.priority:
                index = i
                break
        self.hooks.insert(index, hook)

    def call_hook(self, name: str) -> None:
        if name not in HOOK_POINTS:
            raise ValueError(f"unknown hook point {name!r}")
        for hook in self.hooks:
            getattr(hook, name)(self)

    def get_hook(self, cls):
        return next((h for h in self.hooks if isinstance(h, cls)), None)

    # ----------------------------------------------------------------------------------------------- loop
    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run(self) -> None:
        self.call_hook("before_run")
        while self.epoch < self.max_epochs and not self.stop_requested:
            self.train_epoch()
        self.call_hook("after_run")

    def train_epoch(self) -> None:
        self.model.train()
        self.inner_iter = 0
        self.call_hook("before_train_epoch")
        end = time.perf_counter()
        for batch in self.train_loader(self.epoch):
            self.batch = move_batch(batch, self.device)
            self.data_time = time.perf_counter() - end
            self.call_hook("before_train_iter")
            with self.autocast():
                self.losses = self.model(self.batch, mode="loss")
            self.loss = sum(v for k, v in self.losses.items() if k.startswith("loss"))
            self.call_hook("after_train_iter")  # the OptimizerHook steps here
            self.iter += 1
            self.inner_iter += 1
            end = time.perf_counter()
        self.call_hook("after_train_epoch")
        self.epoch += 1

    @torch.no_grad()
    def val(self) -> None:
        """One pass over this worker's evaluation share; hooks gather and score the predictions."""
        if self.val_loader is None:
            return
        self.model.eval()
        self.call_hook("before_val_epoch")
        for batch in self.val_loader():
            self.batch = move_batch(batch, self.device)
            self.call_hook("before_val_iter")
            with self.autocast():
                self.predictions = self.module.predict(self.batch)
            self.call_hook("after_val_iter")
        self.call_hook("after_val_epoch")
        self.model.train()

    def report(self, metrics: dict, checkpoint: dict | None) -> None:
        if self.report_fn is not None:
            self.report_fn(metrics, checkpoint)

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly where this run stands."""
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "iter": self.iter,
            "world_size": self.world_size,  # a resumed run with another one logs a resize (raydet.train)
            "torch_rng": torch.get_rng_state(),
            "meta": self.meta,
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        for hook in self.hooks:
            extra = hook.state_dict()
            if extra:
                state.setdefault("hooks", {})[type(hook).__name__] = extra
        return state

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        from raydet.engine.checkpoint import load_model_weights

        load_model_weights(self.module, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.iter = int(state["epoch"]), int(state["iter"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for hook in self.hooks:
            hook.load_state_dict(state.get("hooks", {}).get(type(hook).__name__, {}))
