"""Every failure is one line on stderr, whatever Ray wrapped it in: ``error: <message>`` for raydet's named errors,
``error: <Type>: <message> (raised at raydet/<file>.py:<line> in <function>; full traceback: <file>)`` for anything
else, with the original traceback in that file (raydet.errors). Each command is checked with a plain Python error
raised where its model runs: a Ray Train worker (train, test, a Tune trial), a Ray Data actor (infer), the command's
own process (benchmark, ``raydet config``). The expected "raised at" frame is read from raydet's source."""
from __future__ import annotations

import importlib
import inspect
import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

import raydet.models  # noqa: F401  (registers the model components: the tests build the quickstart's model)
from raydet.config import load_config
from raydet.errors import RaydetError, keep_traceback, report_failure

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
LINE = re.compile(r"^error: (?P<what>\w+: .+) \(raised at (?P<where>raydet/\S+\.py:\d+ in \w+); "
                  r"full traceback: (?P<file>.+)\)$")
RAY_WRAPPING = ("Traceback", "RayTaskError", "WorkerGroupError", "UserCodeException", "TrainingFailedError",
                "TuneError", "ray.exceptions", "Error Snippet")
DIVISION = "ZeroDivisionError: division by zero"


def _hooks_module() -> str:
    """The name this process imports tests/_worker_hooks.py by (for commands that need no Ray worker)."""
    for name in ("tests._worker_hooks", "_worker_hooks"):
        try:
            importlib.import_module(name)
            return name
        except ImportError:
            continue
    pytest.fail("tests/_worker_hooks.py is not importable: run pytest from the repository root")


def _exploding(module: str, fail_in: str = "forward") -> list[str]:
    """Overrides: the quickstart's FPN replaced by one that divides by zero (tests/_worker_hooks.py)."""
    return [f"runtime.imports=[{module}]", "model.neck.type=ZeroDivisionFPN", f"model.neck.fail_in={fail_in}"]


def _frame(func, text: str) -> str:
    """``raydet/<file>.py:<line> in <function>`` of the line of ``func``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(func)
    (offset,) = [i for i, line in enumerate(lines) if text in line]
    path = Path(inspect.getsourcefile(func)).resolve()
    return f"{path.relative_to(ROOT).as_posix()}:{start + offset} in {func.__name__}"


def _neck_call() -> str:
    from raydet.models.detectors.base import BaseDetector

    return _frame(BaseDetector.extract_feat, "self.neck(")


def _one_line(err: str, what: str, where: str, folder: Path | None) -> Path:
    """Check the command's stderr: its last line is the only ``error:`` line, about ``what`` raised at ``where``,
    no traceback or Ray wrapper text anywhere; the named file (in ``folder``, if given) holds the original
    traceback. Returns the file."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    match = LINE.match(lines[-1])
    assert match, err[-3000:]
    assert (match["what"], match["where"]) == (what, where), lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1, err[-3000:]
    assert not [w for w in RAY_WRAPPING if w in err], err[-3000:]
    path = Path(match["file"])
    assert path.is_file(), path
    if folder is not None:
        assert path.parent == folder, (path, folder)
    text = path.read_text()
    rel, line = where.split(" in ")[0].split(":")
    assert f'File "{ROOT / rel}", line {line}, in {where.split(" in ")[1]}' in text, text[-3000:]
    assert what in text
    return path


# ------------------------------------------------------------------------------------------------- without Ray
@pytest.mark.parametrize("name, base", [
    ("raydet.registry.ConfigError", ValueError),
    ("raydet.data.image_io.CorruptImageError", OSError),
    ("raydet.data.image_io.ImageSizeMismatchError", OSError),
    ("raydet.engine.checkpoint.CheckpointError", ValueError),
    ("raydet.engine.hooks.NonFiniteLossError", FloatingPointError),
])
def test_raydets_named_errors_share_one_base_and_keep_theirs(name, base):
    module, cls = name.rsplit(".", 1)
    error = getattr(importlib.import_module(module), cls)
    assert issubclass(error, RaydetError) and issubclass(error, base)


def test_a_named_error_is_its_message_with_the_exit_status_of_where_it_was_raised(tmp_path):
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from raydet.engine.hooks import NonFiniteLossError
    from raydet.registry import ConfigError

    cases = [
        (ConfigError("p.yaml: model.depth: expected an int"), 2),  # in the command's process: wrong input
        (NonFiniteLossError("iteration 3: the loss is nan"), 1),    # a run failure wherever it happens
        (WorkerGroupError("snippet", {0: ConfigError("p.yaml: hooks[0]: no such hook")}), 1),  # from a worker
        (RayTaskError("f", "Traceback ...", ConfigError("image id 4: gone")).as_instanceof_cause(), 1),
    ]
    for exc, status in cases:
        err = io.StringIO()
        assert report_failure(exc, tmp_path, "train", stream=err) == status
        message = str(exc.worker_failures[0]) if isinstance(exc, WorkerGroupError) else \
            str(exc.cause) if isinstance(exc, RayTaskError) else str(exc)
        assert err.getvalue() == f"error: {message}\n"
    assert not list(tmp_path.iterdir())  # no traceback file for raydet's own errors


