"""Fast R-CNN (Girshick 2015) from precomputed proposals: the proposal file (raydet.data.proposals), the datasets'
``proposal_file``, the proposals through the transforms and the Ray Data rows, ``raydet test --out-proposals``, and
a tiny Fast R-CNN overfitting a few synthetic images.

Expected values: transformed boxes computed by hand (scale, x' = w - x, shift, crop); AP50 from pycocotools
(through raydet.evaluation) against the synthetic ground truth.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.data import CocoDataset, VOCDataset
from raydet.data.augmentation import Expand, MinIoURandomCrop
from raydet.data.collate import collate_detection, collate_samples
from raydet.data.pipeline import TorchDetectionDataset, record_to_sample
from raydet.data.proposals import read_proposals, write_proposals
from raydet.data.ray_data import row_to_sample, rows_to_columns, sample_to_row
from raydet.data.synthetic import make_shapes_dataset
from raydet.data.transforms import CollateConfig
from test_datasets import coco_fixture, write_coco, write_voc
from test_detectors import PIPELINES, TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline

PIPELINE = "fast_rcnn_r50_fpn_1x_coco.yaml"


def _proposals_for(ids, n: int = 3) -> tuple[list, list]:
    """Per image id: boxes (n, 4) and scores, scores in increasing order (the reader must sort them)."""
    boxes = [np.array([[1, 2, 11, 12], [4, 4, 24, 14], [30, 10, 70, 30]][:n], np.float32) + i for i in range(len(ids))]
    scores = [np.array([0.1, 0.9, 0.5][:n], np.float32) for _ in ids]
    return boxes, scores


# ------------------------------------------------------------------------------------------------ the file

def test_proposal_file_round_trip_through_resize_and_flip(tmp_path):
    """write -> read (npz, no pickle) -> CocoDataset(proposal_file) -> Resize x2 and a flip -> the batch."""
    ann, prefix = write_coco(tmp_path, coco_fixture())  # images 1 (40 x 60), 2 (50 x 30), 5 (40 x 60)
    path = str(tmp_path / "props.npz")
    boxes, scores = _proposals_for([1, 2, 5])
    write_proposals(path, [1, 2, 5], boxes, scores)
    with np.load(path, allow_pickle=False) as f:  # the documented layout
        assert sorted(f.files) == ["boxes", "image_ids", "offsets", "scores"]
        assert f["offsets"].tolist() == [0, 3, 6, 9] and f["image_ids"].tolist() == [1, 2, 5]
        assert f["scores"][:3].tolist() == pytest.approx([0.9, 0.5, 0.1])  # best first
    read = read_proposals(path)
    assert read[2][0].tolist() == [[5, 5, 25, 15], [31, 11, 71, 31], [2, 3, 12, 13]]

    pipeline = [{"type": "Resize", "scale": [120, 80], "keep_ratio": True}, {"type": "RandomFlip", "prob": 1.0}]
    ds = CocoDataset(ann, prefix, pipeline=pipeline, proposal_file=path, num_max_proposals=2)
    by_id = {r["image_id"]: r for r in ds.records}
    # the two best-scored (0.9, 0.5), clipped to the 60 x 40 image: [30, 10, 70, 30] -> [30, 10, 60, 30]
    assert by_id[1]["proposals"].tolist() == [[4, 4, 24, 14], [30, 10, 60, 30]]
    # image 2 is 30 wide, 50 high: [31, 11, 71, 31] + 1 -> x clipped to 30
    assert by_id[2]["proposals"].tolist() == [[5, 5, 25, 15], [30, 11, 30, 31]]

    tds = TorchDetectionDataset(ds, train=True)
    sample = tds[[r["image_id"] for r in ds.records].index(1)]
    # 60 x 40 -> factor min(120 / 60, 80 / 40) = 2 -> 120 x 80; flip: x' = 120 - x
    assert sample["img_shape"] == (80, 120) and sample["flip"]
    expected = [[120 - 48, 8, 120 - 8, 28], [120 - 120, 20, 120 - 60, 60]]
    assert sample["proposals"].tolist() == expected
    batch = tds.collate_fn([sample])
    assert batch["proposals"][0].tolist() == expected
    assert batch["gt_boxes"][0].tolist() == [[120 - 60, 10, 120 - 20, 30]]  # the gt box [10, 5, 30, 15] likewise


def test_proposals_ride_the_ray_data_rows_and_the_ssd_transforms(tmp_path):
    """The records table the Ray Data actors read and the output rows they write (plain functions, no Ray) keep the
    proposals; Expand shifts them and MinIoURandomCrop keeps those whose centre is inside the patch, clipped and
    shifted, as it does boxes."""
    ann, prefix = write_coco(tmp_path, coco_fixture())
    path = str(tmp_path / "props.npz")
    write_proposals(path, [1, 2, 5], *_proposals_for([1, 2, 5]))
    ds = CocoDataset(ann, prefix, proposal_file=path, num_max_proposals=None)
    record = ds.records[0]
    back = pickle.loads(pickle.dumps(ds.records, protocol=5))[0]  # as the actors receive the table
    assert back["proposals"].tolist() == record["proposals"].tolist() and len(back["proposals"]) == 3
    sample = record_to_sample(back, ds.load_image(back))
    out = sample_to_row(sample, with_masks=False)
    cols = rows_to_columns([dict(out, index=0)])
    assert row_to_sample(cols, 0, with_masks=False)["proposals"].tolist() == record["proposals"].tolist()

    props = np.array([[4, 4, 24, 14], [30, 10, 60, 30], [1, 2, 11, 12]], np.float32)
    sample = dict(sample, proposals=props)
    expanded = Expand(prob=1.0).expand(sample, ratio=2.0, left=7, top=3)
    assert expanded["proposals"].tolist() == (props + [7, 3, 7, 3]).tolist()
    cropped = MinIoURandomCrop().crop(sample, (5, 0, 45, 40))
    # centres (14, 9), (45, 20), (6, 7): the second is on the patch's edge (not strictly inside), dropped; the others
    # clipped to x in [5, 45] and shifted by -5: [5, 4, 24, 14] -> [0, 4, 19, 14], [5, 2, 11, 12] -> [0, 2, 6, 12]
    assert cropped["proposals"].tolist() == [[0, 4, 19, 14], [0, 2, 6, 12]]
    assert collate_detection([cropped], CollateConfig())["proposals"][0].tolist() == [[0, 4, 19, 14], [0, 2, 6, 12]]


def test_proposals_stream_through_ray_data_as_the_plain_loader_gives_them(ray_session, tmp_path):
    """The Ray Data decode actors and the worker's batches carry each image's proposals (3, none, 5) transformed
    exactly as the plain PyTorch loader transforms them (the same per-image random flip)."""
    from raydet.data.pipeline import build_transforms
    from raydet.data.ray_data import build_ray_dataset, iter_detection_batches

    ann, prefix = write_coco(tmp_path, coco_fixture())
    boxes = [np.array([[1, 2, 11, 12], [4, 4, 24, 14], [30, 10, 50, 30]], np.float32), np.zeros((0, 4), np.float32),
             np.tile(np.array([[2, 2, 20, 20]], np.float32), (5, 1))]
    write_proposals(str(tmp_path / "p.npz"), [1, 2, 5], boxes, [np.arange(len(b), dtype=np.float32) for b in boxes])
    pipeline = [{"type": "Resize", "scale": [120, 80]}, {"type": "RandomFlip", "prob": 0.5},
                {"type": "Pad", "size_divisor": 32}]
    ds = CocoDataset(ann, prefix, pipeline=pipeline, proposal_file=str(tmp_path / "p.npz"), num_max_proposals=None)
    plain = TorchDetectionDataset(ds, train=True, seed=3, epoch=1)
    expected = {s["image_id"]: s["proposals"].tolist() for s in (plain[i] for i in range(len(ds)))}
    assert {k: len(v) for k, v in expected.items()} == {1: 3, 2: 0, 5: 5}
    _, collate_cfg = build_transforms(ds.pipeline)
    streamed = {}
    for batch in iter_detection_batches(build_ray_dataset(ds, train=True, seed=3, epoch=1), 1, collate_cfg, False,
                                        train=True):
        streamed[batch["img_metas"][0]["image_id"]] = batch["proposals"][0].tolist()
    assert streamed == expected


def test_proposal_ids_that_do_not_match_the_annotations_fail_naming_them(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    missing = str(tmp_path / "missing.npz")
    write_proposals(missing, [1, 5], *_proposals_for([1, 5]))
    with pytest.raises(ValueError, match=r"missing\.npz: no proposals for 1 of the 3 images of .*ann\.json, e\.g\. "
                                         r"image id\(s\) 2: the proposal file was made for other annotations"):
        CocoDataset(ann, prefix, proposal_file=missing)
    extra = str(tmp_path / "extra.npz")
    write_proposals(extra, [1, 2, 5, 9, 11], *_proposals_for([1, 2, 5, 9, 11]))
    with pytest.raises(ValueError, match=r"extra\.npz: proposals for 2 image id\(s\) that .*ann\.json does not have, "
                                         r"e\.g\. 9, 11"):
        CocoDataset(ann, prefix, proposal_file=extra)
    # VOC: the ids are 1..N in split order
    write_voc(tmp_path / "voc", {"000001": (40, 60, [("dog", 1, 1, 20, 20, 0)]),
                                 "000002": (40, 60, [("cat", 5, 5, 30, 30, 0)])})
    one = str(tmp_path / "one.npz")
    write_proposals(one, [1], *_proposals_for([1]))
    with pytest.raises(ValueError, match=r"no proposals for 1 of the 2 images of .*train\.txt, e\.g\. image id\(s\) 2"):
        VOCDataset([str(tmp_path / "voc")], "train", classes=["dog", "cat"], check_images=False, proposal_file=one)


def test_a_bad_proposal_file_fails_naming_the_file_and_key(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    cases = {
        "nokey.npz": ({"image_ids": np.array([1, 2, 5]), "offsets": np.array([0, 0, 0, 0]),
                       "boxes": np.zeros((0, 4), np.float32)},
                      r"nokey\.npz: not a proposal file: missing key\(s\) scores"),
        "offsets.npz": ({"image_ids": np.array([1, 2, 5]), "offsets": np.array([0, 1, 2]),
                         "boxes": np.zeros((2, 4), np.float32), "scores": np.zeros(2, np.float32)},
                        r"offsets\.npz: key offsets: expected shape \(4,\) for 3 image ids, got \(3,\)"),
        "boxes.npz": ({"image_ids": np.array([1, 2, 5]), "offsets": np.array([0, 1, 1, 1]),
                       "boxes": np.array([[5, 5, 1, 9]], np.float32), "scores": np.ones(1, np.float32)},
                      r"boxes\.npz: key boxes: row 0 \(image id 1\): \[5\.0, 5\.0, 1\.0, 9\.0\] .* x2 >= x1"),
        "dup.npz": ({"image_ids": np.array([1, 2, 2]), "offsets": np.array([0, 0, 0, 0]),
                     "boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)},
                    r"dup\.npz: key image_ids: image id\(s\) 2 appear more than once"),
        "pickled.npz": ({"image_ids": np.array([1, 2, 5]), "offsets": np.array([0, 0, 0, 0]),
                         "boxes": np.array([None], dtype=object), "scores": np.zeros(0, np.float32)},
                        r"pickled\.npz: not a proposal file: key boxes: .*allow_pickle"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=message):
            CocoDataset(ann, prefix, proposal_file=str(tmp_path / name))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text\.npz: not a proposal file: not an \.npz archive \(it starts with "
                                         r"b'not an a'\)"):
        CocoDataset(ann, prefix, proposal_file=str(tmp_path / "text.npz"))
    with pytest.raises(ValueError, match=r"absent\.npz: proposal file not found"):
        CocoDataset(ann, prefix, proposal_file=str(tmp_path / "absent.npz"))


# ------------------------------------------------------------------------------- raydet test --out-proposals

def test_rpn_evaluation_writes_a_proposal_file_the_dataset_reads(tmp_path):
    """The evaluation runner of ``raydet test`` (what each Ray Train worker runs) on a tiny RPN with
    ``--out-proposals``: the file holds every image's proposals in original-image pixels, as the model predicts them
    on the test pipeline's resized input; a CocoDataset then reads it."""
    from raydet.config import load_config
    from raydet.engine.checkpoint import save_checkpoint
    from raydet.test import build_evaluation_runner

    torch.manual_seed(0)
    samples = make_shapes_dataset(2, height=64, width=96, max_objects=2, seed=5)
    data = {"images": [{"id": r["image_id"], "file_name": f"{r['image_id']}.png", "height": 64, "width": 96}
                       for _, r in samples],
            "categories": [{"id": 1, "name": "shape"}],
            "annotations": [{"id": 10 * r["image_id"] + j, "image_id": r["image_id"], "category_id": 1,
                             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "iscrowd": 0}
                            for _, r in samples for j, b in enumerate(r["boxes"])]}
    ann, prefix = write_coco(tmp_path, data)
    test_pipeline = ("[{type: Resize, scale: [192, 128]}, {type: Normalize, mean: [123.675, 116.28, 103.53], "
                     "std: [58.395, 57.12, 57.375]}, {type: Pad, size_divisor: 32}]")
    cfg = load_config(PIPELINES / "rpn_r50_fpn_1x_coco.yaml",
                      TINY + TINY_RPN + ["num_classes=1", f"test_pipeline={test_pipeline}",
                                         f"data.test.ann_file={ann}", f"data.test.img_prefix={prefix}",
                                         "evaluation.metric=[proposal]", "runtime.progress=false"])
    model = cfg.build("model")
    checkpoint = save_checkpoint({"model": model.state_dict()}, tmp_path / "rpn.pt")
    dataset = cfg.build("data.test")
    tds = TorchDetectionDataset(dataset, train=False)
    out = str(tmp_path / "proposals" / "rpn_test.npz")
    runner = build_evaluation_runner(cfg, dataset, str(checkpoint), device=torch.device("cpu"), out_dir=None,
                                     val_loader=lambda: iter([tds.collate_fn([tds[0], tds[1]])]), out_proposals=out)
    runner.val()
    assert set(runner.metrics) >= {"proposal/AR@100"}

    written = read_proposals(out)
    assert sorted(written) == [r["image_id"] for _, r in samples]
    model.eval()
    batch = tds.collate_fn([tds[0], tds[1]])
    assert batch["img_metas"][0]["img_shape"] == (128, 192)  # the model saw the image at twice its size
    with torch.no_grad():
        predicted = model(batch, mode="predict")
    for meta, pred in zip(batch["img_metas"], predicted):
        boxes, scores = written[meta["image_id"]]
        assert 0 < len(boxes) <= 300  # TINY_RPN's max_per_img
        order = torch.argsort(pred["scores"], descending=True, stable=True)
        np.testing.assert_allclose(boxes, pred["boxes"][order].numpy(), atol=1e-4)
        np.testing.assert_allclose(scores, pred["scores"][order].numpy(), atol=1e-6)
        assert boxes[:, 2].max() <= 96 and boxes[:, 3].max() <= 64  # original pixels, not the 192 x 128 input
    # the file feeds a dataset (the Fast R-CNN pipeline's proposal_file)
    ds = CocoDataset(ann, prefix, proposal_file=out, num_max_proposals=100)
    for record in ds.records:
        assert record["proposals"].tolist() == written[record["image_id"]][0][:100].tolist()


