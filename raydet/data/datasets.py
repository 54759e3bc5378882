"""Dataset readers: COCO json, Pascal VOC xml and the synthetic shapes, producing records (raydet.structures).

Every reader validates its annotations and reports each problem with the file and the record it concerns
(image id, annotation id, file name). ``on_error="fail"`` (default) raises one ValueError listing the first
problems and the count; ``on_error="skip"`` drops the bad annotation (or the whole image when the image entry
itself is bad) and emits a single warning with the counts per kind of problem and the first examples. Nothing
is dropped silently.

Images are decoded lazily (:func:`raydet.data.image_io.read_image`): readers only hold records, so a dataset object
is cheap to ship to Ray Data actors. ``image_loader()`` returns the small picklable callable that decodes one
record's image; :meth:`DetectionDataset.load_image` uses it. When the annotations are read, each image's header is
looked at (``check_images``) and the EXIF orientation its decoders apply is stored in the record
(``exif_orientation``, see :mod:`raydet.data.image_io`).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from raydet import fileio
from raydet.masks import valid_polygons, valid_polygons_many
from raydet.registry import register

from .image_io import (CorruptImageError, ImageSizeMismatchError, check_exif_orientation, image_file_ends,
                       image_file_problem, read_image, read_image_header, resolve_orientation, size_text)
from .pipeline import build_transforms
from .proposals import attach_proposals
from .record_table import RecordTable
from .seg_maps import check_seg_maps, seg_map_path
from .transforms import Transform

__all__ = ["DetectionDataset", "CocoDataset", "VOCDataset", "SyntheticShapesDataset", "VOC_CLASSES", "read_image",
           "read_json", "load_json", "ImageFileLoader", "SyntheticImageLoader", "CorruptImageError",
           "ImageSizeMismatchError", "image_file_problem", "check_image_files", "NoUsableImagesError", "gc_paused"]

logger = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")

_ON_ERROR = ("fail", "skip")
# The readers' settings with a fixed set of values, as type hints: a pipeline's bad value is a ConfigError naming
# the key when the pipeline is checked (raydet.registry.check), before any file is read.
OnError = Literal["fail", "skip"]
CheckImages = bool | Literal["decode"]
ExifOrientation = Literal["auto", "apply", "ignore"]
_CLIP_TOLERANCE = 1.0  # boxes may stick out of the image by at most this many pixels (then they are clipped)
_MAX_EXAMPLES = 5


# ----------------------------------------------------------------------------------------------------------
# Image files (reading them: raydet.data.image_io).

def _check_check_images(check_images) -> None:
    if not (isinstance(check_images, bool) or check_images == "decode"):
        raise ValueError(f"check_images must be true, false or 'decode', got {check_images!r}")


def check_image_files(records: list[dict], problems: _Problems, describe, exif_orientation: str = "auto",
                      check: str = "header", threads: int = 16) -> list[dict]:
    """Look at each record's image file when the annotations are read: drop the unusable ones (each reported to
    ``problems`` with ``describe(record)``) and store in each kept record the EXIF orientation its decoders apply
    (``record["orientation"]``, 1-8, decided by :func:`~raydet.data.image_io.resolve_orientation` from the header
    and the record's height and width).

    ``check``: ``"header"``: the first and last bytes (:func:`image_file_problem`) and the header's size and EXIF
    orientation (Pillow, no pixel decoding; threads, the work is I/O); ``"decode"``: also a full strict decode of
    every image (:func:`read_image`), which finds damaged data before training starts. Problem kinds:
    ``bad_image_file``, ``image_size_mismatch`` (the size fits no frame ``exif_orientation`` allows),
    ``corrupt_image`` (found by decoding). Images in a bucket (URIs) get one request for their first and last bytes
    (:func:`~raydet.data.image_io.image_file_ends`) and at least 64 threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    def probe(record: dict) -> tuple[str | None, str, int, int]:
        """(problem kind or None, message, orientation to apply, the header's orientation)."""
        path = record["img_path"]
        ends = image_file_ends(path)  # None for a local file
        why = image_file_problem(path, ends)
        if why is not None:
            return "bad_image_file", f"{why}: {path}", 1, 1
        try:
            header = read_image_header(path, head=ends[0] if ends else None)
        except OSError as exc:
            return "bad_image_file", str(exc), 1, 1
        try:
            orientation = resolve_orientation(exif_orientation, header, (record["height"], record["width"]), path)
        except ImageSizeMismatchError as exc:
            return "image_size_mismatch", str(exc), 1, header.orientation
        if check == "decode":
            try:
                read_image(path, orientation=orientation)
            except OSError as exc:
                return "corrupt_image", str(exc), 1, header.orientation
        return None, "", orientation, header.orientation

    if check == "decode":
        threads = max(1, min(threads, os.cpu_count() or 1))  # decoders release the GIL: one thread per CPU
    elif any(fileio.is_uri(r["img_path"]) for r in records[:1]):
        threads = max(threads, 64)  # requests to a bucket: waiting, not work
    # Pillow's notes on odd EXIF data or large images are not problems here: quiet them for the pool, from this
    # thread only (catch_warnings swaps process-wide state; entered from several threads it loses the caller's)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool:
        warnings.simplefilter("ignore")
        found = list(pool.map(probe, records))
    kept, rotated, as_stored = [], 0, 0
    for record, (kind, why, orientation, tagged) in zip(records, found):
        if kind is not None:
            problems.add(kind, f"{describe(record)}: {why} (image dropped)")
            continue
        record["orientation"] = orientation
        kept.append(record)
        if tagged != 1:
            rotated += orientation != 1
            as_stored += orientation == 1
    if rotated or as_stored:
        logger.info("%s: %s an EXIF orientation (exif_orientation=%s): %s upright, %s as stored", problems.source,
                    _count(rotated + as_stored, "image carries", "images carry"), exif_orientation,
                    _count(rotated, "is used", "are used"), _count(as_stored, "is used", "are used"))
    return kept


def _count(n: int, singular: str, plural: str) -> str:
    """``"1 image is"`` / ``"2 images are"``: ``n`` and the words that agree with it."""
    return f"{n} {singular if n == 1 else plural}"


class ImageFileLoader:
    """Picklable ``record -> image``: decodes ``record["img_path"]`` with :func:`read_image`, applying
    ``record["orientation"]`` (decided when the annotations were read), else resolving ``exif_orientation`` from the
    file's header and the record's height and width (readers built with ``check_images=False``)."""

    def __init__(self, exif_orientation: str = "auto"):
        self.exif_orientation = check_exif_orientation(exif_orientation)

    def __call__(self, record: dict) -> np.ndarray:
        return read_image(record["img_path"], record.get("image_id"),
                          record.get("orientation") or self.exif_orientation,
                          size=(int(record["height"]), int(record["width"])))


class SyntheticImageLoader:
    """Picklable ``record -> image`` for :class:`SyntheticShapesDataset`: regenerates the image from its id."""

    def __init__(self, height: int, width: int, max_objects: int, seed: int):
        self.height, self.width, self.max_objects, self.seed = height, width, max_objects, seed

    def __call__(self, record: dict) -> np.ndarray:
        from .synthetic import make_shape_sample

        return make_shape_sample(int(record["image_id"]), self.height, self.width, self.max_objects,
                                 seed=self.seed)[0]


# ----------------------------------------------------------------------------------------------------------
# Problem collection and the on_error policy.

class _Problems:
    """Problems found while reading one source; counted per kind, with the first messages kept (``examples``: the
    first few of any kind; ``first``: kind -> its first message; ``all``: every ``(kind, message)``)."""

    def __init__(self, source: str):
        self.source = source
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[str] = []
        self.first: dict[str, str] = {}
        self.all: list[tuple[str, str]] = []  # every (kind, message), in the order found

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        self.all.append((kind, message))
        self.first.setdefault(kind, message)
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{kind}: {message}")

    def __bool__(self) -> bool:
        return bool(self.counts)

    def _summary(self) -> str:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        first = "\n".join(f"  - {m}" for m in self.examples)
        return f"{sum(self.counts.values())} problem(s) ({kinds}); first:\n{first}"

    def resolve(self, on_error: str) -> None:
        if not self:
            return
        if on_error == "fail":
            raise ValueError(f"{self.source}: {self._summary()}\n(set on_error='skip' to drop the bad entries "
                             f"with a warning)")
        warnings.warn(f"{self.source}: skipped {self._summary()}", UserWarning, stacklevel=4)


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector in this block (then restore it as it was).

    Reading a large annotation file creates millions of objects, and every automatic collection walks all the
    objects it has promoted so far: on COCO train2017's shape that is about 45 % of the reading time. The objects
    made here hold no reference cycles worth collecting; reference counting frees them as usual.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_on_error(on_error: str) -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"on_error must be one of {_ON_ERROR}, got {on_error!r}")


