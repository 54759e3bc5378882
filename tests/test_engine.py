"""The training engine without Ray: hook order, schedules, optimizer step, checkpoints and exact resume."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from raydet.config import load_config
from raydet.data.collate import collate_samples
from raydet.data.synthetic import make_shapes_dataset
from raydet.engine.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from raydet.engine.hooks import HOOK_POINTS, Hook, NonFiniteLossError, OptimizerHook
from raydet.engine.optim import LrScheduleConfig, OptimizerConfig, lr_at, scaled_lr
from raydet.engine.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


class ToyDetector(nn.Module):
    """One parameter; loss (w - target)^2 per batch; predictions carry nothing."""

    def __init__(self, target=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.target = target

    def forward(self, batch, mode="loss"):
        if mode == "loss":
            return {"loss_toy": (self.w - self.target) ** 2 * batch["scale"]}
        return self.predict(batch)

    def predict(self, batch):
        return [{} for _ in batch["img_metas"]]


class Recorder(Hook):
    def __init__(self, name, priority, calls):
        self.name, self.priority, self.calls = name, priority, calls

    def __getattribute__(self, item):
        if item in HOOK_POINTS:
            return lambda runner: self.calls.append((item, object.__getattribute__(self, "name")))
        return object.__getattribute__(self, item)


class ValEverything(Hook):
    """Runs the evaluation pass after every epoch (what EvalHook does, minus the scoring)."""

    def after_train_epoch(self, runner):
        runner.val()


def toy_runner(calls, epochs=2, iters=2, val_iters=1):
    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}]} for _ in range(iters)]
    model = ToyDetector()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = [Recorder("late", 80, calls), Recorder("early", 20, calls), OptimizerHook(), ValEverything()]
    return Runner(model, opt, train_loader=lambda epoch: batches, val_loader=lambda: batches[:val_iters],
                  max_epochs=epochs, hooks=hooks)


def test_hooks_run_at_every_point_in_order_and_by_priority():
    calls = []
    runner = toy_runner(calls, epochs=2, iters=2, val_iters=1)
    runner.run()
    both = lambda point: [(point, "early"), (point, "late")]  # noqa: E731  (priority 20 before 80)
    val = [c for p in ("before_val_epoch", "before_val_iter", "after_val_iter", "after_val_epoch") for c in both(p)]
    expected = both("before_run")
    for _ in range(2):
        expected += both("before_train_epoch")
        expected += (both("before_train_iter") + both("after_train_iter")) * 2
        # the evaluation pass (priority 50) runs inside after_train_epoch, between the two recorders
        expected += [("after_train_epoch", "early")] + val + [("after_train_epoch", "late")]
    expected += both("after_run")
    assert calls == expected
    assert runner.epoch == 2 and runner.iter == 4
    # SGD on (w - 1)^2 with lr 0.1: w <- w - 0.2 (w - 1), four steps from 0: 1 - 0.8^4
    assert runner.module.w.item() == pytest.approx(1 - 0.8 ** 4)


def test_linear_warmup_and_step_schedule_by_hand():
    sched = LrScheduleConfig(warmup="linear", warmup_iters=500, warmup_ratio=0.001, steps=[8, 11], gamma=0.1)
    assert lr_at(0.02, sched, 0, 0) == pytest.approx(0.02 * 0.001)
    assert lr_at(0.02, sched, 0, 250) == pytest.approx(0.02 * (1 - 0.5 * 0.999))
    assert lr_at(0.02, sched, 0, 500) == pytest.approx(0.02)
    assert lr_at(0.02, sched, 7, 10_000) == pytest.approx(0.02)
    assert lr_at(0.02, sched, 8, 10_000) == pytest.approx(0.002)
    assert lr_at(0.02, sched, 11, 10_000) == pytest.approx(0.0002)
    constant = LrScheduleConfig(warmup="constant", warmup_iters=10, warmup_ratio=0.1, steps=[], gamma=0.1)
    assert lr_at(0.01, constant, 0, 3) == pytest.approx(0.001)
    # linear scaling rule: 0.02 at 16 images -> 0.005 at 2 workers x 2 images
    assert scaled_lr(OptimizerConfig(lr=0.02, base_batch_size=16), 4) == pytest.approx(0.005)


def test_nonfinite_loss_stops_with_the_iteration_and_term_or_skips():
    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}]}, {"scale": torch.tensor(float("nan")), "img_metas": [{}]}]
    model = ToyDetector()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=None, max_epochs=1, hooks=[OptimizerHook(nonfinite="stop")])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, iteration 2: loss_toy=nan"):
        runner.run()

    model = ToyDetector()
    skip = OptimizerHook(nonfinite="skip")
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=None, max_epochs=1, hooks=[skip])
    runner.run()
    assert skip.skipped == 1 and model.w.item() == pytest.approx(0.2)  # only the finite step was taken


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary file left behind


def test_loading_a_checkpoint_of_another_model_names_it_and_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(tmp_path / "nowhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    model = nn.Sequential(nn.Linear(4, 3))
    other = nn.Sequential(nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"(?s)other.pt does not fit.*0.weight: checkpoint \(5, 4\) vs model \(3, 4\)"):
        load_model_weights(model, other.state_dict(), "other.pt")


# ------------------------------------------------------------------------------------------- exact resume
TINY_FASTER = [
    "num_classes=3", "model.backbone.depth=18", "model.backbone.frozen_stages=-1", "model.backbone.norm_eval=false",
    "model.neck.in_channels=[64, 128, 256, 512]", "model.neck.out_channels=32",
    "model.rpn_head.in_channels=32", "model.rpn_head.feat_channels=32",
    "model.roi_head.bbox_head.in_channels=32", "model.roi_head.bbox_head.fc_out_channels=64",
    "model.roi_head.sampler.num=64",
    "optimizer={type: SGD, lr: 0.01, momentum: 0.9, weight_decay: 0.0001, base_batch_size: 2}",
    "lr_schedule={warmup: linear, warmup_iters: 3, warmup_ratio: 0.1, steps: [1], gamma: 0.1}",
]


def _tiny_run(tmp_path, epochs, state=None, overrides=(), before_run=None):
    import raydet.models  # noqa: F401
    from raydet.commands.runner_builder import build_runner
    from raydet.commands.sections import parse_sections

    cfg = load_config(ROOT / "pipelines" / "faster_rcnn_r50_fpn_1x_coco.yaml",
                      TINY_FASTER + [f"train.max_epochs={epochs}", "data.images_per_worker=2", *overrides])
    samples = make_shapes_dataset(4, 64, 64, max_objects=2, seed=1)

    class Data:  # the slice of the dataset API that build_runner needs
        records = [r for _, r in samples]
        classes, cat_ids = ("rectangle", "ellipse", "triangle"), (1, 2, 3)

    def loader(epoch):  # epoch-dependent order, as the real loaders
        order = [0, 1, 2, 3] if epoch % 2 == 0 else [2, 3, 0, 1]
        return [collate_samples([samples[i] for i in order[k:k + 2]]) for k in (0, 2)]

    saved = {}
    runner = build_runner(cfg, {"train": Data()}, device="cpu", train_loader=loader,
                          report=lambda metrics, st: saved.update(st or {}), sections=parse_sections(cfg))
    if state is not None:
        runner.load_state_dict(state)
    if before_run is not None:
        before_run(runner)
    runner.run()
    return runner, saved


def test_resume_reaches_the_same_state_as_an_uninterrupted_run(tmp_path):
    straight, _ = _tiny_run(tmp_path, epochs=2)
    first, state = _tiny_run(tmp_path, epochs=1)
    path = save_checkpoint(state, tmp_path / "checkpoint.pt")
    resumed, _ = _tiny_run(tmp_path, epochs=2, state=load_checkpoint(path))
    assert resumed.epoch == straight.epoch == 2 and resumed.iter == straight.iter == 4
    a, b = straight.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer moved the weights (a resume that skipped training would not match the straight run anyway)
    assert not torch.equal(first.module.state_dict()["roi_head.bbox_head.fc_cls.weight"],
                           straight.module.state_dict()["roi_head.bbox_head.fc_cls.weight"])


def test_each_epoch_report_carries_that_epochs_mean_losses():
    from raydet.engine.hooks import CheckpointHook, LoggerHook

    reports = []
    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}]} for _ in range(2)]
    model = ToyDetector()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=None, max_epochs=2, report=lambda m, state: reports.append(m),
                    hooks=[OptimizerHook(), CheckpointHook(), LoggerHook(interval=100, tensorboard=False)])
    runner.run()
    # w: 0 -> 0.2 -> 0.36 -> 0.488; loss (w - 1)^2 before each step: 1, 0.64 | 0.4096, 0.262144
    assert reports[0]["train/loss_toy"] == pytest.approx((1 + 0.64) / 2)
    assert reports[1]["train/loss_toy"] == pytest.approx((0.4096 + 0.262144) / 2)


class FakeEval(Hook):
    """Evaluates (sets metrics like EvalHook: after the epoch's training, before the checkpoint report) at the
    given 1-based epochs, with bbox/AP50 = the value listed for that epoch."""

    priority = 40

    def __init__(self, values: dict):
        self.values = values

    def after_train_epoch(self, runner):
        if runner.epoch + 1 in self.values:
            runner.metrics = {"bbox/AP50": self.values[runner.epoch + 1]}
            runner.eval_epoch = runner.epoch


@pytest.mark.parametrize("order, worst", [("max", -float("inf")), ("min", float("inf"))])
def test_reports_of_epochs_without_evaluation_carry_no_stale_metric_and_the_worst_score(order, worst):
    from raydet.engine.hooks import CHECKPOINT_SCORE, CheckpointHook

    reports = []
    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}]}]
    model = ToyDetector()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=None, max_epochs=4, report=lambda m, state: reports.append((m, state)),
                    hooks=[OptimizerHook(), FakeEval({2: 0.5, 4: 0.25}),
                           CheckpointHook(interval=2, score_attribute="bbox/AP50", score_order=order)])
    runner.run()
    metrics = [m for m, _ in reports]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert [m.get("bbox/AP50") for m in metrics] == [None, 0.5, None, 0.25]   # epoch 3 does not repeat epoch 2's
    assert [m[CHECKPOINT_SCORE] for m in metrics] == [worst, 0.5, worst, 0.25]
    assert [state is not None for _, state in reports] == [False, True, False, True]  # interval 2
    with pytest.raises(ValueError, match="score_order must be max or min"):
        CheckpointHook(score_order="best")


def test_the_epoch_gate_waits_for_a_decision_and_stops_on_the_stop_file(tmp_path):
    import threading

    from raydet.engine.hooks import EpochGateHook

    batches = [{"scale": torch.tensor(1.0), "img_metas": [{}]}]
    epochs_started = []

    class Started(Hook):
        def before_train_epoch(self, runner):
            epochs_started.append(runner.epoch + 1)

    model = ToyDetector()
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=lambda e: batches,
                    val_loader=None, max_epochs=5, hooks=[OptimizerHook(), Started(), EpochGateHook(str(tmp_path))])
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while epochs_started != [1] or not thread.is_alive():  # epoch 1 done, waiting at the gate
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    assert epochs_started == [1] and runner.iter == 1   # no decision yet: epoch 2 has not started
    (tmp_path / "continue_1").touch()
    while epochs_started != [1, 2]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tmp_path / "stop_requested").touch()
    thread.join(timeout=60)
    assert not thread.is_alive() and epochs_started == [1, 2] and runner.epoch == 2 and runner.iter == 2


# ------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_computes_in_half_and_keeps_fp32_weights(tmp_path, amp, dtype):
    """train.amp runs the forward pass under autocast (here on the CPU): convolutions produce ``dtype``; the weights
    stay float32 and are updated; fp16 adds a GradScaler (initial scale 2**16, saved in the checkpoint), bf16 none."""
    seen, start = [], {}

    def watch(runner):
        start.update({k: v.clone() for k, v in runner.module.state_dict().items()})
        runner.module.backbone.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

    runner, state = _tiny_run(tmp_path, epochs=1, overrides=[f"train.amp={amp}"], before_run=watch)
    assert seen == [dtype, dtype]  # two iterations
    weights = runner.module.state_dict()
    assert all(v.dtype == start[k].dtype for k, v in weights.items())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert not torch.equal(weights["backbone.conv1.weight"], start["backbone.conv1.weight"])
    hook = runner.get_hook(OptimizerHook)
    if amp == "fp16":
        assert hook.scaler is not None and hook.scaler.is_enabled()
        # halved once per step whose scaled gradients overflowed, never raised within 2000 steps
        scale = state["hooks"]["OptimizerHook"]["scaler"]["scale"]
        assert scale in (2.0 ** 16, 2.0 ** 15, 2.0 ** 14)
    else:
        assert hook.scaler is None and "hooks" not in state or "OptimizerHook" not in state.get("hooks", {})


def test_a_wrong_amp_or_nonfinite_setting_names_the_key():
    from raydet.registry import ConfigError
    from raydet.commands.sections import parse_sections

    for override, key in (("train.amp=fp32", "train.amp"), ("train.nonfinite_loss=ignore", "train.nonfinite_loss")):
        cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", [override])
        with pytest.raises(ConfigError, match=rf"--set: {key}: expected one of"):
            parse_sections(cfg)


# ------------------------------------------------------------------------------------------- SyncBN
def test_sync_bn_converts_every_batchnorm_on_gpu_workers_only(caplog):
    """train.sync_bn with several workers: on GPUs every BatchNorm2d becomes SyncBatchNorm with the same weights
    and running statistics; CPU workers (where torch's SyncBatchNorm cannot run) keep BatchNorm with a warning;
    one worker needs no conversion."""
    import raydet.models  # noqa: F401
    from raydet.commands.runner_builder import build_runner
    from raydet.commands.sections import parse_sections

    cfg = load_config(ROOT / "pipelines" / "quickstart.yaml", ["train.sync_bn=true"])

    class Data:
        records = [{}] * 8
        classes, cat_ids = ("rectangle", "ellipse", "triangle"), (1, 2, 3)

    def build(device, world_size):
        return build_runner(cfg, {"train": Data()}, device=device, world_size=world_size, sections=parse_sections(cfg),
                            wrap_model=lambda m: m).module  # no .to(device): there is no GPU here

    plain = build("cpu", 1)
    bns = [n for n, m in plain.named_modules() if type(m) is nn.BatchNorm2d]
    assert len(bns) == 1 + 2 * 8 + 3  # ResNet-18: stem, two per BasicBlock, three downsamples
    synced = build("cuda", 2)
    kinds = dict(synced.named_modules())
    assert all(type(kinds[n]) is nn.SyncBatchNorm for n in bns)
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
    a, b = plain.state_dict(), synced.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with caplog.at_level("WARNING", logger="raydet"):
        cpu = build("cpu", 2)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())
    assert "SyncBatchNorm needs GPUs" in caplog.text
