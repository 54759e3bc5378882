"""benchmarks/driver_scale.py: its synthetic COCO file, read by pycocotools (the reference) and by raydet's reader."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "driver_scale.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("driver_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_coco_file_is_valid_and_read_alike(tmp_path):
    from pycocotools.coco import COCO

    from raydet.data import CocoDataset

    bench = _load_script()
    ann_file = tmp_path / "ann.json"
    info = bench.write_annotations(ann_file, 300, 2181)
    assert info["images"] == 300 and info["annotations"] == 2181 and info["categories"] == 80
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    assert len(coco.imgs) == 300 and len(coco.anns) == 2181
    assert sorted(coco.cats) == [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    assert {max(im["height"], im["width"]) for im in coco.imgs.values()} <= set(range(200, 641))

    ds = CocoDataset(str(ann_file), str(tmp_path) + "/", with_masks=True, check_images=False)
    assert len(ds.records) == 300  # every image kept, every annotation valid: nothing dropped
    for rec in ds.records:
        anns = coco.imgToAnns[rec["image_id"]]
        x, y, w, h = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4).T
        np.testing.assert_allclose(rec["boxes"], np.stack([x, y, x + w, y + h], 1), rtol=0, atol=1e-3)
        assert rec["masks"] == [a["segmentation"] for a in anns]
        for a in anns:  # each polygon lies in its box, and its 'area' is the polygon's (shoelace)
            px, py = np.array(a["segmentation"][0][0::2]), np.array(a["segmentation"][0][1::2])
            bx, by, bw, bh = a["bbox"]
            assert px.min() >= bx - 0.02 and px.max() <= bx + bw + 0.02 and py.min() >= by - 0.02
            shoelace = abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))) / 2
            assert abs(shoelace - a["area"]) <= 0.01
