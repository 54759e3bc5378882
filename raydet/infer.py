"""``python -m raydet.infer PIPELINE CHECKPOINT INPUT... [options]``: batch inference as a Ray Data job.

Flow::

    INPUT(s) --(driver: list, check, number)--> ray.data.from_arrow(light rows: index, image_id, path, ...)
      --map_batches(DetectionPredictor, ActorPoolStrategy)--> one row per image (boxes, scores, labels, masks)
      --(driver, streaming)--> results.json (COCO results) / results.parquet, images.json, vis/*.png (actors)

Inputs (several may be given; their images are concatenated in the order given, duplicates dropped):

* a folder: the images in it and in its sub-folders (recursive; hidden files and folders skipped, and the output
  folder when it lies inside), extensions ``.jpg .jpeg .png .bmp .tif .tiff .webp`` (any case), sorted by path;
* a glob pattern (``'data/*.jpg'``, ``**`` recursive): the matching image files, sorted;
* a list file (``.txt``, ``.lst``, ``.list``): one image path per line, relative paths relative to the list file's
  folder; blank lines and lines starting with ``#`` are ignored;
* an image file;
* a COCO json (``.json``, must be the only input): image ids and file names come from its ``images``; files are
  ``--img-prefix/file_name``, by default relative to the json's folder.

Without a COCO json, images get ids ``1..N`` in input order, and ``images.json`` (a COCO skeleton: ``images`` with
``id``, absolute ``file_name``, ``height``, ``width``, plus ``categories``) maps them back to the files;
``COCO("images.json").loadRes("results.json")`` works.

A detector on precomputed proposals (Fast R-CNN) needs ``--proposal-file FILE`` (:mod:`raydet.data.proposals`, e.g.
written by ``raydet test --out-proposals``), keyed by the images' ids (a COCO json input's, else 1..N in input order):
each image gets all of its proposals, transformed with it. An image without proposals is an error naming its id.

Each actor builds the pipeline's model once, loads the checkpoint's weights (shipped once through the object
store), decodes images (:func:`raydet.data.read_image`: strict JPEG decoding, EXIF orientation), applies the
pipeline's test transforms (``data.test.pipeline``, else ``data.val.pipeline``) and the collate step, and runs
``model(batch, mode="predict")`` under ``torch.no_grad()``. Batches are consecutive groups of ``--batch-size``
images in input order (every input block holds a multiple of the batch size), so the results do not depend on how
Ray schedules the blocks.
Boxes are (x1, y1, x2, y2) in pixels of the original image; labels map to category ids and class names through
the checkpoint's ``meta`` (``cat_ids``, ``classes``, written by the trainer).

EXIF orientation (a phone photo stored sideways): ``--exif-orientation`` (default: the pipeline's
``data.test.exif_orientation``, else ``data.val``'s, else ``auto``). Without annotations ``auto`` is the upright frame
(boxes, ``height``/``width`` and drawings as the photo is shown); with a COCO json that gives sizes it decides per
image as the dataset readers do (:mod:`raydet.data.image_io`). ``ignore`` keeps the stored pixels.

Outputs in ``--out`` (default ``<work_dir>/<pipeline name>/infer``):

* ``results.json`` (``--format coco``, default): COCO result entries ``{image_id, category_id, bbox: [x, y, w, h]
  (2 decimals), score}`` plus ``segmentation`` (compressed RLE) for mask models, and ``mask_score`` for a model that
  scores its masks (Mask Scoring R-CNN: the box's classification score x the predicted MaskIoU, Huang et al. 2019,
  Sec. 3.2; ``score`` stays the box's). COCO ``segm`` evaluation should rank masks by ``mask_score`` (MMDetection's
  segm results do; :func:`raydet.evaluation.evaluate_coco` does); pycocotools' ``loadRes`` ranks by ``score``;
* ``results.parquet`` (``--format parquet``): one row per detection: ``image_id, file_name, height, width, label,
  category_id, class_name, score, x1, y1, x2, y2`` (float32, not rounded) and ``segmentation`` (RLE counts) for
  mask models, then ``mask_score`` (float32) for a model that scores its masks; images without detections have no
  row (they are in ``images.json``);
  ``--format coco,parquet`` writes both;
* ``vis/<stem>.png`` (``--draw``; ``<stem>_<image id>.png`` when two files share a stem): the image with the boxes
  (and masks) scoring >= ``--score-thr``, class names and scores (drawn by the actors; on a multi-node cluster
  ``--out`` must be shared storage).

Object storage: the checkpoint, every INPUT (a folder is a prefix, listed recursively; a glob's ``*`` stays within one
``/`` level and ``**`` crosses them; a list file's relative lines are relative to its own URI) and ``--out`` may be
URIs (``s3://``, ``gs://``: :mod:`raydet.fileio`). The actors read each image's bytes from the bucket themselves and
write ``vis/`` there; ``results.json``, ``results.parquet`` and ``images.json`` are written into a local scratch
folder and copied to ``--out`` when the run has finished (a failed run copies nothing, as it leaves no result files
in a local ``--out``).

Unreadable images stop the run with an error naming the file (``--on-error fail``, default) or are skipped with
one warning counting them per kind (``--on-error skip``). The driver first looks at every file's first and last
bytes, as the dataset readers do (missing, empty, not an image, truncated JPEG: found before Ray starts); the
actors report what only decoding finds (:func:`raydet.data.read_image`: corrupt data).
"""
from __future__ import annotations

import argparse
import colorsys
import glob
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raydet import fileio
from raydet.data.image_io import EXIF_ORIENTATION_POLICIES
from raydet.data.ray_data import rows_to_columns

