"""A dataset's records as flat NumPy columns: one buffer per field instead of a Python object per value.

A reader builds its records as a list of dicts (raydet.structures: ``image_id``, ``file_name``, ``height``,
``width``, ``boxes`` (n, 4) float32, ``labels`` (n,) int64, ``ignore`` (n,) bool, ``masks``, ...) and
:meth:`RecordTable.from_records` packs them, once, into a few NumPy arrays per field:

    scalars (int, float, bool)     one array of the field's type, one value per record (NumPy scalars all of one
                                   dtype come back as that type; ints beyond int64 are kept as objects)
    strings (file names, paths)    UTF-8 bytes of all records joined (uint8) + offsets (int64, records + 1)
    arrays (boxes, labels, ...)    all records' arrays concatenated along the first axis + offsets
    int lists (``ann_ids``)        as arrays, returned as Python lists
    ``masks``                      per instance a kind (polygons / RLE with str, bytes or list counts), the RLE
                                   size, and where its data is: polygons' coordinates (float64, concatenated) with
                                   per-polygon and per-instance offsets; RLE counts as bytes or int64 runs
    anything else                  a Python list (kept as it is, ``table[i]`` gets a deep copy; only exotic user
                                   fields end up here: mixed dtypes, RLE with float counts, 2-d polygons, ...)

A field a record lacks is marked absent (``"orientation" not in table[i]`` stays true). ``table[i]`` rebuilds record
``i`` as a fresh dict (arrays copied, polygons as lists of floats, as the readers make them), so a caller may change
it freely; ``table[a:b]``, ``table[index_array]`` and ``table[rank::world]`` are views (the same columns and an index
array), cheap at any size.

Why: COCO train2017 as dicts is ~13 million Python objects (~2.5 GiB per process that unpickles them, 8 s to
unpickle); as columns it is ~50 arrays. Pickled with protocol 5 (as Ray's object store does) the arrays travel out
of band, so every process of a node that ``ray.get``s the table maps the same read-only copy (Detectron2 and
MMEngine serialise their dataset lists into one flat buffer for the same reason).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["RecordTable"]

# mask kinds
_POLYGONS, _RLE_STR, _RLE_BYTES, _RLE_LIST = 0, 1, 2, 3


def _offsets(lengths) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


class _Scalars:
    def __init__(self, values: list, dtype, numpy: bool = False):
        self.values = np.asarray(values, dtype=dtype)
        self.numpy = numpy  # NumPy scalars of one dtype come back as such (np.float32 stays np.float32)

    def get(self, i: int):
        return self.values[i] if self.numpy else self.values[i].item()


class _Strings:
    def __init__(self, values: list[str]):
        encoded = [v.encode("utf-8", "surrogatepass") for v in values]  # os.listdir's undecodable names too
        self.data = np.frombuffer(b"".join(encoded), np.uint8)
        self.offsets = _offsets([len(e) for e in encoded])

    def get(self, i: int) -> str:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")


class _Arrays:
    """Arrays of one dtype and one trailing shape, ragged along their first axis."""

    def __init__(self, values: list[np.ndarray], as_list: bool = False):
        self.as_list = as_list
        if as_list:
            values = [np.asarray(v, np.int64).reshape(-1) for v in values]
        self.trailing = values[0].shape[1:]
        self.offsets = _offsets([len(v) for v in values])
        self.flat = np.concatenate(values) if values else np.zeros((0, *self.trailing))

    def get(self, i: int):
        part = self.flat[self.offsets[i]:self.offsets[i + 1]]
        return part.tolist() if self.as_list else part.copy()


class _Objects:
    def __init__(self, values: list):
        self.values = list(values)

    def get(self, i: int):
        # a copy, as for the other columns: a caller changing it (an augmentation writing into an array) must not
        # change the table, and arrays mapped from Ray's object store are read-only
        return copy.deepcopy(self.values[i])


class _Masks:
    """Per record a list of instance masks: polygons (a list of flat coordinate lists) or a COCO RLE dict."""

    def __init__(self, values: list[list]):
        kinds, sizes, starts, ends = [], [], [], []
        polygons: list = []  # every polygon's coordinate list, in order (read once more by np.fromiter below)
        rle_bytes: list[bytes] = []
        rle_runs: list[np.ndarray] = []
        n_runs = 0
        n_bytes = 0
        for masks in values:
            for m in masks:
                if isinstance(m, dict):
                    counts = m["counts"]
                    sizes.append([int(s) for s in m["size"]])
                    if isinstance(counts, (str, bytes)):
                        raw = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
                        kinds.append(_RLE_STR if isinstance(counts, str) else _RLE_BYTES)
                        starts.append(n_bytes)
                        n_bytes += len(raw)
                        ends.append(n_bytes)
                        rle_bytes.append(raw)
                    else:
                        runs = np.asarray(counts)
                        if runs.size and runs.dtype.kind not in "iu":  # e.g. float counts: kept as objects
                            raise ValueError(f"RLE counts of {runs.dtype}")
                        kinds.append(_RLE_LIST)
                        starts.append(n_runs)
                        n_runs += runs.size
                        ends.append(n_runs)
                        rle_runs.append(runs.astype(np.int64).reshape(-1))
                else:
                    kinds.append(_POLYGONS)
                    sizes.append([0, 0])
                    starts.append(len(polygons))
                    polygons.extend(m)
                    ends.append(len(polygons))
        lengths = np.fromiter(map(len, polygons), np.int64, len(polygons))
        self.poly_offsets = _offsets(lengths)
        # no intermediate list of 40 million floats (COCO train2017): the coordinates go straight into the array
        self.coords = np.fromiter(itertools.chain.from_iterable(polygons), np.float64, int(self.poly_offsets[-1]))
        self.instance_offsets = _offsets([len(m) for m in values])
        self.kinds = np.asarray(kinds, np.int8)
        self.sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.rle_bytes = np.frombuffer(b"".join(rle_bytes), np.uint8)
        self.rle_runs = np.concatenate(rle_runs) if rle_runs else np.zeros(0, np.int64)

    @staticmethod
    def accepts(values: list) -> bool:
        for masks in values:
            if not isinstance(masks, list):
                return False
            for m in masks:
                if isinstance(m, dict):  # only what comes back unchanged: int sizes [h, w], int run lengths
                    size, counts = m.get("size"), m.get("counts")
                    if set(m) != {"size", "counts"} or not (isinstance(size, list) and len(size) == 2
                                                            and all(_is_int(s) for s in size)):
                        return False
                    if not isinstance(counts, (str, bytes, list)):  # list counts: ints, checked when packed
                        return False
                elif not isinstance(m, list) or not all(
                        isinstance(p, list) or isinstance(p, np.ndarray) and p.ndim == 1 and p.dtype.kind in "iuf"
                        for p in m):
                    return False
        return True

    def get(self, i: int) -> list:
        out = []
        for j in range(self.instance_offsets[i], self.instance_offsets[i + 1]):
            kind, a, b = int(self.kinds[j]), int(self.starts[j]), int(self.ends[j])
            if kind == _POLYGONS:
                out.append([self.coords[self.poly_offsets[k]:self.poly_offsets[k + 1]].tolist() for k in range(a, b)])
                continue
            size = self.sizes[j].tolist()
            if kind == _RLE_LIST:
                out.append({"size": size, "counts": self.rle_runs[a:b].tolist()})
            else:
                raw = self.rle_bytes[a:b].tobytes()
                out.append({"size": size, "counts": raw.decode("ascii") if kind == _RLE_STR else raw})
        return out


def _column(key: str, values: list):
    """The column type that holds ``values`` (one per record that has the field) without loss."""
    first = values[0]
    try:  # ints beyond int64 (OverflowError), polygons of nested lists or non-ASCII RLE (ValueError): kept as objects
        if isinstance(first, np.generic) and not first.dtype.hasobject and all(
                type(v) is type(first) and v.dtype == first.dtype for v in values):
            return _Scalars(values, first.dtype, numpy=True)
        if all(isinstance(v, (bool, np.bool_)) for v in values):
            return _Scalars(values, bool)
        if all(_is_int(v) for v in values):
            return _Scalars(values, np.int64)
        if all(isinstance(v, float) or isinstance(v, np.floating) and v.itemsize <= 8 for v in values):
            return _Scalars(values, np.float64)
        if all(isinstance(v, str) for v in values):
            return _Strings(values)
        if type(first) in (np.ndarray, np.memmap) and first.ndim >= 1 and first.dtype.isnative and not (
                first.dtype.hasobject) and all(type(v) in (np.ndarray, np.memmap) and v.dtype == first.dtype
                                               and v.shape[1:] == first.shape[1:] and v.ndim == first.ndim
                                               for v in values):
            return _Arrays(values)
        if key == "masks" and _Masks.accepts(values):
            return _Masks(values)
        if all(isinstance(v, list) and all(_is_int(x) for x in v) for v in values):
            return _Arrays(values, as_list=True)
    except (OverflowError, ValueError, TypeError):
        pass
    return _Objects(values)


class RecordTable(Sequence):
    """Records as columns (see the module docstring). Build with :meth:`from_records`.

    ``len(table)`` records; ``table[i]`` -> a new record dict; ``table[slice | int array | list]`` -> a view
    (:class:`RecordTable` sharing the columns); iteration yields record dicts. :attr:`base` is the table the view
    looks into and :attr:`indices` the view's rows in it. ``nbytes``: the columns' NumPy bytes (a view reports its
    base's).
    """

    def __init__(self, keys: tuple[str, ...], columns: dict[str, Any], present: dict[str, np.ndarray | None],
                 length: int, indices: np.ndarray | None = None):
        self._keys, self._columns, self._present, self._length = keys, columns, present, length
        self._indices = indices  # None: all rows in order

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> RecordTable:
        """Pack a list of record dicts (a :class:`RecordTable` is returned as it is)."""
        if isinstance(records, RecordTable):
            return records
        records = list(records)
        keys: dict[str, None] = {}
        for rec in records:
            for k in rec:
                keys.setdefault(k, None)
        columns, present = {}, {}
        for key in keys:
            mask = np.fromiter((key in rec for rec in records), bool, len(records))
            values = [rec[key] for rec in records] if mask.all() else [rec[key] for rec in records if key in rec]
            columns[key] = _column(key, values)
            present[key] = None if mask.all() else mask
        return cls(tuple(keys), columns, present, len(records))

    # -- views ------------------------------------------------------------------------------------------------
    @property
    def indices(self) -> np.ndarray:
        """This table's rows in :attr:`base` (int64)."""
        return np.arange(self._length) if self._indices is None else self._indices

    @property
    def base(self) -> RecordTable:
        """The whole table this one is a view of (itself when it is not a view)."""
        if self._indices is None:
            return self
        return RecordTable(self._keys, self._columns, self._present, self._length)

    def __len__(self) -> int:
        return self._length if self._indices is None else len(self._indices)

    def __getitem__(self, item):
        if isinstance(item, (int, np.integer)):
            n = len(self)
            if not -n <= item < n:
                raise IndexError(f"record {item} out of range for a table of {n} records")
            item = int(item) % n
            return self.record(item if self._indices is None else int(self._indices[item]))
        if isinstance(item, slice):
            return RecordTable(self._keys, self._columns, self._present, self._length, self.indices[item])
        if isinstance(item, (list, np.ndarray, range)):
            rows = np.asarray(item)
            if rows.dtype == bool:  # a mask selects rows (as NumPy does), never rows 0 and 1
                if rows.shape != (len(self),):
                    raise IndexError(f"a boolean index of shape {rows.shape} for a table of {len(self)} records")
                rows = np.flatnonzero(rows)
            elif rows.size == 0:
                rows = rows.astype(np.int64).reshape(0)
            elif rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise TypeError(f"RecordTable index arrays must be 1-d integers or booleans, got {rows.dtype} "
                                f"of shape {rows.shape}")
            return RecordTable(self._keys, self._columns, self._present, self._length,
                               np.asarray(self.indices[rows], np.int64))
        raise TypeError(f"RecordTable indices must be int, slice or an int array, got {type(item).__name__}")

    def __iter__(self) -> Iterator[dict]:
        for row in self.indices.tolist():
            yield self.record(row)

    def record(self, row: int) -> dict:
        """Record ``row`` of :attr:`base` as a new dict."""
        out = {}
        for key in self._keys:
            mask = self._present[key]
            if mask is None:
                out[key] = self._columns[key].get(row)
            elif mask[row]:
                out[key] = self._columns[key].get(int(self._rank(key, row)))
        return out

    def _rank(self, key: str, row: int) -> int:
        # position of `row` among the records that have `key` (a cumulative count, built once per field)
        ranks = self.__dict__.setdefault("_ranks", {})
        if key not in ranks:
            ranks[key] = np.cumsum(self._present[key]) - 1
        return ranks[key][row]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_ranks", None)
        return state

    @property
    def nbytes(self) -> int:
        total = 0
        for col in self._columns.values():
            total += sum(v.nbytes for v in vars(col).values() if isinstance(v, np.ndarray))
        return total + sum(m.nbytes for m in self._present.values() if m is not None)

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records, fields {list(self._keys)})"
