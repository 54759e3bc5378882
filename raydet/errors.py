"""How a command reports a failure: one ``error: ...`` line on stderr, the full traceback in a file.

raydet's own errors derive from :class:`RaydetError` (:class:`~raydet.registry.ConfigError`,
:class:`~raydet.data.image_io.CorruptImageError`, :class:`~raydet.engine.checkpoint.CheckpointError`,
:class:`~raydet.engine.hooks.NonFiniteLossError`, ...). Their messages name the file, key, record or iteration
concerned, so the command prints only the message.

Anything else is a bug or an environment problem: Ray wraps an exception raised in a Ray Train worker or a Ray Data
actor, sometimes several times (``WorkerGroupError`` -> the original, ``RayTaskError(<original>)`` -> its cause,
a Tune trial's ``RayTaskError(WorkerGroupError)`` -> ...), and the original arrives pickled, without its traceback
(Ray Train keeps 1000 characters of it; the worker loops are decorated with :func:`keep_traceback` to keep all of
it). :func:`report_failure` unwraps it to the original exception and prints::

    error: ZeroDivisionError: division by zero (raised at raydet/engine/runner.py:137 in train_epoch; full
    traceback: work_dirs/quickstart/20261129_204512/error-20261129_204601.txt)

(one line), where "raised at" is the innermost frame inside the raydet package (the innermost frame when none is),
and writes the original's traceback (as text from the Ray process when that is all there is) to the file it names.

Exit codes (each command's contract): 2 for a :class:`RaydetError` (or a ``ValueError`` / ``FileNotFoundError``)
raised by the command's own process before or outside Ray, i.e. wrong input and nothing ran; 1 for a failure
that came back through Ray (the run started and failed) and for anything else. :class:`RaydetError` subclasses
that are run failures wherever they are raised (``NonFiniteLossError``) set ``exit_code = 1``.
"""
from __future__ import annotations

import builtins
import functools
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["RaydetError", "keep_traceback", "wrapped_errors", "find_user_error", "original_error", "describe_failure",
           "report_failure"]

PACKAGE_DIR = Path(__file__).resolve().parent

# Python's separators between the exceptions of a chain in a formatted traceback
_CHAIN_SEPARATORS = re.compile(r"\n(?:The above exception was the direct cause of the following exception:|"
                               r"During handling of the above exception, another exception occurred:)\n")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+?)\s*$', re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:\([\w.]*\))?)(?::\s?(?P<message>.*))?$")


class RaydetError(Exception):
    """Base class of raydet's named errors, whose messages are complete (they name the file, key, record or
    iteration): a command prints ``error: <message>``, nothing more.

    ``exit_code``: the command's exit status when the error is raised in its own process (2: wrong input, nothing
    ran); an error that comes back from a Ray worker or actor always exits with 1 (the run failed).
    """

    exit_code = 2


