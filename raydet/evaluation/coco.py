"""COCO-style evaluation through pycocotools' COCOeval.

The ground truth is a pycocotools ``COCO`` object, built in memory from raydet records with
:func:`coco_from_records` (or loaded from an annotation json). Predictions (see :mod:`raydet.structures`) become
COCO result entries with :func:`predictions_to_coco_results`; :func:`evaluate_coco` scores them.

Metrics are on a 0-1 scale. As in pycocotools, an entry with nothing to measure (e.g. ``APs`` when no ground-truth
object is small) is -1.

One meaning per concept, in training and in every metric (bbox, segm, proposal recall, VOC):

* **Ignored** ground truth is the record's ``ignore`` flag: COCO ``iscrowd: 1`` or ``ignore: 1``, VOC ``difficult``.
  Training passes those boxes to the assigners as ``gt_boxes_ignore``; VOC mAP neither counts them nor scores
  detections on them. COCOeval honours only ``iscrowd`` (its ``_prepare`` sets ``gt["ignore"]`` from ``iscrowd``,
  overwriting any ``ignore`` key), so the ground truth handed to it always carries ``iscrowd`` = the record's flag
  (:func:`coco_from_records`, :func:`coco_gt_from_json`): an ignored box is a crowd region for COCOeval (detections
  on it are neither true nor false positives; overlap with it is intersection over the detection's area, as the
  assigners' ``ignore_iof_thr``).
* A **valid polygon** is what :func:`raydet.masks.valid_polygons` keeps: the evaluation ground truth holds exactly
  the polygons the training mask targets rasterise.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..masks import bitmap_to_rle, to_rle, valid_polygons


def _no_print(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def quiet_pycocotools():
    """Silence pycocotools' progress prints ("creating index...", COCOeval's summary) within the block.

    ``redirect_stdout`` is not enough inside Ray Train workers, whose patched ``print`` logs everything printed
    even when stdout is redirected, so the pycocotools modules' ``print`` is shadowed instead (their own name
    lookup finds the module global before the builtin; nothing else is affected)."""
    import pycocotools.coco
    import pycocotools.cocoeval

    modules = (pycocotools.coco, pycocotools.cocoeval)
    for m in modules:
        m.print = _no_print
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for m in modules:
            m.__dict__.pop("print", None)

__all__ = ["coco_from_records", "coco_gt_from_json", "predictions_to_coco_results", "evaluate_coco",
           "format_coco_table", "write_coco_results", "results_to_coco", "run_cocoeval", "COCO_METRIC_NAMES"]

# Names of COCOeval.stats[0..5].
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_IOU_TYPES = ("bbox", "segm", "proposal")


def _numpy(x: Any) -> np.ndarray:
    """A NumPy view of a NumPy array, torch tensor (any device) or list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with quiet_pycocotools():
        coco.createIndex()
    return coco


