"""The COCO error breakdown (Hoiem et al. 2012, as the COCO API's ``analyze()`` and MMDetection's
``coco_error_analysis.py`` draw it): precision-recall curves of one result set under seven settings, each forgiving
one more kind of error than the one before.

* ``C75``, ``C50``: PR at IoU 0.75 and 0.5 (COCOeval);
* ``Loc``: PR at IoU 0.1: localization errors (a detection on the right object, badly placed) are forgiven;
* ``Sim``: also forgiving confusions with classes of the same supercategory: for class c, only c's detections are
  scored, and the ground truth of the other classes of c's supercategory becomes crowd (ignored) regions of class c,
  so a detection on them is neither right nor wrong;
* ``Oth``: the same with every other class (all class confusions forgiven);
* ``BG``: also forgiving false positives on background: precision 1 wherever ``Oth`` has any precision (up to the
  recall ``Oth`` reaches);
* ``FN``: also forgiving the remaining misses: precision 1 at every recall.

AP of a setting is the mean of its interpolated precision over COCOeval's 101 recall thresholds, at 100 detections
per image, per area range (all, small, medium, large). A class without ground truth in an area range has no
curve there (NaN), and the all-class curve averages the classes that have one, as COCOeval's summary does
(MMDetection counts them as 0). Categories without a ``supercategory`` (missing or empty) have no similar
classes: their ``Sim`` equals their ``Loc``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from raydet.evaluation.coco import quiet_pycocotools

__all__ = ["ERROR_TYPES", "AREAS", "ERROR_COLORS", "ErrorBreakdown", "coco_error_breakdown", "plot_error_breakdown"]

ERROR_TYPES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
AREAS = ("all", "small", "medium", "large")   # COCOeval's area ranges, in its order
# Band colours, bottom (C75) to top (FN): the COCO analysis figure's white / blue / red / green / purple / orange,
# with C75 and C50 in two greys so that both bands show.
ERROR_COLORS = ((0.92, 0.92, 0.92), (0.75, 0.75, 0.75), (0.31, 0.51, 0.74), (0.75, 0.31, 0.30),
                (0.36, 0.90, 0.38), (0.50, 0.39, 0.64), (1.00, 0.60, 0.00))


@dataclass
class ErrorBreakdown:
    """Interpolated precision of each setting.

    Attributes:
        precision: float (7, R, K, 4): ERROR_TYPES x recall thresholds x classes x AREAS; NaN where a class has no
            ground truth in the area range.
        recall_thresholds: (R,) COCOeval's recall thresholds (0, 0.01, ..., 1).
        cat_ids, class_names: the K classes, in the dataset's label order.
        iou_type: "bbox" or "segm".
    """

    precision: np.ndarray
    recall_thresholds: np.ndarray
    cat_ids: list[int]
    class_names: list[str]
    iou_type: str = "bbox"

    def ap(self, error_type: str, area: str = "all", class_index: int | None = None) -> float:
        """AP of one setting: mean precision over the recall thresholds (and over the classes with ground truth when
        ``class_index`` is None); NaN when there is no ground truth."""
        p = self.precision[ERROR_TYPES.index(error_type), :, :, AREAS.index(area)]
        p = p if class_index is None else p[:, class_index]
        p = p[~np.isnan(p)]
        return float(p.mean()) if p.size else float("nan")

    def curve(self, error_type: str, area: str = "all", class_index: int | None = None) -> np.ndarray:
        """(R,) precision at each recall threshold (the mean over classes with ground truth when ``class_index`` is
        None); NaN when there is no ground truth."""
        p = self.precision[ERROR_TYPES.index(error_type), :, :, AREAS.index(area)]
        if class_index is not None:
            return p[:, class_index].copy()
        valid = ~np.isnan(p[0])
        return p[:, valid].mean(axis=1) if valid.any() else np.full(p.shape[0], np.nan)

    def table(self) -> dict:
        """``{area: {error type: AP}}`` over all classes, then ``{class name: {area: {error type: AP}}}``;
        NaN as None (JSON-ready)."""
        def clean(v: float):
            return None if np.isnan(v) else float(v)

        out = {"all_classes": {a: {t: clean(self.ap(t, a)) for t in ERROR_TYPES} for a in AREAS}, "per_class": {}}
        for k, name in enumerate(self.class_names):
            out["per_class"][name] = {a: {t: clean(self.ap(t, a, k)) for t in ERROR_TYPES} for a in AREAS}
        return out


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with quiet_pycocotools():
        coco.createIndex()
    return coco


def _precision(coco_gt: COCO, coco_dt: COCO, iou_type: str, iou_thrs: list[float], cat_ids: list[int],
               max_det: int) -> np.ndarray:
    """COCOeval's interpolated precision (T, R, K, A) at one maxDets, -1 -> NaN."""
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    ev.params.imgIds = sorted(coco_gt.getImgIds())
    ev.params.catIds = list(cat_ids)
    ev.params.iouThrs = np.asarray(iou_thrs, np.float64)
    ev.params.maxDets = [max_det]
    with quiet_pycocotools():
        ev.evaluate()
        ev.accumulate()
    p = np.asarray(ev.eval["precision"][..., 0], np.float64)
    p[p == -1] = np.nan
    return p


