"""The install layout: every package folder is listed in pyproject, and ``ops/`` installs as ``raydet.ops``."""
from __future__ import annotations

from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "raydet").rglob("__init__.py")}
    found.add("raydet.ops")
    assert found == listed, f"add to / remove from pyproject [tool.setuptools] packages: {found ^ listed}"
    assert setup["package-dir"]["raydet.ops"] == "ops"


def test_ops_are_importable_as_part_of_raydet():
    import raydet.ops

    assert Path(raydet.ops.__file__).resolve().parent == ROOT / "ops"
    assert callable(raydet.ops.nms) and callable(raydet.ops.roi_align)
