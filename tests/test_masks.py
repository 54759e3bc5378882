"""raydet.masks: polygons / RLE / bitmaps. Expected values are written out by hand."""
import json

import numpy as np
import pytest

from raydet.masks import (bitmap_to_box, bitmap_to_rle, instance_masks_to_bitmaps, mask_area, polygons_to_bitmap,
                          rle_to_bitmap)


def square(x, y, s):
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def test_polygon_square_covers_its_16_pixels():
    bm = polygons_to_bitmap([square(2, 1, 4)], height=8, width=10)
    assert bm.dtype == np.uint8 and bm.shape == (8, 10)
    expected = np.zeros((8, 10), np.uint8)
    expected[1:5, 2:6] = 1  # rows y..y+3, columns x..x+3
    np.testing.assert_array_equal(bm, expected)


def test_polygons_of_one_instance_are_unioned_and_degenerate_ones_dropped():
    bm = polygons_to_bitmap([square(0, 0, 2), square(5, 5, 3), [1.0, 1.0, 2.0, 2.0]], height=10, width=10)
    assert bm.sum() == 4 + 9
    assert bm[0:2, 0:2].all() and bm[5:8, 5:8].all()
    assert polygons_to_bitmap([], 4, 5).shape == (4, 5) and polygons_to_bitmap([], 4, 5).sum() == 0


def test_uncompressed_rle_is_column_major():
    # 2 x 5 image, counts [3, 2, 5]: pixels 3 and 4 in column-major order are (row 1, col 1) and (row 0, col 2).
    bm = rle_to_bitmap({"size": [2, 5], "counts": [3, 2, 5]}, 2, 5)
    expected = np.zeros((2, 5), np.uint8)
    expected[1, 1] = expected[0, 2] = 1
    np.testing.assert_array_equal(bm, expected)


def test_rle_round_trip_is_json_safe():
    rng = np.random.default_rng(0)
    bm = (rng.random((13, 17)) > 0.6).astype(np.uint8)
    rle = bitmap_to_rle(bm.astype(bool))
    assert isinstance(rle["counts"], str) and rle["size"] == [13, 17]
    rle = json.loads(json.dumps(rle))
    np.testing.assert_array_equal(rle_to_bitmap(rle, 13, 17), bm)
    # bytes counts (pycocotools' own output) decode too
    np.testing.assert_array_equal(rle_to_bitmap({"size": [13, 17], "counts": rle["counts"].encode()}, 13, 17), bm)


def test_instance_masks_mix_polygons_and_rle():
    rle = bitmap_to_rle(np.eye(6, dtype=np.uint8))
    out = instance_masks_to_bitmaps([[square(1, 1, 2)], rle], 6, 6)
    assert out.shape == (2, 6, 6) and out.dtype == np.uint8
    assert out[0].sum() == 4 and out[0][1:3, 1:3].all()
    np.testing.assert_array_equal(out[1], np.eye(6, dtype=np.uint8))
    empty = instance_masks_to_bitmaps([], 6, 7)
    assert empty.shape == (0, 6, 7) and empty.dtype == np.uint8


@pytest.mark.parametrize("bad", [
    [1.0, 2.0, 3.0],                                   # not a list of polygons
    [[0, 0, 4, 0, 4]],                                 # odd number of coordinates
    {"size": [5, 6], "counts": [30]},                  # RLE of another image size
    {"size": [6, 6], "counts": [10, 10]},              # counts do not cover the image
    "polygon",
])
def test_malformed_item_error_names_its_index(bad):
    with pytest.raises(ValueError, match="instance mask 1"):
        instance_masks_to_bitmaps([[square(0, 0, 2)], bad], 6, 6)


def test_bitmap_to_box_and_area():
    masks = np.zeros((3, 6, 9), np.uint8)
    masks[0, 1:5, 2:6] = 1          # rows 1..4, columns 2..5
    masks[1, 3, 7] = 1              # one pixel
    boxes = bitmap_to_box(masks)
    assert boxes.dtype == np.float32
    np.testing.assert_array_equal(boxes, [[2, 1, 6, 5], [7, 3, 8, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask_area(masks), [16, 1, 0])
    assert mask_area(masks[0]) == 16
    # the tight box of a rasterised polygon is the polygon's extent
    bm = polygons_to_bitmap([square(3, 2, 4)], 10, 10)
    np.testing.assert_array_equal(bitmap_to_box(bm[None]), [[3, 2, 7, 6]])