def _check_boxes(boxes: np.ndarray, height, width) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate (n, 4) xyxy boxes (NaN rows: malformed, not flagged) against image sizes (scalars or (n,)).

    Returns (clipped boxes, outside mask, non-positive mask): boxes sticking out by more than 1 px are
    ``outside``; boxes with x2 <= x1 or y2 <= y1 (after clipping) are ``non-positive``.
    """
    n = len(boxes)
    height = np.broadcast_to(np.asarray(height, np.float64), (n,))
    width = np.broadcast_to(np.asarray(width, np.float64), (n,))
    finite = np.isfinite(boxes).all(axis=1)
    tol = _CLIP_TOLERANCE
    with np.errstate(invalid="ignore"):
        outside = finite & ((boxes[:, 0] < -tol) | (boxes[:, 1] < -tol) | (boxes[:, 2] > width + tol)
                            | (boxes[:, 3] > height + tol))
        clipped = boxes.copy()
        clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width[:, None])
        clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height[:, None])
        nonpos = finite & ~outside & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    return clipped, outside, nonpos


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _read_segmentation(seg, height: int, width: int, checked=None) -> tuple[Any, str | None]:
    """A COCO segmentation as records hold it (an RLE dict as it is; polygons as their
    :func:`~raydet.masks.valid_polygons`), and why it is not usable (None when it is). ``checked``: for polygons,
    what :func:`~raydet.masks.valid_polygons_many` found for ``seg`` (its valid polygons or its ValueError)."""
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if size is None or counts is None:
            return seg, f"RLE needs 'size' and 'counts', got keys {sorted(seg)}"
        if not isinstance(size, (list, tuple)) or [int(s) if _is_int(s) else s for s in size] != [height, width]:
            return seg, f"RLE size {size} does not match the image size [{height}, {width}]"
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return seg, f"uncompressed RLE counts must be non-negative ints summing to {height * width}"
        elif not isinstance(counts, (str, bytes)):
            return seg, f"RLE counts must be a string or a list of ints, got {type(counts).__name__}"
        return seg, None
    if not isinstance(seg, list) or not seg:
        return seg, f"expected a non-empty list of polygons or an RLE dict, got {type(seg).__name__}"
    try:  # the one rule of raydet.masks, shared with training and evaluation
        usable = valid_polygons(seg) if checked is None else checked
        if isinstance(usable, ValueError):
            raise usable
    except ValueError as exc:
        return seg, str(exc)
    if not usable:
        return seg, "no polygon encloses an area (3 or more points, not all on one line)"
    return usable, None


# ----------------------------------------------------------------------------------------------------------

class NoUsableImagesError(ValueError):
    """A reader kept no image. ``reason``: the message's first part (the source, ``no usable images`` and whether
    ``filter_empty_gt`` dropped the last ones); ``problems``: what ``on_error="skip"`` dropped while reading
    (counts per kind, the first messages, every message), or None; ``raydet check-data`` reports them as any other
    problems."""

    def __init__(self, message: str, problems=None, reason: str = ""):
        super().__init__(message)
        self.problems, self.reason = problems, reason or message


class DetectionDataset:
    """Common API of the readers.

    Attributes:
        records: the record dicts (raydet.structures), plus ``img_path`` (absolute image path) for file-based
            datasets, packed into a :class:`~raydet.data.record_table.RecordTable` once read (``records[i]`` is a
            new dict; slices and index arrays are views; a list of dicts works everywhere a table does).
        classes: tuple of class names; label ``i`` is ``classes[i]``.
        cat_ids: list, label index -> the dataset's category id.
        pipeline: the transform configs (or built transforms) applied to each image.
        with_masks: whether records carry instance masks and the pipeline keeps them.
    """

    records: RecordTable | list[dict]
    classes: tuple[str, ...]
    cat_ids: list[int]
    pipeline: list
    with_masks: bool = False
    filter_empty_gt: bool = False
    sources: str = ""
    problems = None  # what on_error="skip" dropped while reading: counts per kind, first messages (or None)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.sources}: {len(self)} images, {len(self.classes)} classes, "
                f"masks={self.with_masks})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_loader(self):
        """A small picklable ``record -> uint8 (h, w, 3) RGB`` callable (what Ray Data actors receive)."""
        return ImageFileLoader(getattr(self, "exif_orientation", "auto"))

    def load_image(self, record: dict) -> np.ndarray:
        """Decode one record's image (uint8 (h, w, 3) RGB)."""
        return self.image_loader()(record)

    def coco_gt(self):
        """pycocotools ``COCO`` ground truth of the kept records (for COCO-style evaluation)."""
        if getattr(self, "_coco_gt", None) is None:
            from raydet.evaluation import coco_from_records

            self._coco_gt = coco_from_records(self.records, list(self.classes), self.cat_ids)
        return self._coco_gt

    def _set_pipeline(self, pipeline) -> None:
        build_transforms(pipeline)  # report a bad pipeline when the dataset is built, not in a Ray actor
        self.pipeline = list(pipeline or [])

    def _finish(self, records: list[dict]) -> None:
        """Apply ``filter_empty_gt``, refuse an empty dataset, pack the records into a :class:`RecordTable`."""
        if self.filter_empty_gt:
            kept = [r for r in records if (~np.asarray(r["ignore"], bool)).any()]
            if len(kept) != len(records):
                logger.info("%s: filter_empty_gt dropped %d of %d images without non-ignored boxes",
                            self.sources, len(records) - len(kept), len(records))
            records = kept
        if not records:
            reason = f"{self.sources}: no usable images" + (" after filter_empty_gt" if self.filter_empty_gt else "")
            problems, extra = self.problems, ""
            if problems:  # on_error="skip" dropped them: say why, and keep the problems for the caller
                kinds = ", ".join(f"{k}: {n}" for k, n in sorted(problems.counts.items()))
                extra = (f"; {sum(problems.counts.values())} problem(s) dropped images or annotations ({kinds}); "
                         f"first: {problems.examples[0]}")
            raise NoUsableImagesError(reason + extra, problems, reason)
        with gc_paused():  # packing makes ~1 million small objects at COCO's size, none in a cycle
            self.records = RecordTable.from_records(records)


