"""``raydet check-data``: read every split of a pipeline, decode every image, report what is there and what is wrong.

Each split (``data.train``, ``data.val``, ``data.test``; splits with the same dataset config are read once) is built
as training builds it, but with ``on_error: skip`` for readers that take it, so every problem of the annotations is
counted instead of stopping at the first ones (:attr:`raydet.data.DetectionDataset.problems`). Then every kept
image is decoded with the dataset's own decoder (``dataset.image_loader()``, i.e. :func:`raydet.data.read_image`
for files) in a thread pool, and its size compared with the annotations'.

The report per split: images (and how many have no box), image sizes, boxes / ignored boxes / images per class, a
histogram of box sizes (``sqrt(w * h)`` in pixels of the annotations; COCO's small / medium / large split at 32 and
96), and the problems by kind with the first record of each kind named. A split left with no usable image reports
the problems that dropped its images (and the reason it cannot be read); a split that cannot be read at all (a
missing annotation file) is one problem of kind ``unreadable``.

The pipeline is checked first, every section but the model (:func:`raydet.commands.validation.validate_pipeline`):
a mistake in it (a bad ``on_error`` or ``exif_orientation`` value, an unknown key) is a ConfigError, not a data
problem. Two splits with
different configs may read the same annotation records (e.g. ``data.val`` and ``data.test`` on one file with other
transforms): each split lists its problems, the later one says how many it shares with the earlier, and the total
counts each distinct problem once.
"""
from __future__ import annotations

import collections
import inspect
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from raydet.data.datasets import CorruptImageError, ImageSizeMismatchError, NoUsableImagesError
from raydet.data.image_io import size_text
from raydet.registry import REGISTRY, ConfigError, build, build_context

__all__ = ["SIZE_BINS", "SplitReport", "check_pipeline", "summarize_dataset", "decode_problems", "format_report",
           "default_workers", "distinct_problems"]

SPLITS = ("train", "val", "test")
SIZE_BINS = (0, 8, 16, 32, 64, 96, 128, 256, 512, float("inf"))  # edges of the box-size histogram, pixels


@dataclass
class SplitReport:
    """What :func:`check_pipeline` found in one dataset config (one or more splits)."""

    splits: list[str]
    dataset: str = ""                       # the dataset's repr (type, source, counts)
    classes: list[str] = field(default_factory=list)
    cat_ids: list[int] = field(default_factory=list)
    images: int = 0
    images_without_boxes: int = 0
    image_sizes: dict = field(default_factory=dict)          # (height, width) -> number of images
    boxes_per_class: list[int] = field(default_factory=list)  # non-ignored boxes, per label
    ignored_per_class: list[int] = field(default_factory=list)
    images_per_class: list[int] = field(default_factory=list)
    size_histogram: list[int] = field(default_factory=list)   # non-ignored boxes per SIZE_BINS bin
    problems: dict[str, int] = field(default_factory=dict)    # kind -> count
    first: dict[str, str] = field(default_factory=dict)       # kind -> the first problem's message
    messages: list[tuple[str, str]] = field(default_factory=list)  # every (kind, message)
    shared: dict[str, int] = field(default_factory=dict)      # earlier split(s) -> problems also reported there
    error: str = ""                                           # why no dataset could be built ("": it was)

    @property
    def num_problems(self) -> int:
        return sum(self.problems.values())

    def add_problem(self, kind: str, message: str) -> None:
        self.problems[kind] = self.problems.get(kind, 0) + 1
        self.first.setdefault(kind, message)
        self.messages.append((kind, message))

    def add_reader_problems(self, problems) -> None:
        """Add what a reader's ``on_error="skip"`` dropped (:attr:`raydet.data.DetectionDataset.problems`)."""
        for kind, message in problems.all:
            self.add_problem(kind, message)


