"""Per-image training / test transforms in plain NumPy + OpenCV (no Ray, no torch).

A transform is a callable object ``sample_out = t(sample, rng)`` where ``rng`` is a ``numpy.random.Generator``
(seeded per epoch and per image by :func:`raydet.data.pipeline.image_rng`, so every draw is reproducible) and a
*sample* is a dict::

    image         uint8 (h, w, 3) RGB
    boxes         float32 (n, 4) x1, y1, x2, y2 in pixels of ``image`` (the non-ignored objects)
    labels        int64 (n,)
    ignore_boxes  float32 (k, 4) crowd / difficult regions
    proposals     optional float32 (p, 4) precomputed proposals (Fast R-CNN), moved with the image as boxes are
    masks         optional list of n instance masks (polygons or COCO RLE dicts, see raydet.masks), at ``image``'s size
    seg_map       optional uint8 (h, w) semantic class ids at ``image``'s size (raydet.data.seg_maps; 255 = ignored),
                  moved with nearest-neighbour sampling so no new ids appear
    image_id      int
    ori_shape     (h0, w0) size of the decoded file
    img_shape     (h, w) current size of ``image``
    scale_factor  (sx, sy) = img_shape / ori_shape along x and y
    flip          bool

Transforms never modify their input sample; unknown keys pass through unchanged.

``Normalize`` and ``Pad`` are *batch-level*: :func:`raydet.data.pipeline.build_transforms` takes them out of the
pipeline and :func:`raydet.data.collate.collate_detection` applies them on the training worker, so images travel
through Ray's object store as uint8 (4x fewer bytes than float32).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from raydet.masks import bitmap_to_rle, rle_to_bitmap
from raydet.registry import register

__all__ = ["Transform", "Resize", "RandomFlip", "Normalize", "Pad", "CollateConfig", "scales_from_range",
           "rescale_size"]


@dataclasses.dataclass(frozen=True)
class CollateConfig:
    """The batch-level part of a pipeline: ``Normalize(mean, std, to_rgb)`` and ``Pad(size_divisor)``, applied by
    raydet.data.collate.collate_detection.

    Without a ``Normalize`` in the pipeline images are only converted to float (mean 0, std 1); without a
    ``Pad`` they are padded to the largest image of the batch (size_divisor 1). ``to_rgb=False`` reverses the
    channels (RGB -> BGR) before normalising, for models trained on BGR input.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size_divisor: int = 1
    to_rgb: bool = True


class Transform(ABC):
    """Base class of per-image transforms: ``__call__(sample, rng) -> new sample``."""

    @abstractmethod
    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        """Return the transformed sample (a new dict; the input is not modified)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class BatchTransform(Transform):
    """A transform that runs once per batch in the collate step, not per image (``Normalize``, ``Pad``)."""

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        raise TypeError(f"{type(self).__name__} runs at batch time in raydet.data.collate.collate_detection; build "
                        f"the pipeline with raydet.data.build_transforms, which moves it into the CollateConfig")


def scales_from_range(long: int, short_min: int, short_max: int, step: int) -> list[list[int]]:
    """The paper notation ``long x [short_min:short_max:step]`` as a list of (long, short) pairs, both ends included.

    ``scales_from_range(1333, 640, 800, 32)`` -> ``[[1333, 640], [1333, 672], ..., [1333, 800]]``.
    """
    if step <= 0 or short_min > short_max:
        raise ValueError(f"scales_from_range needs step > 0 and short_min <= short_max, got "
                         f"[{short_min}:{short_max}:{step}]")
    if (short_max - short_min) % step:
        raise ValueError(f"scales_from_range: {short_max} - {short_min} is not a multiple of step {step}")
    return [[int(long), int(s)] for s in range(short_min, short_max + 1, step)]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def rescale_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """(new_h, new_w) keeping the aspect ratio so that long side <= max(scale) and short side <= min(scale).

    factor = min(max(scale) / max(h, w), min(scale) / min(h, w)); sizes are rounded half up (as MMCV does).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, _round_half_up(height * factor)), max(1, _round_half_up(width * factor))


