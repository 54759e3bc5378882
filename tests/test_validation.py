"""The whole pipeline is checked on the driver before Ray starts (issue 9): a typo in any section exits 2 with the
file that set the key, the dotted key and a "did you mean", from ``raydet config`` and from every command, with Ray
never started; ``--set KEY={...}`` merges; hooks take ``priority``; detectors and datasets refuse bad components
when built. No Ray: every test runs in well under a second after the imports."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from raydet import cli
from raydet.config import load_config
from raydet.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"

HOOKS_MODULE = "raydet_validation_test_hooks"  # written to tmp_path, imported through runtime.imports
HOOKS_SOURCE = '''
from raydet.engine.hooks import Hook
from raydet.registry import REGISTRY, register


class ToyHook(Hook):
    """A plain Hook subclass: no priority argument."""

    def __init__(self, every: int = 1):
        self.every = every


class PriorityArgHook(Hook):
    """A hook that takes its priority itself."""

    def __init__(self, priority: int = 50):
        self.given = priority
        self.priority = priority


for cls in (ToyHook, PriorityArgHook):
    if cls.__name__ not in REGISTRY:
        register(cls)
'''


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts or joins Ray; afterwards Ray is no more initialised than before."""
    import ray

    import raydet.benchmark
    import raydet.commands.ray_setup
    import raydet.infer
    import raydet.test
    import raydet.train

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started: the pipeline error must come before")

    was_initialized = ray.is_initialized()
    monkeypatch.setattr(ray, "init", refuse)
    for module in (raydet.commands.ray_setup, raydet.train, raydet.test, raydet.infer):
        if hasattr(module, "init_ray"):
            monkeypatch.setattr(module, "init_ray", refuse)
    yield
    assert ray.is_initialized() == was_initialized


