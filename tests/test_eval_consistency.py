"""One meaning per concept across training and evaluation: an ignored box, a valid polygon, and the VOC AP mode.

Expected values are by hand (the arithmetic is in the comments); pycocotools is the independent reference for mask
areas and for what goes wrong when it is handed a file's annotations as they are.
"""
from __future__ import annotations

import contextlib
import io
import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raydet.data.datasets import CocoDataset
from raydet.data.pipeline import TorchDetectionDataset
from raydet.data.ray_data import decode_masks, encode_masks
from raydet.evaluation import coco_from_records, evaluate_coco, predictions_to_coco_results
from raydet.evaluation.evaluator import DatasetEvaluator
from raydet.masks import instance_masks_to_bitmaps, rle_to_bitmap, to_rle, valid_polygons, valid_polygons_many

SIZE = 64
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def write_coco(tmp_path, annotations, name="ann.json"):
    """One 64 x 64 image (a PNG in tmp_path) and a COCO json with ``annotations`` (category 1, "thing")."""
    cv2.imwrite(str(tmp_path / "1.png"), np.full((SIZE, SIZE, 3), 128, np.uint8))
    data = {"images": [{"id": 1, "file_name": "1.png", "height": SIZE, "width": SIZE}],
            "annotations": [{"image_id": 1, "category_id": 1, **a} for a in annotations],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def box_mask(x1, y1, x2, y2):
    m = np.zeros((SIZE, SIZE), bool)
    m[y1:y2, x1:x2] = True
    return m


def evaluate(ds, metrics, preds, **kw):
    """Run the evaluator the train / test commands use on one image's predictions (torch tensors)."""
    ev = DatasetEvaluator(ds, metrics, **kw)
    return ev.evaluate(ev.convert([{"image_id": 1}], [preds]))


def raw_cocoeval_ap(ann_file, results):
    """bbox AP of pycocotools run directly on the file, as it is."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0]


# ---------------------------------------------------------------------------------------------- ignored boxes

@pytest.mark.parametrize("flags", [{"iscrowd": 0, "ignore": 1}, {"iscrowd": 1}], ids=["ignore", "iscrowd"])
def test_an_ignored_box_is_ignored_by_training_and_every_metric(tmp_path, flags):
    # A = [8, 8, 32, 32] counts; B = [36, 36, 56, 56] is ignored. One detection exactly on A (with its mask).
    ann_file = write_coco(tmp_path, [
        {"id": 1, "bbox": [8, 8, 24, 24], "area": 576, "iscrowd": 0, "segmentation": [square(8, 8, 24)]},
        {"id": 2, "bbox": [36, 36, 20, 20], "area": 400, "segmentation": [square(36, 36, 20)], **flags}])
    ds = CocoDataset(ann_file, str(tmp_path), pipeline=[], with_masks=True)
    assert ds.records[0]["ignore"].tolist() == [False, True]

    # training: B is an ignore box (the assigners' gt_boxes_ignore), not a target
    tds = TorchDetectionDataset(ds, train=True)
    batch = tds.collate_fn([tds[0]])
    assert batch["gt_boxes"][0].tolist() == [[8, 8, 32, 32]]
    assert batch["gt_boxes_ignore"][0].tolist() == [[36, 36, 56, 56]]
    assert batch["gt_masks"][0].shape == (1, SIZE, SIZE)

    # every metric: one counted ground truth, one exact detection -> precision 1 at every recall -> 1.0
    det = {"boxes": torch.tensor([[8.0, 8, 32, 32]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0]),
           "masks": torch.from_numpy(box_mask(8, 8, 32, 32))[None]}
    m = evaluate(ds, ["bbox", "segm", "proposal", "voc_map"], det, proposal_nums=(1, 10, 100))
    assert m["bbox/AP"] == pytest.approx(1.0) and m["bbox/AP50"] == pytest.approx(1.0)
    assert m["segm/AP"] == pytest.approx(1.0)
    assert m["proposal/AR@1"] == pytest.approx(1.0)
    assert m["voc/mAP"] == pytest.approx(1.0)
    gt_anns = ds.coco_gt().dataset["annotations"]
    assert [a["iscrowd"] for a in gt_anns] == [0, 1] and [a["area"] for a in gt_anns] == [576, 400]

    # pycocotools handed the file as it is reads only iscrowd (COCOeval._prepare overwrites gt["ignore"] with it):
    # with `ignore: 1, iscrowd: 0` B counts, recall stops at 0.5 with precision 1 -> 51 of 101 recall points.
    raw = raw_cocoeval_ap(ann_file, predictions_to_coco_results([{k: v.numpy() for k, v in det.items()}], [1], [1]))
    assert raw == pytest.approx(51 / 101 if flags.get("iscrowd") == 0 else 1.0)


# ---------------------------------------------------------------------------------------------- valid polygons

def test_valid_polygons_is_the_one_rule():
    tri = [0, 0, 10, 0, 10, 10]
    bowtie = [0, 0, 10, 10, 10, 0, 0, 10]  # self-crossing: two triangles of 25 px each
    assert valid_polygons([tri]) == [[0.0, 0.0, 10.0, 0.0, 10.0, 10.0]]
    assert valid_polygons([bowtie]) == [[float(v) for v in bowtie]]
    assert mask_utils.area(mask_utils.frPyObjects([bowtie], SIZE, SIZE)).tolist() == [50]
    dropped = [[10, 10, 40, 10],                       # 2 points
               [0, 0, 10, 10, 20, 20],                 # 3 points on one line
               [0.1, 0.1, 0.2, 0.2, 0.3, 0.3],         # on one line up to float rounding
               [5, 5, 5, 5, 5, 5]]                     # one point three times
    for poly in dropped:
        assert valid_polygons([poly, tri]) == [[float(v) for v in tri]], poly
    # what dropping avoids: pycocotools reads a list whose first polygon has 4 numbers as boxes, and fails ...
    with pytest.raises(TypeError, match="Argument 'bb' has incorrect type"):
        mask_utils.frPyObjects([[10, 10, 40, 10], tri], SIZE, SIZE)
    # ... while the line polygons rasterise to nothing anyway
    for poly in dropped[1:]:
        assert mask_utils.area(mask_utils.frPyObjects([poly], SIZE, SIZE)).tolist() == [0], poly
    for bad, why in (([[0, 0, 4, 0, 4]], "polygon 0 has an odd number of coordinates"),
                     ([tri, [0, 0, 1, float("nan"), 2, 2]], "polygon 1 has non-finite"),
                     ([["0", 0, 1, 1, 2, 2]], "polygon 0 is not a flat list of numbers"),
                     ([[True, 0, 1, 1, 2, 2]], "polygon 0 is not a flat list of numbers"),
                     ([1.0, 2.0], "polygon 0 is not a flat list of numbers"),
                     ("polygon", "polygons must be a list")):
        with pytest.raises(ValueError, match=why):
            valid_polygons(bad)


def test_valid_polygons_many_follows_the_one_rule():
    """The readers' batch form gives each instance exactly what valid_polygons gives it (values or message)."""
    tri, ftri = [0, 0, 10, 0, 10, 10], [0.5, 0.5, 10.5, 0.5, 10.5, 10.5]
    cases = [[tri], [[10, 10, 40, 10], tri], [[0, 0, 10, 10, 20, 20]], [[0.1, 0.1, 0.2, 0.2, 0.3, 0.3], ftri],
             [[5, 5, 5, 5, 5, 5]], [[0, 0, 4, 0, 4]], [tri, [0, 0, 1, float("nan"), 2, 2]], [],
             [[0, 0, 10, 10, 10, 0, 0, 10], ftri, [1e9, 0, 0, 1e9, 2e9, 2e9]]]
    odd = [[["0", 0, 1, 1, 2, 2]], [[True, 0, 1, 1, 2, 2]], [1.0, 2.0], "polygon"]

    def expected(instance):
        try:
            return valid_polygons(instance)
        except ValueError as exc:
            return f"ValueError: {exc}"

    def got(result):
        return f"ValueError: {result}" if isinstance(result, ValueError) else result

    for batch in (cases, cases + odd, [[ftri], [ftri, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]]]):
        assert [got(r) for r in valid_polygons_many(batch)] == [expected(c) for c in batch]
    assert valid_polygons_many([[ftri]])[0] == [ftri]
    assert valid_polygons_many([]) == []


