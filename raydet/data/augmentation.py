"""The SSD data augmentation (Liu et al. 2016, Sec. 2.2 "Data augmentation"; MMDetection's transforms of the same
names): photometric distortion, expand (zoom out on a mean-filled canvas) and min-IoU random crop (zoom in).

Per-image transforms as in :mod:`raydet.data.transforms` (``sample_out = t(sample, rng)``, inputs never modified;
images stay uint8 RGB). Each transform draws its random values first and then applies a deterministic method
(``PhotoMetricDistortion.apply``, ``Expand.expand``, ``MinIoURandomCrop.crop``) that the tests call with values
chosen by hand. Boxes, ignore boxes, proposals, instance masks (polygons or RLE) and semantic maps move with the
image. ``Expand`` and ``MinIoURandomCrop`` change ``img_shape`` but not ``ori_shape`` / ``scale_factor``: they are
training augmentations, whose predictions are never mapped back to the file.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from raydet.masks import bitmap_to_rle, rle_to_bitmap
from raydet.registry import register

from .transforms import Transform

__all__ = ["PhotoMetricDistortion", "Expand", "MinIoURandomCrop", "box_iou"]


def _pair(values, name: str, lo: float = 0.0) -> tuple[float, float]:
    if len(values) != 2 or not lo <= values[0] <= values[1]:
        raise ValueError(f"{name} must be (low, high) with {lo} <= low <= high, got {tuple(values)}")
    return float(values[0]), float(values[1])


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (n, 4), all (x1, y1, x2, y2) with areas (x2 - x1)(y2 - y1); -> (n,)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def _shift_polygons(polygons: list, dx: float, dy: float) -> list[np.ndarray]:
    out = []
    for poly in polygons:
        p = np.asarray(poly, dtype=np.float64).reshape(-1, 2) + (dx, dy)
        out.append(p.reshape(-1))
    return out


@register
class PhotoMetricDistortion(Transform):
    """Random brightness, contrast, saturation, hue and channel order, each applied with probability 1/2, in
    MMDetection's order:

    1. brightness: ``x + delta``, delta ~ U(-brightness_delta, brightness_delta);
    2. contrast ``x * alpha``, alpha ~ U(contrast_range), here or at step 6 (probability 1/2 each);
    3. to HSV (float: H in degrees [0, 360), S in [0, 1]);
    4. saturation ``S * s``, s ~ U(saturation_range) (then clipped to [0, 1] when s > 1);
    5. hue ``H + h``, h ~ U(-hue_delta, hue_delta) degrees, wrapped into [0, 360];
    6. back to RGB; contrast if not done at step 2;
    7. a random permutation of the three channels.

    The image is computed in float32 and returned rounded and clipped to uint8 [0, 255] (MMDetection returns the
    unclipped float image; raydet's images travel as uint8).
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: float = 18):
        if brightness_delta < 0:
            raise ValueError(f"brightness_delta must be >= 0, got {brightness_delta}")
        if not 0 <= hue_delta <= 180:
            raise ValueError(f"hue_delta must be in [0, 180] degrees, got {hue_delta}")
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = _pair(contrast_range, "contrast_range")
        self.saturation_range = _pair(saturation_range, "saturation_range")
        self.hue_delta = float(hue_delta)

    def draw(self, rng: np.random.Generator) -> dict:
        """The random choices for one image: each value, or None where that step is skipped."""
        flags = rng.integers(0, 2, size=6)
        return {
            "brightness": float(rng.uniform(-self.brightness_delta, self.brightness_delta)) if flags[0] else None,
            "contrast_first": bool(flags[1]),
            "contrast": float(rng.uniform(*self.contrast_range)) if flags[2] else None,
            "saturation": float(rng.uniform(*self.saturation_range)) if flags[3] else None,
            "hue": float(rng.uniform(-self.hue_delta, self.hue_delta)) if flags[4] else None,
            "swap": rng.permutation(3) if flags[5] else None,
        }

    @staticmethod
    def apply(image: np.ndarray, params: dict) -> np.ndarray:
        """Distort a uint8 RGB image (h, w, 3) by the choices of :meth:`draw` -> uint8 (h, w, 3)."""
        img = image.astype(np.float32)
        if params.get("brightness") is not None:
            img += params["brightness"]
        contrast = params.get("contrast")
        if contrast is not None and params.get("contrast_first"):
            img *= contrast
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        if params.get("saturation") is not None:
            hsv[..., 1] *= params["saturation"]
            if params["saturation"] > 1:
                hsv[..., 1] = hsv[..., 1].clip(0, 1)
        if params.get("hue") is not None:
            hue = hsv[..., 0] + params["hue"]
            hsv[..., 0] = np.where(hue > 360, hue - 360, np.where(hue < 0, hue + 360, hue))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not params.get("contrast_first"):
            img *= contrast
        if params.get("swap") is not None:
            img = img[..., np.asarray(params["swap"])]
        return np.ascontiguousarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        out = dict(sample)
        out["image"] = self.apply(sample["image"], self.draw(rng))
        return out