def summarize_dataset(dataset, report: SplitReport) -> None:
    """Fill ``report``'s counts from ``dataset.records`` (labels index ``dataset.classes``)."""
    num = len(dataset.classes)
    report.dataset, report.classes, report.cat_ids = repr(dataset), list(dataset.classes), list(dataset.cat_ids)
    boxes = np.zeros(num, np.int64)
    ignored = np.zeros(num, np.int64)
    images = np.zeros(num, np.int64)
    sizes: collections.Counter = collections.Counter()
    without = 0
    side = []
    for rec in dataset.records:
        labels = np.asarray(rec["labels"], np.int64).reshape(-1)
        ignore = np.asarray(rec.get("ignore", np.zeros(len(labels), bool)), bool).reshape(-1)
        xyxy = np.asarray(rec["boxes"], np.float64).reshape(-1, 4)[~ignore]
        boxes += np.bincount(labels[~ignore], minlength=num)
        ignored += np.bincount(labels[ignore], minlength=num)
        images += np.bincount(np.unique(labels[~ignore]), minlength=num)
        without += int(not (~ignore).any())
        sizes[(int(rec["height"]), int(rec["width"]))] += 1
        side.append(np.sqrt(np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)))
    side_all = np.concatenate(side) if side else np.zeros(0)
    hist, _ = np.histogram(side_all, bins=np.asarray(SIZE_BINS))
    report.images, report.images_without_boxes = len(dataset.records), without
    report.image_sizes = dict(sizes)
    report.boxes_per_class, report.ignored_per_class = boxes.tolist(), ignored.tolist()
    report.images_per_class = images.tolist()
    report.size_histogram = hist.tolist()


def decode_problems(dataset, workers: int = 8) -> list[tuple[str, str]]:
    """Decode every record's image with the dataset's decoder; ``(kind, message)`` per image that fails, in record
    order. Kinds (the readers' names): ``bad_image_file`` (missing / unreadable file), ``corrupt_image`` (corrupt,
    truncated, not an image), ``image_size_mismatch`` (decoded size differs from the annotations')."""
    loader = dataset.image_loader()

    def check(rec: dict) -> tuple[str, str] | None:
        who = f"image id {rec['image_id']}" + (f" (file_name {rec['file_name']!r})" if rec.get("file_name") else "")
        try:
            image = loader(rec)
        except (OSError, ValueError) as exc:
            why = str(exc).removeprefix(f"image id {rec['image_id']}: ")  # read_image names the id too
            kind = ("image_size_mismatch" if isinstance(exc, ImageSizeMismatchError) else
                    "corrupt_image" if isinstance(exc, CorruptImageError) else "bad_image_file")
            return kind, f"{who}: {why}"
        h, w = image.shape[:2]
        if (h, w) != (int(rec["height"]), int(rec["width"])):
            return "image_size_mismatch", (f"{who}: the decoded image is {size_text(h, w)} but the annotations "
                                           f"say {size_text(rec['height'], rec['width'])}")
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # OpenCV decodes without the GIL
        found = list(pool.map(check, dataset.records))
    return [f for f in found if f is not None]


def _read_split(cfg, spec: dict, where: str):
    """Build one dataset config with ``on_error: skip`` where the reader takes it (the pipeline's own value has
    been validated). A data problem (the reader's ValueError) -> (None, the exception); a pipeline mistake
    (unknown key or type) raises ConfigError."""
    spec = dict(spec)
    factory = REGISTRY.get(spec.get("type"))
    if factory is not None and "on_error" in inspect.signature(factory).parameters:
        spec["on_error"] = "skip"
    with build_context(file=cfg.path, origins=cfg.origins), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the skip summary: counted in dataset.problems instead
        try:
            return build(spec, where), None
        except ConfigError as exc:
            if exc.__cause__ is None or isinstance(exc.__cause__, ConfigError):
                raise
            return None, exc


def check_pipeline(cfg, *, workers: int = 8, decode: bool = True) -> list[SplitReport]:
    """Read (and with ``decode``, decode) every split of a loaded pipeline (:class:`raydet.config.Config`).

    Raises ConfigError for a pipeline mistake (:func:`~raydet.commands.validation.validate_pipeline`, before any
    file is read); data problems go into the reports.
    """
    from raydet.commands.validation import validate_pipeline

    sections = validate_pipeline(cfg, model=False)  # the data need no model (a data-only pipeline is checked too)
    groups: list[tuple[list[str], dict]] = []
    for split in SPLITS:
        spec = getattr(sections.data, split)
        if spec is None:
            continue
        spec = dict(spec)
        if sections.data.num_classes is not None:
            spec.setdefault("num_classes", sections.data.num_classes)
        same = next((g for g in groups if g[1] == spec), None)
        if same is not None:
            same[0].append(split)
        else:
            groups.append(([split], spec))
    reports = []
    for splits, spec in groups:
        report = SplitReport(splits=splits)
        dataset, error = _read_split(cfg, spec, f"data.{splits[0]}")
        if dataset is None:
            report.error = str(error)
            problems = getattr(error.__cause__, "problems", None)
            if isinstance(error.__cause__, NoUsableImagesError) and problems:
                report.error = f"{error.__cause__.reason} (the problems below dropped them)"
                report.add_reader_problems(problems)  # what dropped the images, reported as any problem
            else:
                report.add_problem("unreadable", str(error.__cause__))
            reports.append(report)
            continue
        problems = getattr(dataset, "problems", None)
        if problems is not None:
            report.add_reader_problems(problems)
        summarize_dataset(dataset, report)
        if decode and spec.get("check_images") != "decode":  # (with "decode" the reader has decoded every image)
            for kind, message in decode_problems(dataset, workers):
                report.add_problem(kind, message)
        reports.append(report)
    _mark_shared(reports)
    return reports


