"""Visibility: the progress-bar hook's counts and ETA, and the loss / metric curves drawn from a run's log."""
from __future__ import annotations

import io
import json
import re
import struct

import pytest
import torch

from raydet.engine.curves import curve_series, plot_curves
from raydet.engine.hooks import Hook, LoggerHook, OptimizerHook, ProgressBarHook
from raydet.engine.runner import Runner

from test_engine import ToyDetector


class FakeBar:
    def __init__(self, total, desc, unit):
        self.total, self.descs, self.unit, self.n, self.closed = total, [desc], unit, 0, False

    def update(self, n=1):
        self.n += n

    def set_description(self, desc):
        self.descs.append(desc)

    def close(self):
        self.closed = True


def _runner(hooks, epochs=3, iters=4, val_images=5, start=None):
    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}, {}]} for _ in range(iters)]
    val = [{"scale": torch.tensor(1.0), "img_metas": [{}] * n} for n in (2, 2, 1)]  # 5 images
    model = ToyDetector()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=lambda: val, max_epochs=epochs, hooks=[OptimizerHook(), *hooks],
                    iters_per_epoch=iters, val_images=val_images)
    if start is not None:
        runner.epoch, runner.iter = start, start * iters
    return runner


def test_training_bar_counts_every_iteration_and_evaluation_bar_every_image():
    bars = []

    def factory(**kw):
        bars.append(FakeBar(**kw))
        return bars[-1]

    class ValAfterEpoch2(Hook):  # evaluate once, after epoch 2
        def after_train_epoch(self, runner):
            if runner.epoch == 1:
                runner.val()

    runner = _runner([ProgressBarHook(factory), ValAfterEpoch2()])
    runner.run()
    train, val = bars
    assert (train.total, train.n, train.unit, train.closed) == (12, 12, "it", True)
    assert train.descs[0] == "epoch 1/3" and re.fullmatch(r"epoch 3/3 loss \d+\.\d{4}", train.descs[-1])
    assert len(train.descs) == 13  # the initial one and one per iteration
    assert (val.total, val.n, val.unit, val.closed) == (5, 5, "img", True)
    assert val.descs == ["evaluate (epoch 2)"]


def test_a_resumed_run_starts_its_bar_where_it_stands():
    bars = []
    runner = _runner([ProgressBarHook(lambda **kw: bars.append(FakeBar(**kw)) or bars[-1])], start=2)
    runner.run()
    (train,) = bars
    assert train.total == 12 and train.n == 12  # 8 counted at the start, 4 trained
    assert train.descs[0] == "epoch 3/3"


def test_the_default_bar_outside_ray_is_tqdm_with_eta(monkeypatch):
    """Outside a Ray actor the bar is tqdm; its line shows the count, the total and the remaining time."""
    import raydet.engine.progress as progress

    stream = io.StringIO()
    real = progress.progress_bar
    monkeypatch.setattr(progress, "progress_bar", lambda **kw: real(file=stream, **kw))
    _runner([ProgressBarHook()], epochs=1, iters=3).run()
    text = stream.getvalue()
    assert "epoch 1/1" in text and "3/3" in text and re.search(r"<\d\d:\d\d", text)


# ----------------------------------------------------------------------------------------------- curves
LOG = [
    {"mode": "train", "epoch": 1, "iter": 2, "loss": 3.0, "loss_cls": 2.0, "loss_bbox": 1.0, "lr": 0.01,
     "time": 0.5, "data_time": 0.1, "memory_mb": 100, "eta_s": 9.0},
    {"mode": "train", "epoch": 1, "iter": 4, "loss": 2.0, "loss_cls": 1.5, "loss_bbox": 0.5, "lr": 0.02,
     "time": 0.5, "data_time": 0.1, "memory_mb": 100, "eta_s": 5.0},
    {"mode": "val", "epoch": 1, "iter": 4, "bbox/AP": 0.25, "bbox/AP50": 0.5, "bbox/APl": -1.0},
    # a restart from the epoch-1 checkpoint redoes iterations 3 and 4: the later records win
    {"mode": "train", "epoch": 2, "iter": 4, "loss": 1.5, "loss_cls": 1.0, "loss_bbox": 0.5, "lr": 0.02,
     "time": 0.5, "data_time": 0.1, "memory_mb": 100, "eta_s": 5.0},
    {"mode": "train", "epoch": 2, "iter": 6, "loss": float("nan"), "loss_cls": 0.75, "loss_bbox": 0.25, "lr": 0.02,
     "time": 0.5, "data_time": 0.1, "memory_mb": 100, "eta_s": 1.0},
    {"mode": "val", "epoch": 2, "iter": 6, "bbox/AP": 0.5, "bbox/AP50": 0.75},
]


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_curve_series_are_the_logged_values():
    series = curve_series(LOG)
    assert series["losses"] == {"loss": ([2, 4], [3.0, 1.5]),  # NaN left out
                                "loss_cls": ([2, 4, 6], [2.0, 1.0, 0.75]),
                                "loss_bbox": ([2, 4, 6], [1.0, 0.5, 0.25])}
    assert series["lr"] == {"lr": ([2, 4, 6], [0.01, 0.02, 0.02])}
    assert series["metrics"] == {"bbox/AP": ([1, 2], [0.25, 0.5]), "bbox/AP50": ([1, 2], [0.5, 0.75])}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # width, height of the IHDR chunk