__all__ = ["main", "infer", "collect_images", "ImageSet", "DetectionPredictor", "draw_detections",
           "IMAGE_EXTENSIONS", "inference_pipeline", "checkpoint_classes", "row_prediction"]

log = logging.getLogger("raydet")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
FORMATS = ("coco", "parquet")
_GLOB_CHARS = set("*?[")
_MAX_EXAMPLES = 5
_MAX_BLOCKS = 200


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class ImageSet:
    """The images to run on, in order.

    ``images``: dicts ``{"index", "image_id", "path" (absolute), "name" (for vis/), "height", "width"}`` (height and
    width 0 when unknown, i.e. unless a COCO json gives them). ``coco_json``: the COCO json they come from, if any.
    ``problems``: ``(image_id, path, why)`` of the files that failed the cheap check (left out of ``images``).
    """

    images: list[dict]
    coco_json: str | None = None
    problems: list[tuple[int, str, str]] = field(default_factory=list)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk_folder(folder: str, exclude: str | None) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries and ``exclude`` skipped), sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and (exclude is None or os.path.realpath(os.path.join(root, d)) != exclude)]
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and _is_image(f)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def _walk_uri(folder: str, exclude: str | None) -> list[str]:
    """:func:`_walk_folder` for a folder in object storage: the image objects under the prefix (names starting with
    ``.`` skipped at any level, and those under ``exclude``), sorted by relative path."""
    prefix = folder.rstrip("/") + "/"
    found = []
    for entry in fileio.list_files(folder):
        rel = entry.path[len(prefix):]
        if any(part.startswith(".") for part in rel.split("/")) or not _is_image(rel):
            continue
        if exclude is not None and (entry.path + "/").startswith(exclude.rstrip("/") + "/"):
            continue
        found.append(entry.path)
    return found


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob pattern as a regular expression over ``/``-separated paths: ``**`` any number of levels (``**/``
    also none), ``*`` and ``?`` within one level, ``[...]`` a character class."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _glob_uri(pattern: str) -> list[str]:
    """The files in object storage matching a glob pattern URI, sorted (one listing of the prefix before the first
    level with a wildcard)."""
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    base = f"{scheme}://" + "/".join(parts[:fixed])
    regex = _glob_regex("/".join(parts[fixed:]))
    return [e.path for e in fileio.list_files(base) if regex.match(e.path[len(base) + 1:])]


def _read_list_file(path: str) -> list[str]:
    base = fileio.dirname(path) if fileio.is_uri(path) else os.path.dirname(os.path.abspath(path))
    try:
        if fileio.is_uri(path):
            lines = fileio.read_text(path).splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the image list: {str(exc).removeprefix(f'{path}: ')}") from None
    out = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line if fileio.is_uri(line) else fileio.join(base, os.path.expanduser(line)))
    if not out:
        raise ValueError(f"{path}: the image list is empty")
    return out


def _read_coco_images(path: str, img_prefix: str | None) -> list[dict]:
    """``images`` of a COCO json -> ``{"image_id", "path", "height", "width"}`` (sizes 0 when absent)."""
    from raydet.data.datasets import load_json  # the readers' json checks and messages

    data = load_json(path)
    if img_prefix is not None:
        prefix = img_prefix
    else:
        prefix = fileio.dirname(path) if fileio.is_uri(path) else os.path.dirname(os.path.abspath(path))
    out, seen = [], set()
    for i, im in enumerate(data["images"]):
        iid = im.get("id") if isinstance(im, dict) else None
        name = im.get("file_name") if isinstance(im, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool) or not isinstance(name, str) or not name:
            raise ValueError(f"{path}: images[{i}]: needs an integer 'id' and a non-empty 'file_name', got {im!r}")
        if iid in seen:
            raise ValueError(f"{path}: images[{i}]: duplicate image id {iid}")
        seen.add(iid)
        size = [im.get(k) for k in ("height", "width")]
        h, w = (int(size[0]), int(size[1])) if all(isinstance(v, int) and v > 0 for v in size) else (0, 0)
        file = fileio.join(prefix, name)
        out.append({"image_id": iid, "path": file if fileio.is_uri(file) else os.path.abspath(file), "height": h,
                    "width": w})
    if not out:
        raise ValueError(f"{path}: the COCO json lists no images")
    return out


