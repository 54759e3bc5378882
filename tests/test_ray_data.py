"""raydet.data.ray_data: the Ray Data pipeline against the plain per-image transforms (few, tiny Ray runs)."""
import json
import time
from pathlib import Path

import cv2
import numpy as np

from raydet.data import (CocoDataset, SyntheticShapesDataset, TorchDetectionDataset, build_ray_dataset,
                         build_transforms, collate_detection, iter_detection_batches)
from raydet.data.ray_data import decode_masks, encode_masks
from raydet.masks import instance_masks_to_bitmaps

PIPELINE = [{"type": "Resize", "scale": [[96, 64], [120, 80]]}, {"type": "RandomFlip", "prob": 0.5},
            {"type": "Normalize", "mean": [10, 20, 30], "std": [2, 4, 8]}, {"type": "Pad", "size_divisor": 32}]


def square(x, y, s):
    return [[x, y, x + s, y, x + s, y + s, x, y + s]]


def seg_map(i: int, h: int, w: int) -> np.ndarray:
    """Image i's semantic map: random ids 0-4 and 255 per pixel (any resampling error shows)."""
    return np.random.default_rng([1, i]).choice(np.array([0, 1, 2, 3, 4, 255], np.uint8), size=(h, w))


def mixed_coco(tmp_path: Path, with_seg: bool = False) -> CocoDataset:
    """6 images: landscape 40x60 and portrait 60x40, one without any box, ragged box counts, polygon masks;
    ``with_seg``: a semantic map per image (:func:`seg_map`) under ``seg/``."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    counts = [2, 0, 1, 3, 1, 2]
    for i, n in enumerate(counts):
        h, w = (40, 60) if i % 2 == 0 else (60, 40)
        name = f"{i}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "img" / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if with_seg:
            (tmp_path / "seg").mkdir(exist_ok=True)
            cv2.imwrite(str(tmp_path / "seg" / name), seg_map(i, h, w))
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        for k in range(n):
            x, y, s = 2 + 11 * k, 3 + 5 * k, 8 + k
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 1 + k % 2,
                         "bbox": [x, y, s, s], "iscrowd": 0, "segmentation": square(x, y, s)})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return CocoDataset(str(tmp_path / "ann.json"), str(tmp_path / "img") + "/", pipeline=PIPELINE, with_masks=True,
                       seg_prefix=str(tmp_path / "seg") if with_seg else None)


def test_mask_string_round_trip():
    masks = [square(1, 1, 3), square(0, 0, 2)]
    text = encode_masks(masks, 6, 7)
    assert isinstance(text, str) and len(text.split(" ")) == 2 and encode_masks([], 6, 7) == ""
    np.testing.assert_array_equal(instance_masks_to_bitmaps(decode_masks(text, 6, 7), 6, 7),
                                  instance_masks_to_bitmaps(masks, 6, 7))
    assert decode_masks("", 6, 7) == []


def test_train_pipeline_matches_plain_transforms(ray_session, tmp_path):
    ds = mixed_coco(tmp_path, with_seg=True)
    _, cfg = build_transforms(ds.pipeline)
    reference = TorchDetectionDataset(ds, train=True, seed=7, epoch=3)
    index_of = {r["image_id"]: i for i, r in enumerate(ds.records)}
    rd = build_ray_dataset(ds, train=True, seed=7, epoch=3, num_actors=1, actor_batch_size=2)
    seen, flips = [], set()
    for batch in iter_detection_batches(rd.iterator(), 2, cfg, with_masks=True, train=True):
        imgs = batch["images"]
        assert imgs.shape[-2] % 32 == 0 and imgs.shape[-1] % 32 == 0
        orientations = {m["img_shape"][1] >= m["img_shape"][0] for m in batch["img_metas"]}
        assert len(orientations) == 1  # never mixes landscape and portrait
        expected = collate_detection([reference[index_of[m["image_id"]]] for m in batch["img_metas"]], cfg, True)
        assert torch_equal(imgs, expected["images"])
        for i, meta in enumerate(batch["img_metas"]):
            seen.append(meta["image_id"])
            ref = expected["img_metas"][i]
            assert meta == ref
            assert torch_equal(batch["gt_boxes"][i], expected["gt_boxes"][i])  # exactly the transformed boxes
            assert torch_equal(batch["gt_labels"][i], expected["gt_labels"][i])
            assert torch_equal(batch["gt_masks"][i], expected["gt_masks"][i])  # masks survive Ray Data intact
            assert batch["gt_masks"][i].shape == (len(batch["gt_boxes"][i]), *meta["img_shape"])
            # the semantic map with the image's resize (nearest: row y <- floor(y h / h'), column x <- floor(x w / w'))
            # and flip, 255 on the padding
            (h, w), (nh, nw) = meta["ori_shape"], meta["img_shape"]
            src = seg_map(meta["image_id"] - 100, h, w)
            hand = src[(np.arange(nh) * h) // nh][:, (np.arange(nw) * w) // nw]
            hand = hand[:, ::-1] if meta["flip"] else hand
            flips.add(meta["flip"])
            padded = np.full(imgs.shape[-2:], 255, np.uint8)
            padded[:nh, :nw] = hand
            np.testing.assert_array_equal(batch["gt_semantic_seg"][i].numpy(), padded)
            assert torch_equal(batch["gt_semantic_seg"][i], expected["gt_semantic_seg"][i])
    assert sorted(seen) == [100, 101, 102, 103, 104, 105] and flips == {True, False}
    counts = {r["image_id"]: len(r["boxes"]) for r in ds.records}
    assert counts[101] == 0  # the empty image went through as a (0, 4) box array
    # different epochs draw different augmentations (sizes / flips) for at least one image
    other = TorchDetectionDataset(ds, train=True, seed=7, epoch=4)
    assert any(reference[i]["img_shape"] != other[i]["img_shape"] or reference[i]["flip"] != other[i]["flip"]
               for i in range(len(ds)))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())


def test_eval_keeps_order_and_every_image(ray_session):
    ds = SyntheticShapesDataset(11, height=64, width=64, seed=1,
                                pipeline=[{"type": "Resize", "scale": [80, 80]}, {"type": "Pad", "size_divisor": 32}])
    _, cfg = build_transforms(ds.pipeline)
    rd = build_ray_dataset(ds, train=False, num_actors=2, actor_batch_size=2)
    ids, sizes = [], []
    for batch in iter_detection_batches(rd, 3, cfg, with_masks=True, train=False):
        ids += [m["image_id"] for m in batch["img_metas"]]
        sizes.append(len(batch["img_metas"]))
        assert batch["images"].shape[-2:] == (96, 96)  # 80 -> 96
    assert ids == [r["image_id"] for r in ds.records] and sizes == [3, 3, 3, 2]
    assert rd.context.execution_options.preserve_order  # with several actors, arrival order needs this


def test_multi_epoch_rows_and_shards(ray_session):
    ds = SyntheticShapesDataset(5, height=48, width=64, seed=2, with_masks=False,
                                pipeline=[{"type": "RandomFlip", "prob": 0.5}])
    rows = build_ray_dataset(ds, train=True, seed=1, epoch=2, num_epochs=2, actor_batch_size=4).take_all()
    assert sorted((r["epoch"], r["image_id"]) for r in rows) == [(e, i) for e in (2, 3) for i in range(1, 6)]
    for r in rows:  # each row was augmented with its own epoch's generator
        ref = TorchDetectionDataset(ds, train=True, seed=1, epoch=int(r["epoch"]))[int(r["index"])]
        assert bool(r["flip"]) == ref["flip"]
        np.testing.assert_array_equal(r["image"], ref["image"])
        np.testing.assert_array_equal(r["boxes"], ref["boxes"])
    # shards of an eval dataset cover every image exactly once
    shards = [build_ray_dataset(ds, train=False, shard=(k, 2), actor_batch_size=4).take_all() for k in (0, 1)]
    assert [int(r["image_id"]) for r in shards[0]] == [1, 3, 5]
    assert [int(r["image_id"]) for r in shards[1]] == [2, 4]
    # training shards, padded, two epochs, the first 2 of each epoch's 3 (rows_per_epoch): the epoch's
    # permutation [seed, epoch] grown by its first image, positions rank::2, cut to 2
    rows = build_ray_dataset(ds, train=True, seed=1, epoch=2, num_epochs=2, shard=(1, 2), pad=True,
                             rows_per_epoch=2, actor_batch_size=4).take_all()
    expected = []
    for e in (2, 3):
        perm = np.random.default_rng([1, e]).permutation(5)
        expected += [(e, int(i) + 1) for i in np.concatenate([perm, perm[:1]])[1::2][:2]]
    assert [(int(r["epoch"]), int(r["image_id"])) for r in rows] == expected


def test_actor_side_modules_do_not_import_torch():
    # Decode actors unpickle DecodeAndTransform from raydet.data.ray_data; importing torch there would add seconds
    # to every actor start (every epoch).
    import subprocess
    import sys

    code = ("import sys, raydet.data.ray_data, raydet.data.datasets, raydet.data.synthetic; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the actor-side modules import torch: {out.stdout.strip()[:200]}"


class _GatedShapes:
    """A SyntheticShapesDataset whose images past the first ``free`` ids wait until the file ``gate`` exists (at
    most ``timeout_s``, a leak guard only: the test always creates the gate): while they wait, the decode actor is
    busy, hence alive. Ray Data releases an actor pool's actors as soon as its inputs are done, which for a few tiny
    images may be before the first batch reaches us."""

    def __init__(self, dataset, gate: str, free: int, timeout_s: float = 3600.0):
        self.records, self.pipeline, self.with_masks = dataset.records, dataset.pipeline, dataset.with_masks
        self._loader, self._gate, self._free, self._timeout_s = dataset.image_loader(), gate, free, timeout_s

    def image_loader(self):
        loader, gate, free, timeout_s = self._loader, self._gate, self._free, self._timeout_s

        def load(record):  # a closure: pickled by value, so the actor need not import this test module
            import os
            import time

            if record["image_id"] > free:
                deadline = time.monotonic() + timeout_s
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.02)
            return loader(record)

        return load


def _poll(condition, what, timeout_s: float = 300.0):
    """Poll ``condition()`` until it returns something true (returned), failing after ``timeout_s`` with ``what``
    (a string, or a function giving one then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what() if callable(what) else what} (waited {timeout_s:.0f} s)"
        time.sleep(0.05)


