"""Instance masks: polygons, COCO RLE and bitmaps (NumPy + pycocotools; no Python loop over pixels).

An *instance mask* in a record (see :mod:`raydet.structures`) is either

* a list of polygons, each a flat ``[x0, y0, x1, y1, ...]`` list in pixels of the original image, or
* a COCO RLE dict ``{"size": [h, w], "counts": str | bytes | list[int]}`` (compressed, or uncompressed as COCO
  stores crowd regions).

Bitmaps are ``uint8`` arrays, 1 inside the object. Rasterisation is pycocotools', the one COCOeval scores with: a
pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``, so the polygon of the square ``[x, x + 4] x [y, y + 4]``
covers exactly the 16 pixels ``rows y..y+3, columns x..x+3``.

What a valid polygon is has one answer, :func:`valid_polygons`, used wherever a polygon becomes a mask: the
dataset readers (validation), the training mask targets, the Ray Data mask column, the evaluation ground truth
(:mod:`raydet.evaluation.coco`) and every RLE conversion here. Malformed polygons (not flat lists of numbers, an odd
number of coordinates, non-finite values) are errors; polygons without area (fewer than 3 points, or all points on
one line) are dropped. pycocotools would rasterise those to nothing, or, given 4 numbers, read them as a box (and,
as the first polygon of a list, fail with "Argument 'bb' has incorrect type").
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

__all__ = [
    "valid_polygons", "valid_polygons_many", "polygons_to_rle", "to_rle", "polygons_to_bitmap", "rle_to_bitmap",
    "instance_masks_to_bitmaps", "bitmap_to_rle", "mask_area", "bitmap_to_box",
]


def _empty_rle(height: int, width: int) -> dict:
    return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]


# Points closer to a line than this fraction of the polygon's extent count as on it (float rounding).
_COLLINEAR_RTOL = 1e-9


def _is_number_list(poly: Any) -> bool:
    if isinstance(poly, np.ndarray):
        return poly.dtype.kind in "iuf"
    if isinstance(poly, (list, tuple)):
        return (all(type(v) is float or type(v) is int for v in poly)  # the JSON case, fast
                or all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                       for v in poly))
    return False


def _has_area(p: np.ndarray) -> bool:
    """Whether the points of a flat polygon (x0, y0, x1, y1, ...; 3 or more points) do not all lie on one line."""
    x, y = p[0::2] - p[0], p[1::2] - p[1]
    sq = x * x + y * y
    far = int(sq.argmax())
    if sq[far] == 0:  # all points equal
        return False
    cross = x * y[far] - y * x[far]  # |d_i| |d_far| sin(angle) = (distance of point i to the line) x |d_far|
    return bool(np.abs(cross).max() > _COLLINEAR_RTOL * sq[far])


def valid_polygons(polygons: Any) -> list[list[float]]:
    """The polygons of one instance mask that enclose an area, as flat float lists (the one rule; see the module).

    Raises ValueError naming the polygon's index when ``polygons`` is not a list of flat lists of numbers, or a
    polygon has an odd number of coordinates or a non-finite one. Drops (without error) polygons with fewer than 3
    points (6 coordinates) and polygons whose points all lie on one line (zero area); the result may be empty.
    """
    if not isinstance(polygons, (list, tuple)):
        raise ValueError(f"polygons must be a list of flat [x0, y0, x1, y1, ...] lists, got {type(polygons).__name__}")
    out = []
    for j, poly in enumerate(polygons):
        if not _is_number_list(poly):
            raise ValueError(f"polygon {j} is not a flat list of numbers")
        p = np.asarray(poly, dtype=np.float64).ravel()
        if p.size % 2:
            raise ValueError(f"polygon {j} has an odd number of coordinates ({p.size})")
        if not np.isfinite(p).all():
            raise ValueError(f"polygon {j} has non-finite coordinates")
        if p.size >= 6 and _has_area(p):
            out.append(p.tolist())
    return out


def valid_polygons_many(instances: list) -> list:
    """:func:`valid_polygons` of many instance masks at once (a dataset's annotations): for each instance its valid
    polygons, or the ValueError that :func:`valid_polygons` raises for it, with the same values and messages.

    The common case, lists of flat lists of JSON numbers, is checked with NumPy over all coordinates together (no
    per-polygon NumPy calls: a COCO train2017-sized file has 860,000 instances); any other instance (not a list, an
    element that is not a list, a number that is not a Python float or int) goes through :func:`valid_polygons`.
    The instances are checked ``chunk`` at a time, which bounds the temporary arrays (about 50 bytes per
    coordinate: ~0.2 GiB per chunk of 65,536 COCO instances instead of ~2 GiB for all of train2017).
    """
    if len(instances) > _CHUNK:
        results: list = []
        for start in range(0, len(instances), _CHUNK):
            results.extend(_valid_polygons_chunk(instances[start:start + _CHUNK]))
        return results
    return _valid_polygons_chunk(instances)


_CHUNK = 65_536


def _valid_polygons_chunk(instances: list) -> list:
    import itertools

    results: list = [None] * len(instances)
    fast = [k for k, polys in enumerate(instances)
            if type(polys) is list and all(type(p) is list for p in polys)]
    polys = [p for k in fast for p in instances[k]]
    types = set(map(type, itertools.chain.from_iterable(polys)))
    if not types <= {float, int}:  # bool, str, None, ...: the per-instance rule says which polygon and why
        fast = []
    slow = sorted(set(range(len(instances))) - set(fast))
    for k in slow:
        try:
            results[k] = valid_polygons(instances[k])
        except ValueError as exc:
            results[k] = exc
    if not fast:
        return results
    sizes = np.fromiter(map(len, polys), np.int64, len(polys))
    flat = np.fromiter(itertools.chain.from_iterable(polys), np.float64, int(sizes.sum()))
    per_instance = np.fromiter((len(instances[k]) for k in fast), np.int64, len(fast))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(len(polys)), sizes)
    finite_el = np.isfinite(flat)
    bad_count = np.bincount(owner[~finite_el], minlength=len(polys))
    broken = (sizes % 2 == 1) | (bad_count > 0)  # valid_polygons raises for these
    # _has_area over the polygons of 3 or more points, each polygon's points relative to its first point
    big = ~broken & (sizes >= 6)
    has_area = np.zeros(len(polys), bool)
    if big.any():
        sub = flat[np.repeat(big, sizes)]
        sub_sizes = sizes[big]
        sub_starts = np.concatenate([[0], np.cumsum(sub_sizes)[:-1]])
        sub_owner = np.repeat(np.arange(len(sub_sizes)), sub_sizes // 2)
        x = sub[0::2] - np.repeat(sub[sub_starts], sub_sizes // 2)
        y = sub[1::2] - np.repeat(sub[sub_starts + 1], sub_sizes // 2)
        sq = x * x + y * y
        point_starts = sub_starts // 2
        sq_max = np.maximum.reduceat(sq, point_starts)
        at_max = np.flatnonzero(sq == sq_max[sub_owner])  # ascending: the first one of each polygon is argmax
        _, first = np.unique(sub_owner[at_max], return_index=True)
        far = at_max[first]
        cross = x * np.repeat(y[far], sub_sizes // 2) - y * np.repeat(x[far], sub_sizes // 2)
        cross_max = np.maximum.reduceat(np.abs(cross), point_starts)
        has_area[big] = (sq_max != 0) & (cross_max > _COLLINEAR_RTOL * sq_max)
    int_coords = int in types  # results hold floats: integer coordinates are converted
    instance_of = np.repeat(np.arange(len(fast)), per_instance)
    broken_instances = np.bincount(instance_of[broken], minlength=len(fast)) > 0
    whole = ~broken_instances & (np.bincount(instance_of[~has_area], minlength=len(fast)) == 0) & (per_instance > 0)
    j = 0
    for n_k, k, bad, all_kept in zip(per_instance.tolist(), fast, broken_instances.tolist(),
                                     (whole & (not int_coords)).tolist()):
        if all_kept:  # every polygon valid, every coordinate a float: the instance's own lists
            results[k] = list(instances[k])
        elif n_k == 0:
            results[k] = []
        elif bad:
            try:
                results[k] = valid_polygons(instances[k])
            except ValueError as exc:
                results[k] = exc
        else:
            keep = has_area[j:j + n_k].tolist()
            results[k] = [(flat[starts[j + i]:starts[j + i] + sizes[j + i]].tolist() if int_coords else p)
                          for i, (p, kept) in enumerate(zip(instances[k], keep)) if kept]
        j += n_k
    return results


def polygons_to_rle(polygons: list, height: int, width: int) -> dict:
    """Polygons of one instance -> one compressed RLE (``counts`` as bytes), the union of its
    :func:`valid_polygons` (empty when none is valid)."""
    polys = valid_polygons(polygons)
    if not polys:
        return _empty_rle(height, width)
    return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))


def _rle_to_compressed(rle: dict, height: int, width: int) -> dict:
    if "counts" not in rle or "size" not in rle:
        raise ValueError(f"an RLE dict needs 'size' and 'counts', got keys {sorted(rle)}")
    size = [int(s) for s in rle["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} does not match the image size {[height, width]}")
    counts = rle["counts"]
    if isinstance(counts, (list, tuple, np.ndarray)):  # uncompressed
        counts = [int(c) for c in counts]
        if sum(counts) != height * width or any(c < 0 for c in counts):
            raise ValueError(f"uncompressed RLE counts must be non-negative and sum to {height * width}")
        return mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be str, bytes or a list of ints, got {type(counts).__name__}")
    return {"size": size, "counts": counts}


def to_rle(mask: Any, height: int, width: int) -> dict:
    """One instance mask (polygon list or RLE dict) -> compressed RLE with ``counts`` as bytes."""
    if isinstance(mask, dict):
        return _rle_to_compressed(mask, height, width)
    return polygons_to_rle(mask, height, width)


def polygons_to_bitmap(polygons: list, height: int, width: int) -> np.ndarray:
    """Union of the polygons of one instance -> uint8 (height, width)."""
    return np.ascontiguousarray(mask_utils.decode(polygons_to_rle(polygons, height, width)))


def rle_to_bitmap(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (compressed or uncompressed counts) -> uint8 (height, width)."""
    return np.ascontiguousarray(mask_utils.decode(_rle_to_compressed(rle, height, width)))


def instance_masks_to_bitmaps(masks: list, height: int, width: int) -> np.ndarray:
    """A record's ``masks`` (each item polygons or an RLE dict) -> uint8 (n, height, width).

    Raises ValueError naming the index of a malformed item.
    """
    rles = []
    for i, m in enumerate(masks):
        try:
            rles.append(to_rle(m, height, width))
        except (ValueError, TypeError, IndexError) as e:
            raise ValueError(f"instance mask {i}: {e}") from e
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def bitmap_to_rle(mask: np.ndarray) -> dict:
    """bool / uint8 (h, w) bitmap -> COCO compressed RLE with ``counts`` as str (JSON-safe)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"bitmap_to_rle expects one (h, w) mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_area(masks: np.ndarray) -> np.ndarray | int:
    """Pixel count of (h, w) -> int, or of (n, h, w) -> int64 (n,)."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        return int(np.count_nonzero(masks))
    if masks.ndim != 3:
        raise ValueError(f"mask_area expects (h, w) or (n, h, w), got shape {masks.shape}")
    return np.count_nonzero(masks.reshape(masks.shape[0], -1), axis=1).astype(np.int64)


def bitmap_to_box(masks: np.ndarray) -> np.ndarray:
    """(n, h, w) bitmaps -> float32 (n, 4) tight (x1, y1, x2, y2) boxes; x2 = last column + 1. Empty masks -> 0s."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"bitmap_to_box expects (n, h, w) masks, got shape {masks.shape}")
    n, h, w = masks.shape
    cols = masks.any(axis=1)  # (n, w)
    rows = masks.any(axis=2)  # (n, h)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.float32)
    boxes[~cols.any(axis=1)] = 0.0
    return boxes