def collect_images(inputs: list[str], *, img_prefix: str | None = None, exclude: str | None = None,
                   check_files: bool = True) -> ImageSet:
    """Resolve the INPUT arguments (see the module docstring) into an :class:`ImageSet`.

    ``exclude``: a folder never listed from inside a folder input (the output folder). ``check_files``: look at
    each file's first and last bytes (:func:`raydet.data.datasets.image_file_problem`: missing, empty, not an
    image, truncated JPEG; threads, no decoding) and move the failures to ``problems``. Raises FileNotFoundError
    for an input path that does not exist and ValueError for an input that yields no image. Inputs may be URIs
    (see the module docstring).
    """
    if not inputs:
        raise ValueError("no input given")
    exclude = (exclude if fileio.is_uri(exclude) else os.path.realpath(exclude)) if exclude else None
    jsons = [p for p in inputs if p.lower().endswith(".json")]
    if jsons:
        if len(inputs) > 1:
            raise ValueError(f"a COCO json input ({jsons[0]}) must be the only input")
        if not fileio.isfile(jsons[0]):
            raise _input_not_found(jsons[0])
        entries = _read_coco_images(jsons[0], img_prefix)
        coco_json = jsons[0] if fileio.is_uri(jsons[0]) else os.path.abspath(jsons[0])
    else:
        if img_prefix is not None:
            raise ValueError("--img-prefix only applies to a COCO json input")
        paths: list[str] = []
        for item in inputs:
            if fileio.is_uri(item):
                paths += _uri_input(item, exclude)
            elif os.path.isdir(item):
                found = _walk_folder(item, exclude)
                if not found:
                    raise ValueError(f"{item}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
                paths += found
            elif os.path.isfile(item):
                if item.lower().endswith(LIST_EXTENSIONS):
                    paths += _read_list_file(item)
                elif _is_image(item):
                    paths.append(item)
                else:
                    raise ValueError(f"{item}: not an image ({' '.join(IMAGE_EXTENSIONS)}), an image list "
                                     f"({' '.join(LIST_EXTENSIONS)}) or a COCO json")
            elif _GLOB_CHARS & set(item):
                found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and _is_image(p))
                if not found:
                    raise ValueError(f"{item}: the pattern matches no image file")
                paths += found
            else:
                raise FileNotFoundError(f"input not found: {item}")
        seen, entries = set(), []
        for p in paths:
            key = p if fileio.is_uri(p) else os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                entries.append({"image_id": len(entries) + 1, "path": p if fileio.is_uri(p) else os.path.abspath(p),
                                "height": 0, "width": 0})
        if len(entries) < len(paths):
            log.info("dropped %d duplicate image paths", len(paths) - len(entries))
        coco_json = None

    if check_files:
        from concurrent.futures import ThreadPoolExecutor

        from raydet.data.datasets import image_file_problem  # the readers' check_images probe

        remote = any(fileio.is_uri(e["path"]) for e in entries)
        with ThreadPoolExecutor(max_workers=64 if remote else 16) as pool:  # requests to a bucket: waiting
            found = list(pool.map(image_file_problem, [e["path"] for e in entries]))
    else:
        found = [None] * len(entries)
    images, problems, names = [], [], set()
    for e, why in zip(entries, found):
        if why is not None:
            problems.append((e["image_id"], e["path"], why))
            continue
        stem = Path(e["path"]).stem
        name = stem if stem not in names else f"{stem}_{e['image_id']}"
        names.add(name)
        images.append({**e, "index": len(images), "name": name})
    return ImageSet(images, coco_json, problems)


def _input_not_found(item: str) -> FileNotFoundError:
    """``input not found: <item>``; for a URI, whether its bucket exists."""
    if fileio.is_uri(item):
        return fileio.StorageNotFoundError(f"input not found: {item} ({fileio.not_found_error(item).reason})")
    return FileNotFoundError(f"input not found: {item}")