def _json_segmentation(mask: Any, height: int, width: int) -> Any:
    """An instance mask as the COCO segmentation pycocotools gets: its :func:`~raydet.masks.valid_polygons` (the
    polygons the training targets rasterise), or a str-counts RLE (an RLE input, or no valid polygon: empty).
    Raises ValueError for a malformed mask."""
    if isinstance(mask, (list, tuple)):
        polys = valid_polygons(mask)
        if polys:
            return polys
    rle = dict(to_rle(mask, height, width))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def coco_from_records(records: list[dict], class_names: list[str], cat_ids: list[int] | None = None) -> COCO:
    """Build a pycocotools ``COCO`` ground truth in memory from raydet records.

    Boxes go from (x1, y1, x2, y2) to COCO (x, y, w, h); ``iscrowd`` is the record's ``ignore``; ``segmentation``
    comes from ``masks`` when the record has them, and ``area`` is the mask's pixel area then, else the box area.
    Label index ``i`` maps to category id ``cat_ids[i]`` (default ``i + 1``). Annotation ids start at 1
    (COCOeval reads id 0 as "unmatched").
    """
    num_classes = len(class_names)
    cat_ids = list(range(1, num_classes + 1)) if cat_ids is None else [int(c) for c in cat_ids]
    if len(cat_ids) != num_classes:
        raise ValueError(f"coco_from_records: {len(cat_ids)} cat_ids for {num_classes} class_names")
    if len(set(cat_ids)) != num_classes:
        raise ValueError(f"coco_from_records: cat_ids must be unique, got {cat_ids}")
    cat_lut = np.asarray(cat_ids, dtype=np.int64)

    images, annotations, seen = [], [], set()
    for rec in records:
        image_id, h, w = int(rec["image_id"]), int(rec["height"]), int(rec["width"])
        if image_id in seen:
            raise ValueError(f"coco_from_records: image_id {image_id} appears twice")
        seen.add(image_id)
        images.append({"id": image_id, "file_name": str(rec.get("file_name", "")), "height": h, "width": w})

        boxes = np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(rec["labels"], dtype=np.int64).reshape(-1)
        n = len(boxes)
        ignore = np.asarray(rec.get("ignore", np.zeros(n, bool)), dtype=bool).reshape(-1)
        if len(labels) != n or len(ignore) != n:
            raise ValueError(f"coco_from_records: image {image_id} has {n} boxes, {len(labels)} labels and "
                             f"{len(ignore)} ignore flags")
        if n and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"coco_from_records: image {image_id} has labels outside [0, {num_classes})")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        areas = xywh[:, 2] * xywh[:, 3]

        masks = rec.get("masks")
        segms = None
        if masks is not None:
            if len(masks) != n:
                raise ValueError(f"coco_from_records: image {image_id} has {n} boxes but {len(masks)} masks")
            segms = []
            for i, m in enumerate(masks):
                try:
                    segms.append(_json_segmentation(m, h, w))
                except ValueError as e:
                    raise ValueError(f"coco_from_records: image {image_id}, instance mask {i}: {e}") from e
            if segms:
                areas = mask_utils.area([to_rle(s, h, w) for s in segms]).astype(np.float64)

        cats = cat_lut[labels].tolist()
        for i, (bb, area, cat, crowd) in enumerate(zip(xywh.tolist(), areas.tolist(), cats, ignore.tolist())):
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "bbox": bb,
                   "area": area, "iscrowd": int(crowd)}
            if segms is not None:
                ann["segmentation"] = segms[i]
            annotations.append(ann)

    categories = [{"id": c, "name": str(nm)} for c, nm in zip(cat_ids, class_names)]
    return _quiet_coco({"images": images, "annotations": annotations, "categories": categories})


def coco_gt_from_json(data: dict, records: list[dict], cat_ids: Sequence[int]) -> COCO:
    """pycocotools ground truth from a COCO json (``data``) and the records a reader kept from it.

    Only the records' images, their annotations (``ann_ids``; the first of duplicate ids) and the ``cat_ids``
    categories stay. Each annotation keeps the file's id, bbox and area (the official areas behind APs / APm / APl;
    a missing one becomes the box area), with raydet's meanings on top:

    * ``iscrowd`` (and ``ignore``) is the record's ``ignore`` flag, i.e. the file's ``iscrowd`` or ``ignore``;
      COCOeval reads only ``iscrowd`` (``_prepare`` overwrites ``ignore`` with it);
    * a polygon ``segmentation`` becomes :func:`_json_segmentation` of it: its valid polygons, or an empty RLE.
      A malformed one (left unchecked by a reader without masks) is left out, so that only segm evaluation fails.
    """
    ignore_of: dict = {}
    for rec in records:
        flags = np.asarray(rec.get("ignore", np.zeros(len(rec["ann_ids"]), bool)), dtype=bool).reshape(-1)
        ignore_of.update(zip(rec["ann_ids"], flags.tolist()))
    image_ids = {int(r["image_id"]) for r in records}
    images, seen = [], set()
    for im in data["images"]:
        if isinstance(im, dict) and im.get("id") in image_ids and im["id"] not in seen:
            seen.add(im["id"])
            images.append(im)
    size = {im["id"]: (int(im["height"]), int(im["width"])) for im in images}
    annotations: dict = {}
    for a in data.get("annotations", []):
        if not isinstance(a, dict) or a.get("id") not in ignore_of or a["id"] in annotations:
            continue
        ann = dict(a)
        crowd = int(ignore_of[a["id"]])
        ann["iscrowd"] = ann["ignore"] = crowd
        if not isinstance(ann.get("area"), (int, float)) or isinstance(ann["area"], bool):
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        if isinstance(ann.get("segmentation"), (list, tuple)):
            try:
                ann["segmentation"] = _json_segmentation(ann["segmentation"], *size[ann["image_id"]])
            except ValueError:
                del ann["segmentation"]
        annotations[a["id"]] = ann
    cats = {int(c) for c in cat_ids}
    categories = [c for c in data["categories"] if c["id"] in cats]
    return _quiet_coco({**data, "images": images, "annotations": list(annotations.values()),
                        "categories": categories})