def _forgiving(coco_gt: COCO, cat_id: int, forgive) -> COCO:
    """The ground truth with every annotation of a category ``forgive(category id)`` accepts turned into a crowd
    (ignored) region of ``cat_id``."""
    anns = []
    for a in coco_gt.dataset["annotations"]:
        if a["category_id"] != cat_id and forgive(a["category_id"]):
            a = {**a, "iscrowd": 1, "ignore": 1, "category_id": cat_id}
        anns.append(a)
    return _coco({**coco_gt.dataset, "annotations": anns})


def coco_error_breakdown(coco_gt: COCO, coco_dt: COCO, iou_type: str = "bbox", *, cat_ids: list[int] | None = None,
                         max_det: int = 100) -> ErrorBreakdown:
    """The seven settings' precision for ``coco_dt`` (detections, e.g. ``coco_gt.loadRes(...)``) against
    ``coco_gt`` (see the module docstring). ``cat_ids``: the classes, in label order (default: the ground truth's
    categories, sorted)."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    cat_ids = sorted(coco_gt.getCatIds()) if cat_ids is None else [int(c) for c in cat_ids]
    main = _precision(coco_gt, coco_dt, iou_type, [0.75, 0.5, 0.1], cat_ids, max_det)  # (3, R, K, A)
    R, K, A = main.shape[1:]
    precision = np.full((len(ERROR_TYPES), R, K, A), np.nan)
    precision[:3] = main
    cats = {c["id"]: c for c in coco_gt.dataset["categories"]}
    dt_anns = coco_dt.dataset.get("annotations", [])
    for k, cat in enumerate(cat_ids):
        dt_k = _coco({**coco_dt.dataset, "annotations": [a for a in dt_anns if a["category_id"] == cat]})
        supercategory = cats.get(cat, {}).get("supercategory") or None

        def similar(c: int) -> bool:
            return supercategory is not None and cats.get(c, {}).get("supercategory") == supercategory

        for row, forgive in ((3, similar), (4, lambda c: True)):
            precision[row, :, k] = _precision(_forgiving(coco_gt, cat, forgive), dt_k, iou_type, [0.1], [cat],
                                              max_det)[0, :, 0]
    valid = ~np.isnan(precision[0])
    precision[5] = np.where(valid, (np.nan_to_num(precision[4]) > 0).astype(np.float64), np.nan)
    precision[6] = np.where(valid, 1.0, np.nan)
    names = [cats[c]["name"] if c in cats else str(c) for c in cat_ids]
    return ErrorBreakdown(precision, np.asarray(Params(iouType=iou_type).recThrs), cat_ids, names, iou_type)


def plot_error_breakdown(breakdown: ErrorBreakdown, path: str, class_index: int | None = None) -> dict:
    """One PNG with a panel per area range: the seven PR curves stacked as bands, C75 at the bottom and FN at the
    top, each labelled ``[AP] setting`` in the legend (upper right; all classes, or the class ``class_index``).

    Returns ``{area: (left, top, right, bottom)}``: each panel's plot area in pixels of the PNG (columns, rows from
    the top), where recall 0..1 runs left to right and precision 0..1 bottom to top."""
    from matplotlib.figure import Figure

    name = "all classes" if class_index is None else breakdown.class_names[class_index]
    rs = breakdown.recall_thresholds
    fig = Figure(figsize=(11, 9), dpi=100)  # no pyplot: no global state, no display
    axes = fig.subplots(2, 2)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.96, wspace=0.18, hspace=0.25)  # (tight_layout: slow)
    for ax, area in zip(axes.ravel(), AREAS):
        ax.set_title(f"{breakdown.iou_type} {name}: {area}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        curves = [breakdown.curve(t, area, class_index) for t in ERROR_TYPES]
        if np.isnan(curves[0]).all():
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
            continue
        below = np.zeros_like(rs)
        for t, curve, color in zip(ERROR_TYPES, curves, ERROR_COLORS):
            ap = breakdown.ap(t, area, class_index)
            ax.fill_between(rs, below, curve, color=color, label=f"[{ap:.3f}] {t}", linewidth=0)
            ax.plot(rs, curve, color="k", linewidth=0.5)
            below = curve
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], loc="upper right", fontsize=8)  # FN on top, as the bands
    fig.savefig(path, format="png")
    height = fig.bbox.height
    return {area: (ax.bbox.x0, height - ax.bbox.y1, ax.bbox.x1, height - ax.bbox.y0)
            for area, ax in zip(AREAS, axes.ravel())}
