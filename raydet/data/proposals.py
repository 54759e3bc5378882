"""Precomputed proposal files: what ``raydet test --out-proposals`` writes and a dataset's ``proposal_file`` reads.

A proposal file holds, per image id, class-agnostic boxes (x1, y1, x2, y2) in pixels of the original image (the
file as the annotations describe it, before any transform) and their scores. It is an uncompressed NumPy ``.npz``
archive (no pickled objects; read with ``numpy.load(path, allow_pickle=False)``) with four arrays:

    image_ids  int64   (N,)     one entry per image, each id once
    offsets    int64   (N + 1,) image ``i``'s proposals are rows ``offsets[i]:offsets[i + 1]``; offsets[0] = 0,
                                non-decreasing, offsets[N] = M
    boxes      float32 (M, 4)   x1, y1, x2, y2 (x2 >= x1, y2 >= y1, finite)
    scores     float32 (M,)     higher is better; each image's rows are written best first

MMDetection's ``.pkl`` proposal files (a pickled list in dataset order) are not read: a pickle can run code, and a
list in dataset order breaks silently when the annotation file changes. A pickle-free file is easy to make from one,
e.g. ``write_proposals(path, ids, [p[:, :4] for p in pkl], [p[:, 4] for p in pkl])``.

Paths may be local or in object storage (``s3://``, ``gs://``: :mod:`raydet.fileio`). Every problem is a ValueError
naming the file and the key (or the image ids) it concerns.
"""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable, Sequence

import numpy as np

from raydet import fileio

__all__ = ["PROPOSAL_KEYS", "write_proposals", "read_proposals", "attach_proposals"]

PROPOSAL_KEYS = ("image_ids", "offsets", "boxes", "scores")
_MAX_IDS = 5  # image ids named in one error message


def write_proposals(path: str, image_ids: Sequence[int], boxes: Sequence[np.ndarray],
                    scores: Sequence[np.ndarray]) -> None:
    """Write one image's (k_i, 4) boxes and (k_i,) scores per id (each image's rows sorted by score, best first).

    Raises:
        ValueError: the lists differ in length, an id repeats, or an image's boxes and scores do not match.
    """
    if not len(image_ids) == len(boxes) == len(scores):
        raise ValueError(f"{path}: write_proposals needs one boxes and one scores array per image id, got "
                         f"{len(image_ids)} ids, {len(boxes)} boxes, {len(scores)} scores")
    ids = np.asarray(image_ids, np.int64).reshape(-1)
    _check_unique(ids, path)
    ordered_boxes, ordered_scores, counts = [], [], []
    for iid, b, s in zip(ids.tolist(), boxes, scores):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        s = np.asarray(s, np.float32).reshape(-1)
        if len(b) != len(s):
            raise ValueError(f"{path}: image id {iid}: {len(b)} boxes but {len(s)} scores")
        order = np.argsort(-s, kind="stable")
        ordered_boxes.append(b[order])
        ordered_scores.append(s[order])
        counts.append(len(b))
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=ids, offsets=offsets,
             boxes=np.concatenate(ordered_boxes) if ordered_boxes else np.zeros((0, 4), np.float32),
             scores=np.concatenate(ordered_scores) if ordered_scores else np.zeros(0, np.float32))
    fileio.write_bytes(path, buffer.getvalue())


