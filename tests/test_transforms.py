"""raydet.data.transforms / pipeline / collate: expected values computed by hand in the comments."""
import numpy as np
import pytest
import torch

from raydet.data import (CollateConfig, Normalize, Pad, RandomFlip, Resize, build_transforms, collate_detection,
                         image_rng, rescale_size, scales_from_range)
from raydet.data.synthetic import make_shape_sample
from raydet.masks import bitmap_to_box, bitmap_to_rle, instance_masks_to_bitmaps
from raydet.registry import ConfigError, build


def make_sample(h, w, boxes=((10, 20, 50, 60),), labels=None, masks=None, ignore=()):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    s = {
        "image": np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3).astype(np.uint8),
        "boxes": boxes,
        "labels": np.arange(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels, np.int64),
        "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4),
        "image_id": 7, "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False,
    }
    if masks is not None:
        s["masks"] = masks
    return s


RNG = np.random.default_rng(0)


def test_resize_single_scale_by_hand():
    # h=100, w=200 to [1333, 800]: f = min(1333/200, 800/100) = 6.665; w' = 1333, h' = 666.5 -> 667 (half up).
    s = make_sample(100, 200, boxes=[[10, 20, 50, 60]], ignore=[[0, 0, 200, 100]])
    out = Resize([1333, 800])(s, RNG)
    assert out["image"].shape == (667, 1333, 3) and out["image"].dtype == np.uint8
    assert out["img_shape"] == (667, 1333)
    sx, sy = 1333 / 200, 667 / 100  # 6.665, 6.67: the actual factors, not f
    assert out["scale_factor"] == pytest.approx((sx, sy))
    np.testing.assert_allclose(out["boxes"], [[66.65, 133.4, 333.25, 400.2]], rtol=1e-6)
    np.testing.assert_allclose(out["ignore_boxes"], [[0, 0, 1333, 667]], rtol=1e-6)
    assert out["boxes"].dtype == np.float32
    # the input sample is left untouched
    assert s["image"].shape == (100, 200, 3) and s["boxes"][0, 0] == 10
    # 480 x 640 to [1333, 800]: f = min(2.083, 1.667) = 800/480; w' = 1066.67 -> 1067
    assert rescale_size(480, 640, [1333, 800]) == (800, 1067)
    assert rescale_size(480, 640, [800, 1333]) == (800, 1067)  # (long, short) order does not matter


def test_resize_clips_boxes_to_new_image():
    s = make_sample(10, 10, boxes=[[5, 5, 10.5, 10]])  # readers clip, but a transform must keep boxes inside too
    out = Resize([20, 20])(s, RNG)
    np.testing.assert_allclose(out["boxes"], [[10, 10, 20, 20]])


def test_scales_from_range_and_value_mode():
    scales = scales_from_range(1333, 640, 800, 32)
    assert scales == [[1333, 640], [1333, 672], [1333, 704], [1333, 736], [1333, 768], [1333, 800]]
    t = Resize(scales, multiscale_mode="value")
    # 480 x 640 image: f = min(1333/640, s/480) = s/480, so h' = s and w' = round(640 s / 480).
    expected = {(s, int(np.floor(640 * s / 480 + 0.5))) for s in range(640, 801, 32)}
    rng = np.random.default_rng(1)
    seen = {t(make_sample(480, 640), rng)["img_shape"] for _ in range(150)}
    assert seen == expected


def test_range_mode_stays_in_bounds_and_varies():
    t = Resize([[1333, 640], [1333, 800]], multiscale_mode="range")
    rng = np.random.default_rng(2)
    heights = [t(make_sample(48, 64), rng)["img_shape"][0] for _ in range(200)]
    # 48 x 64: f = min(1333/64, short/48) = short/48 -> h' = short, drawn from the integers 640..800
    assert min(heights) >= 640 and max(heights) <= 800
    assert len(set(heights)) > 50
    with pytest.raises(ValueError, match="exactly two"):
        Resize([[1333, 640], [1333, 700], [1333, 800]], multiscale_mode="range")


def test_resize_keep_ratio_false():
    s = make_sample(100, 50, boxes=[[5, 10, 25, 50]])
    out = Resize([300, 200], keep_ratio=False)(s, RNG)  # exactly (w, h) = (300, 200): sx = 6, sy = 2
    assert out["image"].shape == (200, 300, 3)
    np.testing.assert_allclose(out["boxes"], [[30, 20, 150, 100]])
    assert out["scale_factor"] == (6.0, 2.0)


