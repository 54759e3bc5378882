"""RecordTable: records as flat NumPy columns (raydet.data.record_table), no Ray."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from raydet.commands.loaders import shard_records
from raydet.data.record_table import RecordTable


def _records() -> list[dict]:
    """Three records with every kind of field: scalars, strings (non-ASCII too), ragged arrays, int lists, masks of
    each kind (polygons, RLE with str / bytes / list counts), an optional field and an exotic one."""
    return [
        {"image_id": 7, "file_name": "a.jpg", "height": 40, "width": 60,
         "boxes": np.array([[1, 2, 11, 12], [5, 5, 9, 9]], np.float32), "labels": np.array([3, 0]),
         "ignore": np.array([False, True]), "ann_ids": [70, 71],
         "masks": [[[1.0, 2.0, 11.0, 2.0, 11.0, 12.0], [3.5, 3.0, 4.0, 5.0, 6.0, 3.0]],
                   {"size": [40, 60], "counts": "PPa01"}],
         "orientation": 6, "extra": {"any": ("python", 1)}},
        {"image_id": 8, "file_name": "dossier/é.png", "height": 30, "width": 50,
         "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64), "ignore": np.zeros(0, bool),
         "ann_ids": [], "masks": [], "extra": None},
        {"image_id": 9, "file_name": "c.jpg", "height": 2, "width": 2,
         "boxes": np.array([[0, 0, 2, 2]], np.float32), "labels": np.array([1]), "ignore": np.array([False]),
         "ann_ids": [90, 91], "masks": [{"size": [2, 2], "counts": b"04"}, {"size": [2, 2], "counts": [1, 2, 1]}],
         "orientation": 1, "extra": [1, 2]},
    ]


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            assert b[key].dtype == value.dtype and b[key].shape == value.shape
            np.testing.assert_array_equal(b[key], value)
        else:
            assert b[key] == value and type(b[key]) is type(value), key


def test_every_field_comes_back_as_the_reader_made_it():
    records = _records()
    table = RecordTable.from_records(records)
    assert len(table) == 3
    for original, back in zip(records, table):
        _same(original, back)
    assert "orientation" not in table[1] and table[-1]["orientation"] == 1  # an absent field stays absent
    assert isinstance(table[0]["masks"][0][0][0], float) and table[0]["masks"][1]["counts"] == "PPa01"
    assert table[2]["masks"][0]["counts"] == b"04" and table[2]["masks"][1]["counts"] == [1, 2, 1]
    with pytest.raises(IndexError, match="record 3 out of range for a table of 3 records"):
        table[3]


def test_a_record_is_a_new_dict_each_time():
    table = RecordTable.from_records(_records())
    first = table[0]
    first["boxes"][0, 0] = 99
    first["masks"][0][0][0] = -1.0
    first["file_name"] = "changed"
    again = table[0]
    assert again["boxes"][0, 0] == 1 and again["masks"][0][0][0] == 1.0 and again["file_name"] == "a.jpg"


def test_views_share_the_columns_and_index_their_base():
    table = RecordTable.from_records(_records())
    view = table[np.array([2, 0, 2])]
    assert [r["image_id"] for r in view] == [9, 7, 9]
    assert view.indices.tolist() == [2, 0, 2] and view.base.indices.tolist() == [0, 1, 2]
    assert [r["image_id"] for r in view[1:]] == [7, 9] and view[1:].indices.tolist() == [0, 2]
    assert [r["image_id"] for r in table[::2]] == [7, 9]
    assert len(table[1:1]) == 0


def test_shard_records_gives_each_rank_a_view_with_exact_coverage():
    """Two ranks, 5 records, padded: each rank 3 views into the table, together every record once plus the first
    of the epoch's order repeated (the documented padding) -- the same records the list path gives."""
    records = [dict(_records()[1], image_id=i) for i in range(5)]
    table = RecordTable.from_records(records)
    order = np.random.default_rng([0, 3]).permutation(5)
    shards = [shard_records(table, rank, 2, seed=0, epoch=3, pad=True) for rank in (0, 1)]
    assert all(isinstance(s, RecordTable) and len(s) == 3 for s in shards)
    seen = sorted(r["image_id"] for s in shards for r in s)
    assert seen == sorted(list(range(5)) + [int(order[0])])
    for rank in (0, 1):
        as_list = shard_records(records, rank, 2, seed=0, epoch=3, pad=True)
        assert [r["image_id"] for r in shards[rank]] == [r["image_id"] for r in as_list]


def test_the_columns_pickle_out_of_band():
    """Protocol 5 (Ray's object store): the NumPy columns travel as buffers, the in-band part stays small; a COCO
    record's per-instance Python objects (lists of floats) do not exist in the table."""
    records = [dict(_records()[0], image_id=i, extra=None) for i in range(2000)]
    table = RecordTable.from_records(records)
    buffers = []
    inband = pickle.dumps(table, protocol=5, buffer_callback=buffers.append)
    assert len(inband) < 40_000  # the per-record Python fallback column ("extra": 2000 Nones) and the keys
    assert sum(b.raw().nbytes for b in buffers) == table.nbytes
    # 2000 x (6 + 6 coordinates + 5 RLE bytes + 2 boxes x 16 B ...): the coordinates alone are 2000 x 12 x 8 B
    assert table.nbytes > 2000 * 12 * 8
    back = pickle.loads(inband, buffers=buffers)
    _same(records[1234], back[1234])