def _mark_shared(reports: list[SplitReport]) -> None:
    """Fill each report's ``shared``: how many of its problems (same kind and message: the same record of the same
    file) an earlier report already has."""
    seen: dict[tuple[str, str], str] = {}
    for r in reports:
        name = ", ".join(f"data.{s}" for s in r.splits)
        for key in r.messages:
            if key in seen and seen[key] != name:
                r.shared[seen[key]] = r.shared.get(seen[key], 0) + 1
            else:
                seen.setdefault(key, name)


def distinct_problems(reports: list[SplitReport]) -> int:
    """The problems of all reports, each problem that several splits report counted once."""
    return sum(r.num_problems - sum(r.shared.values()) for r in reports)


def _size_label(lo: float, hi: float) -> str:
    return f"{lo:g}+" if hi == float("inf") else f"{lo:g}-{hi:g}"


def format_report(reports: list[SplitReport]) -> str:
    """The plain-text report printed by ``raydet check-data``."""
    lines = []
    for r in reports:
        name = ", ".join(f"data.{s}" for s in r.splits)
        if not r.dataset:
            lines.append(f"{name}: cannot be read" + (f": {r.error}" if r.error and "unreadable" not in r.problems
                                                      else ""))
        else:
            lines.append(f"{name}: {r.dataset}")
            sizes = sorted(r.image_sizes.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{size_text(h, w, words=False)} ({n})" for (h, w), n in sizes[:3]) + (
                ", ..." if len(sizes) > 3 else "")
            lines.append(f"  images: {r.images} ({r.images_without_boxes} without boxes); sizes (width x height): "
                         f"{shown}")
            width = max([len("class")] + [len(c) for c in r.classes])
            lines.append(f"  {'class':<{width}}  {'id':>6}  {'boxes':>8}  {'ignored':>8}  {'images':>7}")
            for c, cid, b, ig, im in zip(r.classes, r.cat_ids, r.boxes_per_class, r.ignored_per_class,
                                         r.images_per_class):
                lines.append(f"  {c:<{width}}  {cid:>6}  {b:>8}  {ig:>8}  {im:>7}")
            lines.append(f"  {'total':<{width}}  {'':>6}  {sum(r.boxes_per_class):>8}  {sum(r.ignored_per_class):>8}")
            lines.append("  box size (sqrt(w*h), px):")
            most = max(r.size_histogram) if r.size_histogram else 0
            for lo, hi, n in zip(SIZE_BINS[:-1], SIZE_BINS[1:], r.size_histogram):
                bar = "#" * (round(40 * n / most) if most else 0)
                lines.append(f"    {_size_label(lo, hi):>8}  {n:>8}  {bar}".rstrip())
        if r.num_problems:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r.problems.items()))
            lines.append(f"  problems: {r.num_problems} ({kinds}); the first of each kind:")
            lines.extend(f"    {k}: {r.first[k]}" for k in sorted(r.problems))
            for other, n in r.shared.items():
                lines.append(f"  {n} of these {r.num_problems} problem(s) are also reported for {other} (the same "
                             f"annotation records): counted once in the total")
        else:
            lines.append("  problems: none")
    total = distinct_problems(reports)
    lines.append(f"check-data: {len(reports)} dataset(s), {sum(r.images for r in reports)} images, "
                 f"{sum(sum(r.boxes_per_class) for r in reports)} boxes, {total} problem(s)")
    return "\n".join(lines)


def default_workers() -> int:
    """Decoding threads: the CPU count, at most 8."""
    return min(8, os.cpu_count() or 1)
