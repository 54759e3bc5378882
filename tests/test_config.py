"""Pipeline files: _base_ inheritance, origins, ${...} references, --set overrides, errors and `raydet config`."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raydet.cli import main
from raydet.config import SECTIONS, Config, get_by_path, load_config, set_by_path
from raydet.registry import ConfigError


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def tree(tmp_path):
    """grand.yaml <- parent.yaml (+ extra.yaml) <- child.yaml, with a shared train_pipeline variable."""
    write(tmp_path, "_base_/grand.yaml", """\
        img_scale: [1333, 800]
        train_pipeline:
          - {type: LoadImage}
          - {type: Resize, scale: "${img_scale}", keep_ratio: true}
        model:
          type: FasterRCNN
          backbone: {type: ResNet, depth: 50, out_indices: [0, 1, 2, 3],
                     norm_cfg: {type: BN, requires_grad: true}}
          neck: {type: FPN, in_channels: [256, 512, 1024, 2048], out_channels: 256}
        data:
          root: /data/coco
          train: {ann_file: "${data.root}/annotations/train.json", pipeline: "${train_pipeline}"}
          test: {pipeline: "${train_pipeline}"}
        optimizer: {type: SGD, lr: 0.02, momentum: 0.9, weight_decay: 1e-4}
        """)
    write(tmp_path, "_base_/extra.yaml", """\
        optimizer: {lr: 0.04}
        seed: 1
        """)
    write(tmp_path, "_base_/parent.yaml", """\
        _base_: grand.yaml
        model:
          backbone: {depth: 101}
        """)
    child = write(tmp_path, "pipelines/child.yaml", """\
        _base_: [../_base_/parent.yaml, ../_base_/extra.yaml]
        model:
          backbone:
            out_indices: [1, 2]
            norm_cfg: {_delete_: true, type: GN, num_groups: 32}
        seed: 7
        """)
    return tmp_path, child


# ------------------------------------------------------------------ inheritance

def test_two_level_inheritance_merges_dicts_and_replaces_lists(tree):
    root, child = tree
    cfg = load_config(child)
    backbone = cfg["model.backbone"]
    assert backbone["type"] == "ResNet"          # from grand
    assert backbone["depth"] == 101              # parent overrides grand
    assert backbone["out_indices"] == [1, 2]     # child's list replaces, not appends / merges by index
    assert cfg["model.neck.out_channels"] == 256
    assert cfg["optimizer"] == {"type": "SGD", "lr": 0.04, "momentum": 0.9, "weight_decay": 1e-4}
    assert cfg["seed"] == 7                      # the file itself beats its bases
    assert isinstance(cfg["optimizer.weight_decay"], float)  # YAML 1.1 would read 1e-4 as a string


def test_delete_replaces_instead_of_merging(tree):
    _, child = tree
    cfg = load_config(child)
    assert cfg["model.backbone.norm_cfg"] == {"type": "GN", "num_groups": 32}  # requires_grad is gone
    assert "_delete_" not in cfg.to_yaml()


def test_delete_in_a_base_replaces_what_the_bases_before_it_set(tmp_path):
    """A variant file (no bases of its own) with ``_delete_`` in it, listed after a family file: its backbone
    replaces the family's (no ResNet key survives); a marker with nothing to replace anywhere is dropped; a file's
    marker that replaced something in its own bases does not act again in its includer."""
    write(tmp_path, "family.yaml", "model: {type: FasterRCNN, backbone: {type: ResNet, depth: 50, frozen_stages: 1},"
                                   " neck: {type: FPN, out_channels: 256}}\n")
    write(tmp_path, "hrnet.yaml", "model:\n  backbone: {_delete_: true, type: HRNet, extra: {stage1: {num_blocks: [4]}}}"
                                  "\n  neck: {_delete_: true, type: HRFPN, in_channels: [18, 36]}\n")
    child = write(tmp_path, "child.yaml", "_base_: [family.yaml, hrnet.yaml]\nmodel: {neck: {out_channels: 64}}\n")
    cfg = load_config(child)
    assert cfg["model"] == {"type": "FasterRCNN",
                            "backbone": {"type": "HRNet", "extra": {"stage1": {"num_blocks": [4]}}},
                            "neck": {"type": "HRFPN", "in_channels": [18, 36], "out_channels": 64}}
    assert "_delete_" not in cfg.to_yaml() and not [k for k in cfg.origins if "_delete_" in k]
    assert load_config(tmp_path / "hrnet.yaml")["model.backbone"] == {"type": "HRNet",
                                                                     "extra": {"stage1": {"num_blocks": [4]}}}
    # the variant's marker was used up against family.yaml inside mid.yaml: in top.yaml, mid's backbone merges
    write(tmp_path, "mid.yaml", "_base_: [family.yaml, hrnet.yaml]\n")
    write(tmp_path, "other.yaml", "model: {backbone: {norm_eval: false}}\n")
    top = write(tmp_path, "top.yaml", "_base_: [other.yaml, mid.yaml]\n")
    assert load_config(top)["model.backbone"] == {"norm_eval": False, "type": "HRNet",
                                                  "extra": {"stage1": {"num_blocks": [4]}}}


def test_bases_merge_left_to_right(tmp_path):
    write(tmp_path, "a.yaml", "optimizer: {type: SGD, lr: 1}\nseed: 1\n")
    write(tmp_path, "b.yaml", "optimizer: {lr: 2}\n")
    ab = write(tmp_path, "ab.yaml", "_base_: [a.yaml, b.yaml]\n")
    ba = write(tmp_path, "ba.yaml", "_base_: [b.yaml, a.yaml]\n")
    assert load_config(ab)["optimizer"] == {"type": "SGD", "lr": 2}
    assert load_config(ba)["optimizer"] == {"lr": 1, "type": "SGD"}


def test_origins_name_the_file_that_last_set_each_key(tree):
    root, child = tree
    cfg = load_config(child, ["optimizer.momentum=0.8"])
    grand, parent, extra = (str(root / "_base_" / n) for n in ("grand.yaml", "parent.yaml", "extra.yaml"))
    child = str(child)
    assert cfg.origins["model.type"] == grand
    assert cfg.origins["model.backbone.depth"] == parent
    assert cfg.origins["model.backbone.out_indices"] == child
    assert cfg.origins["model.backbone.norm_cfg.type"] == child
    assert cfg.origins["optimizer.lr"] == extra
    assert cfg.origins["optimizer.type"] == grand
    assert cfg.origins["optimizer.momentum"] == "--set"
    assert cfg.origins["seed"] == child
    assert cfg.path == child


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_missing_files_are_named_with_their_includer(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path, "child.yaml", "_base_: gone.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    assert str(exc.value).startswith(f"{child}: _base_: file not found")
    assert "gone.yaml" in str(exc.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  type: X\n  depth: [1, 2\nseed: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert msg.startswith(f"{bad}: line 4")  # the scanner notices the unclosed '[' on line 4
    dup = write(tmp_path, "dup.yaml", "seed: 1\nmodel: {type: X}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: line 3.*duplicate key 'seed'.*line 1"):
        load_config(dup)


# ------------------------------------------------------------------ references

def test_references_resolve_after_merge_so_a_child_variable_changes_all_users(tree):
    root, _ = tree
    child = write(root, "pipelines/small.yaml", """\
        _base_: ../_base_/grand.yaml
        img_scale: [640, 480]
        """)
    cfg = load_config(child)
    resize = {"type": "Resize", "scale": [640, 480], "keep_ratio": True}
    assert cfg["data.train.pipeline"] == [{"type": "LoadImage"}, resize]
    assert cfg["data.test.pipeline"] == [{"type": "LoadImage"}, resize]
    # Deep copies: editing one user leaves the other alone.
    cfg["data.train.pipeline"][1]["scale"][0] = 1
    assert cfg["data.test.pipeline"][1]["scale"] == [640, 480]
    # Variables are gone from the resolved pipeline, and the copied keys keep the file that defined them.
    assert "img_scale" not in cfg.data and "train_pipeline" not in cfg.data
    assert cfg.origins["data.train.pipeline[1].scale[0]"] == str(child)
    assert cfg.origins["data.train.pipeline[0].type"] == str(root / "_base_" / "grand.yaml")


def test_child_overriding_a_whole_variable(tree):
    root, _ = tree
    child = write(root, "pipelines/other.yaml", """\
        _base_: ../_base_/grand.yaml
        train_pipeline: [{type: LoadImage}, {type: RandomFlip, prob: 0.5}]
        """)
    cfg = load_config(child)
    assert cfg["data.train.pipeline[1]"] == {"type": "RandomFlip", "prob": 0.5}
    assert cfg["data.test.pipeline"] == cfg["data.train.pipeline"]


def test_string_interpolation_chains_and_indices(tmp_path):
    path = write(tmp_path, "p.yaml", """\
        name: retina
        size: [640, 512]
        tag: "${name}_${size[0]}x${size.1}"
        model: {type: Det, width: "${size[1]}", alias: "${tag}"}
        work_dir: "work_dirs/${model.alias}/${seed}"
        seed: 3
        """)
    cfg = load_config(path)
    assert cfg["model.width"] == 512 and isinstance(cfg["model.width"], int)  # whole-string reference keeps type
    assert cfg["model.alias"] == "retina_640x512"
    assert cfg["work_dir"] == "work_dirs/retina_640x512/3"


def test_reference_cycle_is_an_error_naming_key_and_file(tmp_path):
    path = write(tmp_path, "p.yaml", """\
        a: "${b}"
        b: {x: "${a}"}
        model: {type: X, v: "${a}"}
        """)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: ") and "cycle" in msg
    assert "a -> b -> b.x -> a" in msg


def test_reference_to_own_parent_is_a_cycle(tmp_path):
    path = write(tmp_path, "p.yaml", "model: {type: X, me: '${model}'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(path)


def test_reference_to_sibling_inside_same_mapping_is_not_a_cycle(tmp_path):
    path = write(tmp_path, "p.yaml", "model: {type: X, a: 4, b: '${model.a}', c: '${model.b}'}\n")
    assert load_config(path)["model"] == {"type": "X", "a": 4, "b": 4, "c": 4}


def test_missing_reference_names_key_file_and_nearest_name(tmp_path):
    write(tmp_path, "base.yaml", "img_scale: [1, 2]\nmodel: {type: X, size: '${img_scael}'}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'base.yaml'}: model.size: ")
    assert "${img_scael} not found" in msg and "did you mean 'img_scale'" in msg


def test_interpolating_a_list_into_a_string_is_an_error(tmp_path):
    path = write(tmp_path, "p.yaml", "s: [1, 2]\nwork_dir: 'out/${s}'\n")
    with pytest.raises(ConfigError, match=r"work_dir: cannot insert \$\{s\} \(a list\)"):
        load_config(path)


# ------------------------------------------------------------------ --set

@pytest.fixture
def simple(tmp_path):
    return write(tmp_path, "p.yaml", """\
        scale: [10, 20]
        model:
          type: Det
          loss: {type: SmoothL1Loss, beta: 0.1}
          head: {num_classes: 80}
          sizes: [1, 2, 3]
        data: {train: {size: "${scale}"}}
        """)


def test_set_values_are_typed_as_yaml(simple):
    cfg = load_config(simple, [
        "model.loss.beta=1/9",                  # a string, not 0.111
        "model.head.num_classes=0.111",         # float
        "model.sizes=[1,2]",                    # list
        "model.loss={type: L1Loss}",            # dict replaces the whole loss
        "model.head.extra=null",                # new leaf inside an existing dict
        "seed=1e-3",                            # float despite YAML 1.1
        "work_dir=a=b",                         # only the first '=' splits
    ])
    assert cfg["model.loss"] == {"type": "L1Loss"}
    assert cfg["model.head"] == {"num_classes": 0.111, "extra": None}
    assert cfg["model.sizes"] == [1, 2]
    assert cfg["seed"] == 0.001
    assert cfg["work_dir"] == "a=b"
    assert cfg.origins["model.loss.type"] == "--set"
    cfg = load_config(simple, ["model.loss.beta=1/9"])
    assert cfg["model.loss.beta"] == "1/9"


def test_set_list_items_by_index(simple):
    cfg = load_config(simple, ["model.sizes[1]=7", "model.sizes.2=8"])
    assert cfg["model.sizes"] == [1, 7, 8]
    with pytest.raises(ConfigError, match=r"--set: model\.sizes\[5\]: index 5 out of range"):
        load_config(simple, ["model.sizes[5]=1"])


def test_set_a_variable_before_resolution(simple):
    assert load_config(simple, ["scale=[3, 4]"])["data.train.size"] == [3, 4]
    cfg = load_config(simple)
    assert cfg.with_overrides(["scale=[5, 6]"])["data.train.size"] == [5, 6]
    assert cfg["data.train.size"] == [10, 20]


def test_set_with_missing_parent_suggests_the_sibling(simple):
    with pytest.raises(ConfigError) as exc:
        load_config(simple, ["model.lss.beta=1"])
    assert str(exc.value) == "--set: model.lss: no key 'lss' in 'model'; did you mean 'loss'?"
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(simple, ["model.loss"])
    with pytest.raises(ConfigError, match=r"'model\.type' is a str"):
        load_config(simple, ["model.type.x=1"])


def test_set_unknown_top_level_key(simple):
    with pytest.raises(ConfigError, match=r"^--set: modle: unknown top-level key 'modle'; did you mean 'model'\?"):
        load_config(simple, ["modle={type: X}"])


# ------------------------------------------------------------------ top-level keys

def test_unknown_top_level_key_names_file_and_suggests(tmp_path):
    base = write(tmp_path, "base.yaml", "modle: {type: X}\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(child)
    assert str(exc.value).startswith(f"{base}: modle: unknown top-level key 'modle'; did you mean 'model'?")


def test_private_top_level_keys_are_dropped(tmp_path):
    path = write(tmp_path, "p.yaml", "_notes_: hi\nseed: 0\n")
    assert load_config(path).data == {"seed": 0}


def test_sections_constant():
    assert SECTIONS[:3] == ("model", "data", "optimizer") and "checkpoint" in SECTIONS


# ------------------------------------------------------------------ Config / helpers

def test_to_yaml_round_trips(tree, tmp_path):
    _, child = tree
    cfg = load_config(child, ["work_dir='1e-3'"])  # a string that looks like a float must stay a string
    out = tmp_path / "out" / "dumped.yaml"
    cfg.dump(out)
    again = load_config(out)
    assert again.data == cfg.data
    assert again["work_dir"] == "1e-3"
    assert list(yaml.safe_load(cfg.to_yaml())) == ["model", "data", "optimizer", "seed", "work_dir"]


def test_get_and_set_by_path():
    data = {"a": {"b": [{"c": 1}, {"c": 2}]}}
    assert get_by_path(data, "a.b[1].c") == 2
    assert get_by_path(data, "a.b.0.c") == 1
    assert get_by_path(data, "a.x", "dflt") == "dflt"
    with pytest.raises(ConfigError, match=r"a\.bb: no key 'bb' in 'a'; did you mean 'b'"):
        get_by_path(data, "a.bb")
    assert set_by_path(data, "a.b.1.c", 5) == "a.b[1].c"
    assert data["a"]["b"][1]["c"] == 5
    set_by_path(data, "a.new", [])
    assert data["a"]["new"] == []
    with pytest.raises(ConfigError, match="no key 'q'"):
        set_by_path(data, "q.r", 1)
    with pytest.raises(ConfigError, match="malformed"):
        get_by_path(data, "a..b")
    cfg = Config(data)
    assert "a.b[0]" in cfg and "a.z" not in cfg
    with pytest.raises(KeyError):
        cfg["a.z"]


# ------------------------------------------------------------------ CLI

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


@pytest.fixture
def runnable(tmp_path):
    """A child of the quickstart (``raydet config`` validates what it prints: the toy ``tree`` would not build)."""
    return write(tmp_path, "child.yaml", f"""\
        _base_: {QUICKSTART}
        img_scale: [192, 128]
        test_pipeline:
          - {{type: Resize, scale: "${{img_scale}}"}}
          - {{type: Pad, size_divisor: 32}}
        model:
          backbone:
            norm_cfg: {{_delete_: true, type: GN, num_groups: 32}}
        """)


def test_cli_config_prints_merged_pipeline(runnable, capsys):
    assert main(["config", str(runnable), "--set", "optimizer.lr=0.01", "model.backbone.depth=34"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["optimizer"]["lr"] == 0.01
    assert out["model"]["backbone"]["depth"] == 34
    assert out["model"]["backbone"]["norm_cfg"] == {"type": "GN", "num_groups": 32}
    assert out["data"]["val"]["pipeline"][0]["scale"] == [192, 128]
    assert out["data"]["num_classes"] == 3


def test_cli_bad_pipeline_exits_2_without_traceback(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "modle: {type: X}\n")
    with pytest.raises(SystemExit) as exc:
        main(["config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: modle: unknown top-level key") and "Traceback" not in err


def test_python_m_raydet_cli(runnable, tmp_path):
    child = runnable
    ok = subprocess.run([sys.executable, "-m", "raydet.cli", "config", str(child), "--set", "seed=11"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["seed"] == 11
    bad = subprocess.run([sys.executable, "-m", "raydet.cli", "config", str(child), "--set", "model.bakbone.x=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --set: model.bakbone: no key 'bakbone' in 'model'; did you mean 'backbone'?"