# ----------------------------------------------------------------------------------------------- overfitting

def _jittered_proposals(records, rng, num_random: int = 40) -> list[np.ndarray]:
    """Per image: each gt box jittered by up to 15% of its size (4 copies) plus random boxes."""
    out = []
    for r in records:
        boxes = np.asarray(r["boxes"], np.float32)
        wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
        jitter = np.concatenate([boxes + rng.uniform(-0.15, 0.15, boxes.shape) * wh for _ in range(4)])
        xy = rng.uniform(0, 100, (num_random, 2))
        size = rng.uniform(10, 60, (num_random, 2))
        random = np.concatenate([xy, np.minimum(xy + size, 128)], axis=1)
        out.append(np.clip(np.concatenate([jitter, random]), 0, 128).astype(np.float32))
    return out


def test_fast_rcnn_overfits_a_few_images_from_proposals():
    torch.set_num_threads(2)
    samples = make_shapes_dataset(4, height=128, width=128, max_objects=3, seed=3)
    records = [r for _, r in samples]
    proposals = _jittered_proposals(records, np.random.default_rng(0))
    batch = collate_samples([(image, dict(r, proposals=p)) for (image, r), p in zip(samples, proposals)])
    torch.manual_seed(0)
    model = build_from_pipeline(PIPELINE, TINY + TINY_ROI)
    assert type(model).__name__ == "FastRCNN" and not hasattr(model, "rpn_head")
    first, last = _train(model, batch, 30)
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