@register
class Expand(Transform):
    """Zoom out: with probability ``prob``, place the image at a random offset on a canvas ``ratio`` times its size
    (ratio ~ U(ratio_range)) filled with the mean colour (SSD: ``ratio_range`` (1, 4), prob 0.5).

    Args:
        mean: the fill colour, in the model's channel order (the pipeline's ``Normalize`` mean); converted to uint8
            by truncation, as MMDetection fills its uint8 canvas.
        to_rgb: whether ``mean`` is in RGB order (True) or BGR (False, reversed for raydet's RGB images), as the
            ``to_rgb`` of ``Normalize``.
        ratio_range: (min, max) canvas size over image size, min >= 1.
        prob: probability of expanding.
        seg_ignore_label: the id a semantic map's canvas is filled with (MMDetection's ``Expand(seg_ignore_label)``,
            which has no default and needs one with semantic maps; here 255, the id the loss ignores).

    The canvas is ``(int(h * ratio), int(w * ratio))``; the image's top-left corner goes to
    ``(left, top) = (int(U(0, w ratio - w)), int(U(0, h ratio - h)))`` and every box, ignore box, mask and
    semantic map moves by it.
    """

    def __init__(self, mean: Sequence[float] = (0, 0, 0), to_rgb: bool = True,
                 ratio_range: Sequence[float] = (1, 4), prob: float = 0.5, seg_ignore_label: int = 255):
        if len(mean) != 3:
            raise ValueError(f"mean needs 3 values, got {list(mean)}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if not 0 <= int(seg_ignore_label) <= 255:
            raise ValueError(f"seg_ignore_label must be a uint8 class id in [0, 255], got {seg_ignore_label}")
        self.seg_ignore_label = int(seg_ignore_label)
        self.mean = tuple(float(m) for m in mean)
        self.to_rgb = bool(to_rgb)
        self.ratio_range = _pair(ratio_range, "ratio_range", lo=1.0)
        self.prob = float(prob)
        rgb = self.mean if self.to_rgb else self.mean[::-1]
        self._fill = np.array(rgb, dtype=np.float64).astype(np.uint8)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        if rng.uniform(0, 1) > self.prob:
            return dict(sample)
        h, w = sample["image"].shape[:2]
        ratio = float(rng.uniform(*self.ratio_range))
        left = int(rng.uniform(0, w * ratio - w))
        top = int(rng.uniform(0, h * ratio - h))
        return self.expand(sample, ratio, left, top)

    def expand(self, sample: dict, ratio: float, left: int, top: int) -> dict:
        """The sample on a canvas of ``(int(h ratio), int(w ratio))`` with its image at column ``left``, row ``top``.

        Raises:
            ValueError: the image does not fit on the canvas at that offset.
        """
        image = sample["image"]
        h, w = image.shape[:2]
        new_h, new_w = int(h * ratio), int(w * ratio)
        if left < 0 or top < 0 or left + w > new_w or top + h > new_h:
            raise ValueError(f"Expand: a {w} x {h} image at ({left}, {top}) does not fit a {new_w} x {new_h} canvas")
        canvas = np.empty((new_h, new_w, image.shape[2]), dtype=image.dtype)
        canvas[...] = self._fill
        canvas[top:top + h, left:left + w] = image
        out = dict(sample)
        out["image"] = canvas
        out["img_shape"] = (new_h, new_w)
        shift = np.array([left, top, left, top], dtype=np.float32)
        out["boxes"] = np.asarray(sample["boxes"], np.float32).reshape(-1, 4) + shift
        out["ignore_boxes"] = np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4) + shift
        if sample.get("proposals") is not None:
            out["proposals"] = np.asarray(sample["proposals"], np.float32).reshape(-1, 4) + shift
        if sample.get("masks") is not None:
            masks = []
            for m in sample["masks"]:
                if isinstance(m, dict):
                    bitmap = np.zeros((new_h, new_w), dtype=np.uint8)
                    bitmap[top:top + h, left:left + w] = rle_to_bitmap(m, h, w)
                    masks.append(bitmap_to_rle(bitmap))
                else:
                    masks.append(_shift_polygons(m, left, top))
            out["masks"] = masks
        if sample.get("seg_map") is not None:
            seg = np.full((new_h, new_w), self.seg_ignore_label, dtype=np.uint8)
            seg[top:top + h, left:left + w] = sample["seg_map"]
            out["seg_map"] = seg
        return out