def test_valid_polygons_many_checks_a_large_file_in_chunks(monkeypatch):
    """Chunks of 4 instances (the odd ones among them) give what valid_polygons gives each instance."""
    import raydet.masks

    monkeypatch.setattr(raydet.masks, "_CHUNK", 4)
    tri = [0.0, 0.0, 10.0, 0.0, 10.0, 10.0]
    batch = [[tri], [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], "bad", [[tri[0] + i, *tri[1:]] for i in range(3)], []] * 3
    results = valid_polygons_many(batch)
    assert len(results) == 15 and results[0::5] == [[tri]] * 3 and results[1::5] == [[]] * 3
    assert all(isinstance(r, ValueError) for r in results[2::5]) and results[4::5] == [[]] * 3
    assert results[3] == [[float(i), *tri[1:]] for i in range(3)]


SQUARE = square(20, 20, 20)  # rows 20..39, columns 20..39: 400 px


@pytest.mark.parametrize("segmentation", [[[10, 10, 40, 10], SQUARE], [SQUARE, [10, 10, 40, 10]],
                                          [[0, 0, 10, 10, 30, 30], SQUARE]],
                         ids=["two_points_first", "two_points_last", "collinear_first"])
def test_a_degenerate_polygon_next_to_a_valid_one_is_dropped_everywhere(tmp_path, segmentation):
    expected = box_mask(20, 20, 40, 40)
    ann_file = write_coco(tmp_path, [{"id": 5, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0,
                                      "segmentation": segmentation}])
    # the reader accepts it and keeps the valid polygon
    ds = CocoDataset(ann_file, str(tmp_path), pipeline=[{"type": "RandomFlip", "prob": 1.0}], with_masks=True)
    assert ds.records[0]["masks"] == [[[float(v) for v in SQUARE]]]
    # training targets (flipped: x' = 64 - x, so columns 24..43)
    tds = TorchDetectionDataset(ds, train=True)
    batch = tds.collate_fn([tds[0]])
    np.testing.assert_array_equal(batch["gt_masks"][0][0].numpy(), box_mask(24, 20, 44, 40))
    # the raw polygons through every conversion: bitmaps, RLE, the Ray Data mask column, coco_from_records
    np.testing.assert_array_equal(instance_masks_to_bitmaps([segmentation], SIZE, SIZE)[0], expected)
    np.testing.assert_array_equal(rle_to_bitmap(to_rle(segmentation, SIZE, SIZE), SIZE, SIZE), expected)
    text = encode_masks([segmentation], SIZE, SIZE)
    np.testing.assert_array_equal(rle_to_bitmap(decode_masks(text, SIZE, SIZE)[0], SIZE, SIZE), expected)
    rec = dict(ds.records[0], masks=[segmentation])
    from_records = coco_from_records([rec], ["thing"])
    assert from_records.dataset["annotations"][0]["segmentation"] == [[float(v) for v in SQUARE]]
    assert from_records.dataset["annotations"][0]["area"] == 400
    # evaluation ground truth: the file's annotation with the valid polygon only (pycocotools itself fails on the
    # file when the 4-number polygon comes first)
    gt_ann = ds.coco_gt().anns[5]
    assert gt_ann["segmentation"] == [[float(v) for v in SQUARE]]
    if len(segmentation[0]) == 4:
        with contextlib.redirect_stdout(io.StringIO()):
            raw = COCO(ann_file)
        with pytest.raises(TypeError, match="bb"):
            raw.annToRLE(raw.anns[5])
    # a perfect mask scores 1 (the detection is in the original image frame)
    det = {"boxes": torch.tensor([[20.0, 20, 40, 40]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0]),
           "masks": torch.from_numpy(expected)[None]}
    m = evaluate(ds, ["bbox", "segm"], det)
    assert m["segm/AP"] == pytest.approx(1.0) and m["bbox/AP"] == pytest.approx(1.0)
    assert evaluate_coco(from_records, predictions_to_coco_results([{k: v.numpy() for k, v in det.items()}], [1],
                                                                   [1]), ("segm",))["segm/AP"] == pytest.approx(1.0)