@pytest.fixture
def hooks_module(tmp_path, monkeypatch):
    folder = tmp_path / "hooks_module"
    folder.mkdir()
    (folder / f"{HOOKS_MODULE}.py").write_text(HOOKS_SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    return HOOKS_MODULE


def pipeline(tmp_path: Path, body: str, name: str = "p.yaml", base: Path = QUICKSTART) -> Path:
    """A pipeline file: ``body`` on top of ``base``."""
    path = tmp_path / name
    path.write_text(f"_base_: {base}\n" + textwrap.dedent(body))
    return path


def run_config(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``raydet config ...`` (``raydet.cli.main``)."""
    try:
        code = cli.main(["config", *map(str, argv)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ a typo in each section, before Ray starts
# (section, YAML on top of the quickstart, the error's dotted key and the rest of its message)
TYPOS = [
    ("model", "model: {backbone: {detph: 18}}\n",
     "model.backbone.detph", "unknown argument of ResNet; did you mean 'depth'?"),
    ("data", "data: {train: {num_image: 8}}\n",
     "data.train.num_image", "unknown argument of SyntheticShapesDataset; did you mean 'num_images'"),
    ("data transform", "train_pipeline:\n  - {type: Resize, scale: [192, 160]}\n  - {type: RandomFlip, prb: 0.5}\n",
     "data.train.pipeline[1].prb", "unknown argument of RandomFlip; did you mean 'prob'?"),
    ("data test split", "data: {test: {type: SyntheticShapeDataset, num_images: 4}}\n",
     "data.test.type", "unknown type 'SyntheticShapeDataset'; did you mean 'SyntheticShapesDataset'"),
    ("optimizer", "optimizer: {lrr: 0.01}\n",
     "optimizer.lrr", "unknown key of OptimizerConfig; did you mean 'lr'?"),
    ("optimizer type", "optimizer: {type: AdamWW}\n",
     "optimizer.type", "unknown optimizer 'AdamWW'; did you mean 'AdamW'"),
    ("lr_schedule", "lr_schedule: {warmup_iter: 10}\n",
     "lr_schedule.warmup_iter", "unknown key of LrScheduleConfig; did you mean 'warmup_iters'"),
    ("evaluation", "evaluation: {metric: [bbox, proposl]}\n",
     "evaluation.metric[1]", "unknown metric 'proposl'; did you mean 'proposal'?"),
    ("checkpoint", "checkpoint: {num_to_kep: 1}\n",
     "checkpoint.num_to_kep", "unknown key of CheckpointSettings; did you mean 'num_to_keep'?"),
    ("runtime", "runtime: {log_intervl: 5}\n",
     "runtime.log_intervl", "unknown key of RuntimeSettings; did you mean 'log_interval'?"),
    ("scaling", "scaling: {data_actor: [1, 1]}\n",
     "scaling.data_actor", "unknown key of ScalingSettings; did you mean 'data_actors'"),
    ("train", "train: {nonfinite_loss: skipp}\n",
     "train.nonfinite_loss", "expected one of stop, skip, got 'skipp'; did you mean 'skip'?"),
    ("hooks", "runtime: {imports: [HOOKS]}\nhooks: [{type: ToyHok}]\n",
     "hooks[0].type", "unknown hook type 'ToyHok'; did you mean 'ToyHook'?"),
    ("hook priority", "runtime: {imports: [HOOKS]}\nhooks: [{type: ToyHook, priority: NORMA}]\n",
     "hooks[0].priority", "unknown priority 'NORMA'; did you mean 'NORMAL'?"),
    ("hook argument", "runtime: {imports: [HOOKS]}\nhooks: [{type: ToyHook, evry: 2}]\n",
     "hooks[0].evry", "unknown argument of ToyHook; did you mean 'every'?"),
    ("top-level", "seeed: 1\n", "seeed", "unknown top-level key 'seeed'; did you mean 'seed'?"),
]


@pytest.mark.parametrize("section, body, key, message", TYPOS, ids=[t[0] for t in TYPOS])
def test_a_typo_in_each_section_fails_raydet_config_naming_file_key_and_suggestion(
        tmp_path, capsys, no_ray, hooks_module, section, body, key, message):
    path = pipeline(tmp_path, body.replace("HOOKS", hooks_module))
    code, out, err = run_config([path], capsys)
    assert code == 2
    assert out == ""  # nothing printed as if it were fine
    assert err.startswith(f"error: {path}: {key}: {message}"), err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("section, body, key, message", TYPOS, ids=[t[0] for t in TYPOS])
def test_a_typo_in_each_section_fails_training_before_ray_starts(
        tmp_path, capsys, no_ray, hooks_module, section, body, key, message):
    import raydet.train

    path = pipeline(tmp_path, body.replace("HOOKS", hooks_module))
    work_dir = tmp_path / "runs"
    assert raydet.train.main([str(path), "--work-dir", str(work_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: {key}: {message}" in err
    assert not work_dir.exists()  # no run folder for a pipeline that cannot run


def test_a_value_from_set_names_set_and_one_from_a_base_file_names_that_file(tmp_path, capsys, no_ray):
    code, _, err = run_config([QUICKSTART, "--set", "optimizer.lrr=0.1", "--validate-only"], capsys)
    assert code == 2 and err.startswith("error: --set: optimizer.lrr: unknown key of OptimizerConfig; did you "
                                        "mean 'lr'?")
    base = pipeline(tmp_path, "lr_schedule: {gama: 0.5}\n", name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"_base_: {base}\nseed: 3\n")
    code, _, err = run_config([child], capsys)
    assert code == 2 and err.startswith(f"error: {base}: lr_schedule.gama: unknown key of LrScheduleConfig; did you "
                                        f"mean 'gamma'?")


@pytest.mark.parametrize("body, key, message", [
    ("scaling: {data_actors: [2, 1]}\n", "scaling.data_actors", "must be [min, max] with 1 <= min <= max"),
    ("train: {max_epochs: 0}\n", "train.max_epochs", "must be >= 1, got 0"),
    ("seed: 0.5\n", "seed", "must be an int, got 0.5"),
    ("optimizer: {lr: -0.1}\n", "optimizer.lr", "must be >= 0, got -0.1"),
    ("optimizer: {grad_clip: {max_nrom: 10}}\n", "optimizer.grad_clip.max_nrom",
     "unknown key of grad_clip; did you mean 'max_norm'?"),
    ("lr_schedule: {warmup: linaer}\n", "lr_schedule.warmup", "did you mean 'linear'?"),
    ("runtime: {imports: [no_such_module_for_raydet_tests]}\n", "runtime.imports[0]",
     "cannot import 'no_such_module_for_raydet_tests'"),
    ("evaluation: {metric: [bbox, segm]}\n", "evaluation.metric",
     "'segm' (mask AP) needs a model with a mask branch; FasterRCNN has none"),
    ("model: {rpn_head: null}\n", "model.rpn_head", "FasterRCNN needs an rpn_head"),
    ("hooks: {type: ToyHook}\n", "hooks", "expected a list of {type: HookName, ...} entries, got dict"),
])
def test_bad_values_fail_naming_the_key(tmp_path, capsys, no_ray, body, key, message):
    path = pipeline(tmp_path, body)
    code, _, err = run_config([path, "--validate-only"], capsys)
    assert code == 2
    assert err.startswith(f"error: {path}: {key}: ") and message in err, err


def test_raydet_config_validates_then_prints_and_validate_only_prints_ok(tmp_path, capsys, no_ray):
    # before issue 9 this printed `detph: 101` and exited 0
    code, out, err = run_config([QUICKSTART, "--set", "model.backbone.detph=101"], capsys)
    assert (code, out) == (2, "")
    assert err == ("error: --set: model.backbone.detph: unknown argument of ResNet; did you mean 'depth'? (valid: "
                   "depth, in_channels, num_stages, strides, dilations, out_indices, style, frozen_stages, norm_cfg, "
                   "norm_eval, zero_init_residual, groups, base_width, dcn_cfg, stage_with_dcn, init_cfg, "
                   "conv_cfg, plugins, base_channels)\n")
    code, out, err = run_config([QUICKSTART, "--validate-only"], capsys)
    assert (code, out, err) == (0, f"ok: {QUICKSTART}\n", "")
    code, out, _ = run_config([QUICKSTART, "--set", "model.backbone.depth=34"], capsys)
    assert code == 0 and load_config(QUICKSTART, ["model.backbone.depth=34"]).to_yaml() == out


def test_every_shipped_pipeline_validates(capsys, no_ray):
    paths = sorted((ROOT / "pipelines").glob("*.yaml")) + sorted((ROOT / "pipelines" / "cluster").glob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        assert run_config([path, "--validate-only"], capsys) == (0, f"ok: {path}\n", "")


# ------------------------------------------------------------------ the other commands
def test_test_infer_benchmark_and_tune_fail_on_a_typo_before_ray_starts(tmp_path, capsys, no_ray):
    import raydet.benchmark
    import raydet.infer
    import raydet.test
    import raydet.tune

    path = pipeline(tmp_path, "optimizer: {momentun: 0.9}\n")
    expected = f"error: {path}: optimizer.momentun: unknown key of OptimizerConfig; did you mean 'momentum'?"
    missing = str(tmp_path / "no_checkpoint.pt")  # the pipeline is checked before the checkpoint is looked for
    images = tmp_path / "images"
    images.mkdir()
    for main, argv in ((raydet.test.main, [path, missing, "--out", tmp_path / "t"]),
                       (raydet.infer.main, [path, missing, images, "--out", tmp_path / "i"]),
                       (raydet.benchmark.main, [path, "--out", tmp_path / "b.json", "--iters", "1"])):
        assert main(list(map(str, argv))) == 2
        assert expected in capsys.readouterr().err, main.__module__
    # raydet tune: the base pipeline, and each trial's pipeline after a searched value is applied
    space = tmp_path / "study.yaml"
    space.write_text(f"pipeline: {path}\nmetric: bbox/AP\nsearch: {{optimizer.lr: {{grid: [0.01]}}}}\n")
    assert raydet.tune.main([str(space), "--work-dir", str(tmp_path / "w")]) == 2
    assert expected in capsys.readouterr().err
    space.write_text(f"pipeline: {QUICKSTART}\nmetric: bbox/AP\n"
                     "search: {optimizer: {grid: [{lr: 0.01}, {lrr: 0.02}]}}\n")
    assert raydet.tune.main([str(space), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert f"error: {space}: search.optimizer value " in err
    assert "optimizer.lrr: unknown key of OptimizerConfig; did you mean 'lr'?" in err
    assert not (tmp_path / "w").exists() and not (tmp_path / "t").exists() and not (tmp_path / "i").exists()


# ------------------------------------------------------------------ --set KEY={...}
@pytest.fixture
def small(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        model:
          type: Det
          backbone: {type: ResNet, depth: 50, norm_cfg: {type: BN, requires_grad: true}}
          loss: {type: SmoothL1Loss, beta: 0.1, loss_weight: 1.0}
        data: {train: {type: X}}
        """))
    return path


