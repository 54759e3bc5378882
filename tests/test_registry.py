"""The registry: bottom-up builds, argument / type checks, dataclass arguments and error locations."""
import dataclasses
import textwrap
from typing import Optional, Sequence

import pytest

from raydet.config import load_config
from raydet.registry import ConfigError, build, build_context, build_dataclass, error, register

BUILT = []  # class names in construction order


@register
class _TestNorm:
    def __init__(self, channels: int = 0, eps: float = 1e-5):
        BUILT.append("norm")
        self.channels, self.eps = channels, eps


@register
class _TestBlock:
    def __init__(self, depth: int, norm: Optional[_TestNorm] = None, norm_cfg: Optional[dict] = None,
                 widths: list[int] = (1,), scale: float = 1.0, act: Optional[str] = None,
                 pair: tuple[int, int] = (1, 1), strides: Sequence[int] = (), weights: dict[str, float] = None):
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        BUILT.append("block")
        self.depth, self.norm, self.norm_cfg, self.widths, self.scale = depth, norm, norm_cfg, widths, scale
        self.act, self.pair = act, pair


@dataclasses.dataclass
class _TestWarmup:
    iters: int
    ratio: float = 0.001


@dataclasses.dataclass
class _TestSchedule:
    steps: list[int]
    gamma: float = 0.1
    warmup: Optional[_TestWarmup] = None


@register
class _TestNet:
    def __init__(self, block: _TestBlock, heads: list = (), schedule: Optional[_TestSchedule] = None):
        BUILT.append("net")
        self.block, self.heads, self.schedule = block, heads, schedule