def _uri_input(item: str, exclude: str | None) -> list[str]:
    """The image URIs of one URI input: an image, a list file, a glob pattern or a folder (a prefix)."""
    if fileio.isfile(item):
        if item.lower().endswith(LIST_EXTENSIONS):
            return _read_list_file(item)
        if _is_image(item):
            return [item]
        raise ValueError(f"{item}: not an image ({' '.join(IMAGE_EXTENSIONS)}), an image list "
                         f"({' '.join(LIST_EXTENSIONS)}) or a COCO json")
    if _GLOB_CHARS & set(item.split("://", 1)[1]):
        found = [p for p in _glob_uri(item) if _is_image(p)]
        if not found:
            raise ValueError(f"{item}: the pattern matches no image file")
        return found
    if fileio.isdir(item):
        found = _walk_uri(item, exclude)
        if not found:
            raise ValueError(f"{item}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
        return found
    raise _input_not_found(item)


# --------------------------------------------------------------------------------------------------- pipeline
def inference_pipeline(cfg) -> list:
    """The pipeline's test-time transform list: ``data.test.pipeline``, else ``data.val.pipeline``."""
    from raydet.registry import ConfigError

    for split in ("test", "val"):
        pipeline = cfg.get(f"data.{split}.pipeline")
        if pipeline is not None:
            return list(pipeline)
    raise ConfigError(f"{cfg.path}: data.test.pipeline: the pipeline defines no test-time transforms "
                      f"(data.test.pipeline or data.val.pipeline)")


def _model_num_classes(model) -> int | None:
    """Classes the model predicts (None for a class-agnostic RPN)."""
    for head in ("roi_head", "bbox_head"):
        obj = getattr(model, head, None)
        obj = getattr(obj, "bbox_head", obj) if head == "roi_head" else obj
        if obj is not None and isinstance(getattr(obj, "num_classes", None), int):
            return obj.num_classes
    return None


def checkpoint_classes(meta: dict, model, source: str) -> tuple[list[str], list[int]]:
    """(class names, category ids), label ``i`` -> ``classes[i]``, ``cat_ids[i]``, from a checkpoint's ``meta``.

    An RPN gets one class ``"object"`` (id 1). Without ``meta`` classes, names ``class_<i>`` and ids ``1..C`` are
    used (with a warning). Raises ValueError when ``meta`` does not match the model's number of classes.
    """
    num = _model_num_classes(model)
    if num is None:
        return ["object"], [1]
    classes, cat_ids = meta.get("classes"), meta.get("cat_ids")
    if not classes:
        warnings.warn(f"checkpoint {source} has no meta classes; using class_0..class_{num - 1} and category ids "
                      f"1..{num}", UserWarning, stacklevel=2)
        return [f"class_{i}" for i in range(num)], list(range(1, num + 1))
    classes = [str(c) for c in classes]
    cat_ids = [int(c) for c in (cat_ids or range(1, len(classes) + 1))]
    if len(classes) != num or len(cat_ids) != num:
        raise ValueError(f"checkpoint {source}: its meta lists {len(classes)} classes and {len(cat_ids)} category "
                         f"ids but the pipeline's model predicts {num} classes (was it trained with another "
                         f"pipeline?)")
    return classes, cat_ids


# --------------------------------------------------------------------------------------------------- drawing
def _color(label: int) -> tuple[int, int, int]:
    """A distinct, saturated RGB colour per label (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((int(label) * 0.618033988749895 + 0.1) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: list[str], score_thr: float = 0.3, masks: np.ndarray | None = None) -> np.ndarray:
    """Draw the detections scoring >= ``score_thr`` on a copy of ``image``.

    Args:
        image: uint8 (h, w, 3) RGB.
        boxes: (n, 4) x1, y1, x2, y2 in pixels of ``image``; scores (n,); labels (n,) indices into ``class_names``.
        masks: optional (n, h, w) bool / uint8 instance masks, blended at 50% in the label's colour.

    Returns a new uint8 (h, w, 3) RGB image: box outlines, masks and ``"<class> <score>"`` tags, lowest score first
    (so the best detections end on top). With no detection above the threshold it equals ``image``.
    """
    import cv2

    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    scores = np.asarray(scores, np.float64).reshape(-1)
    keep = np.flatnonzero(scores >= score_thr)
    keep = keep[np.argsort(scores[keep], kind="stable")]
    thick = max(1, round(min(h, w) / 300))
    font_scale = max(0.3, min(h, w) / 800)
    for i in keep:
        label = int(labels[i])
        color = _color(label)
        if masks is not None:
            m = np.asarray(masks[i], bool)
            out[m] = (0.5 * out[m] + 0.5 * np.asarray(color, np.float64)).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(float(v))) for v in boxes[i])
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, thick)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(h - 1, y1 + th + 2)  # above the box, else inside it
        cv2.rectangle(out, (x1, ty - th - 1), (x1 + tw + 1, ty + base - 1), color, -1)
        cv2.putText(out, text, (x1 + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------------------------------- Ray actor
class DetectionPredictor:
    """Ray Data actor: decode, transform, collate and predict a batch of images with one model per actor.

    Input columns: ``index, image_id, path, height, width`` (the size a COCO json gives, 0 = unknown),
    ``vis_path`` (where to write the drawing, "" = none) and, with a proposal file, ``proposals`` (the image's
    boxes flattened, x1, y1, x2, y2 in original pixels). Output: one row per input row, in order::

        index, image_id (int64), path (str), height, width (int64, of the decoded image; 0 on error)
        boxes   float32 (n, 4) x1, y1, x2, y2 in original-image pixels; scores float32 (n,); labels int64 (n,)
        masks   str: the n masks' compressed COCO RLE counts joined by spaces ("" without a mask head)
        mask_scores float32 (n,): the masks' scores where the model predicts them (``mask_scores``, Mask Scoring
                R-CNN), else empty
        error   str: why the image could not be used ("" if it was); error_kind str

    Args:
        pipeline, path, origins: the resolved pipeline (``Config.data``, ``.path``, ``.origins``).
        weights: ``[object ref or state dict]`` of the model's weights; ``source`` names them in errors.
        transforms: the test-time pipeline list.
        use_gpu: run on CUDA (the actor holds a GPU); else CPU with ``num_threads`` torch threads.
        classes, score_thr: for drawing.
    """

    def __init__(self, pipeline: dict, path: str | None, origins: dict, weights: list, source: str,
                 transforms: list, use_gpu: bool = False, num_threads: int = 1, classes: list[str] = (),
                 score_thr: float = 0.3, exif_orientation: str = "auto"):
        import cv2
        import torch

        import raydet.data  # noqa: F401  (registers the transforms)
        import raydet.models  # noqa: F401  (registers the model components)
        from raydet.config import Config
        from raydet.data.pipeline import build_transforms
        from raydet.engine.checkpoint import load_model_weights
        from raydet.commands.sections import parse_sections

        cv2.setNumThreads(1)
        cfg = Config(pipeline, path, origins)
        parse_sections(cfg)  # imports the pipeline's runtime.imports (user components)
        state = weights[0]
        if not isinstance(state, dict):
            import ray

            state = ray.get(state)
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("DetectionPredictor: a GPU was requested but torch sees no CUDA device")
            self.device = torch.device("cuda")
        else:
            torch.set_num_threads(max(1, int(num_threads)))
            self.device = torch.device("cpu")
        model = cfg.build("model")
        load_model_weights(model, state, source)
        self.model = model.to(self.device).eval()
        self.transforms, self.collate_cfg = build_transforms(transforms)
        self.classes = list(classes)
        self.score_thr = float(score_thr)
        self.exif_orientation = exif_orientation

    def _load(self, batch: dict, i: int):
        """(sample, image) of row ``i``, or raises OSError / ValueError explaining why the image is unusable."""
        from raydet.data.datasets import read_image
        from raydet.data.pipeline import image_rng, record_to_sample

        image_id, path = int(batch["image_id"][i]), str(batch["path"][i])
        eh, ew = int(batch["height"][i]), int(batch["width"][i])  # from a COCO json, else 0
        # the json's size decides the frame under "auto" (and is checked); without one, "auto" is the upright frame
        image = read_image(path, image_id, self.exif_orientation, size=(eh, ew) if eh and ew else None)
        h, w = image.shape[:2]
        record = {"image_id": image_id, "height": h, "width": w, "boxes": np.zeros((0, 4), np.float32),
                  "labels": np.zeros(0, np.int64)}
        if "proposals" in batch:  # clipped to the decoded image, as the dataset readers clip them
            proposals = np.asarray(batch["proposals"][i], np.float32).reshape(-1, 4).copy()
            proposals[:, 0::2] = proposals[:, 0::2].clip(0, w)
            proposals[:, 1::2] = proposals[:, 1::2].clip(0, h)
            record["proposals"] = proposals
        sample = self.transforms(record_to_sample(record, image), image_rng(0, 0, int(batch["index"][i])))
        return sample, image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import cv2
        import torch

        from raydet.data.collate import collate_detection
        from raydet.data.image_io import CorruptImageError, ImageSizeMismatchError
        from raydet.masks import bitmap_to_rle

        n = len(batch["index"])
        rows: list[dict] = []
        ok, samples, images = [], [], []
        for i in range(n):
            rows.append({"index": int(batch["index"][i]), "image_id": int(batch["image_id"][i]),
                         "path": str(batch["path"][i]), "height": 0, "width": 0,
                         "boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                         "labels": np.zeros(0, np.int64), "masks": "", "mask_scores": np.zeros(0, np.float32),
                         "error": "", "error_kind": ""})
            try:
                sample, image = self._load(batch, i)
            except (OSError, ValueError) as exc:
                kind = ("missing_image" if isinstance(exc, FileNotFoundError) else
                        "image_size_mismatch" if isinstance(exc, ImageSizeMismatchError) else
                        "corrupt_image" if isinstance(exc, CorruptImageError) else
                        "unreadable_image" if isinstance(exc, OSError) else "bad_image")
                rows[i].update(error=str(exc), error_kind=kind)
                continue
            rows[i].update(height=int(image.shape[0]), width=int(image.shape[1]))
            ok.append(i)
            samples.append(sample)
            images.append(image)
        if samples:
            with torch.no_grad():
                preds = self.model(collate_detection(samples, self.collate_cfg, device=self.device), mode="predict")
            for i, image, pred in zip(ok, images, preds):
                boxes = pred["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
                scores = pred["scores"].detach().float().cpu().numpy().reshape(-1)
                labels = pred["labels"].detach().cpu().numpy().astype(np.int64).reshape(-1)
                masks = pred.get("masks")
                masks = None if masks is None else masks.detach().cpu().numpy().astype(bool)
                rows[i].update(boxes=boxes, scores=scores, labels=labels)
                if pred.get("mask_scores") is not None:
                    rows[i]["mask_scores"] = pred["mask_scores"].detach().float().cpu().numpy().reshape(-1)
                if masks is not None:
                    rows[i]["masks"] = " ".join(bitmap_to_rle(m)["counts"] for m in masks)
                vis_path = str(batch["vis_path"][i])
                if vis_path:
                    drawn = cv2.cvtColor(draw_detections(image, boxes, scores, labels, self.classes, self.score_thr,
                                                         masks), cv2.COLOR_RGB2BGR)
                    if fileio.is_uri(vis_path):  # encoded here, written to the bucket by this actor
                        ok, png = cv2.imencode(".png", drawn)
                        if not ok:
                            raise OSError(f"cannot encode {vis_path}")
                        fileio.write_bytes(vis_path, png.tobytes())
                    elif not cv2.imwrite(vis_path, drawn):
                        raise OSError(f"cannot write {vis_path}")
        return rows_to_columns(rows)


def row_prediction(cols: dict[str, np.ndarray], i: int, with_mask_scores: bool) -> dict[str, np.ndarray]:
    """Row ``i`` of a :class:`DetectionPredictor` output batch -> ``{"boxes" (n, 4) float32, "scores" (n,) float32,
    "labels" (n,) int64}`` plus ``"mask_scores"`` (n,) float32 when ``with_mask_scores`` (the model's roi_head has
    ``predicts_mask_scores``), as :func:`raydet.evaluation.predictions_to_coco_results` takes them.

    Raises:
        ValueError: ``with_mask_scores`` and the row has not one mask score per detection.
    """
    pred = {"boxes": np.asarray(cols["boxes"][i], np.float32).reshape(-1, 4),
            "scores": np.asarray(cols["scores"][i], np.float32).reshape(-1),
            "labels": np.asarray(cols["labels"][i], np.int64).reshape(-1)}
    if with_mask_scores:
        mask_scores = np.asarray(cols["mask_scores"][i], np.float32).reshape(-1)
        if len(mask_scores) != len(pred["scores"]):
            raise ValueError(f"image id {int(cols['image_id'][i])}: {len(pred['scores'])} detections but "
                             f"{len(mask_scores)} mask_scores from the model")
        pred["mask_scores"] = mask_scores
    return pred


# --------------------------------------------------------------------------------------------------- writers
class _JsonArrayWriter:
    """Writes a json list entry by entry (bounded memory) to ``path.tmp``; ``close`` renames it to ``path``."""

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"
        self.f = open(self.tmp, "w")
        self.f.write("[")
        self.count = 0

    def write(self, entries: list[dict]) -> None:
        for e in entries:
            self.f.write((", " if self.count else "") + json.dumps(e))
            self.count += 1

    def close(self) -> None:
        self.f.write("]\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class _ParquetWriter:
    """One row per detection (see the module docstring), one row group per chunk of images."""

    def __init__(self, path: str, with_masks: bool, with_mask_scores: bool = False):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa, self.path, self.tmp, self.with_masks = pa, path, path + ".tmp", with_masks
        self.with_mask_scores = with_mask_scores
        fields = [("image_id", pa.int64()), ("file_name", pa.string()), ("height", pa.int32()),
                  ("width", pa.int32()), ("label", pa.int64()), ("category_id", pa.int64()),
                  ("class_name", pa.string()), ("score", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
                  ("x2", pa.float32()), ("y2", pa.float32())]
        if with_masks:
            fields.append(("segmentation", pa.string()))
        if with_mask_scores:
            fields.append(("mask_score", pa.float32()))
        self.schema = pa.schema(fields)
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.pending: dict[str, list] = {f.name: [] for f in self.schema}
        self.count = 0

    def add(self, image_id: int, file_name: str, height: int, width: int, boxes, scores, labels, cat_ids,
            class_names, rles: list[str] | None, mask_scores=None) -> None:
        n = len(scores)
        p = self.pending
        p["image_id"] += [image_id] * n
        p["file_name"] += [file_name] * n
        p["height"] += [height] * n
        p["width"] += [width] * n
        p["label"] += labels.tolist()
        p["category_id"] += [cat_ids[k] for k in labels.tolist()]
        p["class_name"] += [class_names[k] for k in labels.tolist()]
        p["score"] += scores.tolist()
        for j, key in enumerate(("x1", "y1", "x2", "y2")):
            p[key] += boxes[:, j].tolist()
        if self.with_masks:
            p["segmentation"] += rles if rles is not None else [""] * n
        if self.with_mask_scores:
            p["mask_score"] += mask_scores.tolist()
        self.count += n

    def flush(self) -> None:
        if self.pending["image_id"]:
            self.writer.write_table(self.pa.table(self.pending, schema=self.schema))
            self.pending = {k: [] for k in self.pending}

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


# --------------------------------------------------------------------------------------------------- driver
def _problem_summary(problems: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for kind, _ in problems:
        counts[kind] = counts.get(kind, 0) + 1
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
    first = "\n".join(f"  - {m}" for _, m in problems[:_MAX_EXAMPLES])
    return f"{len(problems)} unreadable image(s) ({kinds}); first:\n{first}"


def _resources(num_actors, gpus_per_actor, cpus_per_actor) -> tuple[int, float, float]:
    """Defaults and a fit check against the cluster: (actors, GPUs per actor, CPUs per actor)."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if cpus_per_actor is None:
        cpus_per_actor = 1.0
    if num_actors is None:
        num_actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    if num_actors < 1 or gpus_per_actor < 0 or cpus_per_actor < 0:
        raise ValueError(f"--num-actors must be >= 1 and the per-actor resources >= 0, got {num_actors}, "
                         f"{gpus_per_actor} GPU, {cpus_per_actor} CPU")
    need_gpu, need_cpu = num_actors * gpus_per_actor, num_actors * cpus_per_actor
    if need_gpu > gpus + 1e-9 or need_cpu > cpus + 1e-9:
        message = (f"{num_actors} actors x ({gpus_per_actor:g} GPU, {cpus_per_actor:g} CPU) = {need_gpu:g} GPUs, "
                   f"{need_cpu:g} CPUs, but the Ray cluster has {gpus:g} GPUs, {cpus:g} CPUs; lower --num-actors, "
                   f"--gpus-per-actor or --cpus-per-actor")
        if os.environ.get("RAY_ADDRESS"):  # a cluster we joined may autoscale
            log.warning(message)
        else:
            raise ValueError(message)
    return int(num_actors), float(gpus_per_actor), float(cpus_per_actor)