def test_set_with_a_mapping_merges_into_the_mapping_there(small):
    cfg = load_config(small, ["model.backbone={depth: 101, norm_cfg: {requires_grad: false}}"])
    assert cfg["model.backbone"] == {"type": "ResNet", "depth": 101, "norm_cfg": {"type": "BN", "requires_grad": False}}
    assert cfg.origins["model.backbone.depth"] == "--set"
    assert cfg.origins["model.backbone.norm_cfg.requires_grad"] == "--set"
    assert cfg.origins["model.backbone.type"] == str(small)  # kept from the file
    assert cfg.origins["model.backbone.norm_cfg.type"] == str(small)


def test_set_with_delete_or_another_type_replaces_the_mapping(small):
    cfg = load_config(small, ["model.backbone={_delete_: true, type: ResNet, depth: 18}"])
    assert cfg["model.backbone"] == {"type": "ResNet", "depth": 18}
    assert "model.backbone.norm_cfg" not in cfg.origins
    cfg = load_config(small, ["model.loss={type: L1Loss}"])  # another type: SmoothL1Loss's beta would not fit
    assert cfg["model.loss"] == {"type": "L1Loss"}
    cfg = load_config(small, ["model.backbone.norm_cfg={type: GN, num_groups: 32}"])
    assert cfg["model.backbone.norm_cfg"] == {"type": "GN", "num_groups": 32}
    with pytest.raises(ConfigError, match=r"^--set: model\.backbone\._delete_: expected true or false, got 'yes'$"):
        load_config(small, ["model.backbone={_delete_: 'yes', depth: 18}"])