def message(cfg, path="model", **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        build(cfg, path, **kw)
    return str(exc.value)


# ------------------------------------------------------------------ building

def test_nested_types_are_built_bottom_up():
    BUILT.clear()
    net = build({"type": "_TestNet",
                 "block": {"type": "_TestBlock", "depth": 3, "norm": {"type": "_TestNorm", "channels": 4}},
                 "heads": [{"type": "_TestNorm"}, {"type": "_TestNorm", "eps": 0.5}]}, "model")
    assert BUILT == ["norm", "block", "norm", "norm", "net"]  # every child exists before its parent
    assert isinstance(net.block, _TestBlock) and net.block.depth == 3
    assert isinstance(net.block.norm, _TestNorm) and net.block.norm.channels == 4
    assert [type(h) for h in net.heads] == [_TestNorm, _TestNorm] and net.heads[1].eps == 0.5


def test_cfg_arguments_stay_dicts():
    cfg = {"type": "_TestNorm", "channels": 8}
    block = build({"type": "_TestBlock", "depth": 1, "norm_cfg": cfg})
    assert block.norm_cfg == {"type": "_TestNorm", "channels": 8} and isinstance(block.norm_cfg, dict)


def test_non_dicts_and_default_args():
    assert build(None) is None
    norm = _TestNorm()
    assert build(norm) is norm
    assert build({"type": "_TestBlock"}, depth=5).depth == 5          # default_args fill a missing argument
    assert build({"type": "_TestBlock", "depth": 2}, depth=5).depth == 2  # ... but never override the config


def test_register_refuses_a_second_owner_of_a_name():
    with pytest.raises(KeyError, match="_TestNorm"):
        register(type("_TestNorm", (), {}))
    assert register(_TestNorm) is _TestNorm  # registering the same object again is harmless


# ------------------------------------------------------------------ errors

def test_unknown_type_suggests_closest():
    msg = message({"type": "_TestNet", "block": {"type": "_TestBlok", "depth": 1}})
    assert msg.startswith("model.block.type: unknown type '_TestBlok'; did you mean '_TestBlock'")
    assert "missing 'type'" in message({"depth": 1})


def test_unknown_argument_suggests_closest():
    msg = message({"type": "_TestBlock", "depht": 1})
    assert msg.startswith("model.depht: unknown argument of _TestBlock; did you mean 'depth'?")


def test_missing_required_argument():
    assert message({"type": "_TestNet", "block": {"type": "_TestBlock"}}) == \
        "model.block.depth: missing required argument of _TestBlock"


@pytest.mark.parametrize("key, value, expected", [
    ("depth", "3", "int"),                 # str for int
    ("depth", True, "int"),                # bool is not an int here
    ("depth", 2.0, "int"),
    ("scale", True, "float"),              # bool for float
    ("widths", [1, "2"], "list[int]"),     # element types
    ("widths", 3, "list[int]"),
    ("act", 3, "Optional[str]"),           # Optional
    ("pair", [1, 2, 3], "tuple[int, int]"),
    ("strides", [1, 2.5], "Sequence[int]"),
    ("weights", {"cls": "high"}, "dict[str, float]"),
])
def test_wrong_value_types(key, value, expected):
    msg = message({"type": "_TestBlock", "depth": 1, key: value})
    assert msg.startswith(f"model.{key}: _TestBlock expects {expected}, got {value!r}")


def test_accepted_value_types():
    block = build({"type": "_TestBlock", "depth": 1, "scale": 2, "act": None, "widths": [], "pair": [3, 4],
                   "strides": (8, 16), "weights": {"cls": 1, "box": 2.5}})
    assert block.scale == 2 and block.act is None and block.pair == [3, 4]
    assert build({"type": "_TestBlock", "depth": 1, "act": "relu"}).act == "relu"


def test_errors_raised_by_the_class_carry_the_path():
    assert message({"type": "_TestNet", "block": {"type": "_TestBlock", "depth": -1}}) == \
        "model.block: building _TestBlock failed: depth must be positive, got -1"


# ------------------------------------------------------------------ dataclass arguments

def test_dataclass_arguments():
    net = build({"type": "_TestNet", "block": {"type": "_TestBlock", "depth": 1},
                 "schedule": {"steps": [8, 11], "warmup": {"iters": 500}}})
    assert net.schedule == _TestSchedule(steps=[8, 11], gamma=0.1, warmup=_TestWarmup(iters=500, ratio=0.001))


@pytest.mark.parametrize("schedule, expected", [
    ({"steps": [8], "gama": 0.2}, "model.schedule.gama: unknown key of _TestSchedule; did you mean 'gamma'?"),
    ({"gamma": 0.2}, "model.schedule.steps: missing required key of _TestSchedule"),
    ({"steps": "8,11"}, "model.schedule.steps: expected list[int], got '8,11'"),
    ({"steps": [8], "warmup": {"iter": 5}}, "model.schedule.warmup.iter: unknown key of _TestWarmup; "
                                            "did you mean 'iters'?"),
])
def test_dataclass_argument_errors(schedule, expected):
    msg = message({"type": "_TestNet", "block": {"type": "_TestBlock", "depth": 1}, "schedule": schedule})
    assert msg.startswith(expected)


def test_build_dataclass_directly():
    assert build_dataclass(_TestWarmup, {"iters": 3, "ratio": 1}, "w") == _TestWarmup(3, 1)
    with pytest.raises(ConfigError, match="w: expected a mapping for _TestWarmup, got list"):
        build_dataclass(_TestWarmup, [3], "w")


# ------------------------------------------------------------------ error locations

def test_error_uses_the_most_specific_origin_through_list_indices():
    with build_context(file="ctx.yaml", origins={"model": "a.yaml", "model.heads": "b.yaml"}):
        assert str(error("model.heads[1].eps", "bad")) == "b.yaml: model.heads[1].eps: bad"
        assert str(error("model.block.depth", "bad")) == "a.yaml: model.block.depth: bad"
        assert str(error("seed", "bad")) == "ctx.yaml: seed: bad"


def test_config_build_errors_name_the_defining_file_and_key(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(textwrap.dedent("""\
        heads: [{type: _TestNorm}]
        model:
          type: _TestNet
          block: {type: _TestBlock, depth: 2, norm: {type: _TestNorm}}
          heads: ${heads}
        """))
    child = tmp_path / "child.yaml"

    def build_with(text):
        child.write_text("_base_: base.yaml\n" + textwrap.dedent(text))
        with pytest.raises(ConfigError) as exc:
            load_config(child).build("model")
        return str(exc.value)

    # A key the child misspelt: the child's file.
    assert build_with("model: {block: {depht: 3}}") == \
        f"{child}: model.block.depht: unknown argument of _TestBlock; did you mean 'depth'? " \
        "(valid: depth, norm, norm_cfg, widths, scale, act, pair, strides, weights)"
    # A missing argument after the child changed the type: the child's file (it last set keys of that mapping).
    assert build_with("model: {block: {norm: {type: _TestBlock}}}").startswith(
        f"{child}: model.block.norm.depth: missing required argument of _TestBlock")
    assert build_with("model: {block: {depth: 3.5}}") == \
        f"{child}: model.block.depth: _TestBlock expects int, got 3.5"
    # A value that reached the model through a variable: the file that defined the variable.
    assert build_with("heads: [{type: _TestNorm}, {type: _TestNorm, eps: yes}]").startswith(
        f"{child}: model.heads[1].eps: _TestNorm expects float, got True")
    # A wrong value in the base, whatever the child does elsewhere: the base's file.
    base.write_text(base.read_text().replace("depth: 2", "depth: two"))
    assert build_with("model: {block: {scale: 2.0}}") == f"{base}: model.block.depth: _TestBlock expects int, got 'two'"
    # And a correct pipeline builds.
    child.write_text("_base_: base.yaml\nmodel: {block: {depth: 1, norm: {channels: 2}}}\n")
    net = load_config(child).build("model")
    assert net.block.norm.channels == 2 and len(net.heads) == 1
