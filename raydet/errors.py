"""The user's error behind a failed Ray run.

When a training worker or a Ray Data actor raises, Ray wraps the exception several times (``WorkerGroupError`` ->
the worker's exception -> ``UserCodeException`` -> ``RayTaskError(<original>)``), and printing it shows tracebacks
from deep inside Ray. The commands look through the wrapping for one of raydet's own errors, whose messages name the
file, record, key or iteration concerned, and print only that.
"""
from __future__ import annotations

__all__ = ["user_errors", "find_user_error", "wrapped_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """raydet's errors with self-contained messages (a bad pipeline value, image, checkpoint or loss)."""
    from raydet.data.datasets import CorruptImageError
    from raydet.engine.checkpoint import CheckpointError
    from raydet.engine.hooks import NonFiniteLossError
    from raydet.registry import ConfigError

    return ConfigError, CorruptImageError, CheckpointError, NonFiniteLossError, FileNotFoundError


def _links(exc: BaseException) -> list[BaseException]:
    """What ``exc`` wraps: the original of a RayTaskError, each failed worker's error, a controller's error, and
    the Python cause / context."""
    out = []
    for name in ("cause", "controller_failure"):
        inner = getattr(exc, name, None)
        if isinstance(inner, BaseException):
            out.append(inner)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out.extend(e for _, e in sorted(failures.items()) if isinstance(e, BaseException))
    out.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return out


def wrapped_errors(exc: BaseException):
    """``exc`` and everything it wraps (see :func:`_links`), breadth-first, each once."""
    queue, seen = [exc], set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        queue.extend(_links(e))


def find_user_error(exc: BaseException) -> BaseException | None:
    """The first raydet error found breadth-first in what ``exc`` wraps (``exc`` itself included), skipping Ray's
    wrappers that merely subclass it; None when the failure is not one of ours."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # no Ray: nothing is wrapped
        RayTaskError = ()
    wanted = user_errors()
    for e in wrapped_errors(exc):
        if isinstance(e, wanted) and not (RayTaskError and isinstance(e, RayTaskError)):
            return e
    return None