def keep_traceback(fn):
    """Decorator for a function Ray runs in another process (a Ray Train worker's loop): an exception leaving it
    carries its full traceback as text in ``raydet_traceback``, which survives the pickling back to the driver
    (Python drops tracebacks, and Ray Train passes on only the first and last 500 characters of the text)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            try:
                tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # from fn's own frame
                exc.raydet_traceback = "".join(traceback.format_exception(type(exc), exc, tb))
            except (AttributeError, TypeError):  # an exception type that takes no attributes
                pass
            raise

    return run


# --------------------------------------------------------------------------------------------------- Ray's wrapping
def _is_ray(exc: BaseException) -> bool:
    """Whether ``exc`` is one of Ray's exceptions (a wrapper), not the user's."""
    return type(exc).__module__.split(".", 1)[0] == "ray"


def _wrapped(exc: BaseException) -> list[BaseException]:
    """What a Ray wrapper wraps: the original of a RayTaskError, of a Ray Train worker's error and of a
    controller's error, each failed worker's error, and the Python cause (``raise ... from``)."""
    out = []
    for name in ("cause", "_base_exc", "controller_failure"):
        inner = getattr(exc, name, None)
        if isinstance(inner, BaseException):
            out.append(inner)
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict):
        out.extend(e for _, e in sorted(failures.items()) if isinstance(e, BaseException))
    if exc.__cause__ is not None:
        out.append(exc.__cause__)
    return out


def _links(exc: BaseException) -> list[BaseException]:
    """:func:`_wrapped`, and the exception being handled when ``exc`` was raised (Python's context)."""
    return _wrapped(exc) + ([exc.__context__] if exc.__context__ is not None else [])


def wrapped_errors(exc: BaseException):
    """``exc`` and everything it wraps or was raised while handling (see :func:`_links`), breadth-first, each
    once."""
    queue, seen = [exc], set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        queue.extend(_links(e))


def find_user_error(exc: BaseException) -> RaydetError | None:
    """The first :class:`RaydetError` found breadth-first in what ``exc`` wraps (``exc`` itself included),
    skipping Ray's wrappers that merely subclass it (``RayTaskError(ConfigError)``); None when there is none."""
    for e in wrapped_errors(exc):
        if isinstance(e, RaydetError) and not _is_ray(e):
            return e
    return None


def _remote_text(exc: BaseException) -> str | None:
    """The traceback text a Ray wrapper carries from the process that raised (a Ray Train worker's, a task's)."""
    for name in ("raydet_traceback", "_traceback_str", "traceback_str"):
        text = getattr(exc, name, None)
        if isinstance(text, str) and text.strip():
            return text
    return None


def original_error(exc: BaseException) -> tuple[BaseException, str, bool]:
    """``(original, traceback text, remote)``: the exception Ray wrapped (``exc`` itself when it is not one of
    Ray's; a Ray exception when Ray passed nothing else on), its traceback as text, and whether that text comes
    from another process: the text the original or the Ray wrapper closest to it carries (Python does not pickle
    tracebacks)."""
    parents: dict[int, BaseException] = {}
    queue, seen, found = [exc], set(), None
    while queue:  # breadth-first through what Ray's wrappers wrap: the first exception that is not Ray's
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if not _is_ray(e):
            found = e
            break
        for inner in _wrapped(e):
            parents.setdefault(id(inner), e)
            queue.append(inner)
    if found is exc:  # not wrapped; from another process if it lost its traceback there (a Ray Train callback's)
        if exc.__traceback__ is None and _remote_text(exc):
            return exc, _remote_text(exc), True
        return exc, "".join(traceback.format_exception(exc)), False
    node = found if found is not None else exc
    while node is not None:  # the nearest carrier of the remote traceback text
        text = _remote_text(node)
        if text:
            return (found if found is not None else node), text, True
        node = parents.get(id(node))
    original = found if found is not None else exc
    return original, "".join(traceback.format_exception(original if original.__traceback__ else exc)), True


def _exception_line(section: str) -> str | None:
    """The ``Type: message`` line of one exception's part of a formatted traceback (after its last frame)."""
    lines = section.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if _FRAME.match(line)), default=-1)
    for line in lines[last_frame + 1:]:
        if line and not line[0].isspace() and _EXCEPTION_LINE.match(line):
            return line
    return None


def _own_section(text: str) -> tuple[str, str | None]:
    """(section, its exception line) of the exception a formatted traceback is about, skipping Ray's: Python
    prints a chain cause first, so the last section whose exception is not one of Ray's."""
    sections = [part for part in _CHAIN_SEPARATORS.split(text) if part.strip()] or [text]
    for section in reversed(sections):
        line = _exception_line(section)
        if line is not None and not line.startswith("ray."):
            return section, line
    return sections[-1], None


# --------------------------------------------------------------------------------------------------- where
def package_path(filename: str) -> str | None:
    """``raydet/<module>.py`` for a file of the raydet package (also a copy of it on another node or in a Ray
    job's working dir, recognised by its path inside the package), else None."""
    norm = filename.replace("\\", "/")
    root = str(PACKAGE_DIR).replace("\\", "/") + "/"
    if norm.startswith(root):
        return "raydet/" + norm[len(root):]
    at = norm.rfind("/raydet/")
    if at >= 0:
        rel = norm[at + len("/raydet/"):]
        if (PACKAGE_DIR / rel).is_file():
            return "raydet/" + rel
    return None


def _frames(original: BaseException, text: str, remote: bool) -> list[tuple[str, int, str]]:
    """(file, line, function) of the frames that raised ``original``, innermost last."""
    if not remote and original.__traceback__ is not None:
        return [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(original.__traceback__)]
    section, _ = _own_section(text)  # the original's own frames, not those of its causes or Ray's wrappers
    return [(m["file"], int(m["line"]), m["name"]) for m in _FRAME.finditer(section)]


def _raised_at(frames: list[tuple[str, int, str]]) -> str | None:
    """``raydet/<file>.py:<line> in <function>`` of the innermost frame inside raydet (else the innermost)."""
    for filename, line, name in reversed(frames):
        rel = package_path(filename)
        if rel is not None:
            return f"{rel}:{line} in {name}"
    if frames:
        filename, line, name = frames[-1]
        return f"{filename}:{line} in {name}"
    return None


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if getattr(builtins, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__qualname__}"