def read_proposals(path: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image id -> (boxes float32 (k, 4), scores float32 (k,)), best first.

    Raises:
        ValueError: naming the file and, where one is at fault, the key: not found, not an ``.npz`` archive, a
            missing key, a wrong dtype or shape, offsets that do not partition the rows, a repeated image id, a
            non-finite box or one with x2 < x1 or y2 < y1.
    """
    try:
        data = fileio.read_bytes(path)
    except FileNotFoundError as exc:
        reason = f" ({exc.reason})" if isinstance(exc, fileio.StorageNotFoundError) else ""
        raise ValueError(f"{path}: proposal file not found{reason}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the proposal file: {str(exc).removeprefix(f'{path}: ')}") from None
    try:
        if not data.startswith((b"PK\x03\x04", b"\x93NUMPY")):  # a zip archive (.npz), or a lone .npy array
            raise ValueError(f"not an .npz archive (it starts with {data[:8]!r})")
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with archive:
            missing = [k for k in PROPOSAL_KEYS if k not in archive.files]
            if missing:
                raise ValueError(f"missing key(s) {', '.join(missing)} (the archive has {', '.join(archive.files)}; "
                                 f"a proposal file holds {', '.join(PROPOSAL_KEYS)})")
            arrays = {}
            for key in PROPOSAL_KEYS:
                try:
                    arrays[key] = archive[key]
                except ValueError as exc:  # an object array needs pickle: refused
                    raise ValueError(f"key {key}: {exc}") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a proposal file: {exc}") from None
    ids, offsets, boxes, scores = (arrays[k] for k in PROPOSAL_KEYS)

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{path}: key {key}: {why}")

    for key, arr, kind in (("image_ids", ids, "i"), ("offsets", offsets, "i"), ("boxes", boxes, "f"),
                           ("scores", scores, "f")):
        if arr.dtype.kind not in (kind, "u" if kind == "i" else kind):
            raise bad(key, f"expected {'integers' if kind == 'i' else 'floats'}, got dtype {arr.dtype}")
    if ids.ndim != 1:
        raise bad("image_ids", f"expected shape (N,), got {ids.shape}")
    if offsets.shape != (len(ids) + 1,):
        raise bad("offsets", f"expected shape ({len(ids) + 1},) for {len(ids)} image ids, got {offsets.shape}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise bad("boxes", f"expected shape (M, 4), got {boxes.shape}")
    if scores.shape != (len(boxes),):
        raise bad("scores", f"expected shape ({len(boxes)},) (one per box), got {scores.shape}")
    if offsets[0] != 0 or offsets[-1] != len(boxes) or (np.diff(offsets) < 0).any():
        raise bad("offsets", f"must start at 0, never decrease and end at the number of boxes ({len(boxes)}); got "
                  f"{offsets[:3].tolist()}...{offsets[-1:].tolist()}")
    ids = ids.astype(np.int64)
    _check_unique(ids, path)
    boxes = boxes.astype(np.float32)
    scores = scores.astype(np.float32)
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    valid = finite & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        image = int(ids[np.searchsorted(offsets, row, side="right") - 1])
        raise bad("boxes", f"row {row} (image id {image}): {boxes[row].tolist()} with score {float(scores[row])} is "
                  f"not a finite (x1, y1, x2, y2) box with x2 >= x1 and y2 >= y1 "
                  f"({int((~valid).sum())} such row(s))")
    return {int(iid): (boxes[offsets[i]:offsets[i + 1]], scores[offsets[i]:offsets[i + 1]])
            for i, iid in enumerate(ids.tolist())}


def attach_proposals(records: list[dict], path: str, num_max_proposals: int | None, source: str,
                     known_ids: Iterable[int]) -> None:
    """Give each record ``proposals``: float32 (k, 4), its image's ``num_max_proposals`` best-scored boxes from the
    file (all of them when None; ties keep the file's order), clipped to the image (MMDetection's
    ``LoadProposals``).

    Args:
        records: the reader's records (raydet.structures), changed in place.
        source: the annotation source, for messages.
        known_ids: every image id of the annotation source (records dropped while reading included): the file may
            not name any other.

    Raises:
        ValueError: naming the proposal file and up to 5 ids: records without proposals, or proposals of ids that
            are not images of ``source``.
    """
    if num_max_proposals is not None and (isinstance(num_max_proposals, bool) or int(num_max_proposals) < 1):
        raise ValueError(f"{source}: num_max_proposals must be a positive integer or null (all), got "
                         f"{num_max_proposals!r}")
    proposals = read_proposals(path)
    missing = [int(r["image_id"]) for r in records if int(r["image_id"]) not in proposals]
    if missing:
        raise ValueError(f"{path}: no proposals for {len(missing)} of the {len(records)} images of {source}, e.g. "
                         f"image id(s) {_some(missing)}: the proposal file was made for other annotations")
    known = {int(i) for i in known_ids}
    unknown = sorted(set(proposals) - known)
    if unknown:
        raise ValueError(f"{path}: proposals for {len(unknown)} image id(s) that {source} does not have, e.g. "
                         f"{_some(unknown)}: the proposal file was made for other annotations")
    for record in records:
        boxes, scores = proposals[int(record["image_id"])]
        boxes = boxes[np.argsort(-scores, kind="stable")]  # best first, whatever the writer's order
        if num_max_proposals is not None:
            boxes = boxes[: int(num_max_proposals)]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, record["width"])
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, record["height"])
        record["proposals"] = boxes


def _check_unique(ids: np.ndarray, path: str) -> None:
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{path}: key image_ids: image id(s) {_some(values[counts > 1].tolist())} appear more than "
                         f"once")


def _some(ids: list[int]) -> str:
    return ", ".join(str(i) for i in ids[:_MAX_IDS]) + (", ..." if len(ids) > _MAX_IDS else "")