def test_set_with_a_mapping_of_part_of_the_model_builds(capsys, no_ray):
    # before issue 9 the mapping replaced the backbone and the build failed on a missing 'type'
    code, out, err = run_config([QUICKSTART, "--set", "model.backbone={depth: 34, norm_eval: true}"], capsys)
    assert (code, err) == (0, "")
    cfg = load_config(QUICKSTART)
    expected = dict(cfg["model.backbone"], depth=34, norm_eval=True)
    import yaml

    assert yaml.safe_load(out)["model"]["backbone"] == expected


# ------------------------------------------------------------------ hook priority
def test_a_plain_hook_takes_priority_as_an_int_or_a_name_and_runs_in_that_order(hooks_module):
    import importlib

    import torch

    from raydet.engine.hooks import Hook, build_hook
    from raydet.engine.runner import Runner

    importlib.import_module(hooks_module)
    late = build_hook({"type": "ToyHook", "priority": 70, "every": 3}, "hooks[0]")
    early = build_hook({"type": "ToyHook", "priority": "high"}, "hooks[1]")
    default = build_hook({"type": "ToyHook"}, "hooks[2]")
    assert (late.priority, late.every, early.priority, default.priority) == (70, 3, 30, 50)
    own = build_hook({"type": "PriorityArgHook", "priority": "VERY_LOW"}, "hooks[3]")
    assert (own.given, own.priority) == (90, 90)
    model = torch.nn.Linear(1, 1)
    runner = Runner(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=None, val_loader=None,
                    max_epochs=0, hooks=[late, own, default, early])
    assert runner.hooks == [early, default, late, own]
    assert isinstance(late, Hook)