def test_flip_box_and_polygon_by_hand():
    poly = [10.0, 20.0, 30.0, 20.0, 30.0, 40.0]
    s = make_sample(50, 100, boxes=[[10, 20, 30, 40]], masks=[[poly]], ignore=[[0, 0, 40, 10]])
    out = RandomFlip(prob=1.0)(s, RNG)
    np.testing.assert_allclose(out["boxes"], [[70, 20, 90, 40]])  # x1' = 100 - 30, x2' = 100 - 10
    np.testing.assert_allclose(out["ignore_boxes"], [[60, 0, 100, 10]])
    np.testing.assert_allclose(out["masks"][0][0], [90, 20, 70, 20, 70, 40])
    assert out["flip"] is True
    np.testing.assert_array_equal(out["image"], s["image"][:, ::-1])
    same = RandomFlip(prob=0.0)(s, RNG)
    assert same["flip"] is False and np.array_equal(same["boxes"], s["boxes"])
    with pytest.raises(ValueError, match="horizontal"):
        RandomFlip(direction="vertical")


def test_rle_masks_resize_and_flip():
    # a 4 x 6 rectangle at rows 2..5, cols 1..6 of a 10 x 20 image, as RLE
    bm = np.zeros((10, 20), np.uint8)
    bm[2:6, 1:7] = 1
    s = make_sample(10, 20, boxes=[[1, 2, 7, 6]], masks=[bitmap_to_rle(bm)])
    out = Resize([40, 20], keep_ratio=False)(s, RNG)  # x2 in both directions
    out = RandomFlip(prob=1.0)(out, RNG)
    got = instance_masks_to_bitmaps(out["masks"], 20, 40)[0]
    expected = np.zeros((20, 40), np.uint8)
    expected[4:12, 40 - 14:40 - 2] = 1  # rows 4..11; cols 2..13 flipped to 26..37
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(out["boxes"], [[26, 4, 38, 12]])


def test_masks_follow_boxes_through_the_pipeline():
    image, rec = make_shape_sample(3, height=96, width=128, max_objects=3, seed=5)
    s = make_sample(96, 128, boxes=rec["boxes"], labels=rec["labels"], masks=rec["masks"])
    s["image"] = image
    transforms, _ = build_transforms([{"type": "Resize", "scale": [[333, 200], [500, 300]]},
                                      {"type": "RandomFlip", "prob": 1.0}])
    out = transforms(s, image_rng(0, 0, 3))
    h, w = out["img_shape"]
    bitmaps = instance_masks_to_bitmaps(out["masks"], h, w)
    assert bitmaps.shape == (len(rec["boxes"]), h, w)
    # polygons rasterise to the pixels whose centres are inside: the tight box is within 1 px of the box
    np.testing.assert_allclose(bitmap_to_box(bitmaps), out["boxes"], atol=1.0)
    assert out["flip"] and out["image"].shape[:2] == (h, w)


def test_transforms_are_deterministic_given_the_rng():
    pipe, _ = build_transforms([{"type": "Resize", "scale": scales_from_range(1333, 640, 800, 32)},
                                {"type": "RandomFlip"}])
    s = make_sample(48, 64)
    a = [pipe(s, image_rng(0, 0, i))["img_shape"] + (pipe(s, image_rng(0, 0, i))["flip"],) for i in range(20)]
    b = [pipe(s, image_rng(0, 0, i))["img_shape"] + (pipe(s, image_rng(0, 0, i))["flip"],) for i in range(20)]
    c = [pipe(s, image_rng(0, 1, i))["img_shape"] + (pipe(s, image_rng(0, 1, i))["flip"],) for i in range(20)]
    assert a == b and a != c


