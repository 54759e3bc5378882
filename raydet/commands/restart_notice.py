"""One console line when a Ray Train worker fails and Ray Train restarts the worker group.

Ray Train's own messages about it (the worker's traceback, the failure policy's decision, the new worker group) go
to its log files (:mod:`raydet.commands.ray_setup`). A failure that ends the run is not announced here: the command
reports it in its one ``error:`` line (:func:`raydet.errors.report_failure`).
"""
from __future__ import annotations

import sys

from ray.train import UserCallback

from raydet.errors import describe_failure

__all__ = ["RestartNotice"]


class RestartNotice(UserCallback):
    """Runs in the Ray Train controller; ``max_failures``: the run's ``scaling.max_failures`` (-1: no limit)."""

    def __init__(self, max_failures: int):
        self.max_failures = int(max_failures)
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        if not worker_exceptions or 0 <= self.max_failures < self.failures:
            return  # no restart: the command reports the failure
        rank, exc = min(worker_exceptions.items(), key=lambda item: item[0])
        limit = "no limit" if self.max_failures < 0 else f"at most {self.max_failures}"
        print(f"raydet: training worker {rank} failed: {describe_failure(exc)}; restarting the workers from the "
              f"latest checkpoint (restart {self.failures}, {limit}: scaling.max_failures)", file=sys.stderr,
              flush=True)
