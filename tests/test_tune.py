"""raydet tune: space files are checked before any trial starts (pure Python), the shipped spaces reproduce the
paper's settings, and a real two-trial study on Ray Tune writes its report and resumes without rerunning trials."""
from __future__ import annotations

import copy
import csv
import json
import re
import textwrap
import time
from pathlib import Path

import pytest

from raydet.config import apply_override, load_config
from raydet.registry import ConfigError
from raydet.commands.sections import parse_sections
from raydet.tune import (build_scheduler, fragment_overrides, load_base, load_space, main, raw_data, trial_config,
                         validate_space)

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "tune_spaces"
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
RPN = ROOT / "pipelines" / "rpn_r50_fpn_1x_coco.yaml"


def space_file(tmp_path: Path, body: str, pipeline: Path = QUICKSTART, metric: str = "bbox/AP") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"pipeline: {pipeline}\nmetric: {metric}\n" + textwrap.dedent(body))
    return path


def checked(path: Path, overrides=()):
    space = load_space(path, overrides)
    validate_space(space)
    return space


# ----------------------------------------------------------------------------------------------- space errors
@pytest.mark.parametrize("body, message", [
    ("serach: {optimizer.lr: {grid: [0.1]}}\n",
     r"study\.yaml: serach: unknown key of a space file; did you mean 'search'\?"),
    ("search: {optimizer.lr: {unifrom: [0.001, 0.01]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.unifrom: unknown distribution 'unifrom'; did you mean 'uniform'"),
    ("search: {optimizer.lr: {choice: []}}\n", r"study\.yaml: search\.optimizer\.lr\.choice: empty list"),
    ("search: {optimizer.lr: {grid: []}}\n", r"study\.yaml: search\.optimizer\.lr\.grid: empty list"),
    ("search: {optimizer.lr: {uniform: [0.01, 0.001]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.uniform: lo must be below hi, got lo=0\.01, hi=0\.001"),
    ("search: {optimizer.lr: {uniform: [0.01, 0.01]}}\n", r"search\.optimizer\.lr\.uniform: lo must be below hi"),
    ("search: {optimizer.lr: {loguniform: [0, 0.1]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.loguniform: loguniform needs lo > 0"),
    ("search: {optimizer.lr: {quniform: [0.001, 0.01, 0]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.quniform: q must be positive"),
    ("search: {optimizer.lr: {uniform: [0.001]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.uniform: expected \[lo, hi\] numbers"),
    ("search: {optimizer.lr: 0.01}\n", r"study\.yaml: search\.optimizer\.lr: expected a distribution"),
    ("search: {optimizer.lr: {grid: [0.1, 0.2], choice: [0.3]}}\n",
     r"search\.optimizer\.lr: expected exactly one distribution"),
    ("search: {optimizer.lr: {grid: [0.1, 0.2], labels: [a]}}\n",
     r"study\.yaml: search\.optimizer\.lr\.labels: expected 2 names, one per value"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nscheduler: {type: ashaa}\n",
     r"study\.yaml: scheduler\.type: unknown scheduler 'ashaa'; did you mean 'asha'\?"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nscheduler: {type: asha, grace_periods: 1}\n",
     r"study\.yaml: scheduler\.grace_periods: unknown argument of asha; did you mean 'grace_period'\?"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nresources: {num_worker: 2}\n",
     r"study\.yaml: resources\.num_worker: unknown key; did you mean 'num_workers'"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nmode: maximum\n", r"study\.yaml: mode: expected max or min"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nnum_samples: 0\n", r"study\.yaml: num_samples: expected a positive"),
    ("search: {}\n", r"study\.yaml: search: expected a mapping of pipeline keys"),
])
def test_malformed_spaces_fail_naming_the_file_and_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_space(space_file(tmp_path, body))