def test_fast_rcnn_without_proposals_says_which_key_to_set():
    model = build_from_pipeline(PIPELINE, TINY + TINY_ROI)
    batch = collate_samples([(image, r) for image, r in make_shapes_dataset(1, 64, 64, seed=1)])
    with pytest.raises(ValueError, match=r"FastRCNN needs precomputed proposals: set the dataset's proposal_file"):
        model(batch)


# ------------------------------------------------------------------------------------------ raydet infer

def test_infer_actor_predicts_from_the_proposal_file_rows(tmp_path):
    """``raydet infer --proposal-file``: the actor (called here without Ray) scales an image's proposals with the
    test Resize and maps the detections back: the same as the model on a batch resized and scaled by hand."""
    import cv2

    from raydet.config import load_config
    from raydet.infer import DetectionPredictor, _image_proposals, inference_pipeline

    torch.manual_seed(0)
    test_pipeline = ("[{type: Resize, scale: [192, 128]}, {type: Normalize, mean: [123.675, 116.28, 103.53], "
                     "std: [58.395, 57.12, 57.375]}, {type: Pad, size_divisor: 32}]")
    cfg = load_config(PIPELINES / PIPELINE, TINY + TINY_ROI + [f"test_pipeline={test_pipeline}",
                                                               "model.roi_head.test.score_thr=0.0"])
    model = cfg.build("model").eval()
    (image, record), = make_shapes_dataset(1, height=64, width=96, seed=2)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    rng = np.random.default_rng(1)
    xy, size = rng.uniform(0, 60, (30, 2)), rng.uniform(8, 30, (30, 2))
    props = np.concatenate([record["boxes"] + rng.uniform(-3, 3, record["boxes"].shape),
                            np.concatenate([xy, xy + size], axis=1)]).astype(np.float32)
    write_proposals(str(tmp_path / "p.npz"), [7], [props], [np.arange(len(props), dtype=np.float32)])
    with pytest.raises(ValueError, match=r"p\.npz: no proposals for 1 of the 2 input images, e\.g\. image id\(s\) 8"):
        _image_proposals(str(tmp_path / "p.npz"), [{"image_id": 7}, {"image_id": 8}], "FastRCNN", True)
    with pytest.raises(ValueError, match=r"FastRCNN predicts from precomputed proposals: give --proposal-file"):
        _image_proposals(None, [{"image_id": 7}], "FastRCNN", True)
    (flat,) = _image_proposals(str(tmp_path / "p.npz"), [{"image_id": 7}], "FastRCNN", True).values()

    actor = DetectionPredictor(cfg.data, cfg.path, cfg.origins, [model.state_dict()], "test",
                               inference_pipeline(cfg))
    column = np.empty(1, dtype=object)
    column[0] = flat.reshape(-1)
    out = actor({"index": np.array([0]), "image_id": np.array([7]), "path": np.array([str(path)]),
                 "height": np.array([64]), "width": np.array([96]), "vis_path": np.array([""]), "proposals": column})
    assert out["error"][0] == ""

    resized = cv2.resize(image, (192, 128), interpolation=cv2.INTER_LINEAR)  # 96 x 64 -> 192 x 128: factor 2
    by_hand = {"image_id": 7, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
               "ori_shape": (64, 96), "scale_factor": (2.0, 2.0), "proposals": np.clip(props, 0, [96, 64] * 2) * 2}
    with torch.no_grad():
        (expected,) = model(collate_samples([(resized, by_hand)]), mode="predict")
    assert len(expected["boxes"]) > 0

    def rows(boxes, scores):  # detections as (score, box) rows in a fixed order (equal scores may swap places)
        table = np.concatenate([np.asarray(scores).reshape(-1, 1), np.asarray(boxes).reshape(-1, 4)], axis=1)
        return table[np.lexsort(table.T[::-1])]

    np.testing.assert_allclose(rows(out["boxes"][0], out["scores"][0]),
                               rows(expected["boxes"].numpy(), expected["scores"].numpy()), atol=1e-3)