def _input_dataset(images: list[dict], vis_dir: str | None, batch_size: int, proposals: dict | None = None):
    """The light rows as Arrow blocks holding a multiple of ``batch_size`` rows each (at most ~200 blocks), with each
    image's proposals (``proposals``: image id -> (k, 4) boxes) flattened into a list column."""
    import pyarrow as pa
    import ray

    n = len(images)
    batches = -(-n // batch_size)
    per_block = batch_size * max(1, -(-batches // _MAX_BLOCKS))
    tables = []
    for start in range(0, n, per_block):
        chunk = images[start:start + per_block]
        columns = {
            "index": pa.array([im["index"] for im in chunk], pa.int64()),
            "image_id": pa.array([im["image_id"] for im in chunk], pa.int64()),
            "path": pa.array([im["path"] for im in chunk], pa.string()),
            "height": pa.array([im["height"] for im in chunk], pa.int64()),
            "width": pa.array([im["width"] for im in chunk], pa.int64()),
            "vis_path": pa.array([fileio.join(vis_dir, im["name"] + ".png") if vis_dir else "" for im in chunk],
                                 pa.string()),
        }
        if proposals is not None:
            columns["proposals"] = pa.array([proposals[im["image_id"]].reshape(-1) for im in chunk],
                                            pa.list_(pa.float32()))
        tables.append(pa.table(columns))
    return ray.data.from_arrow(tables)


def _image_proposals(proposal_file: str | None, images: list[dict], model_name: str,
                     required: bool) -> dict | None:
    """image id -> its (k, 4) proposals from ``proposal_file`` (None without one).

    Raises:
        ValueError: the model needs proposals and there is no file, or the file has none for some input image
            (naming up to 5 ids).
    """
    if not proposal_file:
        if required:
            raise ValueError(f"{model_name} predicts from precomputed proposals: give --proposal-file (e.g. written "
                             f"by `raydet test <rpn pipeline> <checkpoint> --out-proposals FILE`)")
        return None
    from raydet.data.proposals import read_proposals

    read = read_proposals(proposal_file)
    missing = [im["image_id"] for im in images if im["image_id"] not in read]
    if missing:
        some = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{proposal_file}: no proposals for {len(missing)} of the {len(images)} input images, e.g. "
                         f"image id(s) {some} (ids: a COCO json input's, else 1..N in input order)")
    return {im["image_id"]: read[im["image_id"]][0] for im in images}


def infer(cfg, checkpoint: str, inputs: list[str], out_dir: str, *, formats=("coco",), draw: bool = False,
          score_thr: float = 0.3, batch_size: int = 4, num_actors: int | None = None,
          gpus_per_actor: float | None = None, cpus_per_actor: float | None = None, img_prefix: str | None = None,
          on_error: str = "fail", progress: bool | None = None, exif_orientation: str | None = None,
          proposal_file: str | None = None) -> dict:
    """Run ``checkpoint`` on ``inputs`` as a Ray Data job and write the outputs into ``out_dir``.

    Returns a summary ``{"images", "skipped", "detections", "seconds", "images_per_s", "outputs": {kind: path}}``
    (``seconds``: the Ray job, actor start-up included). Raises FileNotFoundError / ValueError / ConfigError for
    bad inputs, a checkpoint that does not fit the pipeline's model, or (``on_error="fail"``) an unreadable image.
    ``progress``: Ray Data's progress bars for this job (default: the pipeline's ``runtime.progress``; ``auto``:
    when stderr is a terminal). ``exif_orientation``: auto, apply or ignore (default: the pipeline's, see the module
    docstring). ``proposal_file``: precomputed proposals, needed by a detector that reads them (Fast R-CNN).
    """
    import ray
    import torch

    import raydet.data  # noqa: F401
    import raydet.models  # noqa: F401
    from raydet.data.pipeline import build_transforms
    from raydet.engine.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint
    from raydet.evaluation.coco import predictions_to_coco_results
    from raydet.registry import build_context
    from raydet.commands.ray_setup import init_ray
    from raydet.commands.validation import validate_pipeline
    from raydet.workspace import check_shared_storage, cluster_node_count

    formats = tuple(dict.fromkeys(formats))
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"--format must be among {FORMATS}, got {list(formats)}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error must be fail or skip, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if exif_orientation is None:
        exif_orientation = cfg.get("data.test.exif_orientation") or cfg.get("data.val.exif_orientation") or "auto"
    if exif_orientation not in EXIF_ORIENTATION_POLICIES:
        raise ValueError(f"--exif-orientation must be one of {', '.join(EXIF_ORIENTATION_POLICIES)}, got "
                         f"{exif_orientation!r}")

    # Everything that can be checked without Ray fails here, before any actor starts.
    sections = validate_pipeline(cfg)
    if progress is None:
        setting = sections.runtime.progress
        progress = setting is True or (setting == "auto" and sys.stderr.isatty())
    transforms = inference_pipeline(cfg)
    with build_context(file=cfg.path, origins=cfg.origins):
        build_transforms(transforms)
    remote = fileio.is_uri(out_dir)
    if remote:  # fails now, naming the URI, when the bucket does not exist or cannot be listed
        fileio.list_files(out_dir)
    image_set = collect_images(inputs, img_prefix=img_prefix, exclude=out_dir)
    problems = [("bad_image_file", f"image id {iid}: {why}: {p}") for iid, p, why in image_set.problems]
    if problems and on_error == "fail":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0][1]}{more} (use --on-error skip to skip unreadable images)")
    if not image_set.images:
        raise ValueError(f"no readable image among the inputs:\n{_problem_summary(problems)}")
    source = str(resolve_checkpoint(checkpoint))
    state = load_checkpoint(checkpoint, map_location="cpu")
    model = cfg.build("model")
    load_model_weights(model, state["model"], source)
    classes, cat_ids = checkpoint_classes(state.get("meta") or {}, model, source)
    with_masks = bool(getattr(getattr(model, "roi_head", None), "with_mask", False))
    with_mask_scores = bool(getattr(getattr(model, "roi_head", None), "predicts_mask_scores", False))
    proposals = _image_proposals(proposal_file, image_set.images, type(model).__name__,
                                 getattr(model, "requires_proposals", False))
    del model

    vis_dir = fileio.join(out_dir if remote else os.path.abspath(out_dir), "vis") if draw else None
    fileio.makedirs(out_dir)
    if vis_dir:
        fileio.makedirs(vis_dir)

    init_ray()
    if vis_dir:  # drawn by the actors, on any node
        check_shared_storage(out_dir if remote else os.path.abspath(out_dir), "--out", cluster_node_count(),
                             sections.runtime.shared_storage)
    num_actors, gpus_per_actor, cpus_per_actor = _resources(num_actors, gpus_per_actor, cpus_per_actor)
    start = time.perf_counter()
    weights_ref = ray.put({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state["model"].items()})
    del state
    # an actor's exception reaches the command as itself, not as Ray Data's UserCodeException (as in training)
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = _input_dataset(image_set.images, vis_dir, batch_size, proposals)
    ds = ds.map_batches(
        DetectionPredictor,
        fn_constructor_kwargs={"pipeline": cfg.data, "path": cfg.path, "origins": cfg.origins,
                               "weights": [weights_ref], "source": source, "transforms": transforms,
                               "use_gpu": gpus_per_actor > 0, "num_threads": max(1, int(cpus_per_actor)),
                               "classes": classes, "score_thr": score_thr, "exif_orientation": exif_orientation},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        udf_modifying_row_count=False,
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = progress

    outputs: dict[str, str] = {}
    folder = fileio.MirroredFolder(out_dir, prefix="raydet-infer-")  # the result files; copied to a URI at the end
    writers: list = []
    json_writer = parquet_writer = None
    done: list[dict] = []
    detections = 0
    stream = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        if "coco" in formats:
            json_writer = _JsonArrayWriter(folder.path("results.json"))
            writers.append(json_writer)
        if "parquet" in formats:
            parquet_writer = _ParquetWriter(folder.path("results.parquet"), with_masks, with_mask_scores)
            writers.append(parquet_writer)
        for cols in stream:
            for i in range(len(cols["index"])):
                if cols["error"][i]:
                    problems.append((str(cols["error_kind"][i]), str(cols["error"][i])))
                    if on_error == "fail":
                        raise ValueError(f"{cols['error'][i]} (use --on-error skip to skip unreadable images)")
                    continue
                image_id, path = int(cols["image_id"][i]), str(cols["path"][i])
                h, w = int(cols["height"][i]), int(cols["width"][i])
                pred = row_prediction(cols, i, with_mask_scores)
                rles = str(cols["masks"][i]).split(" ") if with_masks and len(pred["scores"]) else None
                done.append({"id": image_id, "file_name": path, "height": h, "width": w})
                detections += len(pred["scores"])
                if json_writer is not None:
                    entries = predictions_to_coco_results([pred], [image_id], cat_ids)
                    for e, counts in zip(entries, rles or ()):
                        e["segmentation"] = {"size": [h, w], "counts": counts}
                    json_writer.write(entries)
                if parquet_writer is not None:
                    parquet_writer.add(image_id, path, h, w, pred["boxes"], pred["scores"], pred["labels"], cat_ids,
                                       classes, rles, pred.get("mask_scores"))
            if parquet_writer is not None:
                parquet_writer.flush()
    except BaseException:
        for wr in writers:
            wr.abort()
        folder.close(upload=False)
        raise
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the streaming executor (and its actors) at once on an early exit
    for wr in writers:
        wr.close()
    seconds = time.perf_counter() - start
    if json_writer is not None:
        outputs["results"] = folder.uri("results.json")
    if parquet_writer is not None:
        outputs["parquet"] = folder.uri("results.parquet")
    if image_set.coco_json is None:
        with open(folder.path("images.json"), "w") as f:
            json.dump({"images": done, "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, classes)]}, f)
        outputs["images"] = folder.uri("images.json")
    folder.close()  # a URI --out: the files are copied there now
    if vis_dir:
        outputs["vis"] = vis_dir
    if problems:
        warnings.warn(f"skipped {_problem_summary(problems)}", UserWarning, stacklevel=2)
    return {"images": len(done), "skipped": len(problems), "detections": detections, "seconds": seconds,
            "images_per_s": len(done) / seconds if seconds > 0 else math.inf, "outputs": outputs}


def _formats(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or any(t not in FORMATS for t in items):
        raise argparse.ArgumentTypeError(f"expected coco, parquet or coco,parquet; got {text!r}")
    return items


def main(argv=None) -> int:
    from raydet.config import load_config
    from raydet.commands.ray_setup import setup_logging
    from raydet.commands.sections import parse_sections, work_dir_of
    from raydet.workspace import resolve_work_dir

    parser = argparse.ArgumentParser(
        prog="raydet infer", description="Run a checkpoint on images as a Ray Data batch-inference job.",
        epilog="INPUT: folders (recursive), glob patterns, image list files (.txt/.lst/.list), image files, or one "
               "COCO json. See `python -c 'import raydet.infer; help(raydet.infer)'` for the output formats.")
    parser.add_argument("pipeline", help="pipeline YAML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="checkpoint file or Ray checkpoint folder")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="images to run on")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override pipeline keys, values parsed as YAML")
    parser.add_argument("--out", default=None, help="output folder (default: <work_dir>/<pipeline name>/infer)")
    parser.add_argument("--format", type=_formats, default=["coco"],
                        help="coco (results.json, default), parquet (results.parquet) or coco,parquet")
    parser.add_argument("--score-thr", type=float, default=0.3, help="minimum score of drawn detections")
    parser.add_argument("--draw", action="store_true", help="write OUT/vis/<image>.png with the detections")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default 4)")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="model replicas (default: one per GPU of the cluster, else 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=None,
                        help="GPUs per actor (default: 1 when the Ray cluster has GPUs, else 0 = CPU)")
    parser.add_argument("--cpus-per-actor", type=float, default=None,
                        help="CPUs per actor, also its torch threads on CPU (default 1)")
    parser.add_argument("--img-prefix", default=None,
                        help="folder of a COCO json's file_name entries (default: the json's folder)")
    parser.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                        help="unreadable image: stop with an error (default) or skip it with a warning")
    parser.add_argument("--exif-orientation", default=None, choices=list(EXIF_ORIENTATION_POLICIES),
                        help="EXIF-rotated photos: auto (upright; with a COCO json, the frame its sizes give), apply "
                             "(upright) or ignore (stored pixels); default: the pipeline's data.test setting, else "
                             "auto")
    parser.add_argument("--proposal-file", default=None, metavar="FILE",
                        help="precomputed proposals by image id (raydet.data.proposals; raydet test --out-proposals), "
                             "for a detector that reads them (Fast R-CNN)")
    args = parser.parse_args(argv)
    setup_logging()
    out = None
    try:
        cfg = load_config(args.pipeline, args.set)
        sections = parse_sections(cfg)
        out = (resolve_work_dir(args.out, work_root=sections.runtime.work_root, key="--out", allow_uri=True)
               if args.out else fileio.join(work_dir_of(cfg, sections, allow_uri=True), "infer"))
        summary = infer(cfg, args.checkpoint, args.inputs, out, formats=args.format, draw=args.draw,
                        score_thr=args.score_thr, batch_size=args.batch_size, num_actors=args.num_actors,
                        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                        img_prefix=args.img_prefix, on_error=args.on_error, exif_orientation=args.exif_orientation,
                        proposal_file=args.proposal_file)
    except Exception as exc:  # one line (ours, or the original behind Ray's wrapping); the traceback to a file
        from raydet.commands.ray_setup import release_ray
        from raydet.errors import report_failure

        release_ray()  # no actor output after the error line
        return report_failure(exc, out if out and (fileio.is_uri(out) or os.path.isdir(out)) else None, "infer")
    paths = ", ".join(summary["outputs"].values())
    print(f"raydet infer: {summary['images']} images ({summary['skipped']} skipped), {summary['detections']} "
          f"detections in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} images/s, actor start-up "
          f"included); outputs: {paths}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles DetectionPredictor by reference to raydet.infer
    # (a class defined in __main__ would be pickled by value, with everything it touches).
    import importlib

    sys.exit(importlib.import_module("raydet.infer").main())
