"""raydet.infer: batch inference as a Ray Data job against the plain in-process prediction.

Three Ray Data jobs in all (each costs seconds): one module-scoped run on a folder that several tests inspect, one on
a COCO json (with a corrupt image skipped), one that stops on a corrupt image. Everything else runs without Ray.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import raydet.data  # noqa: F401  (registers the dataset and transform types)
import raydet.models  # noqa: F401  (registers the model components)
from raydet.config import load_config
from raydet.engine.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
RETINANET = ROOT / "pipelines" / "retinanet_r50_fpn_1x_coco.yaml"
MASK_RCNN = ROOT / "pipelines" / "mask_rcnn_r50_fpn_1x_coco.yaml"
MS_RCNN = ROOT / "pipelines" / "ms_rcnn_r50_caffe_fpn_1x_coco.yaml"
OVERRIDES = ["test_pipeline=[{type: Resize, scale: [96, 96]}, "
             "{type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}, "
             "{type: Pad, size_divisor: 32}]"]
R18 = ["num_classes=3", "model.backbone.depth=18", "model.neck.in_channels=[64, 128, 256, 512]"]
# Mask R-CNN shrunk like the quickstart: 64-channel FPN and heads, fewer proposals and detections.
SMALL_MASK_RCNN = R18 + [
    "model.neck.out_channels=64", "model.rpn_head.in_channels=64", "model.rpn_head.feat_channels=64",
    "model.rpn_head.test_proposals.max_per_img=100", "model.roi_head.bbox_head.in_channels=64",
    "model.roi_head.bbox_head.fc_out_channels=256", "model.roi_head.mask_head.in_channels=64",
    "model.roi_head.mask_head.conv_out_channels=64", "model.roi_head.test.max_per_img=20"]
SMALL_MS_RCNN = SMALL_MASK_RCNN + [  # and its MaskIoU head at the same widths
    "model.roi_head.mask_iou_head.in_channels=64", "model.roi_head.mask_iou_head.conv_out_channels=64",
    "model.roi_head.mask_iou_head.fc_out_channels=256"]
CLASSES, CAT_IDS = ["rect", "ellipse", "triangle"], [3, 7, 11]  # non-contiguous ids: labels must be mapped
BATCH = 2
SCORE_THR = 0.5


def write_image(path: Path, h: int, w: int, seed: int) -> None:
    """A smooth random RGB image (some structure for the detector, PNG/BMP lossless, JPEG as decoded)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    from raydet.infer import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_model(pipeline: Path, overrides: list[str], path: Path) -> Path:
    """A pipeline's model with seeded weights, saved like Runner.state_dict (model, optimizer, epoch, iter, meta);
    the box classifier's bias favours class 1 so that some detections score high."""
    cfg = load_config(pipeline, overrides)
    torch.manual_seed(0)
    model = cfg.build("model")
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias.copy_(torch.tensor([1.0, 2.5, 0.0, -2.0]))
    return save_checkpoint({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "iter": 8,
                            "meta": {"pipeline": cfg.to_yaml(), "classes": CLASSES, "cat_ids": CAT_IDS}}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The quickstart Faster R-CNN (ResNet-18, 64-channel FPN)."""
    return save_model(QUICKSTART, OVERRIDES, tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """5 images (landscape 48x72 and portrait 72x48; png, jpg, bmp; one in a sub-folder) and files to ignore."""
    folder = tmp_path_factory.mktemp("images")
    for i, (name, h, w) in enumerate([("b.jpg", 48, 72), ("a.png", 48, 72), ("sub/d.png", 72, 48),
                                      ("c.png", 72, 48), ("e.bmp", 48, 72)]):
        write_image(folder / name, h, w, seed=i)
    (folder / "notes.txt").write_text("not an image")
    write_image(folder / ".hidden.png", 48, 72, seed=9)
    return folder


@pytest.fixture(scope="module")
def folder_run(ray_session, checkpoint, image_folder, tmp_path_factory):
    """One Ray Data job on the folder, both output formats and the drawings: (out dir, exit code, stdout)."""
    from raydet.infer import main

    out = tmp_path_factory.mktemp("infer-out")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(QUICKSTART), str(checkpoint), str(image_folder), "--set", *OVERRIDES, "--out", str(out),
                     "--format", "coco,parquet", "--draw", "--score-thr", str(SCORE_THR), "--batch-size", str(BATCH),
                     "--num-actors", "1", "--cpus-per-actor", "1"])
    return out, code, stdout.getvalue()


def reference_results(checkpoint: Path, paths: list[str], image_ids: list[int]) -> list[dict]:
    """The same prediction in this process, without Ray: read_image, test transforms, collate and
    model(mode="predict") on consecutive groups of BATCH images (the batches the Ray job forms), one torch thread
    (as the CPU actor), then the COCO result entries."""
    from raydet.data.collate import collate_detection
    from raydet.data.datasets import read_image
    from raydet.data.pipeline import build_transforms, image_rng, record_to_sample
    from raydet.engine.checkpoint import load_checkpoint, load_model_weights
    from raydet.evaluation.coco import predictions_to_coco_results

    cfg = load_config(QUICKSTART, OVERRIDES)
    model = cfg.build("model")
    state = load_checkpoint(checkpoint)
    load_model_weights(model, state["model"], str(checkpoint))
    model.eval()
    transforms, collate_cfg = build_transforms(cfg.get("data.test.pipeline"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = []
    try:
        for start in range(0, len(paths), BATCH):
            samples = []
            for index in range(start, min(start + BATCH, len(paths))):
                image = read_image(paths[index])
                record = {"image_id": image_ids[index], "height": image.shape[0], "width": image.shape[1],
                          "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
                samples.append(transforms(record_to_sample(record, image), image_rng(0, 0, index)))
            with torch.no_grad():
                preds = model(collate_detection(samples, collate_cfg), mode="predict")
            results += predictions_to_coco_results(preds, image_ids[start:start + BATCH], state["meta"]["cat_ids"])
    finally:
        torch.set_num_threads(threads)
    return results


def by_image(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(r)
    return out


# ----------------------------------------------------------------------------------------------------------
# The folder run

def test_folder_results_equal_the_in_process_prediction(folder_run, checkpoint, image_folder):
    out, code, stdout = folder_run
    assert code == 0
    assert "raydet infer: 5 images (0 skipped)" in stdout and "images/s" in stdout
    for name in ("results.json", "results.parquet", "images.json", "vis"):
        assert str(out / name) in stdout
    assert not list(out.glob("*.tmp"))
    expected_names = ["a.png", "b.jpg", "c.png", "e.bmp", "sub/d.png"]  # sorted, recursive, hidden/txt skipped
    images = json.loads((out / "images.json").read_text())
    assert [im["id"] for im in images["images"]] == [1, 2, 3, 4, 5]
    assert [im["file_name"] for im in images["images"]] == [str(image_folder / n) for n in expected_names]
    for im in images["images"]:
        assert (im["height"], im["width"]) == read_rgb(im["file_name"]).shape[:2]
    assert images["categories"] == [{"id": c, "name": n} for c, n in zip(CAT_IDS, CLASSES)]

    results = json.loads((out / "results.json").read_text())
    paths = [im["file_name"] for im in images["images"]]
    expected = reference_results(checkpoint, paths, [1, 2, 3, 4, 5])
    got, want = by_image(results), by_image(expected)
    assert set(got) == set(want) == {1, 2, 3, 4, 5}  # no image lost; every one has detections
    for image_id in want:
        g, w = got[image_id], want[image_id]
        assert len(g) == len(w), image_id
        assert [r["category_id"] for r in g] == [r["category_id"] for r in w]
        np.testing.assert_allclose([r["bbox"] for r in g], [r["bbox"] for r in w], atol=1e-4)
        np.testing.assert_allclose([r["score"] for r in g], [r["score"] for r in w], atol=1e-4)
    cats = {r["category_id"] for r in results}
    assert cats <= set(CAT_IDS) and 7 in cats  # label 1 (boosted) -> category id 7, never the label itself


def test_parquet_has_one_row_per_detection(folder_run):
    import pyarrow.parquet as pq

    out, code, _ = folder_run
    assert code == 0
    table = pq.read_table(out / "results.parquet")
    assert table.column_names == ["image_id", "file_name", "height", "width", "label", "category_id",
                                  "class_name", "score", "x1", "y1", "x2", "y2"]
    results = json.loads((out / "results.json").read_text())
    assert table.num_rows == len(results) > 0
    rows = table.to_pydict()
    assert rows["image_id"] == [r["image_id"] for r in results]
    assert rows["category_id"] == [r["category_id"] for r in results]
    assert all(CAT_IDS[lab] == cat and CLASSES[lab] == name
               for lab, cat, name in zip(rows["label"], rows["category_id"], rows["class_name"]))
    np.testing.assert_allclose(rows["score"], [r["score"] for r in results], rtol=1e-6)
    xywh = np.stack([rows["x1"], rows["y1"], np.subtract(rows["x2"], rows["x1"]),
                     np.subtract(rows["y2"], rows["y1"])], axis=1)
    np.testing.assert_allclose(xywh, [r["bbox"] for r in results], atol=0.006)  # json: 2 decimals


def test_draw_writes_one_png_per_image(folder_run):
    out, code, _ = folder_run
    assert code == 0
    images = json.loads((out / "images.json").read_text())["images"]
    results = by_image(json.loads((out / "results.json").read_text()))
    pngs = sorted(p.name for p in (out / "vis").iterdir())
    assert pngs == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    drawn_any = 0
    for im in images:
        original = read_rgb(im["file_name"])
        vis = read_rgb(out / "vis" / (Path(im["file_name"]).stem + ".png"))
        assert vis.shape == original.shape
        above = any(r["score"] >= SCORE_THR for r in results.get(im["id"], []))
        assert (vis != original).any() == above, im
        drawn_any += above
    assert drawn_any > 0


# ----------------------------------------------------------------------------------------------------------
# COCO json input (and skipping a corrupt image)

def test_coco_json_input_keeps_its_image_ids(ray_session, tmp_path, capsys):
    """A small Mask R-CNN on a COCO json: the json's ids, RLE masks at the image size, loadRes works."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    checkpoint = save_model(MASK_RCNN, SMALL_MASK_RCNN + OVERRIDES, tmp_path / "mask_rcnn.pt")

    images = []
    for iid, (h, w) in zip([10, 20, 30], [(48, 72), (72, 48), (48, 72)]):
        write_image(tmp_path / "pics" / f"{iid}.png", h, w, seed=iid)
        images.append({"id": iid, "file_name": f"pics/{iid}.png", "height": h, "width": w})
    good = (tmp_path / "pics" / "10.png").read_bytes()
    (tmp_path / "pics" / "40.png").write_bytes(good[:60])  # truncated PNG: only decoding (the actor) finds it
    images.append({"id": 40, "file_name": "pics/40.png", "height": 48, "width": 72})
    images.append({"id": 50, "file_name": "pics/50.png", "height": 48, "width": 72})  # missing: found by the driver
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps({"images": images, "annotations": [],
                               "categories": [{"id": c, "name": n} for c, n in zip(CAT_IDS, CLASSES)]}))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"(?s)skipped 2 unreadable image\(s\) \(bad_image_file: 1, "
                                         r"corrupt_image: 1\).*image id 50: image file not found: .*50\.png"
                                         r".*image id 40: cannot decode .*40\.png"):
        code, stdout, err = run_main([MASK_RCNN, checkpoint, ann, "--set", *SMALL_MASK_RCNN, *OVERRIDES, "--out", out,
                                      "--batch-size", BATCH, "--on-error", "skip", "--format", "coco,parquet"], capsys)
    assert code == 0, err
    assert "raydet infer: 3 images (2 skipped)" in stdout and "images/s" in stdout
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {10, 20, 30}
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    for r in results[:: max(1, len(results) // 20)]:
        assert r["segmentation"]["size"] == list(sizes[r["image_id"]])
        assert mask_utils.decode(r["segmentation"]).shape == sizes[r["image_id"]]
    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet", columns=["image_id", "segmentation"]).to_pydict()
    assert table["segmentation"] == [r["segmentation"]["counts"] for r in results]
    # Mask R-CNN scores its masks by the box score: no mask_score field or column
    assert not any("mask_score" in r for r in results)
    assert "mask_score" not in pq.read_schema(out / "results.parquet").names
    assert not (out / "images.json").exists()  # the json already maps ids to files
    gt = COCO(str(ann))
    dt = gt.loadRes(str(out / "results.json"))
    anns = dt.loadAnns(dt.getAnnIds())
    assert len(anns) == len(results) and {a["image_id"] for a in anns} == {10, 20, 30}
    assert all(a["area"] > 0 for a in anns)


def test_mask_scoring_rcnn_mask_scores_are_written(tmp_path):
    """Mask Scoring R-CNN (untrained, tiny) without Ray: the actor's row carries the model's ``mask_scores``, which
    equal score x the MaskIoU head's output at each detection's class (read from the head by a hook, Huang et al.
    2019, Sec. 3.2), and the driver's conversion writes them as ``mask_score`` in results.json's entries and the
    parquet's last column, one per detection, with the box ``score`` unchanged."""
    import pyarrow.parquet as pq

    from raydet.data.collate import collate_detection
    from raydet.evaluation.coco import predictions_to_coco_results
    from raydet.infer import DetectionPredictor, _ParquetWriter, inference_pipeline, row_prediction

    cfg = load_config(MS_RCNN, SMALL_MS_RCNN + OVERRIDES)
    torch.manual_seed(0)
    model = cfg.build("model").eval()
    with torch.no_grad():
        model.roi_head.bbox_head.fc_cls.bias.copy_(torch.tensor([1.0, 2.5, 0.0, -2.0]))
    assert model.roi_head.predicts_mask_scores
    write_image(tmp_path / "a.png", 48, 72, seed=0)
    batch = {"index": np.array([0]), "image_id": np.array([7]), "path": np.array([str(tmp_path / "a.png")]),
             "height": np.array([0]), "width": np.array([0]), "vis_path": np.array([""])}
    threads = torch.get_num_threads()
    try:
        predictor = DetectionPredictor(cfg.data, cfg.path, cfg.origins, [model.state_dict()], "test weights",
                                       inference_pipeline(cfg))
        cols = predictor(batch)
        sample, _ = predictor._load(batch, 0)
        iou_pred = []
        hook = model.roi_head.mask_iou_head.register_forward_hook(lambda m, i, o: iou_pred.append(o))
        with torch.no_grad():
            (ref,) = model(collate_detection([sample], predictor.collate_cfg), mode="predict")
        hook.remove()
    finally:
        torch.set_num_threads(threads)
    assert cols["error"][0] == ""
    pred = row_prediction(cols, 0, with_mask_scores=True)
    n = len(pred["scores"])
    assert n > 0 and pred["mask_scores"].shape == (n,)
    by_hand = ref["scores"] * iou_pred[0][torch.arange(n), ref["labels"]]
    np.testing.assert_allclose(pred["mask_scores"], ref["mask_scores"].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["mask_scores"], by_hand.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pred["mask_scores"], pred["scores"])

    entries = predictions_to_coco_results([pred], [7], CAT_IDS)
    np.testing.assert_allclose([e["mask_score"] for e in entries], ref["mask_scores"].numpy(), rtol=1e-5)
    np.testing.assert_allclose([e["score"] for e in entries], ref["scores"].numpy(), rtol=1e-5)
    writer = _ParquetWriter(str(tmp_path / "results.parquet"), with_masks=True, with_mask_scores=True)
    writer.add(7, "a.png", 48, 72, pred["boxes"], pred["scores"], pred["labels"], CAT_IDS, CLASSES,
               str(cols["masks"][0]).split(" "), pred["mask_scores"])
    writer.close()
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.column_names[-2:] == ["segmentation", "mask_score"]
    np.testing.assert_allclose(table.column("mask_score").to_pylist(), ref["mask_scores"].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"image id 7: \d+ detections but 0 mask_scores"):
        row_prediction({**cols, "mask_scores": np.array([np.zeros(0, np.float32)], dtype=object)}, 0, True)


# ----------------------------------------------------------------------------------------------------------
# Errors: exit code 2 and a message naming the file

def test_missing_input_fails_clearly(checkpoint, tmp_path, capsys):
    code, _, err = run_main([QUICKSTART, checkpoint, tmp_path / "nope", "--set", *OVERRIDES,
                             "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert err.startswith("error: input not found: ") and str(tmp_path / "nope") in err
    assert "Traceback" not in err


def test_missing_file_in_a_list_fails_before_ray(checkpoint, image_folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{image_folder / 'a.png'}\n\nmissing.png\n")
    code, _, err = run_main([QUICKSTART, checkpoint, listing, "--set", *OVERRIDES, "--out", tmp_path / "out"],
                            capsys)
    assert code == 2
    assert f"image id 2: image file not found: {tmp_path / 'missing.png'}" in err


def test_bad_image_file_fails_before_ray(checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_image(folder / "b.png", 48, 72, seed=1)
    (folder / "a.jpg").write_bytes(b"<html>not an image</html>")
    code, _, err = run_main([QUICKSTART, checkpoint, folder, "--set", *OVERRIDES, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert f"error: image id 1: not an image file (unknown format): {folder / 'a.jpg'}" in err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_checkpoint_of_another_model_fails_clearly(image_folder, tmp_path, capsys):
    cfg = load_config(RETINANET, R18)
    retina = cfg.build("model")
    path = save_checkpoint({"model": retina.state_dict(), "meta": {"classes": CLASSES, "cat_ids": CAT_IDS}},
                           tmp_path / "retinanet.pt")
    code, _, err = run_main([QUICKSTART, path, image_folder, "--set", *OVERRIDES, "--out", tmp_path / "out"],
                            capsys)
    assert code == 2
    assert f"error: checkpoint {path} does not fit this model" in err
    assert "keys missing from the checkpoint" in err and "Traceback" not in err


def test_corrupt_image_stops_the_run(ray_session, checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    write_image(folder / "good.png", 48, 72, seed=1)
    good = (folder / "good.png").read_bytes()
    (folder / "bad.png").write_bytes(good[:40])  # truncated PNG
    out = tmp_path / "out"
    code, _, err = run_main([QUICKSTART, checkpoint, folder, "--set", *OVERRIDES, "--out", out,
                             "--batch-size", BATCH], capsys)
    assert code == 2
    assert "error: image id 1: cannot decode image file" in err and str(folder / "bad.png") in err
    assert "--on-error skip" in err and "Traceback" not in err
    assert not (out / "results.json").exists() and not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------------------
# Without Ray: inputs and drawing

def test_collect_images_inputs(image_folder, tmp_path):
    from raydet.infer import collect_images

    listing = tmp_path / "lists" / "l.txt"
    listing.parent.mkdir()
    listing.write_text(f"{os.path.relpath(image_folder / 'c.png', listing.parent)}\n")
    got = collect_images([str(image_folder / "e.bmp"), str(image_folder / "*.png"), str(listing),
                          str(image_folder)], exclude=str(image_folder / "sub"))
    names = [os.path.relpath(im["path"], image_folder) for im in got.images]
    # explicit file, glob (sorted), list (relative to the list's folder, duplicate dropped), folder minus exclude
    assert names == ["e.bmp", "a.png", "c.png", "b.jpg"]
    assert [im["image_id"] for im in got.images] == [1, 2, 3, 4] and got.coco_json is None
    assert [im["name"] for im in got.images] == ["e", "a", "c", "b"]

    with pytest.raises(ValueError, match="must be the only input"):
        collect_images([str(tmp_path / "x.json"), str(image_folder)])
    with pytest.raises(ValueError, match="the pattern matches no image file"):
        collect_images([str(tmp_path / "*.jpg")])
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_images([str(tmp_path / "none")])


def test_draw_detections_changes_pixels_only_for_kept_detections():
    from raydet.infer import draw_detections

    image = np.full((60, 80, 3), 40, np.uint8)
    boxes = np.array([[10, 10, 50, 40], [5, 5, 20, 20]], np.float32)
    scores, labels = np.array([0.9, 0.1], np.float32), np.array([1, 0])
    np.testing.assert_array_equal(draw_detections(image, boxes, scores, labels, CLASSES, score_thr=0.95), image)
    drawn = draw_detections(image, boxes, scores, labels, CLASSES, score_thr=0.5)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (drawn[39, 10:50] != 40).any()  # bottom edge of the kept box
    assert (drawn[55:, :] == 40).all() and (drawn[:, 60:] == 40).all()  # far from it: untouched
    assert (image == 40).all()  # the input is not modified
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 20:30, 20:30] = True
    with_mask = draw_detections(image, boxes, scores, labels, CLASSES, score_thr=0.5, masks=masks)
    assert (with_mask[25, 25] != 40).any() and (drawn[25, 25] == 40).all()