def _check_num_classes(num_classes: int | None, classes: Sequence[str], source: str) -> None:
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"{source}: num_classes={num_classes} but the dataset has {len(classes)} classes "
                         f"({', '.join(classes)})")


def _class_names(classes, owner: str) -> tuple[str, ...] | None:
    """``classes`` as a tuple of names (None stays None). A string is refused, not split into its letters."""
    if classes is None:
        return None
    if isinstance(classes, str):
        raise ValueError(f"{owner}: classes must be a list of class names, got the string {classes!r} "
                         f"(for one class write [{classes!r}])")
    classes = tuple(classes)
    bad = [c for c in classes if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"{owner}: classes must be non-empty strings, got {bad[0]!r} in {list(classes)}")
    return classes


# ----------------------------------------------------------------------------------------------------------
# COCO

def read_json(path: str, what: str = "annotation file"):
    """The parsed contents of a JSON file (a local path or a URI, :mod:`raydet.fileio`); a missing, unreadable or
    malformed file is a ValueError naming it and ``what`` it is (``annotation file``, ``results file``), and for a
    URI whether its bucket exists."""
    try:
        if fileio.is_uri(path):
            return json.loads(fileio.read_text(path))
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        reason = f" ({exc.reason})" if isinstance(exc, fileio.StorageNotFoundError) else ""
        raise ValueError(f"{path}: {what} not found{reason}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        message = str(exc).removeprefix(f"{path}: ")  # a StorageError names the URI already
        raise ValueError(f"{path}: cannot read the {what}: {message}") from None


def load_json(path: str) -> dict:
    """A COCO annotation file's top-level object (:func:`read_json`), checked to hold ``images`` and
    ``categories`` lists."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO json object with 'images', 'annotations', 'categories', "
                         f"got a {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing or invalid '{key}' list")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    return data


def _box_array(bboxes: list) -> tuple[np.ndarray, np.ndarray]:
    """COCO bbox entries -> float64 (n, 4) xywh and a malformed mask (rows that are not 4 finite numbers: NaN)."""
    n = len(bboxes)
    try:
        arr = np.asarray(bboxes, dtype=np.float64)
        if arr.shape == (n, 4):
            bad = ~np.isfinite(arr).all(axis=1)
            arr[bad] = np.nan
            return arr.reshape(n, 4), bad
    except (TypeError, ValueError):
        pass
    arr = np.full((n, 4), np.nan)
    for i, bb in enumerate(bboxes):
        if (isinstance(bb, (list, tuple)) and len(bb) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bb)):
            arr[i] = bb
    bad = ~np.isfinite(arr).all(axis=1)
    arr[bad] = np.nan
    return arr, bad


@register
class CocoDataset(DetectionDataset):
    """COCO-format json (boxes, optional instance masks).

    Args:
        ann_file: the annotation json.
        img_prefix: folder that ``file_name`` of each image is relative to.
        pipeline: transform configs for each image (see raydet.data.transforms).
        filter_empty_gt: drop images without any non-ignored box (training); the count is logged at info level.
        with_masks: keep segmentations (polygons / RLE) in ``records[i]["masks"]``.
        num_classes: if given, must equal the number of (selected) categories.
        classes: select these categories by name, label ``i`` = ``classes[i]``; annotations of other categories
            are dropped (counted, logged at info level). Default: every category, labels in sorted-id order.
        on_error: ``"fail"`` or ``"skip"`` (see the module docstring).
        check_images: ``true`` (default): look at every image file's first and last bytes and its header when
            reading (missing, empty, not an image, truncated JPEG, a size that fits no frame), so such images fail
            (or are skipped) before training starts, not mid-epoch; ``"decode"``: also decode every image in full
            (strict: damaged JPEG data is found too); ``false``: no look (the decoders then resolve
            ``exif_orientation`` and report problems when they meet the image).
        exif_orientation: ``"auto"`` (default), ``"apply"`` or ``"ignore"``: which frame the annotations are in for
            images with an EXIF orientation, see :mod:`raydet.data.image_io`. ``auto`` decides per image from the
            header's size: annotations of the upright size get the rotation applied, those of the stored size keep
            the stored pixels, any other size is an ``image_size_mismatch`` problem naming the file.
        proposal_file: precomputed proposals (:mod:`raydet.data.proposals`, e.g. written by ``raydet test
            --out-proposals``): each record gets ``proposals`` (k, 4), which the transforms move with the image
            (Fast R-CNN). A file without proposals for some kept image, or with proposals of an image id that the
            annotation file does not have, is an error naming the ids.
        num_max_proposals: the best-scored proposals kept per image (MMDetection's ``LoadProposals``; default 2000,
            null: all).
        seg_prefix: a folder of semantic maps, one PNG of class ids per image named like its ``file_name`` with
            ``.png`` (COCO-stuff's ``stuffthingmaps``, for HTC's semantic branch; :mod:`raydet.data.seg_maps`): each
            record gets ``seg_map_path``, and the samples a ``seg_map`` that the transforms move with the image (the
            batch's ``gt_semantic_seg``). With ``check_images``, every map is looked at when the annotations are
            read: a missing map (``missing_seg_map``), an unreadable or multi-channel one (``bad_seg_map``) or one
            whose size is not the image's (``seg_map_size_mismatch``) is a problem naming the map and the image,
            handled by ``on_error``.

    Crowd annotations (``iscrowd=1``, or ``ignore=1``) become ignored boxes. Boxes go from xywh to xyxy; a box
    that sticks out of the image by at most 1 px is clipped, further out it is an error, as is a non-positive
    width or height.
    """

    def __init__(self, ann_file: str, img_prefix: str, pipeline: Sequence[dict | Transform] | None = None,
                 filter_empty_gt: bool = False, with_masks: bool = False, num_classes: int | None = None,
                 classes: Sequence[str] | None = None, on_error: OnError = "fail", check_images: CheckImages = True,
                 exif_orientation: ExifOrientation = "auto", proposal_file: str | None = None,
                 num_max_proposals: int | None = 2000, seg_prefix: str | None = None):
        _check_on_error(on_error)
        _check_check_images(check_images)
        self.exif_orientation = check_exif_orientation(exif_orientation)
        self.seg_prefix = str(seg_prefix) if seg_prefix else None
        classes = _class_names(classes, f"CocoDataset({ann_file})")
        self.ann_file, self.img_prefix = str(ann_file), str(img_prefix)
        self.sources = self.ann_file
        self.filter_empty_gt, self.with_masks, self.on_error = filter_empty_gt, with_masks, on_error
        self._set_pipeline(pipeline)
        with gc_paused():  # a COCO-sized file is millions of objects (see gc_paused)
            data = load_json(self.ann_file)
            self._read_categories(data["categories"], classes)
            _check_num_classes(num_classes, self.classes, self.ann_file)
            problems = _Problems(self.ann_file)
            images = self._read_images(data["images"], problems)
            records = self._read_annotations(data.get("annotations", []), images, problems)
        describe = lambda r: f"image id {r['image_id']} (file_name {r['file_name']!r})"  # noqa: E731
        if self.seg_prefix:
            for r in records:
                r["seg_map_path"] = seg_map_path(self.seg_prefix, r["file_name"])
        if check_images:
            records = check_image_files(records, problems, describe, self.exif_orientation,
                                        "decode" if check_images == "decode" else "header")
            if self.seg_prefix:
                records = check_seg_maps(records, problems, describe)
        problems.resolve(on_error)
        self.problems = problems
        self._coco_gt = None
        self.proposal_file = str(proposal_file) if proposal_file else None
        if self.proposal_file:
            attach_proposals(records, self.proposal_file, num_max_proposals, self.ann_file,
                             [im.get("id") for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))])
        del data, images  # the json's objects go before the records are packed (a lower peak at COCO's size)
        self._finish(records)

    # -- categories / images / annotations

    def _read_categories(self, categories: list, classes: Sequence[str] | None) -> None:
        by_id: dict[int, str] = {}
        for i, c in enumerate(categories):
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise ValueError(f"{self.ann_file}: categories[{i}] needs an integer 'id' and a string 'name', "
                                 f"got {c!r}")
            if c["id"] in by_id:
                raise ValueError(f"{self.ann_file}: duplicate category id {c['id']} "
                                 f"('{by_id[c['id']]}' and '{c['name']}')")
            by_id[int(c["id"])] = c["name"]
        self.all_cat_ids = set(by_id)
        if classes is None:
            self.cat_ids = sorted(by_id)
        else:
            by_name: dict[str, int] = {}
            for cid, name in by_id.items():
                by_name.setdefault(name, cid)
            missing = [c for c in classes if c not in by_name]
            if missing:
                raise ValueError(f"{self.ann_file}: classes {missing} are not categories of this file "
                                 f"(available: {', '.join(by_name)})")
            if len(set(classes)) != len(classes):
                raise ValueError(f"{self.ann_file}: classes contains duplicates: {list(classes)}")
            self.cat_ids = [by_name[c] for c in classes]
        if not self.cat_ids:
            raise ValueError(f"{self.ann_file}: no categories")
        self.classes = tuple(by_id[c] for c in self.cat_ids)
        self.cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}

    def _read_images(self, images: list, problems: _Problems) -> dict[int, dict]:
        """image id -> image entry, in file order; bad and duplicate entries reported (and dropped)."""
        kept: dict[int, dict] = {}
        self._dropped_image_ids: set = set()
        for i, im in enumerate(images):
            if not isinstance(im, dict):
                problems.add("bad_image", f"images[{i}] is not an object (image dropped)")
                continue
            iid, name = im.get("id"), im.get("file_name")
            h, w = im.get("height"), im.get("width")
            what = f"image id {iid!r} (images[{i}], file_name {name!r})"
            if not _is_int(iid) or iid < 0:
                problems.add("bad_image", f"{what}: 'id' must be a non-negative integer (image dropped)")
                continue
            if iid in kept:
                problems.add("duplicate_image_id", f"{what}: duplicate image id, first used by file_name "
                             f"{kept[iid]['file_name']!r} (later entry dropped)")
                continue
            if not isinstance(name, str) or not name:
                problems.add("bad_image", f"{what}: missing 'file_name' (image and its annotations dropped)")
                self._dropped_image_ids.add(iid)
                continue
            if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
                problems.add("bad_image", f"{what}: height and width must be positive integers, got height {h!r}, "
                             f"width {w!r} (image and its annotations dropped)")
                self._dropped_image_ids.add(iid)
                continue
            kept[iid] = im
        return kept

    def _read_annotations(self, anns: list, images: dict[int, dict], problems: _Problems) -> list[dict]:
        src = self.ann_file
        n = len(anns)
        anns = [a if isinstance(a, dict) else {} for a in anns]
        ann_ids = [a.get("id") for a in anns]
        xywh, malformed = _box_array([a.get("bbox") for a in anns])
        keep = np.ones(n, bool)

        # Per-annotation facts (list comprehensions; the checks on numbers are vectorised below).
        image_ids = [a.get("image_id") for a in anns]
        image_of = [images.get(iid) if _is_int(iid) else None for iid in image_ids]
        cats = [a.get("category_id") for a in anns]
        labels = np.array([self.cat_to_label.get(c, -1) if _is_int(c) else -1 for c in cats], dtype=np.int64)
        heights = np.array([im["height"] if im is not None else 0 for im in image_of], dtype=np.float64)
        widths = np.array([im["width"] if im is not None else 0 for im in image_of], dtype=np.float64)

        def describe(i: int) -> str:
            im = image_of[i]
            name = f", file_name {im['file_name']!r}" if im is not None else ""
            return f"annotation id {ann_ids[i]!r} (annotations[{i}], image id {image_ids[i]!r}{name})"

        def reject(mask: np.ndarray, kind: str, why) -> None:
            nonlocal keep
            for i in np.flatnonzero(mask & keep):
                problems.add(kind, f"{describe(i)}: {why(i) if callable(why) else why} (annotation dropped)")
            keep &= ~mask

        seen: set = set()
        bad_id = np.zeros(n, bool)
        dup_id = np.zeros(n, bool)
        for i, aid in enumerate(ann_ids):
            if not _is_int(aid):
                bad_id[i] = True
            elif aid in seen:
                dup_id[i] = True
            else:
                seen.add(aid)
        reject(bad_id, "bad_annotation", "'id' must be an integer")
        reject(dup_id, "duplicate_annotation_id", "duplicate annotation id")
        dropped_image = np.array([iid in self._dropped_image_ids for iid in image_ids], bool)
        reject(dropped_image, "annotation_of_dropped_image", "its image entry is invalid")
        no_image = np.array([im is None for im in image_of], bool)
        reject(no_image, "missing_image", lambda i: f"refers to image id {image_ids[i]!r}, which is not in 'images'")
        known = np.array([_is_int(c) and c in self.all_cat_ids for c in cats], bool)
        reject(~known, "unknown_category", lambda i: f"unknown category id {cats[i]!r}")
        unselected = known & (labels < 0) & keep  # categories left out by `classes`: dropped, logged
        keep &= ~unselected
        if unselected.any():
            logger.info("%s: dropped %d annotations of categories not in `classes`", src, int(unselected.sum()))
        reject(malformed, "malformed_box", lambda i: f"bbox must be 4 finite numbers [x, y, w, h], got "
                                                     f"{anns[i].get('bbox')!r}")
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        with np.errstate(invalid="ignore"):
            nonpos_raw = ~malformed & ((xywh[:, 2] <= 0) | (xywh[:, 3] <= 0))
        reject(nonpos_raw, "nonpositive_box", lambda i: f"bbox {anns[i].get('bbox')} has non-positive size")
        clipped, outside, nonpos = _check_boxes(np.where(keep[:, None], xyxy, np.nan), heights, widths)
        reject(outside, "box_outside_image", lambda i: f"bbox {anns[i].get('bbox')} extends more than "
               f"{_CLIP_TOLERANCE:g} px outside the {size_text(heights[i], widths[i])} image")
        reject(nonpos, "nonpositive_box", lambda i: f"bbox {anns[i].get('bbox')} has no area inside the image")
        segmentations: dict[int, Any] = {}
        if self.with_masks:
            kept = np.flatnonzero(keep).tolist()
            segs = [anns[i].get("segmentation") for i in kept]
            lists = [k for k, s in enumerate(segs) if type(s) is list and s]
            checked = dict(zip(lists, valid_polygons_many([segs[k] for k in lists])))  # all polygons at once
            for k, i in enumerate(kept):
                seg, why = _read_segmentation(segs[k], int(heights[i]), int(widths[i]), checked.get(k))
                if why is not None:
                    problems.add("malformed_segmentation", f"{describe(i)}: segmentation: {why} "
                                 f"(annotation dropped)")
                    keep[i] = False
                else:
                    segmentations[int(i)] = seg

        crowd = np.array([bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)) for a in anns], bool)
        # Group the kept annotations by image, in annotation order.
        by_image: dict[int, list[int]] = collections.defaultdict(list)
        for i in np.flatnonzero(keep):
            by_image[image_ids[i]].append(int(i))
        records = []
        for iid, im in images.items():
            idx = np.asarray(by_image.get(iid, []), dtype=np.int64)
            rec = {
                "image_id": int(iid),
                "file_name": im["file_name"],
                "height": int(im["height"]),
                "width": int(im["width"]),
                "boxes": clipped[idx].astype(np.float32).reshape(-1, 4),
                "labels": labels[idx],
                "ignore": crowd[idx],
                "img_path": fileio.join(self.img_prefix, im["file_name"]),
                "ann_ids": [ann_ids[i] for i in idx.tolist()],
            }
            if self.with_masks:  # polygons as the valid ones (raydet.masks.valid_polygons); RLE as it is
                rec["masks"] = [segmentations[i] for i in idx.tolist()]
            records.append(rec)
        return records

    def coco_gt(self):
        """The annotation json restricted to the kept images, annotations and selected categories (pycocotools
        ``COCO``), so official areas and crowd regions are what COCOeval sees, with the records' meanings of an
        ignored box and a valid polygon: :func:`raydet.evaluation.coco_gt_from_json`."""
        if self._coco_gt is None:
            from raydet.evaluation.coco import coco_gt_from_json

            self._coco_gt = coco_gt_from_json(load_json(self.ann_file), self.records, self.cat_ids)
        return self._coco_gt


# ----------------------------------------------------------------------------------------------------------
# Pascal VOC

def _fetch_all(uris: list[str], threads: int = 64) -> list[bytes | BaseException]:
    """The bytes of each URI, or the OSError that fetching it raised (requests to a bucket, many at once)."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(uri: str):
        try:
            return fileio.read_bytes(uri)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fetch, uris))