@pytest.mark.parametrize("spec, message", [
    ({"type": "ToyHook", "priority": 101}, (r"^hooks\[0\]\.priority: expected an int from 0 to 100 or a name such as "
                                            r"NORMAL, got 101$")),
    ({"type": "ToyHook", "priority": True}, r"^hooks\[0\]\.priority: expected an int from 0 to 100"),
    ({"type": "L1Loss"}, r"^hooks\[0\]\.type: L1Loss is not a hook \(subclass raydet\.engine\.hooks\.Hook\)$"),
    ("ToyHook", r"^hooks\[0\]: expected a mapping \{type: HookName, \.\.\.\}, got 'ToyHook'$"),
])
def test_bad_hook_entries_name_the_key(hooks_module, spec, message):
    import importlib

    import raydet.models  # noqa: F401  (registers L1Loss)
    from raydet.engine.hooks import build_hook

    importlib.import_module(hooks_module)
    with pytest.raises(ConfigError, match=message):
        build_hook(spec, "hooks[0]")


def test_the_pipeline_hook_form_with_priority_validates(tmp_path, capsys, no_ray, hooks_module):
    path = pipeline(tmp_path, f"runtime: {{imports: [{hooks_module}]}}\n"
                              "hooks: [{type: ToyHook, priority: 60}, {type: ToyHook, priority: BELOW_NORMAL}]\n")
    assert run_config([path, "--validate-only"], capsys) == (0, f"ok: {path}\n", "")


# ------------------------------------------------------------------ build-time checks of components
def test_detectors_refuse_a_missing_or_wrong_head_when_built():
    import raydet.models  # noqa: F401
    from raydet.models.detectors.detectors import RPN, FasterRCNN, RetinaNet

    cfg = load_config(QUICKSTART)
    parts = {name: cfg.build(f"model.{name}") for name in ("backbone", "neck", "rpn_head", "roi_head")}
    with pytest.raises(ValueError, match=r"^rpn_head: FasterRCNN needs an rpn_head \(e\.g\. \{type: RPNHead, "
                                         r"\.\.\.\}\); got null$"):
        FasterRCNN(parts["backbone"], parts["neck"], None, parts["roi_head"])
    with pytest.raises(ValueError, match=r"^roi_head: FasterRCNN needs a roi_head .*; got null$"):
        FasterRCNN(parts["backbone"], parts["neck"], parts["rpn_head"], None)
    with pytest.raises(ValueError, match=r"^rpn_head: RPN needs an rpn_head .*; got RoIHeadLike"):
        RPN(parts["backbone"], parts["neck"], RoIHeadLike())
    with pytest.raises(ValueError, match=r"^bbox_head: RetinaNet needs a bbox_head .*; got null$"):
        RetinaNet(parts["backbone"], parts["neck"], None)
    with pytest.raises(ValueError, match=r"^backbone: FasterRCNN needs a backbone .*; got a dict, not a torch module"):
        FasterRCNN({"type": "ResNet"}, parts["neck"], parts["rpn_head"], parts["roi_head"])
    detector = FasterRCNN(parts["backbone"], parts["neck"], parts["rpn_head"], parts["roi_head"])
    assert detector.rpn_head is parts["rpn_head"]


class RoIHeadLike(__import__("torch").nn.Module):
    """A module with loss / predict but no loss_and_proposals: not an RPN head."""

    def loss(self, *args):
        return {}

    def predict(self, *args):
        return []


def _coco_file(tmp_path: Path) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 10, 10], "area": 100,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))
    return path