def _one_line(message: str) -> str:
    """A message's first line: the rest is in the traceback file (Ray Data appends its retry advice to a failed
    map's exception message, for one)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _type_and_message(original: BaseException, text: str) -> str:
    if _is_ray(original):  # Ray passed no exception object of the user's: the remote traceback names it
        _, line = _own_section(text)
        if line is not None:
            return _one_line(line)
    message = _one_line(str(original))
    return f"{_type_name(original)}: {message}" if message else _type_name(original)


def _summary(exc: BaseException) -> tuple[str, str | None, BaseException, str, bool]:
    """(``<Type>: <message>``, where it was raised or None, original, traceback text, remote)."""
    original, text, remote = original_error(exc)
    return _type_and_message(original, text), _raised_at(_frames(original, text, remote)), original, text, remote


def describe_failure(exc: BaseException) -> str:
    """One line about a failure: the message of a :class:`RaydetError` found in ``exc``'s wrapping, else
    ``<Type>: <message> (raised at raydet/<file>.py:<line> in <function>)`` of the exception Ray wrapped."""
    ours = find_user_error(exc)
    if ours is not None:
        return str(ours)
    head, where, *_ = _summary(exc)
    return head + (f" (raised at {where})" if where else "")


# --------------------------------------------------------------------------------------------------- report
def _error_file(work_dir: str | os.PathLike | None, command: str) -> tuple[int, str]:
    """An open, new file for the traceback: ``<work_dir>/error-<time>.txt``, or a temporary file when the work
    dir does not exist (yet) or cannot be written."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    if work_dir and os.path.isdir(work_dir):
        for n in range(100):
            path = os.path.join(os.path.abspath(work_dir), f"error-{stamp}{f'-{n}' if n else ''}.txt")
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), path
            except FileExistsError:
                continue
            except OSError:
                break
    return tempfile.mkstemp(prefix=f"raydet-{command}-error-{stamp}-", suffix=".txt")


def _to_storage(path: str, work_dir) -> str:
    """A traceback file written locally for a work dir in object storage (a URI), copied there as
    ``error-<time>.txt`` and removed here; returns where it is (the local path when the copy fails)."""
    from raydet import fileio

    if not work_dir or not fileio.is_uri(os.fspath(work_dir)):
        return path
    dest = fileio.join(os.fspath(work_dir), f"error-{time.strftime('%Y%m%d_%H%M%S')}.txt")
    try:
        fileio.upload_file(path, dest)
    except OSError:
        return path
    os.unlink(path)
    return dest


def _raised_in_package(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by raydet's own code (its innermost frame is in the package)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    return bool(frames) and package_path(frames[-1].filename) is not None


def report_failure(exc: BaseException, work_dir: str | os.PathLike | None, command: str, *, stream=None) -> int:
    """Print the one ``error:`` line for a command that failed with ``exc`` and return its exit status.

    A :class:`RaydetError` anywhere in Ray's wrapping: ``error: <message>``. A ``ValueError`` or
    ``FileNotFoundError`` that raydet's own code raised in this process (a bad argument or input): ``error:
    <message>``, status 2. Anything else: ``error: <Type>: <message> (raised at <where>; full traceback: <file>)``
    with the traceback written to ``<work_dir>/error-<time>.txt`` (a temporary file without a work dir), status 1
    (2 for a ``ValueError`` / ``FileNotFoundError`` raised outside raydet's code in this process).

    Args:
        exc: what the command caught.
        work_dir: the folder the traceback file goes to (the run folder for ``train``), if it exists; a URI
            (object storage) gets it copied there.
        command: the command's name, for the file's header and a temporary file's name.
        stream: where the line goes (default: ``sys.stderr``).
    """
    stream = stream or sys.stderr
    through_ray = _is_ray(exc)  # it came back from a Ray worker, actor or trial: the run started
    ours = find_user_error(exc)
    if ours is not None:
        print(f"error: {ours}", file=stream, flush=True)
        return 1 if through_ray else ours.exit_code
    input_error = not through_ray and isinstance(exc, (ValueError, FileNotFoundError))
    if input_error and _raised_in_package(exc):
        print(f"error: {exc}", file=stream, flush=True)
        return 2
    head, where, original, text, remote = _summary(exc)
    try:
        fd, path = _error_file(work_dir, command)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"raydet {command} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                    f"error: {head}" + (f" (raised at {where})" if where else "") + "\n\n")
            f.write(("Traceback in the Ray process that raised it:\n" if remote else "") + text)
            if original is not exc:
                f.write("\nRay's wrapping of it, as raised in this process:\n" +
                        "".join(traceback.format_exception(exc)))
        saved = f"full traceback: {_to_storage(path, work_dir)}"
    except OSError as write_error:  # a full disk: the line still says what failed
        saved = f"the traceback could not be written: {write_error}"
    print(f"error: {head} (" + (f"raised at {where}; " if where else "") + f"{saved})", file=stream, flush=True)
    return 2 if input_error else 1