def predictions_to_coco_results(predictions: list[dict], image_ids: list[int], cat_ids: list[int]) -> list[dict]:
    """raydet predictions -> COCO result entries.

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h] (2 decimals), "score"}`` plus a compressed
    ``"segmentation"`` RLE (str counts) when the prediction has ``masks``, and a ``"mask_score"`` when it has
    ``mask_scores`` (Mask Scoring R-CNN: ``segm`` evaluation ranks the masks by it, ``bbox`` by ``score``). Values
    may be NumPy arrays or tensors.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"predictions_to_coco_results: {len(predictions)} predictions for {len(image_ids)} image ids")
    cat_lut = np.asarray(cat_ids, dtype=np.int64)
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = _numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"predictions_to_coco_results: image {image_id} has {len(boxes)} boxes, "
                             f"{len(scores)} scores and {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(cat_lut)):
            raise ValueError(f"predictions_to_coco_results: image {image_id} has labels outside [0, {len(cat_lut)})")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(2)
        entries = [{"image_id": int(image_id), "category_id": c, "bbox": b, "score": s}
                   for b, s, c in zip(xywh.tolist(), scores.tolist(), cat_lut[labels].tolist())]
        if pred.get("masks") is not None:
            masks = _numpy(pred["masks"])
            if len(masks) != len(entries):
                raise ValueError(f"predictions_to_coco_results: image {image_id} has {len(entries)} boxes but "
                                 f"{len(masks)} masks")
            for e, m in zip(entries, masks):
                e["segmentation"] = bitmap_to_rle(m)
        if pred.get("mask_scores") is not None:
            mask_scores = _numpy(pred["mask_scores"]).astype(np.float64).reshape(-1)
            if len(mask_scores) != len(entries):
                raise ValueError(f"predictions_to_coco_results: image {image_id} has {len(entries)} boxes but "
                                 f"{len(mask_scores)} mask scores")
            for e, s in zip(entries, mask_scores.tolist()):
                e["mask_score"] = s
        results.extend(entries)
    return results


def write_coco_results(results: list[dict], path: str | os.PathLike) -> str:
    """Write COCO result entries as json (creating parent folders; a URI: :mod:`raydet.fileio`); returns the
    path."""
    from raydet import fileio

    path = os.fspath(path)
    if fileio.is_uri(path):
        fileio.write_text(path, json.dumps(results))
        return path
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f)
    return path


def results_to_coco(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """COCO object for the detections. Entries are copied (loadRes edits them); an empty list gives an empty one."""
    if not results:
        return _quiet_coco({"images": list(coco_gt.dataset["images"]), "annotations": [],
                            "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))})
    if iou_type == "segm":
        if any("segmentation" not in r for r in results):
            raise ValueError("evaluate_coco: iou_type 'segm' needs a 'segmentation' in every result")
        # Without 'bbox', loadRes takes the area (for APs/APm/APl) from the mask, not from the box. Masks are
        # ranked by their own score where the detector gives one (Mask Scoring R-CNN's mask_score).
        dets = [{**{k: v for k, v in r.items() if k not in ("bbox", "mask_score")},
                 "score": r.get("mask_score", r["score"])} for r in results]
    else:
        dets = [{k: v for k, v in r.items() if k not in ("segmentation", "mask_score")} for r in results]
    with quiet_pycocotools():
        return coco_gt.loadRes(dets)


def run_cocoeval(coco_gt: COCO, coco_dt: COCO, iou_type: str, max_dets: list[int] | None,
                 use_cats: bool = True) -> COCOeval:
    """pycocotools' COCOeval of ``coco_dt`` against ``coco_gt`` (``bbox`` or ``segm``), evaluated and accumulated.

    Raises:
        ValueError: ``segm`` with ground-truth annotations that have no valid segmentation (their ids named).
    """
    missing = [a["id"] for a in coco_gt.dataset["annotations"] if "segmentation" not in a] if iou_type == "segm" else []
    if missing:
        raise ValueError(f"evaluate_coco: iou_type 'segm' needs a valid 'segmentation' in every ground-truth "
                         f"annotation; {len(missing)} have none (records without 'masks', or malformed), e.g. "
                         f"annotation ids {missing[:5]}")
    ev = COCOeval(coco_gt, coco_dt, "segm" if iou_type == "segm" else "bbox")
    if max_dets is not None:
        ev.params.maxDets = list(max_dets)
    ev.params.useCats = int(use_cats)
    with quiet_pycocotools():
        ev.evaluate()
        ev.accumulate()
        if len(ev.params.maxDets) == 3:
            ev.summarize()
    return ev


def average_recall(ev: COCOeval, max_det: int) -> float:
    """Mean recall over IoU 0.5:0.95 and categories, all areas, at ``max_det`` detections (COCOeval's AR)."""
    m = ev.params.maxDets.index(max_det)
    a = ev.params.areaRngLbl.index("all")
    r = ev.eval["recall"][:, :, a, m]
    r = r[r > -1]
    return float(r.mean()) if r.size else -1.0


def evaluate_coco(coco_gt: COCO, results: list[dict] | str | os.PathLike, iou_types: Sequence[str] = ("bbox",),
                  classwise: bool = False, proposal_nums: Sequence[int] | None = None) -> dict[str, float]:
    """Score COCO result entries (or a json file of them) against ``coco_gt`` with COCOeval.

    Returns ``{"<type>/AP", "<type>/AP50", "<type>/AP75", "<type>/APs", "<type>/APm", "<type>/APl"}`` per iou type
    ("bbox", "segm") from ``COCOeval.stats[0:6]``, on a 0-1 scale (-1: nothing to measure), and with ``classwise``
    also ``"<type>/AP_<class name>"`` (AP@[.5:.95], all areas, NaN for a class without ground truth).
    ``proposal_nums`` (three values) replaces COCOeval's ``maxDets`` (1, 10, 100) as MMDetection does; AP is then at
    the last one. iou type "proposal" scores boxes class-agnostically (``useCats = 0``) and returns
    ``"proposal/AR@<n>"`` for each of ``proposal_nums`` (default 100, 300, 1000). Empty results score 0.
    """
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    if isinstance(iou_types, str):
        iou_types = (iou_types,)
    for t in iou_types:
        if t not in _IOU_TYPES:
            raise ValueError(f"evaluate_coco: unknown iou type {t!r}; expected one of {_IOU_TYPES}")
    if proposal_nums is not None:
        proposal_nums = [int(n) for n in proposal_nums]
        if any(n <= 0 for n in proposal_nums) or proposal_nums != sorted(proposal_nums):
            raise ValueError(f"evaluate_coco: proposal_nums must be positive and increasing, got {proposal_nums}")

    metrics: dict[str, float] = {}
    for t in iou_types:
        if t == "proposal":
            nums = proposal_nums or [100, 300, 1000]
            ev = run_cocoeval(coco_gt, results_to_coco(coco_gt, results, "bbox"), "bbox", nums, use_cats=False)
            for n in nums:
                metrics[f"proposal/AR@{n}"] = average_recall(ev, n)
            continue
        if proposal_nums is not None and len(proposal_nums) != 3:
            raise ValueError(f"evaluate_coco: proposal_nums for '{t}' must have 3 values (COCOeval's maxDets), "
                             f"got {proposal_nums}")
        ev = run_cocoeval(coco_gt, results_to_coco(coco_gt, results, t), t, proposal_nums)
        for name, value in zip(COCO_METRIC_NAMES, ev.stats[:6]):
            metrics[f"{t}/{name}"] = float(value)
        if classwise:
            precision = ev.eval["precision"]  # (iou thrs, recall thrs, categories, areas, max dets)
            for k, cat_id in enumerate(ev.params.catIds):
                p = precision[:, :, k, 0, -1]
                p = p[p > -1]
                name = coco_gt.loadCats(int(cat_id))[0]["name"]
                metrics[f"{t}/AP_{name}"] = float(p.mean()) if p.size else float("nan")
    return metrics


def format_coco_table(metrics: dict[str, float]) -> str:
    """A plain-text table of :func:`evaluate_coco` metrics: one row per iou type, then per-class AP if present."""
    types = list(dict.fromkeys(k.split("/", 1)[0] for k in metrics))
    lines = []
    for t in types:
        keys = [k for k in metrics if k.startswith(t + "/")]
        main = [k for k in keys if not k.split("/", 1)[1].startswith("AP_")]
        per_class = [k for k in keys if k not in main]
        if main:
            names = [k.split("/", 1)[1] for k in main]
            widths = [max(len(n), 6) for n in names]
            lines.append(f"{t:<9}" + " ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
            lines.append(f"{'':<9}" + " ".join(f"{metrics[k]:>{w}.3f}" for k, w in zip(main, widths)))
        if per_class:
            names = [k.split("/", 1)[1][3:] for k in per_class]
            width = max(len(n) for n in names)
            lines.append(f"{t} AP per class:")
            lines.extend(f"  {n:<{width}}  {metrics[k]:.3f}" for n, k in zip(names, per_class))
    return "\n".join(lines)
