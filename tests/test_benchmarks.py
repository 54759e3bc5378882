"""benchmarks/detectors_vs_torchvision.py: a tiny run of both models in both modes, and its weight transfer."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "detectors_vs_torchvision.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("detectors_vs_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_main_writes_the_comparison_json(tmp_path):
    bench = _load_script()
    out = tmp_path / "result.json"
    # score threshold 0: every (box, class) candidate passes, so both post-processings must fill 100 detections
    # one thread: at this size per-op threading overhead dominates, badly so on a busy machine
    threads = torch.get_num_threads()
    try:
        returned = bench.main(["--size", "32", "64", "--batch", "1", "--warmup", "0", "--repeats", "1",
                               "--score-thr", "0", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))

    meta = written["meta"]
    for key in ("torch", "torchvision", "device", "device_name", "threads", "input_size_hw", "train_batch",
                "preprocessing", "test_settings"):
        assert key in meta, key
    assert meta["input_size_hw"] == [32, 64] and meta["threads"] == 1 and meta["device"] == "cpu"
    assert meta["torchvision_num_classes"] == {"faster_rcnn": 91, "retinanet": 91}

    rows = {(r["model"], r["mode"]): r for r in written["results"]}
    assert set(rows) == {(m, mode) for m in ("faster_rcnn", "retinanet") for mode in ("inference", "train")}
    for (model, mode), row in rows.items():
        key = "images_per_s" if mode == "inference" else "s_per_iter"
        for impl in ("raydet", "torchvision"):
            value = row[impl][key]
            assert math.isfinite(value) and value > 0, (model, mode, impl, value)
            assert len(row[impl]["times_s"]) == 1 and row[impl]["median_s"] > 0
        assert row["ratio"] > 0
        if mode == "inference":
            # speed ratio = raydet images/s over torchvision images/s
            assert math.isclose(row["ratio"], row["raydet"]["images_per_s"] / row["torchvision"]["images_per_s"])
            assert row["raydet"]["detections"] == row["torchvision"]["detections"] == 100
        else:
            # speed ratio = torchvision s/iter over raydet s/iter
            assert math.isclose(row["ratio"], row["torchvision"]["s_per_iter"] / row["raydet"]["s_per_iter"])
            assert math.isfinite(row["raydet"]["last_loss"]) and math.isfinite(row["torchvision"]["last_loss"])
    # the second stage of both Faster R-CNNs sees its proposals (at most 1000 at test time)
    frcnn = rows[("faster_rcnn", "inference")]
    assert 0 < frcnn["raydet"]["rois"] <= 1000 and 0 < frcnn["torchvision"]["rois"] <= 1000


def test_copied_weights_make_torchvision_retinanet_reproduce_raydet():
    """With raydet's weights loaded (classes moved to torchvision's COCO-91 ids), torchvision's independent
    RetinaNet must return raydet's detections: same scores, labels shifted by one, same boxes up to its rounded
    anchors (torchvision rounds anchor corners to whole pixels)."""
    bench = _load_script()
    args = bench.parse_args(["--size", "64", "64", "--score-thr", "0"])
    torch.manual_seed(0)
    ours, theirs = bench.build_raydet("retinanet", args).eval(), bench.build_torchvision("retinanet", args).eval()
    bench.copy_raydet_weights(ours, theirs, bench.torchvision_label_offset("retinanet", args))
    samples, images = bench.make_inputs(1, args, np.random.default_rng(0))
    with torch.no_grad():
        (a,) = ours(bench.raydet_batch(samples, torch.device("cpu")), mode="predict")
        (b,) = theirs(images)
    assert len(a["scores"]) == len(b["scores"]) == 100
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-6)
    assert torch.equal(a["labels"] + 1, b["labels"])
    assert (a["boxes"] - b["boxes"]).abs().max() < 1.0