def test_a_missing_pipeline_file_is_reported(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("pipeline: nowhere.yaml\nmetric: bbox/AP\nsearch: {optimizer.lr: {grid: [0.1]}}\n")
    with pytest.raises(ConfigError, match=r"study\.yaml: pipeline: file not found: nowhere\.yaml"):
        load_space(path)


def test_the_pipeline_path_is_relative_to_the_space_file(tmp_path):
    (tmp_path / "spaces").mkdir()
    path = tmp_path / "spaces" / "s.yaml"
    rel = Path("..") / Path(*[".."] * len(tmp_path.parts[1:])) / QUICKSTART.relative_to("/")
    path.write_text(f"pipeline: {rel}\nmetric: bbox/AP\nsearch: {{optimizer.lr: {{grid: [0.1]}}}}\n")
    assert Path(load_space(path).pipeline).resolve() == QUICKSTART


# ----------------------------------------------------------------------------------------------- pipeline checks
@pytest.mark.parametrize("body, metric, message", [
    ("search: {optimizer.lrr: {choice: [0.1]}}\n", "bbox/AP",
     r"study\.yaml: search\.optimizer\.lrr: not a key of the pipeline .*quickstart\.yaml "
     r"\(optimizer\.lrr: no key 'lrr' in 'optimizer'; did you mean 'lr'\?\)"),
    ("search: {model.rpn_head.loss_bbx: {choice: [{type: L1Loss}]}}\n", "bbox/AP",
     r"search\.model\.rpn_head\.loss_bbx: .*did you mean 'loss_bbox'"),
    ("search: {optimizer.lr: {grid: [0.1]}}\n", "bbox/mAP",
     r"study\.yaml: metric: 'bbox/mAP' is not a metric raydet reports"),
    ("search: {optimizer.lr: {grid: [0.1]}}\n", "segm/AP",
     r"study\.yaml: metric: 'segm/AP' needs 'segm' in the pipeline's evaluation\.metric, which is \['bbox'\]"),
    ("search: {optimizer.lr: {grid: [0.1]}}\n", "proposal/AR@100",
     r"metric: 'proposal/AR@100' needs 'proposal' in the pipeline's evaluation\.metric"),
    # the second value's typo is found too, with the searched key, the value and the argument
    ("search:\n  model.roi_head.bbox_head.loss_bbox:\n"
     "    grid: [{type: SmoothL1Loss, beta: 1.0}, {type: SmoothL1Loss, betta: 0.5}]\n", "bbox/AP",
     r"study\.yaml: search\.model\.roi_head\.bbox_head\.loss_bbox value 'SmoothL1Loss\(betta=0\.5\)': .*"
     r"model\.roi_head\.bbox_head\.loss_bbox\.betta: unknown argument of SmoothL1Loss; did you mean 'beta'\?"),
    ("search:\n  train_pipeline:\n    grid:\n      - [{type: Resize, scale: [96, 96]}, {type: Normalize, mean: [0, 0, 0], "
     "std: [1, 1, 1]}]\n      - [{type: Rezize, scale: [96, 96]}]\n", "bbox/AP",
     r"search\.train_pipeline value .*data\.train\.pipeline\[0\]\.type: unknown type 'Rezize'; did you mean 'Resize'\?"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nset: [optimizer.lrr=0.1]\n", "bbox/AP",
     r"optimizer\.lrr: unknown key of OptimizerConfig; did you mean 'lr'\?"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nset: [model.backbone.depht=18]\n", "bbox/AP",
     r"model\.backbone\.depht: unknown argument of ResNet; did you mean 'depth'\?"),
    ("search: {optimizer.lr: {grid: [0.1]}}\nset: [modle.backbone.depth=18]\n", "bbox/AP",
     r"study\.yaml: set: --set: modle: no key 'modle' at the top level; did you mean 'model'\?"),
])
def test_space_checks_against_the_pipeline(tmp_path, body, metric, message):
    with pytest.raises(ConfigError, match=message):
        checked(space_file(tmp_path, body, metric=metric))


def test_proposal_metric_must_be_one_of_the_proposal_nums(tmp_path):
    path = space_file(tmp_path, "search: {model.rpn_head.allowed_border: {grid: [0, -1]}}\n", RPN,
                      "proposal/AR@2000")
    with pytest.raises(ConfigError, match=r"metric: 'proposal/AR@2000': 2000 is not in the pipeline's "
                                          r"evaluation\.proposal_nums \[100, 300, 1000\]"):
        checked(path)
    checked(space_file(tmp_path, "search: {model.rpn_head.allowed_border: {grid: [0, -1]}}\n", RPN,
                       "proposal/AR@300"))


# ----------------------------------------------------------------------------------------------- values -> overrides
RAW = {"model": {"backbone": {"type": "ResNet", "depth": 50, "norm_eval": True,
                              "norm_cfg": {"type": "BN", "requires_grad": True}},
                 "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0}}}


def test_a_mapping_value_merges_into_the_mapping_of_the_same_type():
    out = fragment_overrides(RAW, "model.backbone", {"norm_eval": False, "norm_cfg": {"requires_grad": False}})
    assert out == ["model.backbone.norm_eval=false", "model.backbone.norm_cfg.requires_grad=false"]


def test_a_mapping_with_another_type_or_delete_replaces():
    out = fragment_overrides(RAW, "model.loss_bbox", {"type": "SmoothL1Loss", "beta": 0.1111})
    assert out == ["model.loss_bbox={type: SmoothL1Loss, beta: 0.1111}"]
    out = fragment_overrides(RAW, "model.backbone", {"_delete_": True, "type": "ResNet", "depth": 18})
    assert out == ["model.backbone={_delete_: true, type: ResNet, depth: 18}"]  # a plain --set mapping would merge
    data = copy.deepcopy(RAW)
    apply_override(data, {}, out[0])
    assert data["model"]["backbone"] == {"type": "ResNet", "depth": 18}


def test_override_values_read_back_exactly():
    import numpy as np

    cfg = load_config(QUICKSTART)
    raw = raw_data(cfg)
    lr = np.float64(0.00123456789)  # what Tune samples
    out = cfg.with_overrides(fragment_overrides(raw, "optimizer.lr", lr)
                             + fragment_overrides(raw, "runtime.imports", ["1e-4"]))
    assert out.get("optimizer.lr") == 0.00123456789 and type(out.get("optimizer.lr")) is float
    assert out.get("runtime.imports") == ["1e-4"]  # a string that YAML 1.1 would read as a float stays a string


# ----------------------------------------------------------------------------------------------- shipped spaces
def test_every_shipped_space_validates():
    names = sorted(p.name for p in SPACES.glob("*.yaml"))
    assert names == ["bn.yaml", "quickstart.yaml", "reg_losses.yaml", "rpn.yaml", "train_scales.yaml"]
    for path in sorted(SPACES.glob("*.yaml")):
        checked(path)


def _grid_size(space) -> int:
    n = 1
    for d in space.dims:
        n *= len(d.values)
    return n


def test_rpn_space_is_table_9():
    space = load_space(SPACES / "rpn.yaml")
    base = load_base(space)
    assert space.metric == "proposal/AR@1000" and space.mode == "max" and _grid_size(space) == 18
    assert base.get("evaluation.metric") == ["proposal"] and base.get("evaluation.proposal_nums") == [100, 300, 1000]
    assert base.get("scaling.num_workers") == 8 and base.get("scaling.use_gpu") is True
    loss, border, npu = space.dims
    assert [v["beta"] for v in loss.values] == pytest.approx([1 / 5, 1 / 9, 1 / 15], abs=1e-4)
    assert border.values == [0, -1] and npu.values == [-1, 3, 5]
    cfg = trial_config(base, space.dims, {loss.key: loss.values[1], border.key: -1, npu.key: 3})
    head = cfg.get("model.rpn_head")
    assert head["loss_bbox"] == {"type": "SmoothL1Loss", "beta": 0.1111, "loss_weight": 1.0}
    assert head["allowed_border"] == -1 and head["sampler"]["neg_pos_ub"] == 3
    assert head["sampler"]["num"] == 256  # the rest of the sampler is kept


def test_train_scales_space_is_table_8():
    space = load_space(SPACES / "train_scales.yaml")
    base = load_base(space)
    assert base.get("train.max_epochs") == 24 and base.get("lr_schedule.steps") == [16, 22]
    (dim,) = space.dims
    expected = {
        "1333x800": ("value", [[1333, 800]]),
        "1333x[640:800:32]": ("value", [[1333, s] for s in range(640, 801, 32)]),
        "1333x[640:960:32]": ("value", [[1333, s] for s in range(640, 961, 32)]),
        "2000x[640:800:32]": ("value", [[2000, s] for s in range(640, 801, 32)]),
        "1333x[640:800]": ("range", [[1333, 640], [1333, 800]]),
        "1333x[640:960]": ("range", [[1333, 640], [1333, 960]]),
        "1333x[480:960]": ("range", [[1333, 480], [1333, 960]]),
    }
    assert dim.key == "train_pipeline" and dim.labels == list(expected)
    for value, label in zip(dim.values, dim.labels):
        cfg = trial_config(base, space.dims, {dim.key: value})
        resize = cfg.get("data.train.pipeline[0]")
        mode, scales = expected[label]
        scale = resize["scale"] if isinstance(resize["scale"][0], list) else [resize["scale"]]
        assert scale == scales and resize.get("multiscale_mode", "value") == mode, label
        assert cfg.get("data.train.pipeline[2].mean") == [123.675, 116.28, 103.53]  # ${img_norm.mean} resolved
        assert cfg.get("data.val.pipeline[0].scale") == [1333, 800]  # testing scale unchanged


def test_bn_space_is_table_6():
    space = load_space(SPACES / "bn.yaml")
    base = load_base(space)
    backbone, schedule = space.dims
    settings = [(v["norm_eval"], v["norm_cfg"]["requires_grad"]) for v in backbone.values]
    assert settings == [(False, True), (True, False), (True, True)]
    cfg = trial_config(base, space.dims, {backbone.key: backbone.values[0], schedule.key: schedule.values[1]})
    assert cfg.get("model.backbone.norm_eval") is False and cfg.get("model.backbone.norm_cfg.requires_grad") is True
    assert cfg.get("model.backbone.depth") == 50 and cfg.get("model.backbone.frozen_stages") == 1
    assert cfg.get("train.max_epochs") == 24 and cfg.get("lr_schedule.steps") == [16, 22]
    cfg = trial_config(base, space.dims, {backbone.key: backbone.values[1], schedule.key: schedule.values[0]})
    assert cfg.get("train.max_epochs") == 12 and cfg.get("lr_schedule.steps") == [8, 11]


def test_reg_losses_space_is_table_5():
    space = load_space(SPACES / "reg_losses.yaml")
    base = load_base(space)
    (dim,) = space.dims
    weights = {}
    for v in dim.values:
        weights.setdefault(v["type"], []).append(v["loss_weight"])
    assert weights == {"SmoothL1Loss": [1, 2, 5], "L1Loss": [1, 2, 5], "BalancedL1Loss": [1, 2, 5],
                       "IoULoss": [1, 2, 5, 10], "GIoULoss": [1, 2, 5, 10], "BoundedIoULoss": [1, 2, 5, 10]}
    for value, decoded in ((dim.values[3], False), (dim.values[13], True)):  # L1 x1, GIoU x1
        head = trial_config(base, space.dims, {dim.key: value}).build("model.roi_head.bbox_head")
        assert type(head.loss_bbox).__name__ == value["type"] and head.reg_decoded_bbox is decoded


def test_asha_evaluates_every_epoch_and_compares_by_epoch(tmp_path):
    path = space_file(tmp_path, "search: {optimizer.lr: {grid: [0.001, 0.002]}}\n"
                                "scheduler: {type: asha, grace_period: 2, reduction_factor: 3}\n"
                                "set: [train.max_epochs=9, evaluation.interval=4]\n")
    space = load_space(path)
    base = validate_space(space)
    assert base.get("evaluation.interval") == 1  # every report ASHA sees carries the metric
    scheduler = build_scheduler(space, base)
    assert scheduler._time_attr == "epoch" and scheduler.metric == "bbox/AP" and scheduler._metric_op == 1.0
    # rungs at grace_period * reduction_factor**k epochs below max_t: 2 and 6
    assert scheduler._max_t == 9 and [milestone for milestone, _ in scheduler._brackets[0]._rungs] == [6, 2]
    bad = load_space(space_file(tmp_path, "search: {optimizer.lr: {grid: [0.001]}}\n"
                                          "scheduler: {type: asha, grace_period: 20}\n"))
    with pytest.raises(ConfigError, match=r"scheduler\.grace_period: 20 epochs is more than the 12 epochs trained"):
        build_scheduler(bad, validate_space(bad))


# ----------------------------------------------------------------------------------------------- a real study
def _rows(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def test_quickstart_study_reports_and_resumes_without_rerunning(ray_session, tmp_path, capsys):
    from test_train_ray import SMALL

    space = str(SPACES / "quickstart.yaml")
    overrides = SMALL + ["train.max_epochs=1"]
    assert main([space, "--work-dir", str(tmp_path), "--set", *overrides]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # the study's progress bar reached both trials and names the best metric
    assert re.search(r"study quickstart: best bbox/AP50 [\d.e+-]+: 100%\S* 2/2", captured.err), captured.err[-2000:]
    folder = tmp_path / "tune" / "quickstart"
    rows = _rows(folder)
    assert sorted(r["optimizer.lr"] for r in rows) == ["0.0005", "0.002"]
    assert all(r["status"] == "done" and r["epoch"] == "1" for r in rows)
    ap50 = [float(r["bbox/AP50"]) for r in rows]
    assert ap50 == sorted(ap50, reverse=True) and all(0.0 <= v <= 1.0 for v in ap50)
    for r in rows:  # each row is the trial's own evaluation, read back from its run log
        run = folder / "runs" / r["trial"]
        val = [rec for rec in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if rec["mode"] == "val"]
        assert float(r["bbox/AP50"]) == pytest.approx(val[-1]["bbox/AP50"])
        assert load_config(run / "pipeline.yaml").get("optimizer.lr") == float(r["optimizer.lr"])
        assert r["trial"] in printed and r["trial"] in (folder / "results.md").read_text()
    assert "| rank | trial" in printed
    png = (folder / "metric_vs_optimizer.lr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    best = load_config(folder / "best_pipeline.yaml")
    assert best.get("optimizer.lr") == float(rows[0]["optimizer.lr"])
    assert best.get("train.max_epochs") == 1 and best.get("data.train.num_images") == 16
    assert best.get("scaling.cpus_per_worker") == 0.5 and best.build("model") is not None
    parse_sections(best)  # what python -m raydet.train best_pipeline.yaml reads first

    # a second fresh study into the same folder is refused; --resume with other settings too
    assert main([space, "--work-dir", str(tmp_path), "--set", *overrides]) == 2
    assert "a study already exists" in capsys.readouterr().err
    assert main([space, "--work-dir", str(tmp_path), "--resume", "--set", *overrides[:-1]]) == 2
    assert "a resumed study keeps its settings" in capsys.readouterr().err

    # resuming a finished study reruns nothing: same table, one driver start per trial, no new reports
    before = (folder / "results.csv").read_text()
    progress = {r["trial"]: (folder / f"trial_{r['trial']}" / "result.json").read_text() for r in rows}
    assert main([space, "--work-dir", str(tmp_path), "--resume"]) == 0
    assert (folder / "results.csv").read_text() == before
    for r in rows:
        starts = (folder / "runs" / r["trial"] / "starts.jsonl").read_text().splitlines()
        assert len(starts) == 1 and json.loads(starts[0])["resumed"] is False
        assert (folder / f"trial_{r['trial']}" / "result.json").read_text() == progress[r["trial"]]


def test_a_failed_trial_is_rerun_on_resume(ray_session, tmp_path, capsys):
    """An infinite learning rate makes the loss NaN at the second step: the trial fails (the study does not),
    and --resume starts it again (resuming errored trials)."""
    from test_train_ray import SMALL

    path = space_file(tmp_path, "search: {optimizer.lr: {grid: [.inf]}}\n"
                                "resources: {num_workers: 1, cpus_per_worker: 0.5, driver_cpus: 0.5}\n",
                      metric="bbox/AP50")
    overrides = SMALL + ["train.max_epochs=1", "runtime.log_interval=100"]
    assert main([str(path), "--work-dir", str(tmp_path / "w"), "--set", *overrides]) == 1
    # no trial reported the metric: the command ends with the (first) trial's failure, raydet's own message
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: non-finite loss at epoch 1, iteration 2")
    folder = tmp_path / "w" / "tune" / "study"
    (row,) = _rows(folder)
    assert row["status"] == "error" and row["bbox/AP50"] == ""
    error = (folder / f"trial_{row['trial']}" / "error.txt").read_text()
    assert "non-finite loss at epoch 1, iteration 2" in error
    assert main([str(path), "--work-dir", str(tmp_path / "w"), "--resume"]) == 1
    starts = (folder / "runs" / row["trial"] / "starts.jsonl").read_text().splitlines()
    assert len(starts) == 2


def test_a_trial_that_crashed_mid_run_resumes_from_its_last_checkpoint(ray_session, tmp_path, capsys, worker_hooks):
    """A trial crashes in epoch 2, after its epoch-1 checkpoint (a test hook raises once, at iteration 5): the study
    records the error; --resume starts the trial again from that checkpoint, not from scratch, and it finishes."""
    from test_train_ray import SMALL

    from raydet.workspace import find_checkpoints

    marker = tmp_path / "crashed.json"
    path = space_file(tmp_path, "search: {optimizer.lr: {grid: [0.002]}}\nmode: min\n"
                                "resources: {num_workers: 1, cpus_per_worker: 0.5, driver_cpus: 0.5}\n",
                      metric="train/loss")
    overrides = SMALL + ["train.max_epochs=2", "data.train.num_images=8", "data.val=null",
                         f"runtime.imports=[{worker_hooks}]",
                         f"hooks=[{{type: FailOnceAtIteration, marker: '{marker}', iteration: 5}}]"]
    assert main([str(path), "--work-dir", str(tmp_path / "w"), "--set", *overrides]) == 0  # epoch 1 reported
    assert "1 trials (1 failed)" in capsys.readouterr().out
    folder = tmp_path / "w" / "tune" / "study"
    (row,) = _rows(folder)
    assert row["status"] == "error" and json.loads(marker.read_text())["iter"] == 5
    run = folder / "runs" / row["trial"]
    (first,) = find_checkpoints(run)
    assert (first.epoch, first.iter) == (1, 4)

    assert main([str(path), "--work-dir", str(tmp_path / "w"), "--resume"]) == 0
    (row,) = _rows(folder)
    assert row["status"] == "done" and row["epoch"] == "2"
    starts = [json.loads(s) for s in (run / "starts.jsonl").read_text().splitlines()]
    assert [(s["resumed"], s["checkpoint"]) for s in starts] == [(False, None), (True, first.path)]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["mode"] == "resume"]
    assert [(r["epoch"], r["iter"]) for r in resume] == [(1, 4)]
    after = [r["iter"] for r in records[records.index(resume[0]):] if r["mode"] == "train"]
    assert after == [5, 6, 7, 8]  # epoch 2 only: epoch 1 was not trained again


def test_asha_stops_the_worse_trial_at_its_first_rung(ray_session, tmp_path):
    """Two trials, one at a time (the CPU budget fits one): lr 0.002 trains, lr 0 cannot lower its loss. ASHA
    (grace 1 epoch, reduction factor 2) keeps the better half at the epoch-1 rung, so the lr 0 trial, which
    reaches the rung second with the higher mean loss, is stopped there. What raydet guarantees for a stopped trial
    (README, raydet.tune): no iteration past the rung's epoch, that epoch's result and checkpoint, workers released."""
    import ray

    from test_train_ray import SMALL

    from raydet.workspace import find_checkpoints, latest_checkpoint

    path = space_file(tmp_path, "search: {optimizer.lr: {grid: [0.002, 0.0]}}\nmode: min\n"
                                "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n"
                                "resources: {num_workers: 1, cpus_per_worker: 0.5, driver_cpus: 0.5}\n",
                      metric="train/loss")
    overrides = SMALL + ["train.max_epochs=2", "data.train.num_images=8", "data.val=null",
                         "lr_schedule.warmup=null"]
    before = set(ray.util.placement_group_table())  # earlier tests' groups may still be on their way out
    assert main([str(path), "--work-dir", str(tmp_path / "w"), "--set", *overrides]) == 0
    folder = tmp_path / "w" / "tune" / "study"
    rows = {float(r["optimizer.lr"]): r for r in _rows(folder)}
    assert rows[0.002]["status"] == "done" and rows[0.002]["epoch"] == "2"
    assert rows[0.0]["status"] == "stopped" and rows[0.0]["epoch"] == "1"
    assert float(rows[0.002]["train/loss"]) < float(rows[0.0]["train/loss"])
    # the stopped trial trained exactly its first epoch (4 iterations of 2 images), not one iteration more
    run = folder / "runs" / rows[0.0]["trial"]
    train = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["mode"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    # its epoch-1 checkpoint is the last it wrote, and kept: a resumed study would start from it
    assert [c.epoch for c in find_checkpoints(run)] == [1] and latest_checkpoint(run).epoch == 1
    assert not (run / "continue_1").exists()  # Tune never told it to go on
    # and its workers' resources are back: no placement group of this study is left holding them
    deadline = time.monotonic() + 300
    while True:
        held = [pg for pg_id, pg in ray.util.placement_group_table().items()
                if pg_id not in before and pg["state"] == "CREATED"]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not held, held