def test_the_reader_reports_polygons_that_are_malformed_or_have_no_area(tmp_path):
    ann_file = write_coco(tmp_path, [
        {"id": 7, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0, "segmentation": [[20, 20, 40, 20, 40]]},
        {"id": 8, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0, "segmentation": [[10, 10, 40, 10]]},
        {"id": 9, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0, "segmentation": [SQUARE]}])
    with pytest.raises(ValueError, match=r"annotation id 7 .*polygon 0 has an odd number of coordinates \(5\)"):
        CocoDataset(ann_file, str(tmp_path), with_masks=True)
    with pytest.warns(UserWarning, match="annotation id 8 .*no polygon encloses an area"):
        ds = CocoDataset(ann_file, str(tmp_path), with_masks=True, on_error="skip")
    assert ds.records[0]["ann_ids"] == [9]
    assert sorted(ds.coco_gt().anns) == [9]


def test_a_malformed_segmentation_unchecked_by_a_box_reader_fails_only_segm_naming_it(tmp_path):
    ann_file = write_coco(tmp_path, [{"id": 3, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0,
                                      "segmentation": [[20, 20, 40, 20, 40]]}])
    ds = CocoDataset(ann_file, str(tmp_path))  # with_masks=False: segmentations are not read
    det = {"boxes": torch.tensor([[20.0, 20, 40, 40]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0]),
           "masks": torch.from_numpy(box_mask(20, 20, 40, 40))[None]}
    assert evaluate(ds, ["bbox"], det)["bbox/AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"segm.*annotation ids \[3\]"):
        evaluate(ds, ["segm"], det)


# ---------------------------------------------------------------------------------------------- VOC AP mode

def _voc_case():
    """Three ground truths; detections ranked TP, FP, FP, TP, TP."""
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], np.float32)
    rec = {"image_id": 1, "height": SIZE, "width": SIZE, "boxes": gt, "labels": np.zeros(3, np.int64),
           "ignore": np.zeros(3, bool)}
    dataset = types.SimpleNamespace(records=[rec], classes=("thing",), cat_ids=[1])
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 40, 10, 50], [20, 40, 30, 50], [20, 0, 30, 10],
                                  [40, 0, 50, 10]]),
           "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), "labels": torch.zeros(5, dtype=torch.long)}
    return dataset, det