def _resize_image(image: np.ndarray, new_w: int, new_h: int, backend: str) -> np.ndarray:
    """Bilinear resize of a uint8 (h, w, C) image with OpenCV or Pillow (see :class:`Resize`'s ``backend``)."""
    if backend == "pillow":
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers on instance masks (polygons stay polygons; RLE is decoded, transformed and re-encoded).

def _scale_polygons(polygons: list, sx: float, sy: float) -> list[np.ndarray]:
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * (sx, sy)
        out.append(p.reshape(-1))
    return out


def _flip_polygons(polygons: list, width: int) -> list[np.ndarray]:
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2).copy()
        p[:, 0] = width - p[:, 0]
        out.append(p.reshape(-1))
    return out


def _resize_rle(rle: dict, h: int, w: int, new_h: int, new_w: int) -> dict:
    bitmap = rle_to_bitmap(rle, h, w)
    return bitmap_to_rle(cv2.resize(bitmap, (new_w, new_h), interpolation=cv2.INTER_NEAREST))


def _flip_rle(rle: dict, h: int, w: int) -> dict:
    return bitmap_to_rle(np.ascontiguousarray(rle_to_bitmap(rle, h, w)[:, ::-1]))


def _clip_boxes(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    boxes = boxes.copy()
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes


# ----------------------------------------------------------------------------------------------------------

@register
class Resize(Transform):
    """Resize the image, boxes and masks.

    Args:
        scale: one (long, short) pair such as ``[1333, 800]``, or a list of pairs.
        keep_ratio: True: scale by ``min(long / max(h, w), short / min(h, w))`` (see :func:`rescale_size`).
            False: resize to exactly ``(w, h) = (long, short)`` of the chosen pair.
        multiscale_mode: with several pairs, ``"value"`` picks one pair uniformly; ``"range"`` takes exactly two
            pairs and draws the long side uniformly (integers) between their long sides and the short side between
            their short sides.
        backend: how the image is interpolated (bilinear): ``"cv2"`` (OpenCV's ``INTER_LINEAR``) or ``"pillow"``
            (Pillow's ``BILINEAR``, which also filters over the source footprint when shrinking; what Detectron2's
            ``ResizeTransform`` does to uint8 images), as MMDetection's ``Resize(backend=...)``.

    Boxes and proposals are multiplied by the actual ``(new_w / w, new_h / h)`` and clipped to the new image.
    Polygon masks are scaled the same way; RLE masks are decoded, resized with nearest-neighbour and re-encoded (RLE,
    str counts). A ``seg_map`` is resized to the new image size with nearest-neighbour (OpenCV's ``INTER_NEAREST``,
    as MMDetection's ``Resize`` does to ``gt_seg_map``): pixel (x, y) takes source pixel
    (floor(x * w / new_w), floor(y * h / new_h)). ``scale_factor`` accumulates over successive resizes (it is always
    img_shape / ori_shape).
    """

    def __init__(self, scale: Sequence[int] | Sequence[Sequence[int]], keep_ratio: bool = True,
                 multiscale_mode: str = "value", backend: str = "cv2"):
        if multiscale_mode not in ("value", "range"):
            raise ValueError(f"multiscale_mode must be 'value' or 'range', got {multiscale_mode!r}")
        if backend not in ("cv2", "pillow"):
            raise ValueError(f"backend must be 'cv2' or 'pillow', got {backend!r}")
        self.backend = backend
        pairs = [scale] if len(scale) and np.isscalar(scale[0]) else list(scale)
        if not pairs:
            raise ValueError("Resize needs at least one (long, short) scale")
        checked = []
        for pair in pairs:
            if np.isscalar(pair) or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in pair):
                raise ValueError(f"each scale must be a pair of positive integers (long, short), got {pair!r}")
            checked.append((int(pair[0]), int(pair[1])))
        if multiscale_mode == "range" and len(checked) != 2:
            raise ValueError(f"multiscale_mode 'range' needs exactly two scales, got {len(checked)}")
        self.scale = checked
        self.keep_ratio = keep_ratio
        self.multiscale_mode = multiscale_mode

    def choose_scale(self, rng: np.random.Generator) -> tuple[int, int]:
        """The (long, short) pair used for one image."""
        if len(self.scale) == 1:
            return self.scale[0]
        if self.multiscale_mode == "value":
            return self.scale[int(rng.integers(len(self.scale)))]
        longs = sorted(max(p) for p in self.scale)
        shorts = sorted(min(p) for p in self.scale)
        return int(rng.integers(longs[0], longs[1] + 1)), int(rng.integers(shorts[0], shorts[1] + 1))

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        image = sample["image"]
        h, w = image.shape[:2]
        scale = self.choose_scale(rng)
        if self.keep_ratio:
            new_h, new_w = rescale_size(h, w, scale)
        else:
            new_w, new_h = scale
        out = dict(sample)
        if (new_h, new_w) != (h, w):
            out["image"] = _resize_image(image, new_w, new_h, self.backend)
        sx, sy = new_w / w, new_h / h
        factor = np.array([sx, sy, sx, sy], dtype=np.float32)
        out["boxes"] = _clip_boxes(np.asarray(sample["boxes"], np.float32).reshape(-1, 4) * factor, new_h, new_w)
        out["ignore_boxes"] = _clip_boxes(
            np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4) * factor, new_h, new_w)
        if sample.get("proposals") is not None:
            out["proposals"] = _clip_boxes(
                np.asarray(sample["proposals"], np.float32).reshape(-1, 4) * factor, new_h, new_w)
        if sample.get("masks") is not None:
            out["masks"] = [_resize_rle(m, h, w, new_h, new_w) if isinstance(m, dict) else _scale_polygons(m, sx, sy)
                            for m in sample["masks"]]
        if sample.get("seg_map") is not None and (new_h, new_w) != (h, w):
            out["seg_map"] = cv2.resize(sample["seg_map"], (new_w, new_h), interpolation=cv2.INTER_NEAREST)
        old_sx, old_sy = sample.get("scale_factor", (1.0, 1.0))
        out["scale_factor"] = (float(old_sx) * sx, float(old_sy) * sy)
        out["img_shape"] = (new_h, new_w)
        return out