def test_decode_actors_hold_the_custom_resource_they_are_placed_by(ray_session, tmp_path):
    """``resources={"cpu_node": 1}`` (the pipeline's scaling.data_resources): each decode actor reserves one unit
    for its lifetime, so the actors can only run on nodes that declare it (the CPU-only node types in clusters/).

    Ray's resource view is updated asynchronously, so the test polls it, at a moment the actor is certainly alive:
    it is held in the call with images 5 and 6 until the test opens the gate. (Images 3 and 4 are let through: the
    iterator fetches the next block before it hands out the first batch.)"""
    ds = SyntheticShapesDataset(6, height=32, width=32, seed=0, pipeline=[{"type": "Resize", "scale": [32, 32]}])
    gate = tmp_path / "gate"
    gated = _GatedShapes(ds, str(gate), free=4)
    total = ray_session.cluster_resources()["cpu_node"]

    def held() -> float:
        return total - ray_session.available_resources().get("cpu_node", 0.0)

    stream = iter(build_ray_dataset(gated, train=False, num_actors=1, actor_batch_size=2,
                                    resources={"cpu_node": 1}).iter_batches(batch_size=2))
    try:
        first = next(stream)
        assert [int(i) for i in first["image_id"]] == [1, 2]
        _poll(lambda: held() == 1.0, lambda: f"the decode actor, alive, never showed as holding 1 of the {total:g} "
                                             f"cpu_node units (held: {held():g})")
    finally:
        gate.touch()
    rest = list(stream)
    assert len(first["image"]) + sum(len(b["image"]) for b in rest) == 6
    # and the unit goes back once the stream is done (the actor's lifetime ends with it)
    _poll(lambda: held() == 0.0, lambda: f"the decode actor's cpu_node unit was not released after the stream "
                                         f"ended (held: {held():g})")