def test_classes_given_as_a_string_is_refused_not_split_into_letters(tmp_path):
    from raydet.data.datasets import CocoDataset, VOCDataset

    ann = _coco_file(tmp_path)
    ds = CocoDataset(ann, tmp_path, classes=["person"], check_images=False)
    assert ds.classes == ("person",) and ds.cat_ids == [1]
    assert [list(r["labels"]) for r in ds.records] == [[0]]  # the car box is dropped
    with pytest.raises(ValueError, match=r"classes must be a list of class names, got the string 'person' "
                                         r"\(for one class write \['person'\]\)"):
        CocoDataset(ann, tmp_path, classes="person", check_images=False)
    with pytest.raises(ValueError, match=r"classes must be a list of class names, got the string 'person'"):
        VOCDataset([str(tmp_path)], "train", classes="person")
    with pytest.raises(ValueError, match=r"classes must be non-empty strings, got 3"):
        CocoDataset(ann, tmp_path, classes=["person", 3], check_images=False)


def test_classes_as_a_string_in_a_pipeline_is_refused_by_type(tmp_path, capsys, no_ray):
    ann = _coco_file(tmp_path)
    path = pipeline(tmp_path, f"data: {{val: {{_delete_: true, type: CocoDataset, ann_file: {ann}, "
                              f"img_prefix: {tmp_path}, classes: person}}}}\n")
    code, _, err = run_config([path, "--validate-only"], capsys)
    assert code == 2
    assert err.startswith(f"error: {path}: data.val.classes: CocoDataset expects "), err
    assert "got 'person'" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_every_readme_training_command_line_validates(capsys):
    """Each ``python -m raydet.train PIPELINE [--set ...]`` line of the README validates as written, e.g.
    ``--set scaling.num_workers=8`` on a pipeline that leaves ``scaling:`` at its defaults (the section is created)."""
    import re
    import shlex

    line = r"^(?:ray job submit .*?-- )?python -m raydet\.train (pipelines/\S+\.yaml(?: --set [^#\n]*)?)"
    commands = re.findall(line, (ROOT / "README.md").read_text(), re.MULTILINE)
    assert len(commands) >= 3
    for command in commands:
        pipeline, *rest = shlex.split(command)
        overrides = rest[1:] if rest[:1] == ["--set"] else []
        code = cli.main(["config", str(ROOT / pipeline), "--validate-only", *(["--set", *overrides] if overrides
                                                                              else [])])
        assert code == 0, (command, capsys.readouterr().err)
    cfg = load_config(ROOT / "pipelines" / "faster_rcnn_r50_fpn_1x_coco.yaml", ["scaling.num_workers=8"])
    assert cfg.get("scaling") == {"num_workers": 8} and cfg.origins["scaling"] == "--set"
    with pytest.raises(ConfigError, match=r"--set: scaling\.num_workrs: unknown key .*did you mean 'num_workers'"):
        from raydet.commands.sections import parse_sections

        parse_sections(load_config(ROOT / "pipelines" / "faster_rcnn_r50_fpn_1x_coco.yaml", ["scaling.num_workrs=8"]))


@pytest.mark.parametrize("override, key", [
    ("model.backbone.depth=50", r"model\.neck\.in_channels: the neck does not take the backbone's outputs "
                                r"\(channels \[256, 512, 1024, 2048\]\)"),
    ("model.rpn_head.in_channels=32", r"model\.rpn_head\.in_channels: the head does not take the neck's outputs "
                                      r"\(channels \[64\]\)"),
], ids=["backbone_vs_neck", "neck_vs_head"])
def test_parts_whose_channels_do_not_fit_fail_before_ray(override, key):
    """The quickstart's neck is built for ResNet-18's channels (64..512): ResNet-50's (256..2048) do not fit it, and
    an RPN head of 32 input channels does not take the 64-channel neck; found by shapes on the meta device."""
    from raydet.commands.validation import validate_pipeline

    with pytest.raises(ConfigError, match=key):
        validate_pipeline(load_config(QUICKSTART, [override]))