@pytest.mark.parametrize("mode, expected", [
    # precision / recall after each detection: (1, 1/3) (1/2, 1/3) (1/3, 1/3) (1/2, 2/3) (3/5, 1).
    # Envelope: 1 up to recall 1/3, then 3/5.  area: 1/3 * 1 + 2/3 * 3/5 = 0.7333
    ("area", 1 / 3 + 2 / 3 * 3 / 5),
    # 11 points: recall 0, .1, .2, .3 -> 1 (4 points); .4, ..., 1 -> 3/5 (7 points): (4 + 7 * 0.6) / 11 = 0.7455
    ("11points", (4 + 7 * 0.6) / 11),
])
def test_voc_mode_goes_from_the_pipeline_to_the_metric(mode, expected):
    from raydet.commands.sections import parse_sections
    from raydet.config import load_config

    cfg = load_config(PIPELINES / "quickstart.yaml", ["evaluation.metric=[voc_map]", f"evaluation.voc_mode={mode}",
                                                       "checkpoint.score_attribute=voc/mAP"])
    settings = parse_sections(cfg).evaluation
    assert settings.voc_mode == mode
    dataset, det = _voc_case()
    ev = DatasetEvaluator.from_settings(dataset, settings)
    m = ev.evaluate(ev.convert([{"image_id": 1}], [det]))
    assert m["voc/mAP"] == pytest.approx(expected)


def test_voc_mode_defaults_to_area_and_is_checked():
    from raydet.commands.sections import EvaluationSettings, parse_sections
    from raydet.config import load_config
    from raydet.registry import ConfigError

    assert EvaluationSettings().voc_mode == "area"
    assert parse_sections(load_config(PIPELINES / "faster_rcnn_r50_fpn_1x_voc0712.yaml")).evaluation.voc_mode == \
        "11points"  # VOC2007 test, as MMDetection's voc0712 config
    cfg = load_config(PIPELINES / "quickstart.yaml", ["evaluation.voc_mode=11point"])
    with pytest.raises(ConfigError, match="evaluation.voc_mode"):
        parse_sections(cfg)
    with pytest.raises(ValueError, match="evaluation.voc_mode"):
        DatasetEvaluator(_voc_case()[0], ["voc_map"], voc_mode="eleven")