def _xml_text(node, tag: str):
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _xml_number(node, tag: str) -> float:
    text = _xml_text(node, tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


@register
class VOCDataset(DetectionDataset):
    """Pascal VOC layout: ``root/Annotations/<id>.xml``, ``root/JPEGImages/<id>.jpg``,
    ``root/ImageSets/Main/<split>.txt``.

    Boxes are the VOC integers as (x1, y1, x2, y2) = (xmin, ymin, xmax, ymax), with no +1/-1 shift. Image ids are
    1..N in the order of the split files (roots in order); records also carry ``voc_id`` and ``img_path``.
    Difficult objects are ignored boxes when ``with_difficult_as_ignore`` (VOC evaluation skips them), else
    ordinary boxes. Category ids are 1..C in ``classes`` order (default: the 20 VOC classes). As in MMDetection,
    objects whose ``<name>`` is not in ``classes`` are dropped (counted in one info log line; an image left without
    objects follows ``filter_empty_gt``), so a subset of the classes can be trained; a ``classes`` entry that no
    object of the split names is a warning log line (likely a typo). ``check_images`` and ``exif_orientation`` as in
    :class:`CocoDataset`; a missing ``<size>`` is read from the image's header (the upright size unless
    ``exif_orientation`` is ``"ignore"``). ``proposal_file`` and ``num_max_proposals`` as in :class:`CocoDataset`
    (the file's image ids are these 1..N).
    """

    def __init__(self, roots: Sequence[str], split: str, pipeline: Sequence[dict | Transform] | None = None,
                 filter_empty_gt: bool = False, num_classes: int | None = None,
                 classes: Sequence[str] | None = None, on_error: OnError = "fail",
                 with_difficult_as_ignore: bool = True,
                 check_images: CheckImages = True, exif_orientation: ExifOrientation = "auto",
                 proposal_file: str | None = None, num_max_proposals: int | None = 2000):
        _check_on_error(on_error)
        _check_check_images(check_images)
        self.exif_orientation = check_exif_orientation(exif_orientation)
        if isinstance(roots, str):
            roots = [roots]
        if not roots:
            raise ValueError("VOCDataset needs at least one root folder")
        self.roots, self.split = [str(r) for r in roots], split
        self.sources = ", ".join(os.path.join(r, "ImageSets", "Main", f"{split}.txt") for r in self.roots)
        self.filter_empty_gt, self.with_masks, self.on_error = filter_empty_gt, False, on_error
        self.with_difficult_as_ignore = with_difficult_as_ignore
        classes = _class_names(classes, f"VOCDataset({self.sources})")
        self.classes = tuple(VOC_CLASSES if classes is None else classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"{self.sources}: classes must be unique and non-empty, got {list(self.classes)}")
        _check_num_classes(num_classes, self.classes, self.sources)
        self.cat_ids = list(range(1, len(self.classes) + 1))
        self._label = {c: i for i, c in enumerate(self.classes)}
        self._set_pipeline(pipeline)
        problems = _Problems(self.sources)
        self._names: collections.Counter = collections.Counter()  # <name> of every object read -> count
        records = []
        for root in self.roots:
            split_file = fileio.join(root, "ImageSets", "Main", f"{split}.txt")
            try:
                if fileio.is_uri(split_file):
                    lines = fileio.read_text(split_file).splitlines()
                else:
                    with open(split_file, encoding="utf-8") as f:
                        lines = f.read().splitlines()
                ids = [line.split()[0] for line in lines if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{split_file}: cannot read the split file: "
                                 f"{str(exc).removeprefix(f'{split_file}: ')}") from None
            contents = _fetch_all([fileio.join(root, "Annotations", f"{i}.xml") for i in ids]) \
                if fileio.is_uri(root) else [None] * len(ids)
            for voc_id, data in zip(ids, contents):
                rec = self._read_xml(root, voc_id, len(records) + 1, problems, data)
                if rec is not None:
                    records.append(rec)
        self._log_class_use(explicit=classes is not None)
        read_ids = [r["image_id"] for r in records]
        if check_images:
            records = check_image_files(records, problems, lambda r: f"image {r['voc_id']}", self.exif_orientation,
                                        "decode" if check_images == "decode" else "header")
        problems.resolve(on_error)
        self.problems = problems
        self._coco_gt = None
        self.proposal_file = str(proposal_file) if proposal_file else None
        if self.proposal_file:
            attach_proposals(records, self.proposal_file, num_max_proposals, self.sources, read_ids)
        self._finish(records)

    def _log_class_use(self, explicit: bool) -> None:
        """One info line for the objects of names not in ``classes`` (dropped, as MMDetection's VOC reader drops
        them), one warning for the ``classes`` that no object of the split names (a typo, or the wrong split)."""
        found = ", ".join(f"{n} ({c})" for n, c in self._names.most_common(10)) + (
            ", ..." if len(self._names) > 10 else "")
        other = {n: c for n, c in self._names.items() if n not in self._label}
        if other:
            logger.info("%s: dropped %s of classes not in `classes` (%s)", self.sources,
                        _count(sum(other.values()), "object", "objects"),
                        ", ".join(f"{n}: {c}" for n, c in sorted(other.items(), key=lambda kv: -kv[1])))
        missing = [c for c in self.classes if c not in self._names]
        if missing and (explicit or len(missing) == len(self.classes)):
            logger.warning("%s: `classes` %s %s %s no object of this split (a typo in `classes`?); the objects' "
                           "names: %s", self.sources, "entry" if len(missing) == 1 else "entries",
                           ", ".join(map(repr, missing)), "names" if len(missing) == 1 else "name", found or "none")

    def _read_xml(self, root: str, voc_id: str, image_id: int, problems: _Problems,
                  data: bytes | BaseException | None = None) -> dict | None:
        """One image's record from its xml (``data``: the file's bytes or why they could not be fetched, for a
        root in a bucket; None: parse the local file)."""
        xml_path = fileio.join(root, "Annotations", f"{voc_id}.xml")
        img_path = fileio.join(root, "JPEGImages", f"{voc_id}.jpg")
        what = f"{xml_path} (image {voc_id})"
        try:
            if isinstance(data, BaseException):
                raise data
            tree = ET.parse(xml_path).getroot() if data is None else ET.fromstring(data)
        except FileNotFoundError as exc:
            reason = f" ({exc.reason})" if isinstance(exc, fileio.StorageNotFoundError) else ""
            problems.add("missing_annotation_file", f"{what}: file not found{reason} (image dropped)")
            return None
        except (ET.ParseError, OSError) as exc:
            problems.add("bad_annotation_file", f"{what}: cannot parse the xml: {exc} (image dropped)")
            return None
        size = tree.find("size")
        h = _xml_number(size, "height") if size is not None else math.nan
        w = _xml_number(size, "width") if size is not None else math.nan
        if not (h > 0 and w > 0 and float(h).is_integer() and float(w).is_integer()):
            try:  # like MMDetection: fall back to the image itself (its header) when <size> is missing or zero
                header = read_image_header(img_path, image_id)
                h, w = (header.height, header.width) if self.exif_orientation == "ignore" else header.upright_size
            except OSError as exc:
                problems.add("bad_image", f"{what}: no valid <size> and the image cannot be read: {exc} "
                             f"(image dropped)")
                return None
        h, w = int(h), int(w)

        objects = tree.findall("object")
        names = [_xml_text(o, "name") for o in objects]
        boxes = np.array([[_xml_number(o.find("bndbox"), t) if o.find("bndbox") is not None else math.nan
                           for t in ("xmin", "ymin", "xmax", "ymax")] for o in objects],
                         dtype=np.float64).reshape(-1, 4)
        difficult = np.array([_xml_text(o, "difficult") not in (None, "", "0") for o in objects], bool)
        labels = np.array([self._label.get(nm, -1) for nm in names], dtype=np.int64)
        self._names.update(nm for nm in names if nm)
        nameless = np.array([not nm for nm in names], bool)
        keep = (labels >= 0) | nameless  # objects of other classes: dropped, counted in one log line

        def reject(mask: np.ndarray, kind: str, why) -> None:
            nonlocal keep
            for i in np.flatnonzero(mask & keep):
                problems.add(kind, f"{what}, object {i} ({names[i]!r}): {why(i)} (object dropped)")
            keep &= ~mask

        reject(nameless, "bad_annotation", lambda i: "the object has no <name>")
        malformed = ~np.isfinite(boxes).all(axis=1)
        reject(malformed, "malformed_box", lambda i: "<bndbox> needs numeric xmin, ymin, xmax, ymax")
        clipped, outside, nonpos = _check_boxes(boxes, h, w)
        reject(outside, "box_outside_image", lambda i: f"box {boxes[i].tolist()} extends more than "
               f"{_CLIP_TOLERANCE:g} px outside the {size_text(h, w)} image")
        reject(nonpos, "nonpositive_box", lambda i: f"box {boxes[i].tolist()} has non-positive size")
        ignore = difficult[keep] if self.with_difficult_as_ignore else np.zeros(int(keep.sum()), bool)
        return {
            "image_id": image_id,
            "file_name": os.path.join(fileio.basename(root) if fileio.is_uri(root) else
                                      os.path.basename(os.path.normpath(root)), "JPEGImages", f"{voc_id}.jpg"),
            "height": h,
            "width": w,
            "boxes": clipped[keep].astype(np.float32).reshape(-1, 4),
            "labels": labels[keep],
            "ignore": ignore,
            "img_path": img_path,
            "voc_id": voc_id,
        }


# ----------------------------------------------------------------------------------------------------------
# Synthetic shapes

@register
class SyntheticShapesDataset(DetectionDataset):
    """Coloured rectangles, ellipses and triangles (raydet.data.synthetic), generated in memory.

    Records carry no file: ``load_image`` regenerates an image deterministically from its ``image_id`` (the
    generator is seeded with ``[seed, image_id]``), so rows sent through Ray Data stay small. Category ids 1..3.
    """

    def __init__(self, num_images: int, height: int = 128, width: int = 128, max_objects: int = 3, seed: int = 0,
                 start_id: int = 1, pipeline: Sequence[dict | Transform] | None = None, filter_empty_gt: bool = False,
                 with_masks: bool = True, num_classes: int | None = None):
        from .synthetic import CLASSES, make_shape_sample

        if num_images < 1 or height < 32 or width < 32 or max_objects < 1 or start_id < 0:
            raise ValueError(f"SyntheticShapesDataset needs num_images >= 1, height/width >= 32, max_objects >= 1 "
                             f"and start_id >= 0, got {num_images}, height {height}, width {width}, {max_objects}, "
                             f"{start_id}")
        self.sources = f"synthetic(seed={seed}, ids {start_id}..{start_id + num_images - 1})"
        self.filter_empty_gt, self.with_masks = filter_empty_gt, with_masks
        self.classes = tuple(CLASSES)
        _check_num_classes(num_classes, self.classes, self.sources)
        self.cat_ids = list(range(1, len(self.classes) + 1))
        self._set_pipeline(pipeline)
        self._loader = SyntheticImageLoader(height, width, max_objects, seed)
        records = []
        for image_id in range(start_id, start_id + num_images):
            rec = make_shape_sample(image_id, height, width, max_objects, seed=seed)[1]
            if not with_masks:
                rec.pop("masks")
            records.append(rec)
        self._coco_gt = None
        self._finish(records)

    def image_loader(self):
        return self._loader
