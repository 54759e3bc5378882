"""Waiting for an asynchronous Ray event in a test (DEVELOPERS.md, "Asynchronous Ray events"): poll a condition with
a generous deadline instead of sleeping a fixed time."""
from __future__ import annotations

import threading
import time


def wait_for(condition, what: str, timeout_s: float, stop: threading.Event | None = None, poll_s: float = 0.05):
    """Poll ``condition()`` until it returns something true (returned); raise AssertionError saying ``what`` never
    happened after ``timeout_s``, or as soon as ``stop`` is set (nothing left to wait for)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if stop is not None and stop.is_set():
            raise AssertionError(f"{what} (the run ended first)")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout_s:.0f} s)")
        time.sleep(poll_s)
