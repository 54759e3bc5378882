"""Hooks that Ray tests load into Ray Train workers (``runtime.imports`` + ``hooks:`` in the pipeline), so that the
event a test reacts to happens at a fixed point of the training loop instead of whenever a (busy) machine gets there;
and a neck that fails with a plain Python error wherever the model runs (``model.neck.type: ZeroDivisionFPN``).

Not a test module (pytest collects ``test_*.py`` only). The Ray workers import it by the name the test passes in
``runtime.imports`` (see ``tests/test_failures.py``: ``tests._worker_hooks`` when Ray was started from the
repository root, whose path the workers get).
"""
from __future__ import annotations

import json
import os
import time

from raydet.engine.hooks import Hook, Priority
from raydet.models.necks.fpn import FPN
from raydet.registry import REGISTRY, register

__all__ = ["PauseOnceAfterIteration", "FailOnceAtIteration", "ZeroDivisionFPN", "RendezvousAfterIteration"]


class PauseOnceAfterIteration(Hook):
    """On rank 0, once global iteration ``iteration`` (1-based) is trained and logged, write ``marker`` (JSON:
    ``pid``, ``epoch``, ``iter``) and wait there until the process is killed, ``release`` exists, or ``timeout_s``
    passes (a leak guard only: the test creates ``release`` whatever happens). Only the first worker to get there
    pauses: a worker started later (a restarted worker group) finds the marker and trains on."""

    priority = Priority.LOWEST  # after the LoggerHook (VERY_LOW): the iteration's record is in log.jsonl first

    def __init__(self, marker: str, iteration: int, release: str | None = None, timeout_s: float = 3600.0):
        self.marker, self.iteration, self.release, self.timeout_s = marker, int(iteration), release, timeout_s

    def after_train_iter(self, runner):
        if runner.rank != 0 or runner.iter + 1 != self.iteration or os.path.exists(self.marker):
            return
        tmp = f"{self.marker}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "epoch": runner.epoch + 1, "iter": runner.iter + 1}, f)
        os.replace(tmp, self.marker)  # the test never reads a half-written marker
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not (self.release and os.path.exists(self.release)):
            time.sleep(0.05)


if "PauseOnceAfterIteration" not in REGISTRY:  # imported under a second name in the same process: keep the first
    register(PauseOnceAfterIteration)


class FailOnceAtIteration(Hook):
    """On rank 0, the first time global iteration ``iteration`` (1-based) is about to train, write ``marker`` and
    raise (a crash in the middle of a run); a later start of the run finds the marker and trains on."""

    priority = Priority.LOWEST

    def __init__(self, marker: str, iteration: int):
        self.marker, self.iteration = marker, int(iteration)

    def before_train_iter(self, runner):
        if runner.rank != 0 or runner.iter + 1 != self.iteration or os.path.exists(self.marker):
            return
        with open(self.marker, "w") as f:
            json.dump({"pid": os.getpid(), "epoch": runner.epoch + 1, "iter": runner.iter + 1}, f)
        raise RuntimeError(f"test crash before iteration {self.iteration}")


if "FailOnceAtIteration" not in REGISTRY:
    register(FailOnceAtIteration)


def _divide(count: int) -> float:
    return 1 / count  # ZeroDivisionError for count == 0: a failure that is none of raydet's named errors


class ZeroDivisionFPN(FPN):
    """The quickstart's FPN (same parameters, so a quickstart checkpoint loads into it) that fails with a plain
    ZeroDivisionError where ``fail_in`` says: ``"forward"`` (in every process that runs the model: a Ray Train
    worker, a Ray Data inference actor, a Tune trial's worker, or the benchmark's own process) or ``"init"``
    (wherever the model is built, even on the meta device by ``raydet config``)."""

    def __init__(self, *args, fail_in: str = "forward", **kwargs):
        super().__init__(*args, **kwargs)
        if fail_in == "init":
            _divide(0)
        self.fail_in = fail_in

    def forward(self, inputs):
        if self.fail_in == "forward":
            _divide(0)
        return super().forward(inputs)


if "ZeroDivisionFPN" not in REGISTRY:
    register(ZeroDivisionFPN)


class RendezvousAfterIteration(Hook):
    """On rank 0, after global iteration ``iteration`` (1-based): write ``<folder>/<pid>`` and wait until
    ``parties`` such files exist (or ``timeout_s`` passes, a leak guard): runs that take it (e.g. the trials of a
    study) are all running at once at that point."""

    priority = Priority.LOWEST

    def __init__(self, folder: str, parties: int, iteration: int = 1, timeout_s: float = 600.0):
        self.folder, self.parties, self.iteration, self.timeout_s = folder, int(parties), int(iteration), timeout_s

    def after_train_iter(self, runner):
        if runner.rank != 0 or runner.iter + 1 != self.iteration:
            return
        os.makedirs(self.folder, exist_ok=True)
        open(os.path.join(self.folder, str(os.getpid())), "w").close()
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and len(os.listdir(self.folder)) < self.parties:
            time.sleep(0.05)


if "RendezvousAfterIteration" not in REGISTRY:
    register(RendezvousAfterIteration)