def test_plot_curves_writes_one_png_with_a_panel_per_kind(tmp_path):
    log = _write_log(tmp_path / "log.jsonl", LOG)
    assert plot_curves(log)["metrics"]["bbox/AP"] == ([1, 2], [0.25, 0.5])
    assert _png_size(tmp_path / "curves.png") == (1650, 400)  # 3 panels x 5.5 in x 100 dpi, 4 in high
    only_train = _write_log(tmp_path / "train.jsonl", [r for r in LOG if r["mode"] == "train"])
    plot_curves(only_train, tmp_path / "train.png")
    assert _png_size(tmp_path / "train.png") == (1100, 400)  # losses and lr only


def test_logger_hook_draws_the_curves_at_the_end_of_a_run(tmp_path):
    runner = _runner([LoggerHook(interval=1, tensorboard=False)], epochs=2, iters=2)
    runner.work_dir = str(tmp_path)
    runner.run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    assert _png_size(tmp_path / "curves.png") == (1100, 400)

    (tmp_path / "off").mkdir()  # runtime.curves: false
    runner = _runner([LoggerHook(interval=1, tensorboard=False, curves=False)], epochs=1, iters=2)
    runner.work_dir = str(tmp_path / "off")
    runner.run()
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == ["log.jsonl"]


def test_curves_command(tmp_path, capsys):
    from raydet.cli import main

    log = _write_log(tmp_path / "log.jsonl", LOG)
    assert main(["curves", str(log), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'c.png'}: losses: loss, loss_cls, loss_bbox; lr: lr")
    (tmp_path / "bad.jsonl").write_text('{"mode": "train"}\n{"mode": "tr')
    with pytest.raises(SystemExit) as exc:
        main(["curves", str(tmp_path / "bad.jsonl")])
    assert exc.value.code == 2 and "bad.jsonl:2: not a JSON record" in capsys.readouterr().err


def test_progress_auto_means_a_terminal_on_the_driver(monkeypatch):
    """runtime.progress: auto becomes true only when the command's stderr is a terminal (the workers' output is
    forwarded by Ray and cannot tell); the Runner gets a ProgressBarHook only for true."""
    from pathlib import Path

    import raydet.models  # noqa: F401
    from raydet.config import load_config
    from raydet.registry import ConfigError
    from raydet.commands.runner_builder import build_runner
    from raydet.commands.sections import parse_sections, resolve_progress

    quickstart = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"

    class Data:
        records = [{}] * 8
        classes, cat_ids = ("rectangle", "ellipse", "triangle"), (1, 2, 3)

    def hooks(cfg):
        return [type(h).__name__ for h in build_runner(cfg, {"train": Data()}, device="cpu").hooks]

    cfg = load_config(quickstart)
    assert cfg.get("runtime.progress", "auto") == "auto"
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    assert resolve_progress(cfg).get("runtime.progress") is False
    assert "ProgressBarHook" not in hooks(resolve_progress(cfg))
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert resolve_progress(cfg).get("runtime.progress") is True
    assert "ProgressBarHook" in hooks(resolve_progress(cfg))
    assert resolve_progress(load_config(quickstart, ["runtime.progress=false"])).get("runtime.progress") is False
    with pytest.raises(ConfigError, match=r"runtime\.progress: expected one of true, false, auto, got 'yes please'"):
        parse_sections(load_config(quickstart, ["runtime.progress=yes please"]))