def test_a_bad_argument_raydet_refuses_in_the_driver_is_its_message_with_status_2(tmp_path):
    from raydet.infer import collect_images

    err = io.StringIO()
    with pytest.raises(ValueError) as caught:
        collect_images([])
    assert report_failure(caught.value, tmp_path, "infer", stream=err) == 2
    assert err.getvalue() == "error: no input given\n" and not list(tmp_path.iterdir())


def _worker_failure() -> ZeroDivisionError:
    """A ZeroDivisionError raised by a factory that raydet's registry.build calls, in a function decorated with
    keep_traceback (as a Ray Train worker's loop is), after the pickling that brings it to the driver."""
    from raydet.registry import REGISTRY, build, register

    def exploding_factory():
        return 1 / 0

    register(exploding_factory, name="_ExplodingFactory")
    try:
        with pytest.raises(ZeroDivisionError) as caught:
            keep_traceback(build)({"type": "_ExplodingFactory"})
    finally:
        del REGISTRY["_ExplodingFactory"]
    arrived = pickle.loads(pickle.dumps(caught.value))
    assert arrived.__traceback__ is None  # what Ray's pickling keeps: no traceback object
    return arrived


def test_a_workers_error_keeps_its_traceback_through_pickling_and_rays_wrapping(tmp_path):
    """What a Ray Train worker's failure looks like in the driver: the original exception in a WorkerGroupError.
    The line names the innermost raydet frame (registry.build calling the factory), not the factory's own file."""
    from ray.train import WorkerGroupError

    from raydet.registry import build

    err = io.StringIO()
    wrapped = WorkerGroupError("Training failed", {0: _worker_failure()})
    assert report_failure(wrapped, tmp_path, "train", stream=err) == 1
    path = _one_line(err.getvalue(), DIVISION, _frame(build, "return factory(**built)"), tmp_path)
    assert "in exploding_factory" in path.read_text() and "return 1 / 0" in path.read_text()


def test_a_worker_group_restart_is_announced_in_one_line(capsys):
    """RestartNotice (in Ray Train's controller) for scaling.max_failures: 1: the first failure restarts the
    workers and says so; the second ends the run, which the command reports."""
    from raydet.commands.restart_notice import RestartNotice
    from raydet.registry import build

    notice = RestartNotice(max_failures=1)
    notice.after_exception(None, {1: RuntimeError("rank 1"), 0: _worker_failure()})
    assert capsys.readouterr().err == (
        f"raydet: training worker 0 failed: {DIVISION} (raised at {_frame(build, 'return factory(**built)')}); "
        f"restarting the workers from the latest checkpoint (restart 1, at most 1: scaling.max_failures)\n")
    notice.after_exception(None, {0: _worker_failure()})
    assert capsys.readouterr().err == ""


def test_benchmark_a_failure_in_its_own_process(tmp_path, capsys):
    from raydet.benchmark import main

    small = ["data.images_per_worker=1", "data.train.num_images=4", "data.train.height=64", "data.train.width=64"]
    code = main([str(QUICKSTART), "--set", *small, *_exploding(_hooks_module()), "--skip", "inference", "data",
                 "--precision", "fp32", "--iters", "1", "--warmup", "0", "--size", "64", "64",
                 "--out", str(tmp_path / "r.json")])
    assert code == 1
    _one_line(capsys.readouterr().err, DIVISION, _neck_call(), tmp_path)
    assert not (tmp_path / "r.json").exists()


def test_raydet_config_a_failure_while_building_the_model(capsys):
    from raydet.cli import main
    from raydet.registry import build

    with pytest.raises(SystemExit) as exc:
        main(["config", str(QUICKSTART), "--set", *_exploding(_hooks_module(), fail_in="init")])
    assert exc.value.code == 1
    path = _one_line(capsys.readouterr().err, DIVISION, _frame(build, "return factory(**built)"), None)
    path.unlink()  # no work dir: a temporary file


