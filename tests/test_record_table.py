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


def test_numpy_scalars_keep_their_type_and_value():
    """A user's reader may store NumPy scalars: np.float32 stays np.float32 (not a float64 Python float),
    np.longdouble keeps its extra precision, np.uint64 above int64's range is not an OverflowError."""
    third = np.longdouble(1) / np.longdouble(3)
    records = [{"score": np.float32(0.1), "n": np.int32(-3), "flag": np.bool_(True), "big": np.uint64(2**63 + 5),
                "ld": third},
               {"score": np.float32(2.5), "n": np.int32(7), "flag": np.bool_(False), "big": np.uint64(1),
                "ld": np.longdouble(2)}]
    back = list(RecordTable.from_records(records))
    for original, rec in zip(records, back):
        for key, value in original.items():
            assert type(rec[key]) is type(value) and rec[key] == value, key
    assert back[0]["big"] == 9223372036854775813 and back[0]["ld"] == third and back[0]["ld"] != 1 / 3


def test_ints_beyond_int64_are_kept_as_given():
    records = [{"uid": 2**70, "ann_ids": [2**64 - 1, 3]}, {"uid": 1, "ann_ids": []}]
    back = list(RecordTable.from_records(records))
    assert back == records and type(back[0]["uid"]) is int


def test_fields_kept_as_objects_come_back_as_copies():
    """float64 boxes in one record and float32 in another (and a nested dict) stay as the reader made them; a
    caller writing into them (a flip augmentation) changes neither the table nor, after protocol-5 pickling (Ray's
    object store), meets a read-only array."""
    records = [{"boxes": np.array([[1.0, 2.0, 3.0, 4.0]]), "meta": {"tags": ["a"]}},
               {"boxes": np.array([[5, 6, 7, 8]], np.float32), "meta": {}}]
    table = RecordTable.from_records(records)
    first = table[0]
    assert first["boxes"].dtype == np.float64 and table[1]["boxes"].dtype == np.float32
    first["boxes"][0, 0] = 99.0
    first["meta"]["tags"].append("b")
    assert table[0]["boxes"].tolist() == [[1.0, 2.0, 3.0, 4.0]] and table[0]["meta"] == {"tags": ["a"]}
    buffers = []
    back = pickle.loads(pickle.dumps(table, protocol=5, buffer_callback=buffers.append), buffers=buffers)
    again = back[0]
    again["boxes"][0, 0] = -1.0  # would raise "assignment destination is read-only" on a shared buffer
    assert back[0]["boxes"][0, 0] == 1.0


def test_masks_the_columns_cannot_hold_exactly_stay_as_given():
    """RLE with float counts or sizes, a tuple size, non-ASCII counts, a polygon as an (k, 2) array or as nested
    [x, y] pairs: none may be truncated to ints, reshaped or refused; they come back equal."""
    cases = [[{"size": [2, 2], "counts": [1.5, 2.0, 0.5]}], [{"size": [2.5, 2.0], "counts": [1, 2, 1]}],
             [{"size": (2, 2), "counts": [1, 2, 1]}], [{"size": [2, 2], "counts": "é0"}],
             [[[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]]]
    for masks in cases:
        back = RecordTable.from_records([{"masks": masks}, {"masks": []}])[0]["masks"]
        assert back == masks, masks
    assert type(RecordTable.from_records([{"masks": cases[2]}])[0]["masks"][0]["size"]) is tuple
    polygon = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    rec = RecordTable.from_records([{"masks": [[polygon]]}])[0]
    assert rec["masks"][0][0].shape == (3, 2) and rec["masks"][0][0].tolist() == polygon.tolist()


def test_file_names_with_undecodable_bytes_round_trip():
    """os.listdir gives a name that is not UTF-8 as surrogate escapes ("bad\\udcff.jpg"): it must pack."""
    records = [{"file_name": "bad\udcff.jpg"}, {"file_name": "lone\ud800"}, {"file_name": "日本/ü.png"}]
    assert [r["file_name"] for r in RecordTable.from_records(records)] == ["bad\udcff.jpg", "lone\ud800", "日本/ü.png"]


def test_arrays_that_do_not_concatenate_exactly_stay_as_given():
    """A 0-d array next to 1-d ones (was a TypeError), a masked array (its mask was dropped) and a big-endian
    array (came back native) are kept as they are."""
    records = [{"x": np.array([3.0]), "m": np.ma.array([1, 2], mask=[False, True]), "be": np.array([1, 2], ">i4")},
               {"x": np.array(4.0), "m": np.ma.array([5], mask=[False]), "be": np.array([3], ">i4")}]
    back = list(RecordTable.from_records(records))
    assert back[1]["x"].shape == () and back[1]["x"] == 4.0 and back[0]["x"].tolist() == [3.0]
    assert back[0]["m"].mask.tolist() == [False, True] and back[0]["be"].dtype.str == ">i4"


def test_a_boolean_index_selects_rows():
    """``table[mask]`` selects the rows where the mask is true (as NumPy does); it used to read the mask as the
    row numbers 0 and 1. Float or 2-d index arrays are refused, empty ones give an empty view."""
    table = RecordTable.from_records([{"i": k} for k in range(4)])
    assert [r["i"] for r in table[np.array([False, True, False, True])]] == [1, 3]
    assert [r["i"] for r in table[[True, False, False, True]]] == [0, 3]
    assert [r["i"] for r in table[1:][np.array([True, False, True])]] == [1, 3]
    assert [r["i"] for r in table[range(2)]] == [0, 1] and len(table[[]]) == 0
    with pytest.raises(IndexError, match="boolean index of shape"):
        table[np.array([True, False])]
    with pytest.raises(TypeError, match="1-d integers or booleans"):
        table[np.array([1.7, 2.2])]
