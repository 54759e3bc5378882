"""``raydet analyze``: what a COCO results json says about a model, against a pipeline's split.

``RESULTS`` is the detections json that ``raydet test --out`` and ``raydet infer`` write (COCO results: a list of
``{image_id, category_id, bbox: [x, y, w, h], score}``, plus ``segmentation`` for masks). Its image and category
ids are the dataset's. When an ``images.json`` lies beside it (``raydet infer`` on a folder, glob or list numbers
the images 1..N and writes that map), the ids are mapped back to the split's images by file path, and the
categories by name.

Outputs (in ``--out``):

* the per-class AP table (COCOeval at IoU 0.5:0.95, 0.5, 0.75 and per area, 100 detections), printed;
* ``confusion_matrix.png`` (:mod:`raydet.tools.confusion`, boxes);
* ``error_breakdown_<iou type>_all.png`` and one ``error_breakdown_<iou type>_<class>.png`` per class
  (:mod:`raydet.tools.coco_errors`);
* ``analysis.json``: every number above.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from raydet.data.datasets import read_json
from raydet.evaluation.coco import COCO_METRIC_NAMES, results_to_coco, run_cocoeval

from .coco_errors import AREAS, ERROR_TYPES, coco_error_breakdown, plot_error_breakdown
from .confusion import confusion_matrix, plot_confusion_matrix

__all__ = ["load_results", "map_infer_ids", "per_class_ap", "format_ap_table", "analyze_results", "format_analysis"]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_results(path: str) -> list[dict]:
    """Read and check a COCO results json: a list of entries with an integer ``image_id`` and ``category_id``, a
    ``bbox`` of 4 finite numbers (width and height >= 0) and a finite ``score``. Errors name the file and entry."""
    data = read_json(path, "results file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a COCO results list ([{{image_id, category_id, bbox, score}}, ...]), "
                         f"got a {type(data).__name__}" + (" (an annotation file?)" if isinstance(data, dict) else ""))
    for i, e in enumerate(data):
        bbox = e.get("bbox") if isinstance(e, dict) else None
        why = None
        if not isinstance(e, dict):
            why = f"expected an object, got {type(e).__name__}"
        elif not all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) for k in ("image_id", "category_id")):
            why = f"image_id and category_id must be integers, got {e.get('image_id')!r}, {e.get('category_id')!r}"
        elif not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)
                  and bbox[2] >= 0 and bbox[3] >= 0):
            why = f"bbox must be [x, y, w, h] (4 finite numbers, w and h >= 0), got {bbox!r}"
        elif not _number(e.get("score")):
            why = f"score must be a finite number, got {e.get('score')!r}"
        if why:
            raise ValueError(f"{path}: entry {i}: {why}")
    return data


def map_infer_ids(entries: list[dict], images_json: str, dataset) -> list[dict]:
    """Entries numbered by ``raydet infer`` (ids of ``images_json``) -> the dataset's image and category ids, by
    file path (``img_path`` of the records) and category name. Errors name the file and the first unmatched id."""
    try:
        with open(images_json, encoding="utf-8") as f:
            data = json.load(f)
        images, categories = data["images"], data.get("categories", [])
        path_of = {int(im["id"]): os.path.realpath(str(im["file_name"])) for im in images}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{images_json}: not an images.json of raydet infer ({exc})") from None
    by_path = {os.path.realpath(r["img_path"]): int(r["image_id"]) for r in dataset.records if r.get("img_path")}
    cat_of_name = dict(zip(dataset.classes, dataset.cat_ids))
    name_of = {int(c["id"]): str(c["name"]) for c in categories if isinstance(c, dict)}
    out = []
    for i, e in enumerate(entries):
        path = path_of.get(e["image_id"])
        if path is None:
            raise ValueError(f"{images_json}: entry {i} of the results has image_id {e['image_id']}, which is not "
                             f"in this images.json")
        if path not in by_path:
            raise ValueError(f"{images_json}: image {e['image_id']} ({path}) is not an image of {dataset!r}")
        cat = e["category_id"]
        if name_of:
            name = name_of.get(cat)
            if name not in cat_of_name:
                raise ValueError(f"{images_json}: category {cat} ({name!r}) of results entry {i} is not a class of "
                                 f"the dataset ({', '.join(dataset.classes)})")
            cat = cat_of_name[name]
        out.append({**e, "image_id": by_path[path], "category_id": cat})
    return out


def _check_ids(entries: list[dict], dataset, source: str) -> None:
    image_ids = {int(r["image_id"]) for r in dataset.records}
    cat_ids = set(int(c) for c in dataset.cat_ids)
    for i, e in enumerate(entries):
        if e["image_id"] not in image_ids:
            raise ValueError(f"{source}: entry {i}: image_id {e['image_id']} is not an image of {dataset!r} "
                             f"(results of another split or dataset? e.g. ids {sorted(image_ids)[:5]})")
        if e["category_id"] not in cat_ids:
            raise ValueError(f"{source}: entry {i}: category_id {e['category_id']} is not a category of the "
                             f"dataset (ids {sorted(cat_ids)})")


def per_class_ap(ev, coco_gt, cat_ids: list[int]) -> list[dict]:
    """Rows ``{class, category_id, gts, AP, AP50, AP75, APs, APm, APl}`` from an evaluated and accumulated
    COCOeval (standard IoU thresholds, last maxDets); NaN where the class has no ground truth."""
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    iou = list(np.round(ev.params.iouThrs, 2))
    order = {int(c): k for k, c in enumerate(ev.params.catIds)}

    def mean(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else float("nan")

    rows = []
    for cat in cat_ids:
        k = order[int(cat)]
        gts = sum(1 for a in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat])) if not a.get("iscrowd", 0))
        p = precision[:, :, k, :, -1]
        rows.append({"class": coco_gt.loadCats(cat)[0]["name"], "category_id": int(cat), "gts": gts,
                     "AP": mean(p[:, :, 0]), "AP50": mean(p[iou.index(0.5), :, 0]),
                     "AP75": mean(p[iou.index(0.75), :, 0]), "APs": mean(p[:, :, 1]), "APm": mean(p[:, :, 2]),
                     "APl": mean(p[:, :, 3])})
    return rows


def format_ap_table(rows: list[dict], overall: dict, iou_type: str) -> str:
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    width = max([len("class")] + [len(r["class"]) for r in rows])

    def cell(v) -> str:
        return f"{'n/a':>6}" if v is None or v != v or v < 0 else f"{v:>6.3f}"

    lines = [f"{iou_type} AP per class (COCOeval, 100 detections per image):",
             f"  {'class':<{width}}  {'gts':>6}  " + "  ".join(f"{n:>6}" for n in names)]
    for r in rows:
        lines.append(f"  {r['class']:<{width}}  {r['gts']:>6}  " + "  ".join(cell(r[n]) for n in names))
    lines.append(f"  {'(all)':<{width}}  {sum(r['gts'] for r in rows):>6}  "
                 + "  ".join(cell(overall[n]) for n in names))
    return "\n".join(lines)


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _nan_to_none(value):
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def analyze_results(dataset, entries: list[dict], out_dir: str, *, iou_types=("bbox",), score_thr: float = 0.3,
                    tp_iou_thr: float = 0.5, source: str = "results") -> dict:
    """Score ``entries`` (checked COCO results with the dataset's ids) on ``dataset`` and write the outputs.

    Returns ``{"per_class": {iou type: rows}, "overall": {iou type: {AP..APl}}, "confusion_matrix": {...},
    "error_breakdown": {iou type: ErrorBreakdown.table()}, "files": [...]}``, also written as ``analysis.json``.
    """
    _check_ids(entries, dataset, source)
    if "segm" in iou_types:
        if not getattr(dataset, "with_masks", False):
            raise ValueError(f"--types segm: {dataset!r} has no masks (with_masks: true in the split's dataset)")
        missing = next((i for i, e in enumerate(entries) if "segmentation" not in e), None)
        if missing is not None:
            raise ValueError(f"{source}: entry {missing}: no 'segmentation' (--types segm needs the masks of a mask "
                             f"model's results)")
    os.makedirs(out_dir, exist_ok=True)
    coco_gt = dataset.coco_gt()
    cat_ids = [int(c) for c in dataset.cat_ids]
    out: dict = {"per_class": {}, "overall": {}, "error_breakdown": {}, "files": []}
    for iou_type in iou_types:
        coco_dt = results_to_coco(coco_gt, entries, iou_type)
        ev = run_cocoeval(coco_gt, coco_dt, iou_type, None)
        out["per_class"][iou_type] = per_class_ap(ev, coco_gt, cat_ids)
        out["overall"][iou_type] = dict(zip(COCO_METRIC_NAMES, (float(v) for v in ev.stats[:6])))
        breakdown = coco_error_breakdown(coco_gt, coco_dt, iou_type, cat_ids=cat_ids)
        out["error_breakdown"][iou_type] = breakdown.table()
        path = os.path.join(out_dir, f"error_breakdown_{iou_type}_all.png")
        plot_error_breakdown(breakdown, path)
        out["files"].append(path)
        parts = [_file_part(name) for name in breakdown.class_names]
        for k, part in enumerate(parts):
            part = part if parts.count(part) == 1 else f"{part}_{k}"  # two names that make the same file name
            path = os.path.join(out_dir, f"error_breakdown_{iou_type}_{part}.png")
            plot_error_breakdown(breakdown, path, k)
            out["files"].append(path)

    label_of = {c: i for i, c in enumerate(cat_ids)}
    by_image: dict[int, list[dict]] = {}
    for e in entries:
        by_image.setdefault(e["image_id"], []).append(e)
    ground_truth, detections = [], []
    for rec in dataset.records:
        dets = by_image.get(int(rec["image_id"]), [])
        xywh = np.asarray([d["bbox"] for d in dets], np.float64).reshape(-1, 4)
        detections.append({"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                           "scores": np.asarray([d["score"] for d in dets], np.float64),
                           "labels": np.asarray([label_of[d["category_id"]] for d in dets], np.int64)})
        ground_truth.append({"boxes": rec["boxes"], "labels": rec["labels"], "ignore": rec.get("ignore")})
    matrix = confusion_matrix(ground_truth, detections, len(cat_ids), score_thr=score_thr, tp_iou_thr=tp_iou_thr)
    path = os.path.join(out_dir, "confusion_matrix.png")
    plot_confusion_matrix(matrix, list(dataset.classes), path,
                          title=f"Confusion matrix\n(score >= {score_thr:g}, IoU >= {tp_iou_thr:g})")
    out["files"].append(path)
    out["confusion_matrix"] = {"classes": list(dataset.classes) + ["background"], "score_thr": score_thr,
                               "tp_iou_thr": tp_iou_thr, "matrix": matrix.tolist()}
    path = os.path.join(out_dir, "analysis.json")
    out["files"].append(path)
    with open(path, "w") as f:
        json.dump(_nan_to_none(out), f, indent=1)
    return out


def format_analysis(result: dict) -> str:
    """The summary ``raydet analyze`` prints: AP tables, the error breakdown over all classes and the matrix."""
    lines = []
    for iou_type, rows in result["per_class"].items():
        lines.append(format_ap_table(rows, result["overall"][iou_type], iou_type))
        table = result["error_breakdown"][iou_type]["all_classes"]
        lines.append(f"{iou_type} error breakdown, all classes (AP of each setting; see error_breakdown_*.png):")
        lines.append(f"  {'area':<7}" + "  ".join(f"{t:>6}" for t in ERROR_TYPES))
        for area in AREAS:
            vals = table[area]
            lines.append(f"  {area:<7}" + "  ".join(f"{'n/a':>6}" if vals[t] is None or vals[t] != vals[t]
                                                    else f"{vals[t]:>6.3f}" for t in ERROR_TYPES))
    cm = result["confusion_matrix"]
    names = cm["classes"]
    width = max(len(n) for n in names)
    lines.append(f"confusion matrix (rows ground truth, columns prediction; score >= {cm['score_thr']:g}, "
                 f"IoU >= {cm['tp_iou_thr']:g}):")
    lines.append(f"  {'':<{width}}  " + "  ".join(f"{n[:10]:>10}" for n in names))
    for n, row in zip(names, cm["matrix"]):
        lines.append(f"  {n:<{width}}  " + "  ".join(f"{v:>10}" for v in row))
    return "\n".join(lines)