@register
class MinIoURandomCrop(Transform):
    """Zoom in: crop a random patch whose IoU with every box is at least a randomly chosen ``min_iou``.

    Each image draws a mode from ``(1, *min_ious, 0)`` (1: keep the whole image); then up to 50 patches of width
    ~ U(min_crop_size w, w) and height ~ U(min_crop_size h, h) with h / w in [0.5, 2], at a uniform position,
    corners truncated to whole pixels. The first patch whose IoU with every box (ignore boxes included) is >= the
    mode and that contains the centre of at least one box is taken; after 50 failures a new mode is drawn
    (MMDetection's loop). Boxes whose centre lies strictly inside the patch are kept, clipped to it (with
    ``bbox_clip_border``) and shifted; the others are dropped with their labels and masks. An image without boxes is
    cropped by the first patch of valid shape. A semantic map is cropped to the patch with the image.

    MMDetection draws the patch's left edge from ``numpy.random.uniform(w - new_w)``, i.e. between ``w - new_w`` and
    1 (NumPy's default ``high`` = 1); raydet draws it from U(0, w - new_w), the paper's uniform position.
    """

    def __init__(self, min_ious: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size: float = 0.3,
                 bbox_clip_border: bool = True):
        if len(min_ious) == 0 or any(not 0 <= v < 1 for v in min_ious):
            raise ValueError(f"min_ious must be a non-empty list of IoUs in [0, 1), got {list(min_ious)}")
        if not 0 < min_crop_size <= 1:
            raise ValueError(f"min_crop_size must be in (0, 1], got {min_crop_size}")
        self.min_ious = tuple(float(v) for v in min_ious)
        self.min_crop_size = float(min_crop_size)
        self.bbox_clip_border = bool(bbox_clip_border)

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        boxes = np.concatenate([np.asarray(sample["boxes"], np.float32).reshape(-1, 4),
                                np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4)])
        modes = (1.0, *self.min_ious, 0.0)
        while True:
            mode = modes[int(rng.integers(len(modes)))]
            if mode == 1.0:
                return dict(sample)
            patch = self.draw_patch(boxes, sample["image"].shape[:2], mode, rng)
            if patch is not None:
                return self.crop(sample, patch)

    def draw_patch(self, boxes: np.ndarray, shape: tuple[int, int], min_iou: float,
                   rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """Up to 50 random patches (x1, y1, x2, y2) of an image of ``shape`` (h, w); the first with IoU >= min_iou
        with every box (n, 4) and a box centre inside, or None."""
        h, w = int(shape[0]), int(shape[1])
        for _ in range(50):
            new_w = rng.uniform(self.min_crop_size * w, w)
            new_h = rng.uniform(self.min_crop_size * h, h)
            if not 0.5 <= new_h / new_w <= 2:
                continue
            left = rng.uniform(0, w - new_w)
            top = rng.uniform(0, h - new_h)
            patch = (int(left), int(top), int(left + new_w), int(top + new_h))
            if patch[2] == patch[0] or patch[3] == patch[1]:
                continue
            if len(boxes):
                if box_iou(np.asarray(patch, np.float64), boxes).min() < min_iou:
                    continue
                if not self.centre_inside(boxes, patch).any():
                    continue
            return patch
        return None

    @staticmethod
    def centre_inside(boxes: np.ndarray, patch: Sequence[int]) -> np.ndarray:
        """(n,) bool: the box centre lies strictly inside the patch (x1, y1, x2, y2)."""
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        return (cx > patch[0]) & (cy > patch[1]) & (cx < patch[2]) & (cy < patch[3])

    def _crop_boxes(self, boxes: np.ndarray, keep: np.ndarray, patch: Sequence[int]) -> np.ndarray:
        x1, y1, x2, y2 = patch
        boxes = boxes[keep].copy()
        if self.bbox_clip_border:
            boxes[:, 0::2] = boxes[:, 0::2].clip(x1, x2)
            boxes[:, 1::2] = boxes[:, 1::2].clip(y1, y2)
        return (boxes - np.array([x1, y1, x1, y1], dtype=np.float32)).astype(np.float32)

    def crop(self, sample: dict, patch: Sequence[int]) -> dict:
        """The sample cropped to the integer patch (x1, y1, x2, y2), keeping the boxes whose centre is inside."""
        x1, y1, x2, y2 = (int(v) for v in patch)
        image = sample["image"]
        h, w = image.shape[:2]
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise ValueError(f"MinIoURandomCrop: patch {tuple(patch)} is not inside the {w} x {h} image")
        boxes = np.asarray(sample["boxes"], np.float32).reshape(-1, 4)
        ignore = np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4)
        keep = self.centre_inside(boxes, (x1, y1, x2, y2))
        out = dict(sample)
        out["image"] = np.ascontiguousarray(image[y1:y2, x1:x2])
        out["img_shape"] = (y2 - y1, x2 - x1)
        out["boxes"] = self._crop_boxes(boxes, keep, (x1, y1, x2, y2))
        out["labels"] = np.asarray(sample["labels"]).reshape(-1)[keep]
        out["ignore_boxes"] = self._crop_boxes(ignore, self.centre_inside(ignore, (x1, y1, x2, y2)), (x1, y1, x2, y2))
        if sample.get("proposals") is not None:  # as ignore boxes: kept when their centre is inside
            props = np.asarray(sample["proposals"], np.float32).reshape(-1, 4)
            out["proposals"] = self._crop_boxes(props, self.centre_inside(props, (x1, y1, x2, y2)), (x1, y1, x2, y2))
        if sample.get("masks") is not None:
            masks = []
            for m in (sample["masks"][i] for i in np.flatnonzero(keep)):
                if isinstance(m, dict):
                    masks.append(bitmap_to_rle(np.ascontiguousarray(rle_to_bitmap(m, h, w)[y1:y2, x1:x2])))
                else:
                    masks.append(_shift_polygons(m, -x1, -y1))
            out["masks"] = masks
        if sample.get("seg_map") is not None:
            out["seg_map"] = np.ascontiguousarray(sample["seg_map"][y1:y2, x1:x2])
        return out