@register
class RandomFlip(Transform):
    """Flip the image horizontally with probability ``prob``: x1' = w - x2, x2' = w - x1; polygons x' = w - x;
    a ``seg_map``'s columns are reversed with the image's.

    Only ``direction="horizontal"`` is supported: it is the flip that the models' post-processing undoes
    (``img_metas[i]["flip"]``).
    """

    def __init__(self, prob: float = 0.5, direction: str = "horizontal"):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if direction != "horizontal":
            raise ValueError(f"only direction='horizontal' is supported (the flip that prediction un-does), "
                             f"got {direction!r}")
        self.prob = float(prob)
        self.direction = direction

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        do_flip = bool(rng.random() < self.prob)
        out = dict(sample)
        out["flip"] = bool(sample.get("flip", False)) ^ do_flip
        if not do_flip:
            return out
        image = sample["image"]
        h, w = image.shape[:2]
        out["image"] = np.ascontiguousarray(image[:, ::-1])
        for key in ("boxes", "ignore_boxes", "proposals"):
            if sample.get(key) is None:
                continue
            b = np.asarray(sample[key], np.float32).reshape(-1, 4)
            out[key] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
        if sample.get("masks") is not None:
            out["masks"] = [_flip_rle(m, h, w) if isinstance(m, dict) else _flip_polygons(m, w)
                            for m in sample["masks"]]
        if sample.get("seg_map") is not None:
            out["seg_map"] = np.ascontiguousarray(sample["seg_map"][:, ::-1])
        return out


@register
class Normalize(BatchTransform):
    """``(image - mean) / std`` per channel, applied by the collate step (batch-level, on the training device).

    ``mean`` / ``std`` are in the channel order the model expects. Images are already RGB after loading, so
    ``to_rgb=True`` (MMDetection's flag for "convert BGR to RGB first") keeps them RGB; ``to_rgb=False`` means the
    model wants BGR input (e.g. Caffe-style weights), and the collate step reverses the channels before
    normalising.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.to_rgb = bool(to_rgb)


@register
class Pad(BatchTransform):
    """Zero-pad each image (after normalisation) so that H and W are multiples of ``size_divisor`` (batch-level);
    semantic maps are padded with 255, the ignored id (MMDetection's ``seg_pad_value``)."""

    def __init__(self, size_divisor: int = 32):
        if size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self.size_divisor = int(size_divisor)
