"""raydet.evaluation: COCO AP, proposal AR and VOC mAP.

References are hand computations (arithmetic in the comments) or pycocotools' COCOeval run directly on json files
written here, with ground truth written in COCO's own (x, y, w, h) form rather than through our converter.
"""
import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raydet.evaluation import (coco_from_records, evaluate_coco, evaluate_proposals, format_coco_table,
                               format_voc_table, predictions_to_coco_results, recall_at, voc_map,
                               write_coco_results)
from raydet.masks import polygons_to_bitmap

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
CLASSES = ["cat", "dog"]
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def record(image_id, boxes, labels, ignore=None, masks=None, h=100, w=100):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    rec = {"image_id": image_id, "file_name": f"{image_id}.jpg", "height": h, "width": w, "boxes": boxes,
           "labels": np.asarray(labels, np.int64),
           "ignore": np.zeros(len(boxes), bool) if ignore is None else np.asarray(ignore, bool)}
    if masks is not None:
        rec["masks"] = masks
    return rec


def pred(boxes, scores, labels, masks=None):
    p = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "scores": np.asarray(scores, np.float32),
         "labels": np.asarray(labels, np.int64)}
    if masks is not None:
        p["masks"] = masks
    return p


# Three images, two classes, one small (< 32^2), medium and large (> 96^2) object at least.
RECORDS = [
    record(1, [[10, 10, 50, 50], [60, 60, 90, 95]], [0, 1]),
    record(2, [[5, 5, 40, 30], [20, 50, 70, 90]], [0, 0]),
    record(3, [[30, 30, 80, 80], [2, 2, 20, 20], [0, 0, 99, 99]], [1, 0, 1]),
]


def xyxy_to_xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def reference_gt_json(path, records, with_segm=False):
    """Ground truth written independently of coco_from_records (COCO's own x, y, w, h; ids from 1)."""
    anns, k = [], 0
    for r in records:
        for i, (b, lab) in enumerate(zip(r["boxes"].tolist(), r["labels"].tolist())):
            k += 1
            x, y, w, h = xyxy_to_xywh(b)
            ann = {"id": k, "image_id": r["image_id"], "category_id": lab + 1, "bbox": [x, y, w, h],
                   "area": w * h, "iscrowd": int(r["ignore"][i])}
            if with_segm:
                ann["segmentation"] = r["masks"][i]
                ann["area"] = float(polygons_to_bitmap(r["masks"][i], r["height"], r["width"]).sum())
            anns.append(ann)
    d = {"images": [{"id": r["image_id"], "height": r["height"], "width": r["width"], "file_name": ""}
                    for r in records],
         "annotations": anns, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    path.write_text(json.dumps(d))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def cocoeval_stats(gt, results_path, iou_type="bbox", use_cats=True, max_dets=None):
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(results_path))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.useCats = int(use_cats)
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def perfect(records):
    return [pred(r["boxes"], np.linspace(0.9, 0.5, len(r["boxes"])), r["labels"]) for r in records]


# ---------------------------------------------------------------- COCO

def test_perfect_detections_score_one():
    gt = coco_from_records(RECORDS, CLASSES)
    res = predictions_to_coco_results(perfect(RECORDS), [r["image_id"] for r in RECORDS], [1, 2])
    m = evaluate_coco(gt, res, classwise=True)
    for k in KEYS:
        assert m[f"bbox/{k}"] == pytest.approx(1.0), k
    assert m["bbox/AP_cat"] == pytest.approx(1.0) and m["bbox/AP_dog"] == pytest.approx(1.0)
    assert "AP50" in format_coco_table(m) and "dog" in format_coco_table(m)


