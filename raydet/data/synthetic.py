"""A deterministic synthetic detection dataset: coloured shapes with boxes and polygon masks.

It needs no download, so tests, the quickstart and the benchmarks can run anywhere. Three classes:
``rectangle``, ``ellipse`` and ``triangle``, painted from the very bitmaps that the instance polygons rasterise to
(``raydet.masks``: pixel (x, y) covers [x, x + 1) x [y, y + 1)), so masks and pixels agree exactly and boxes are the
polygons' extents in the same pixel frame.
"""
from __future__ import annotations

import numpy as np

from raydet.masks import polygons_to_bitmap

CLASSES = ("rectangle", "ellipse", "triangle")

__all__ = ["CLASSES", "make_shapes_dataset", "make_shape_sample"]


def _shape_polygon(kind: int, cx: float, cy: float, w: float, h: float, rng: np.random.Generator) -> np.ndarray:
    """(k, 2) float polygon of one shape centred at (cx, cy) inside a w x h box."""
    if kind == 0:  # axis-aligned rectangle
        return np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                         [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])
    if kind == 1:  # ellipse as a 32-gon
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return np.stack([cx + w / 2 * np.cos(t), cy + h / 2 * np.sin(t)], axis=1)
    # triangle: apex at a random x along the top edge, base along the bottom
    apex = cx - w / 2 + rng.uniform(0.2, 0.8) * w
    return np.array([[apex, cy - h / 2], [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])


def make_shape_sample(image_id: int, height: int = 128, width: int = 128, max_objects: int = 3,
                      min_size: int = 20, max_size: int | None = None, seed: int = 0, with_seg: bool = False):
    """One image (HxWx3 uint8 RGB) and its record (see raydet.structures) with 1..max_objects shapes.

    Shapes do not overlap (rejection sampling on boxes), so every instance is fully visible. ``with_seg``: the record
    also carries ``seg_map``, uint8 (height, width) semantic class ids painted from the same instance bitmaps: label
    + 1 on each shape's pixels, 0 on the background (4 semantic classes); the draws, and so the image, are unchanged.
    """
    rng = np.random.default_rng([seed, image_id])
    max_size = max_size or max(min_size + 1, min(height, width) // 2)
    background = rng.integers(0, 60, size=3)
    image = np.clip(background + rng.normal(0, 8, size=(height, width, 3)), 0, 255).astype(np.uint8)

    boxes, labels, polygons = [], [], []
    seg_map = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(50):
            w, h = rng.uniform(min_size, max_size, size=2)
            cx = rng.uniform(w / 2 + 1, width - w / 2 - 1)
            cy = rng.uniform(h / 2 + 1, height - h / 2 - 1)
            kind = int(rng.integers(0, len(CLASSES)))
            poly = _shape_polygon(kind, cx, cy, w, h, rng)
            box = np.array([poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max()])
            if all(_disjoint(box, b, margin=4) for b in boxes):
                break
        else:
            continue
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        # (OpenCV's fillPoly would put pixel centres at integer coordinates: half a pixel off the annotations.)
        inside = polygons_to_bitmap([poly.reshape(-1).tolist()], height, width).astype(bool)
        image[inside] = colour
        seg_map[inside] = kind + 1
        boxes.append(box)
        labels.append(kind)
        polygons.append([poly.reshape(-1).astype(float).tolist()])

    record = {
        "image_id": int(image_id),
        "file_name": f"synthetic_{image_id:06d}.png",
        "height": height,
        "width": width,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "ignore": np.zeros(len(labels), dtype=bool),
        "masks": polygons,
    }
    if with_seg:
        record["seg_map"] = seg_map
    return image, record


def _disjoint(a, b, margin: float) -> bool:
    return a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1]


def make_shapes_dataset(num_images: int, height: int = 128, width: int = 128, max_objects: int = 3,
                        min_size: int = 20, max_size: int | None = None, seed: int = 0, start_id: int = 1,
                        with_seg: bool = False):
    """``num_images`` (image, record) pairs, deterministic for a given seed (``with_seg``: see
    :func:`make_shape_sample`)."""
    return [make_shape_sample(start_id + i, height, width, max_objects, min_size, max_size, seed, with_seg)
            for i in range(num_images)]
