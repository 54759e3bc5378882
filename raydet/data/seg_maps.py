"""Semantic segmentation maps: one PNG of class ids per image (COCO-stuff's ``stuffthingmaps``, what Hybrid Task
Cascade's semantic branch trains on; Chen et al. 2019, Sec. 3.3 and 4.1).

A dataset's ``seg_prefix`` is a folder (local or a URI, :mod:`raydet.fileio`) holding, for the image ``file_name``
``a/b.jpg``, the map ``<seg_prefix>/a/b.png`` (MMDetection's ``data_prefix=dict(seg=...)`` with
``seg_map_suffix='.png'``). A map is a single-channel 8-bit PNG (Pillow mode ``L``, or ``P`` whose palette indices
are the ids) of the image's (height, width); each pixel is a class id, and 255 marks pixels no class is given for
(COCO-stuff's "unlabeled"; the loss ignores them, as it ignores the padding of a batch).

* :func:`seg_map_path`: where an image's map is.
* :func:`check_seg_maps`: the readers' look at every map when the annotations are read (missing, unreadable, not
  single-channel, a size that is not the image's), each problem naming the map and the image record.
* :func:`read_seg_map`: decode one map -> uint8 (h, w), with the same checks (the Ray Data decode actors call it).

The per-image transforms move a sample's ``seg_map`` with the image (nearest neighbour, so no new ids appear;
:mod:`raydet.data.transforms`), and the collate step pads it with 255 into the batch's ``gt_semantic_seg``.
"""
from __future__ import annotations

import io
import posixpath
from typing import Any

import numpy as np

from raydet import fileio

from .image_io import HEADER_BYTES, CorruptImageError, ImageSizeMismatchError, size_text

__all__ = ["SEG_IGNORE_INDEX", "SEG_MAP_SUFFIX", "seg_map_path", "read_seg_map", "check_seg_maps"]

SEG_IGNORE_INDEX = 255  # [mmdet] CrossEntropyLoss(ignore_index=255), DetDataPreprocessor(seg_pad_value=255)
SEG_MAP_SUFFIX = ".png"  # [mmdet] CocoDataset seg_map_suffix
_MODES = ("L", "P")


def seg_map_path(seg_prefix: str, file_name: str) -> str:
    """The map of the image ``file_name``: ``file_name`` without its extension, plus ``.png``, under ``seg_prefix``."""
    return fileio.join(seg_prefix, posixpath.splitext(file_name)[0] + SEG_MAP_SUFFIX)


def _who(image_id: Any) -> str:
    return f"image id {image_id}: " if image_id is not None else ""


def _open(data_or_path):
    from PIL import Image

    return Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)


def _check(im, path: str, who: str, size: tuple[int, int] | None) -> None:
    """Mode and size of an opened (not decoded) map; raises naming ``path``."""
    if im.mode not in _MODES:
        raise CorruptImageError(f"{who}semantic map {path} is a Pillow mode {im.mode!r} image; expected a "
                                f"single-channel 8-bit PNG of class ids (mode L or P)")
    width, height = im.size
    if size is not None and (height, width) != (int(size[0]), int(size[1])):
        raise ImageSizeMismatchError(f"{who}semantic map {path} is {size_text(height, width)} but its image is "
                                     f"{size_text(*size, words=False)}")


def read_seg_map(path: str, image_id: Any = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one map -> uint8 (h, w) class ids.

    Args:
        path: the PNG (local or a URI).
        image_id: named in errors.
        size: the image's (height, width); the map must have it.

    Raises FileNotFoundError (missing), :class:`~raydet.data.image_io.CorruptImageError` (not decodable, not a
    single-channel 8-bit image) or :class:`~raydet.data.image_io.ImageSizeMismatchError` (not ``size``), each
    naming the file and the image id (OSErrors, so a training dataset's ``on_error: skip`` replaces the image as it
    does for an unusable image file).
    """
    from PIL import UnidentifiedImageError

    who = _who(image_id)
    try:
        data = fileio.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{who}semantic map not found: {path}") from None
    except fileio.StorageError as exc:
        raise fileio.StorageError(f"{who}{exc}") from None
    except OSError as exc:
        raise OSError(f"{who}cannot read semantic map {path}: {exc}") from None
    try:
        with _open(data) as im:
            _check(im, path, who, size)
            return np.array(im, dtype=np.uint8)  # P: the palette indices, not the colours
    except (UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(f"{who}cannot decode semantic map {path}: {exc}") from None
    except CorruptImageError:
        raise
    except OSError as exc:  # truncated data
        raise CorruptImageError(f"{who}cannot decode semantic map {path}: {exc}") from None


def check_seg_maps(records: list[dict], problems, describe, threads: int = 16) -> list[dict]:
    """The records whose ``seg_map_path`` is a usable map of their image's size, from each map's header (Pillow, no
    pixel decoding; threads, the work is I/O). Each other record is reported to ``problems`` (``add(kind,
    message)``) with ``describe(record)`` and dropped: kinds ``missing_seg_map``, ``bad_seg_map`` (unreadable, not
    single-channel 8-bit), ``seg_map_size_mismatch`` (naming both sizes)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import UnidentifiedImageError

    def probe(record: dict) -> tuple[str | None, str]:
        path = record["seg_map_path"]
        try:
            head = fileio.read_ends(path, HEADER_BYTES, 0)[0] if fileio.is_uri(path) else path
            with _open(head) as im:
                _check(im, path, "", (record["height"], record["width"]))
        except FileNotFoundError:
            return "missing_seg_map", f"semantic map not found: {path}"
        except ImageSizeMismatchError as exc:
            return "seg_map_size_mismatch", str(exc)
        except CorruptImageError as exc:
            return "bad_seg_map", str(exc)
        except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
            return "bad_seg_map", f"cannot read semantic map {path}: {exc}"
        return None, ""

    if any(fileio.is_uri(r["seg_map_path"]) for r in records[:1]):
        threads = max(threads, 64)  # requests to a bucket: waiting, not work
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(probe, records))
    kept = []
    for record, (kind, why) in zip(records, found):
        if kind is None:
            kept.append(record)
        else:
            problems.add(kind, f"{describe(record)}: {why} (image dropped)")
    return kept