# ------------------------------------------------------------------------------------------------- with Ray
def test_train_a_failure_in_a_ray_train_worker_on_the_real_console(ray_session, worker_hooks, tmp_path):
    """`python -m raydet.train` in a child process on the session's Ray (its console is real: the workers' output
    reaches it). Epoch 1 (one iteration, evaluated) reports and checkpoints; a test hook raises a RuntimeError
    before iteration 2. stderr: the one line; stdout: raydet's lines, none of Ray's per-epoch ones."""
    from test_train_ray import SMALL

    from raydet.engine.runner import Runner

    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    marker = tmp_path / "crashed.json"
    cmd = [sys.executable, "-m", "raydet.train", str(QUICKSTART), "--work-dir", str(tmp_path / "w"),
           "--set", *SMALL, "train.max_epochs=2", "train.max_iters_per_epoch=1", "evaluation.interval=1",
           f"runtime.imports=[{worker_hooks}]",
           f"hooks=[{{type: FailOnceAtIteration, marker: '{marker}', iteration: 2}}]"]
    child = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 1, child.stdout[-3000:] + child.stderr[-3000:]
    (run_dir,) = [p for p in (tmp_path / "w").iterdir() if p.is_dir()]
    path = _one_line(child.stderr, "RuntimeError: test crash before iteration 2",
                     _frame(Runner.call_hook, "getattr(hook, name)(self)"), run_dir)
    assert "in before_train_iter" in path.read_text()  # the hook's own frame, below raydet's
    console = child.stdout + child.stderr
    assert "epoch 1/2 iter 1/2" in console and "epoch 1/2 val bbox/AP" in console
    for ray_line in ("TrainingReport", "core_worker.cc", "execution finished", "Checkpoint successfully created"):
        assert ray_line not in console, ray_line


def test_test_a_failure_in_a_ray_train_worker(ray_session, worker_hooks, tmp_path, capsys):
    from test_train_ray import SMALL

    from raydet.engine.checkpoint import save_checkpoint
    from raydet.test import main

    ckpt = save_checkpoint({"model": load_config(QUICKSTART, SMALL).build("model").state_dict()}, tmp_path / "c.pt")
    out = tmp_path / "out"
    assert main([str(QUICKSTART), str(ckpt), "--out", str(out), "--set", *SMALL, *_exploding(worker_hooks)]) == 1
    _one_line(capsys.readouterr().err, DIVISION, _neck_call(), out)


def test_infer_a_failure_in_a_ray_data_actor(ray_session, worker_hooks, tmp_path, capsys):
    from test_train_ray import SMALL

    from raydet.engine.checkpoint import save_checkpoint
    from raydet.infer import main

    model = load_config(QUICKSTART, SMALL).build("model")
    ckpt = save_checkpoint({"model": model.state_dict(), "meta": {"classes": ["a", "b", "c"], "cat_ids": [1, 2, 3]}},
                           tmp_path / "c.pt")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), np.full((64, 64, 3), 60 * i, np.uint8))
    out = tmp_path / "out"
    code = main([str(QUICKSTART), str(ckpt), str(images), "--out", str(out), "--set", *SMALL,
                 *_exploding(worker_hooks)])
    assert code == 1
    _one_line(capsys.readouterr().err, DIVISION, _neck_call(), out)
    assert not (out / "results.json").exists()


def test_tune_every_trial_failed_in_its_workers(ray_session, worker_hooks, tmp_path, capsys):
    from test_train_ray import SMALL

    from raydet.tune import main

    space = tmp_path / "study.yaml"
    space.write_text(textwrap.dedent(f"""\
        pipeline: {QUICKSTART}
        metric: train/loss
        mode: min
        search: {{optimizer.lr: {{grid: [0.002]}}}}
        resources: {{num_workers: 1, cpus_per_worker: 0.5, driver_cpus: 0.5}}
        """))
    overrides = [*SMALL, "data.val=null", "train.max_epochs=1", "train.max_iters_per_epoch=1",
                 *_exploding(worker_hooks)]
    assert main([str(space), "--work-dir", str(tmp_path / "w"), "--set", *overrides]) == 1
    captured = capsys.readouterr()
    folder = tmp_path / "w" / "tune" / "study"
    _one_line(captured.err, DIVISION, _neck_call(), folder)
    (failed,) = [line for line in captured.out.splitlines() if line.startswith("trial ")]
    assert f"failed: {DIVISION} (raised at {_neck_call()}); traceback: " in failed


def test_raydet_warnings_print_as_one_line(monkeypatch):
    """A warning raised by raydet's code (a skipped record) reads ``warning: <message>`` on one line in a command's
    console; a warning of other code keeps Python's form (file, line, category)."""
    import warnings

    from raydet.commands import ray_setup

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    ray_setup.setup_logging()
    text = warnings.formatwarning("data.train: skipped 2 problem(s)", UserWarning, ray_setup.__file__, 10, "x = 1")
    assert text == "warning: data.train: skipped 2 problem(s)\n"
    other = warnings.formatwarning("careful", UserWarning, "/elsewhere/mod.py", 3, "call()")
    assert other.startswith("/elsewhere/mod.py:3: UserWarning: careful") and "call()" in other