def test_build_transforms_splits_batch_level_settings():
    pipe, cfg = build_transforms([{"type": "Resize", "scale": [1333, 800]}, {"type": "RandomFlip", "prob": 0.5},
                                  {"type": "Normalize", "mean": [1, 2, 3], "std": [4, 5, 6], "to_rgb": False},
                                  {"type": "Pad", "size_divisor": 64}])
    assert [type(t).__name__ for t in pipe.transforms] == ["Resize", "RandomFlip"]
    assert cfg == CollateConfig(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), size_divisor=64, to_rgb=False)
    assert build_transforms(None)[1] == CollateConfig()
    with pytest.raises(ConfigError, match="unknown type 'Resise'.*did you mean 'Resize'"):
        build_transforms([{"type": "Resise", "scale": [1, 1]}])
    with pytest.raises(ValueError, match=r"pipeline\[1\]: Resize comes after Normalize/Pad"):
        build_transforms([{"type": "Pad"}, {"type": "Resize", "scale": [10, 10]}])
    with pytest.raises(ValueError, match="Normalize appears twice"):
        build_transforms([Normalize([0, 0, 0], [1, 1, 1]), Normalize([0, 0, 0], [1, 1, 1])])
    with pytest.raises(ConfigError, match="scale"):
        build({"type": "Resize", "scale": [1333, 800, 3]})
    with pytest.raises(TypeError, match="batch time"):
        Pad()(make_sample(4, 4), RNG)


def test_collate_normalises_pads_and_keeps_metas():
    a = make_sample(30, 40, boxes=[[1, 2, 3, 4]])
    a["image"] = np.full((30, 40, 3), 10, np.uint8)
    a["image"][..., 2] = 20
    b = make_sample(50, 20, boxes=np.zeros((0, 4)), ignore=[[0, 0, 5, 5]])
    b["image"] = np.full((50, 20, 3), 30, np.uint8)
    b["flip"], b["scale_factor"], b["ori_shape"] = True, (2.0, 2.0), (25, 10)
    batch = collate_detection([a, b], CollateConfig(mean=(2.0, 2.0, 4.0), std=(2.0, 2.0, 4.0), size_divisor=32))
    imgs = batch["images"]
    assert imgs.shape == (2, 3, 64, 64) and imgs.dtype == torch.float32  # max h 50 -> 64, max w 40 -> 64
    # image a: (10 - 2) / 2 = 4 on R and G, (20 - 4) / 4 = 4 on B; zero outside its 30 x 40 area
    assert torch.all(imgs[0, :, :30, :40] == 4)
    assert torch.all(imgs[0, :, 30:] == 0) and torch.all(imgs[0, :, :, 40:] == 0)
    assert torch.all(imgs[1, :2, :50, :20] == 14) and torch.all(imgs[1, 2, :50, :20] == 6.5)
    m0, m1 = batch["img_metas"]
    assert m0["pad_shape"] == (32, 64) and m1["pad_shape"] == (64, 32)
    assert m0["batch_input_shape"] == m1["batch_input_shape"] == (64, 64)
    assert m1["flip"] is True and m1["scale_factor"] == (2.0, 2.0) and m1["ori_shape"] == (25, 10)
    assert m0["img_shape"] == (30, 40) and m0["image_id"] == 7
    assert batch["gt_boxes"][1].shape == (0, 4) and batch["gt_labels"][1].dtype == torch.int64
    assert batch["gt_boxes_ignore"][1].tolist() == [[0, 0, 5, 5]]
    on_device = collate_detection([a, b], CollateConfig(mean=(2.0, 2.0, 4.0), std=(2.0, 2.0, 4.0), size_divisor=32),
                                  device="cpu")
    assert torch.equal(on_device["images"], imgs) and on_device["gt_boxes"][0].device.type == "cpu"
    # to_rgb=False: the model wants BGR, so channel 0 becomes the blue one (20) before normalising
    bgr = collate_detection([a], CollateConfig(to_rgb=False))["images"]
    assert torch.all(bgr[0, 0] == 20) and torch.all(bgr[0, 2] == 10)


def test_collate_rasterises_masks_at_img_shape():
    square = [[2.0, 1.0, 6.0, 1.0, 6.0, 5.0, 2.0, 5.0]]
    s = make_sample(8, 10, boxes=[[2, 1, 6, 5]], masks=[square])
    batch = collate_detection([s], CollateConfig(size_divisor=32), with_masks=True)
    m = batch["gt_masks"][0]
    assert m.shape == (1, 8, 10) and m.dtype == torch.uint8
    assert m.sum() == 16 and torch.all(m[0, 1:5, 2:6] == 1)