def test_coco_from_records_matches_hand_written_json(tmp_path):
    gt = coco_from_records(RECORDS, CLASSES, cat_ids=[1, 2])
    ref = reference_gt_json(tmp_path / "gt.json", RECORDS)
    ours = sorted((a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in gt.dataset["annotations"])
    theirs = sorted((a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in ref.dataset["annotations"])
    assert ours == theirs
    # non-default category ids: label i -> cat_ids[i]
    gt2 = coco_from_records(RECORDS, CLASSES, cat_ids=[7, 3])
    assert {a["category_id"] for a in gt2.dataset["annotations"] if a["image_id"] == 3} == {3, 7}
    assert gt2.loadCats(3)[0]["name"] == "dog"


def test_fp_and_missed_gt_agree_with_cocoeval(tmp_path):
    preds = [
        pred([[10, 10, 50, 50], [60, 62, 90, 93], [0, 60, 30, 99]], [0.9, 0.6, 0.7], [0, 1, 0]),  # + one FP
        pred([[6, 5, 41, 31]], [0.8], [0]),                                                       # one GT missed
        pred([[31, 29, 80, 82], [2, 2, 20, 20], [0, 0, 90, 99], [1, 1, 20, 21]], [0.95, 0.4, 0.85, 0.3],
             [1, 0, 1, 1]),                                                                   # wrong class FP
    ]
    gt = coco_from_records(RECORDS, CLASSES)
    res = predictions_to_coco_results(preds, [1, 2, 3], [1, 2])
    m = evaluate_coco(gt, res)
    path = write_coco_results(res, tmp_path / "sub" / "res.json")
    ref = cocoeval_stats(reference_gt_json(tmp_path / "gt.json", RECORDS), path)
    for k, v in zip(KEYS, ref[:6]):
        assert m[f"bbox/{k}"] == pytest.approx(v, abs=1e-12), k
    assert 0.0 < m["bbox/AP"] < 1.0
    assert evaluate_coco(gt, path) == m  # results given as a json path


def test_ap50_by_hand():
    # 1 image, 2 GT. Ranked detections: TP (0.9), FP (0.8), TP (0.7), TPs exact, so every IoU threshold agrees.
    # precision / recall: (1, 0.5), (0.5, 0.5), (2/3, 1). Envelope: 1 for recall <= 0.5, 2/3 above.
    # 101 recall points 0, 0.01, ..., 1: 51 points (0..0.50) at 1, 50 points (0.51..1) at 2/3:
    # AP50 = (51 + 50 * 2/3) / 101 = 84.333 / 101 = 0.834983.
    recs = [record(1, [[10, 10, 50, 50], [50, 50, 90, 90]], [0, 0])]
    preds = [pred([[10, 10, 50, 50], [0, 60, 30, 99], [50, 50, 90, 90]], [0.9, 0.8, 0.7], [0, 0, 0])]
    m = evaluate_coco(coco_from_records(recs, CLASSES), predictions_to_coco_results(preds, [1], [1, 2]))
    expected = (51 + 50 * 2 / 3) / 101
    assert m["bbox/AP50"] == pytest.approx(expected)
    assert m["bbox/AP"] == pytest.approx(expected) and m["bbox/AP75"] == pytest.approx(expected)
    assert m["bbox/APs"] == -1.0  # no small ground truth: nothing to measure, as in pycocotools


def test_empty_results_score_zero():
    m = evaluate_coco(coco_from_records(RECORDS, CLASSES), [], iou_types=("bbox",))
    assert all(m[f"bbox/{k}"] == 0.0 for k in KEYS)
    assert predictions_to_coco_results([pred([], [], [])], [1], [1, 2]) == []


def test_results_from_torch_equal_numpy():
    preds = perfect(RECORDS)
    tpreds = [{k: torch.from_numpy(v) for k, v in p.items()} for p in preds]
    ids = [r["image_id"] for r in RECORDS]
    a = predictions_to_coco_results(preds, ids, [1, 2])
    b = predictions_to_coco_results(tpreds, ids, [1, 2])
    assert a == b
    assert a[0] == {"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 40.0], "score": pytest.approx(0.9)}
    json.dumps(a)


def square(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def test_segm_ap_by_hand(tmp_path):
    # One class. GT masks: A = 20x20 square, B = 25 wide x 20 high (500 px). Predicted boxes equal the GT boxes
    # (box AP 1), but the mask for B covers only 13 of its 25 columns: mask IoU 260 / 500 = 0.52, a hit only at 0.5.
    # At IoU 0.5: AP 1. At 0.55..0.95: TP (0.9), FP (0.8): recall 0.5 at precision 1 -> 51 of 101 recall points
    # (0, 0.01, .., 0.50) at 1, the rest 0 -> 51/101. segm AP = (1 + 9 * 51/101) / 10 = 0.55446.
    h, w = 60, 80
    recs = [record(1, [[10, 10, 30, 30], [40, 20, 65, 40]], [0, 0], masks=[square(10, 10, 20, 20),
                                                                             square(40, 20, 25, 20)], h=h, w=w)]
    masks = np.zeros((2, h, w), bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 20:40, 40:53] = True
    preds = [pred([[10, 10, 30, 30], [40, 20, 65, 40]], [0.9, 0.8], [0, 0], masks=masks)]
    gt = coco_from_records(recs, CLASSES)
    assert [a["area"] for a in gt.dataset["annotations"]] == [400, 500]
    res = predictions_to_coco_results(preds, [1], [1, 2])
    m = evaluate_coco(gt, res, iou_types=("bbox", "segm"))
    assert m["bbox/AP"] == pytest.approx(1.0)
    assert m["segm/AP50"] == pytest.approx(1.0)
    assert m["segm/AP75"] == pytest.approx(51 / 101)
    assert m["segm/AP"] == pytest.approx((1 + 9 * 51 / 101) / 10)
    # independent reference on the same files
    path = write_coco_results(res, tmp_path / "res.json")
    ref = cocoeval_stats(reference_gt_json(tmp_path / "gt.json", recs, with_segm=True), path, "segm")
    for k, v in zip(KEYS, ref[:6]):
        assert m[f"segm/{k}"] == pytest.approx(v, abs=1e-12), k


def test_segm_needs_masks():
    with pytest.raises(ValueError, match="segm"):
        evaluate_coco(coco_from_records(RECORDS, CLASSES), predictions_to_coco_results(
            perfect(RECORDS), [1, 2, 3], [1, 2]), iou_types=("segm",))


# ---------------------------------------------------------------- proposals

def random_proposals(records, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        gt = r["boxes"][rng.integers(0, len(r["boxes"]), n)]
        boxes = gt + rng.normal(0, 4, (n, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        out.append({"boxes": boxes.astype(np.float32), "scores": rng.random(n).astype(np.float32)})
    return out


def test_evaluate_proposals_equals_cocoeval_usecats0(tmp_path):
    props = random_proposals(RECORDS, 6)
    m = evaluate_proposals(coco_from_records(RECORDS, CLASSES), props, [1, 2, 3], proposal_nums=(1, 2, 5))
    res = [{"image_id": i, "category_id": 1, "bbox": [round(v, 2) for v in xyxy_to_xywh(b)], "score": float(s)}
           for i, p in zip([1, 2, 3], props) for b, s in zip(p["boxes"].astype(np.float64).tolist(), p["scores"])]
    path = tmp_path / "props.json"
    path.write_text(json.dumps(res))
    ref = cocoeval_stats(reference_gt_json(tmp_path / "gt.json", RECORDS), path, use_cats=False, max_dets=(1, 2, 5))
    assert m["proposal/AR@1"] == pytest.approx(ref[6], abs=1e-12)
    assert m["proposal/AR@2"] == pytest.approx(ref[7], abs=1e-12)
    assert m["proposal/AR@5"] == pytest.approx(ref[8], abs=1e-12)
    assert 0 < m["proposal/AR@1"] < m["proposal/AR@5"] < 1


def test_proposal_recall_hand_cases():
    recs = [record(1, [[0, 0, 50, 50], [60, 60, 100, 100]], [0, 1])]
    gt = coco_from_records(recs, CLASSES)
    # one GT hit exactly, the other missed: AR = 0.5 at every threshold (proposals are class-agnostic).
    props = [{"boxes": np.array([[0, 0, 50, 50], [0, 55, 30, 90]], np.float32), "scores": np.array([0.9, 0.8])}]
    m = evaluate_proposals(gt, props, [1], proposal_nums=(100, 300, 1000))
    assert m == {"proposal/AR@100": pytest.approx(0.5), "proposal/AR@300": pytest.approx(0.5),
                 "proposal/AR@1000": pytest.approx(0.5)}
    assert recall_at(props, [recs[0]["boxes"]], 100) == pytest.approx(0.5)
    # GT 2 now overlapped by [60, 60, 100, 88.8]: IoU 40 * 28.8 / 1600 = 0.72, a hit at 0.5, 0.55, .., 0.7 (5 of 10
    # thresholds); AR = (10 + 5) / 20 = 0.75 for both COCOeval and the greedy matcher.
    props = [{"boxes": np.array([[0, 0, 50, 50], [60, 60, 100, 88.8]], np.float32), "scores": np.array([0.9, 0.8])}]
    assert evaluate_proposals(gt, props, [1], (1, 2, 3))["proposal/AR@2"] == pytest.approx(0.75)
    assert recall_at(props, [recs[0]["boxes"]], 2) == pytest.approx(0.75)
    # top-1 by score only: the higher-scored proposal recalls GT 1 -> 0.5
    assert recall_at(props, [recs[0]["boxes"]], 1) == pytest.approx(0.5)


def test_recall_at_is_one_to_one_and_uses_scores():
    gts = [np.array([[0, 0, 10, 10], [0, 0, 10, 9]], np.float32)]
    # one proposal overlaps both GTs (IoU 1 and 0.9) but can only recall one of them
    assert recall_at([np.array([[0, 0, 10, 10]], np.float32)], gts, 10) == pytest.approx(0.5)
    # (n, 5) with scores: the best box has the lowest score, so top-1 misses everything
    props = np.array([[0, 0, 10, 10, 0.1], [50, 50, 60, 60, 0.9]], np.float32)
    assert recall_at([props], [gts[0][:1]], 1) == 0.0
    assert recall_at([torch.from_numpy(props)], [gts[0][:1]], 2) == pytest.approx(1.0)
    # per-threshold values: IoU 0.72 counts at 0.5, 0.6, 0.7 of (0.5, 0.6, 0.7, 0.8)
    g = [np.array([[0, 0, 50, 50]], np.float32)]
    assert recall_at([np.array([[0, 0, 50, 36]], np.float32)], g, 1, iou_thrs=[0.5, 0.6, 0.7, 0.8]) == 0.75


# ---------------------------------------------------------------- VOC

def voc_case(extra_gt=(), extra_ignore=(), extra_det=()):
    """Class 0, 2 counted GTs; detections TP (0.9), duplicate FP (0.8), TP (0.7)."""
    gt = [[10, 10, 50, 50], [60, 60, 90, 90], *extra_gt]
    recs = [record(1, gt, [0] * len(gt), ignore=[False, False, *extra_ignore])]
    dets = [([10, 10, 50, 50], 0.9), ([11, 11, 50, 51], 0.8), ([60, 60, 90, 90], 0.7), *extra_det]
    preds = [pred([d[0] for d in dets], [d[1] for d in dets], [0] * len(dets))]
    return preds, recs


def test_voc_area_and_11points_by_hand():
    # precision / recall after each detection: (1, .5), (.5, .5), (2/3, 1); envelope 1 up to recall .5, 2/3 after.
    # area: .5 * 1 + .5 * 2/3 = 0.8333.   11 points: recall 0, .1, ..., .5 -> 1 (6 points), .6 .. 1 -> 2/3 (5 points):
    # (6 + 5 * 2/3) / 11 = 0.8485.
    preds, recs = voc_case()
    area = voc_map(preds, recs, num_classes=1, mode="area", class_names=["cat"])
    pts = voc_map(preds, recs, num_classes=1, mode="11points")
    assert area["voc/mAP"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert area["voc/AP_cat"] == area["voc/mAP"]
    assert pts["voc/mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert pts["voc/AP_0"] == pts["voc/mAP"]
    assert "cat" in format_voc_table(area) and "mAP" in format_voc_table(area)


def test_voc_difficult_is_neither_tp_nor_fp():
    expected = 0.5 + 0.5 * 2 / 3
    # a detection (0.85) exactly on a difficult GT: skipped, AP unchanged
    preds, recs = voc_case(extra_gt=[[0, 60, 30, 95]], extra_ignore=[True], extra_det=[([0, 60, 30, 95], 0.85)])
    assert voc_map(preds, recs, 1)["voc/mAP"] == pytest.approx(expected)
    # a difficult GT nobody detects does not lower recall
    preds, recs = voc_case(extra_gt=[[0, 60, 30, 95]], extra_ignore=[True])
    assert voc_map(preds, recs, 1)["voc/mAP"] == pytest.approx(expected)
    # the same GT not difficult: TP (.9) TP (.85) FP (.8) TP (.7) with 3 GT -> precision 1, 1, 2/3, 3/4;
    # recall 1/3, 2/3, 2/3, 1 -> area 2/3 * 1 + 1/3 * 3/4 = 0.9167
    preds, recs = voc_case(extra_gt=[[0, 60, 30, 95]], extra_ignore=[False], extra_det=[([0, 60, 30, 95], 0.85)])
    assert voc_map(preds, recs, 1)["voc/mAP"] == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)


def test_voc_classes_without_gt_are_left_out():
    recs = [record(1, [[10, 10, 50, 50]], [0]), record(2, [[20, 20, 60, 70]], [2])]
    preds = [pred([[10, 10, 50, 50], [0, 0, 30, 30]], [0.9, 0.95], [0, 1]), pred([], [], [])]
    m = voc_map(preds, recs, 3, class_names=["a", "b", "c"])
    assert m["voc/AP_a"] == pytest.approx(1.0)
    assert math.isnan(m["voc/AP_b"])        # detections but no GT: not in the mean
    assert m["voc/AP_c"] == 0.0             # GT but no detection: 0, in the mean
    assert m["voc/mAP"] == pytest.approx(0.5)
    # a right box with the wrong label is a false positive of its own class and no hit for the GT's class
    preds = [pred([[10, 10, 50, 50]], [0.9], [2]), pred([[20, 20, 60, 70]], [0.9], [2])]
    m = voc_map(preds, recs, 3)
    assert m["voc/AP_0"] == 0.0 and m["voc/AP_2"] == pytest.approx(0.5)


def test_voc_iou_threshold_is_inclusive():
    # IoU of [0, 0, 10, 10] and [0, 0, 10, 5] is exactly 0.5 -> a hit at iou_thr 0.5, not at 0.6
    recs = [record(1, [[0, 0, 10, 10]], [0])]
    preds = [pred([[0, 0, 10, 5]], [0.9], [0])]
    assert voc_map(preds, recs, 1, iou_thr=0.5)["voc/mAP"] == 1.0
    assert voc_map(preds, recs, 1, iou_thr=0.6)["voc/mAP"] == 0.0


# ---------------------------------------------------------------- real data (../shared/data)

def load_coco_json(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def records_from_coco(coco, image_ids):
    cat_ids = sorted(coco.getCatIds())
    recs = []
    for i in image_ids:
        img = coco.loadImgs(i)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=i))
        b = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        rec = record(i, b, [cat_ids.index(a["category_id"]) for a in anns],
                     ignore=[bool(a.get("iscrowd", 0)) for a in anns], h=img["height"], w=img["width"])
        if all("segmentation" in a for a in anns):
            rec["masks"] = [a["segmentation"] for a in anns]
        recs.append(rec)
    return recs, [c["name"] for c in coco.loadCats(cat_ids)], cat_ids


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared datasets not found at {DATA} (a plain clone has "
                                                          f"no ../shared/data)")


@needs_data
def test_bccd_subset_ground_truth_scores_one_and_matches_json():
    coco = load_coco_json(DATA / "bccd" / "annotations" / "instances_val.json")
    ids = sorted(coco.getImgIds())[:5]
    recs, names, cat_ids = records_from_coco(coco, ids)
    gt = coco_from_records(recs, names, cat_ids)
    preds = [pred(r["boxes"], np.ones(len(r["boxes"])), r["labels"]) for r in recs]
    res = predictions_to_coco_results(preds, ids, cat_ids)
    assert evaluate_coco(gt, res)["bbox/AP"] == pytest.approx(1.0)
    assert voc_map(preds, recs, len(names))["voc/mAP"] == pytest.approx(1.0)
    assert evaluate_proposals(gt, [{"boxes": p["boxes"], "scores": p["scores"]} for p in preds], ids,
                              (10, 100, 1000))["proposal/AR@100"] == pytest.approx(1.0)
    # jittered, partly dropped detections score identically against the upstream json (restricted to the subset)
    rng = np.random.default_rng(1)
    noisy = []
    for p in preds:
        keep = rng.random(len(p["boxes"])) > 0.2
        noisy.append(pred(p["boxes"][keep] + rng.normal(0, 6, (keep.sum(), 4)), rng.random(keep.sum()),
                          p["labels"][keep]))
    res = predictions_to_coco_results(noisy, ids, cat_ids)
    ours = evaluate_coco(gt, res)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, v in zip(KEYS, ev.stats[:6]):
        assert ours[f"bbox/{k}"] == pytest.approx(v, abs=1e-12), k
    assert 0.1 < ours["bbox/AP"] < 0.9


@needs_data
def test_nuts_ground_truth_masks_score_one():
    coco = load_coco_json(DATA / "nuts_labelme" / "annotations" / "instances_val.json")
    ids = sorted(coco.getImgIds())
    recs, names, cat_ids = records_from_coco(coco, ids)
    assert all("masks" in r for r in recs)
    gt = coco_from_records(recs, names, cat_ids)
    preds = []
    for r in recs:
        masks = np.stack([polygons_to_bitmap(m, r["height"], r["width"]) for m in r["masks"]]).astype(bool)
        preds.append(pred(r["boxes"], np.ones(len(r["boxes"])), r["labels"], masks=masks))
    m = evaluate_coco(gt, predictions_to_coco_results(preds, ids, cat_ids), iou_types=("bbox", "segm"))
    assert m["bbox/AP"] == pytest.approx(1.0)
    assert m["segm/AP"] == pytest.approx(1.0)
    # mask areas equal the upstream (pycocotools-rasterised) areas
    ours = sorted(a["area"] for a in gt.dataset["annotations"])
    assert ours == pytest.approx(sorted(a["area"] for a in coco.dataset["annotations"]))


def test_voc_detection_pairs_with_its_best_gt_even_if_taken():
    # VOC devkit / MMDetection rule: a detection is judged against the GT it overlaps most. D2 overlaps the taken GT A
    # (IoU 80 / 120 = 0.67) more than the free GT B (70 / 130 = 0.54): a duplicate, so FP. TP, FP with 2 GT -> AP 0.5.
    recs = [record(1, [[0, 0, 10, 10], [5, 0, 15, 10]], [0, 0])]
    preds = [pred([[0, 0, 10, 10], [2, 0, 12, 10]], [0.9, 0.8], [0, 0])]
    assert voc_map(preds, recs, 1)["voc/mAP"] == pytest.approx(0.5)


def test_ignore_becomes_crowd():
    # GT A normal, GT B ignored (iscrowd). The only detection sits on B: COCOeval ignores it and A is missed -> AP 0.
    # (Were B an ordinary GT: recall 0.5 at precision 1 -> 51/101.)
    recs = [record(1, [[10, 10, 50, 50], [60, 60, 90, 90]], [0, 0], ignore=[False, True])]
    gt = coco_from_records(recs, CLASSES)
    assert [a["iscrowd"] for a in gt.dataset["annotations"]] == [0, 1]
    res = predictions_to_coco_results([pred([[60, 60, 90, 90]], [0.9], [0])], [1], [1, 2])
    assert evaluate_coco(gt, res)["bbox/AP"] == 0.0
    recs[0]["ignore"][:] = False
    assert evaluate_coco(coco_from_records(recs, CLASSES), res)["bbox/AP"] == pytest.approx(51 / 101)


def test_quiet_pycocotools_silences_its_prints_even_under_a_patched_print(monkeypatch):
    """Ray Train workers replace builtins.print with one that logs everything, redirected or not: pycocotools'
    own prints must still stay silent, and only inside the block."""
    import builtins

    import pycocotools.coco

    from raydet.evaluation.coco import quiet_pycocotools

    logged = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: logged.append(" ".join(map(str, a))))
    coco = pycocotools.coco.COCO()
    coco.dataset = {"images": [], "annotations": [], "categories": []}
    with quiet_pycocotools():
        coco.createIndex()
    assert logged == [] and "print" not in vars(pycocotools.coco)
    coco.createIndex()
    assert logged == ["creating index...", "index created!"]
