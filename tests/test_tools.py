"""``raydet browse``, ``check-data`` and ``analyze`` (raydet.tools), in process, on hand-made datasets, the quickstart's
generated shapes and the shared BCCD set. Every expected value comes from the test's own construction, pycocotools'
COCOeval, or a hand calculation; the PNGs are read back and their pixels checked."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from raydet.cli import main
from raydet.tools.coco_errors import ERROR_TYPES
from raydet.tools.confusion import confusion_matrix
from raydet.tools.draw import IGNORE_COLOR, label_color

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT / ".." / "shared" / "data" / "bccd"
needs_bccd = pytest.mark.skipif(not (BCCD / "annotations" / "instances_test.json").exists(),
                                reason="../shared/data/bccd is absent (a clone without the shared data sets)")
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
MEAN = (100, 110, 120)


# ------------------------------------------------------------------------------------------------- helpers
def run(argv: list, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``raydet <argv>`` run in process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_image(path: Path, h: int, w: int, rgb=(40, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = rgb
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def read_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_coco(root: Path, name: str, data: dict, image_size=None) -> None:
    """``root/annotations/<name>`` and, for each image, a uniform PNG under ``root/images/``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / name).write_text(json.dumps(data))
    for im in data["images"]:
        write_image(root / "images" / im["file_name"], im["height"], im["width"])


def coco_pipeline(path: Path, root: Path, *, train_pipeline: str, test_pipeline: str | None = None,
                  train="instances_train.json", test="instances_train.json", extra: str = "") -> Path:
    """A pipeline file over a COCO json under ``root`` (the quickstart's model; only the data matters here)."""
    test_pipeline = test_pipeline or train_pipeline
    path.write_text(f"""
_base_: {QUICKSTART}
num_classes: null
data:
  num_classes: null
  train: {{_delete_: true, type: CocoDataset, ann_file: {root}/annotations/{train}, img_prefix: {root}/images/,
          pipeline: {train_pipeline} {extra}}}
  val: null
  test: {{_delete_: true, type: CocoDataset, ann_file: {root}/annotations/{test}, img_prefix: {root}/images/,
         pipeline: {test_pipeline} {extra}}}
checkpoint: {{score_attribute: null}}
""")
    return path


def outline_pixels(box) -> list[tuple[int, int]]:
    """(row, col) of a 1-px outline of a box x1, y1, x2, y2 (x2, y2 exclusive)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    cols = range(x1, x2)
    rows = range(y1, y2)
    return ([(y1, c) for c in cols] + [(y2 - 1, c) for c in cols] + [(r, x1) for r in rows]
            + [(r, x2 - 1) for r in rows])


# ------------------------------------------------------------------------------------------------- browse
def test_browse_draws_boxes_where_resize_and_flip_put_them(tmp_path, capsys):
    # one 60x45 image; Resize to (120, 90) doubles it, RandomFlip(prob 1) mirrors it, Pad 32 -> a 128x96 canvas
    root = tmp_path / "data"
    write_coco(root, "instances_train.json", {
        "images": [{"id": 4, "file_name": "a.png", "height": 45, "width": 60}],
        "categories": [{"id": 5, "name": "cell"}],
        "annotations": [{"id": 1, "image_id": 4, "category_id": 5, "bbox": [10, 15, 20, 15], "iscrowd": 0},
                        {"id": 2, "image_id": 4, "category_id": 5, "bbox": [40, 2, 8, 8], "iscrowd": 1}]})
    pipe = ("[{type: Resize, scale: [120, 90]}, {type: RandomFlip, prob: 1.0}, "
            f"{{type: Normalize, mean: {list(MEAN)}, std: [1, 1, 1]}}, {{type: Pad, size_divisor: 32}}]")
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline=pipe)
    code, out, err = run(["browse", pipeline, "--out", tmp_path / "vis"], capsys)
    assert code == 0, err
    assert "drew 1 of the 1 images of data.train" in out
    png = read_png(tmp_path / "vis" / "a.png")
    assert png.shape == (96, 128, 3)
    # the padding is the Normalize mean (what the model sees as 0), the image the 120x90 top-left part
    assert (png[90:, :] == MEAN).all() and (png[:, 120:] == MEAN).all()
    # box [10, 15, 30, 30] -> x2 [20, 30, 60, 60] -> flipped in a 120-wide image: [60, 30, 100, 60]
    color = label_color(0)
    for r, c in outline_pixels([60, 30, 100, 60]):
        assert tuple(png[r, c]) == color, (r, c)
    assert (png[31:59, 61:99] == 40).all()                  # the inside is the image
    assert (png[30:60, 20] == 40).all()                     # nothing where the box was before the flip
    # the class-name tag: just above the box, from its left edge: the class colour with white text in it
    tag = png[18:30, 60:75]
    is_color = (tag == color).all(axis=2)
    assert is_color.mean() > 0.5 and (tag.min(axis=2) > 200).any()
    assert (png[18:30, 50:59] == 40).all()                  # left of the tag: background
    # the crowd box [40, 2, 48, 10] -> [80, 4, 96, 20] -> flipped [24, 4, 40, 20], grey
    for r, c in outline_pixels([24, 4, 40, 20]):
        assert tuple(png[r, c]) == IGNORE_COLOR, (r, c)


def test_browse_quickstart_draws_the_training_sample_with_masks(tmp_path, capsys):
    from raydet.commands.sections import build_datasets, parse_sections
    from raydet.config import load_config
    from raydet.data.pipeline import build_transforms, load_sample
    from raydet.masks import instance_masks_to_bitmaps

    overrides = ["data.train.num_images=3"]
    code, out, err = run(["browse", QUICKSTART, "--out", tmp_path, "--num", "2", "--epoch", "1", "--set",
                          *overrides], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["synthetic_000001.png", "synthetic_000002.png"]
    # the reference: the sample the training pipeline makes of image 1 in epoch 1 (raydet.data.pipeline)
    cfg = load_config(QUICKSTART, overrides)
    sections = parse_sections(cfg)
    dataset = build_datasets(cfg, sections, ("train",))["train"]
    transforms, collate_cfg = build_transforms(dataset.pipeline)
    sample = load_sample(dataset.image_loader(), dataset.records[0], transforms, seed=sections.seed, epoch=1,
                         with_masks=True)
    h, w = sample["image"].shape[:2]
    png = read_png(tmp_path / "synthetic_000001.png")
    assert png.shape == (-(-h // 32) * 32, -(-w // 32) * 32, 3)
    assert (png[h:] == (124, 116, 104)).all() and (png[:, w:] == (124, 116, 104)).all()  # rounded mean
    masks = instance_masks_to_bitmaps(sample["masks"], h, w).astype(bool)
    last = len(sample["boxes"]) - 1  # drawn last: nothing covers its outline
    color = np.asarray(label_color(int(sample["labels"][last])))
    for r, c in outline_pixels(sample["boxes"][last]):
        assert (png[r, c] == color).all(), (r, c)
    # mask pixels away from every outline and tag: 50% image + 50% class colour
    x1, y1, x2, y2 = (int(round(v)) for v in sample["boxes"][last])
    inner = np.zeros((h, w), bool)
    inner[y1 + (2 if y1 >= 16 else 16):y2 - 2, x1 + 2:x2 - 2] = True   # (its tag is inside when there is no room)
    for i, box in enumerate(sample["boxes"]):
        if i != last:  # the other boxes and their tags (above or inside, up to 70 px wide)
            bx1, by1, bx2, by2 = (int(round(v)) for v in box)
            inner[max(0, by1 - 16):by2 + 1, max(0, bx1 - 1):max(bx2, bx1 + 70) + 1] = False
    m = masks[last] & inner
    assert m.sum() > 20
    expected = (0.5 * sample["image"][m] + 0.5 * color).astype(np.uint8)
    np.testing.assert_array_equal(png[:h, :w][m], expected)
    outside = ~masks.any(axis=0) & inner
    np.testing.assert_array_equal(png[:h, :w][outside], sample["image"][outside])


@needs_bccd
def test_browse_bccd_draws_each_cell_in_its_class_colour(tmp_path, capsys):
    pipe = ("[{type: Resize, scale: [320, 240]}, {type: Normalize, mean: [0, 0, 0], std: [1, 1, 1]}, "
            "{type: Pad, size_divisor: 32}]")
    pipeline = coco_pipeline(tmp_path / "p.yaml", BCCD.resolve(), train_pipeline=pipe)
    pipeline.write_text(pipeline.read_text().replace(f"{BCCD.resolve()}/images/", f"{BCCD.resolve()}/JPEGImages/"))
    code, out, err = run(["browse", pipeline, "--out", tmp_path / "vis", "--num", "2"], capsys)
    assert code == 0, err
    data = json.loads((BCCD / "annotations" / "instances_train.json").read_text())
    first = data["images"][0]
    anns = [a for a in data["annotations"] if a["image_id"] == first["id"]]
    png = read_png(tmp_path / "vis" / f"{Path(first['file_name']).stem}.png")
    assert png.shape == (256, 320, 3)                         # 640x480 halved, padded to 32
    assert (png[240:] == 0).all()
    # the last annotation is drawn last: its whole outline is in its class colour (RBC 1, WBC 2, Platelets 3)
    x, y, bw, bh = anns[-1]["bbox"]
    color = label_color(anns[-1]["category_id"] - 1)
    for r, c in outline_pixels([x / 2, y / 2, (x + bw) / 2, (y + bh) / 2]):
        assert tuple(png[r, c]) == color, (r, c)
    # every class present in the image shows up in its colour
    for cat in {a["category_id"] for a in anns}:
        assert (png == label_color(cat - 1)).all(axis=2).sum() > 50


# ------------------------------------------------------------------------------------------------- check-data
def _report_lines(out: str, split: str) -> dict[str, list[int]]:
    """class name -> [id, boxes, ignored, images] from one split's table of the report."""
    rows, inside = {}, False
    for line in out.splitlines():
        if line.startswith("data."):
            inside = split in line
        elif inside and line.startswith("  ") and not line.startswith("   ") and len(line.split()) == 5:
            name, *nums = line.split()
            if name != "class":
                rows[name] = [int(v) for v in nums]
    return rows


def test_check_data_counts_a_clean_coco_dataset_with_sparse_ids(tmp_path, capsys):
    # the README's COCO layout, read through the example pipeline for non-contiguous ids (3: cat, 7: dog, 12: bird)
    root = tmp_path / "pets"
    cats = [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 96} for i in (1, 2, 3)]
    anns = [(1, 3, [0, 0, 10, 10], 0), (1, 3, [20, 0, 30, 40], 0), (1, 7, [50, 10, 40, 40], 0),
            (2, 7, [5, 5, 4, 4], 0), (2, 12, [60, 30, 30, 30], 0), (2, 3, [0, 0, 96, 64], 1), (3, 7, [1, 1, 80, 60], 0)]
    data = {"images": images, "categories": cats,
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd,
                             "area": b[2] * b[3]} for k, (i, c, b, crowd) in enumerate(anns)]}
    write_coco(root, "instances_train.json", data)
    write_coco(root, "instances_val.json", {**data, "images": images[:1],
                                            "annotations": [a for a in data["annotations"] if a["image_id"] == 1]})
    code, out, err = run(["check-data", ROOT / "pipelines" / "examples" / "coco_sparse_ids.yaml", "--set",
                          f"data_root={root}/"], capsys)
    assert code == 0, out + err
    # labels in sorted-id order: cat (3), dog (7), bird (12); boxes / ignored / images per class as written
    assert _report_lines(out, "data.train") == {"cat": [3, 2, 1, 1], "dog": [7, 3, 0, 3], "bird": [12, 1, 0, 1]}
    assert _report_lines(out, "data.val") == {"cat": [3, 2, 0, 1], "dog": [7, 1, 0, 1], "bird": [12, 0, 0, 0]}
    assert "data.val, data.test:" in out                       # the same dataset config is read once
    # sqrt areas 10, 34.6, 40, 4, 30, 77.5 (train) -> bins 0-8: 1, 8-16: 1, 16-32: 1, 32-64: 2, 64-96: 1
    hist = [line.split()[1] for line in out.split("data.val")[0].splitlines() if line.startswith("    ")]
    assert hist == ["1", "1", "1", "2", "1", "0", "0", "0", "0"]
    assert out.rstrip().endswith("check-data: 2 dataset(s), 4 images, 9 boxes, 0 problem(s)")


def _voc_xml(path: Path, objects: list[tuple[str, list[int]]], w=96, h=64) -> None:
    ann = ET.Element("annotation")
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text, ET.SubElement(size, "height").text = str(w), str(h)
    for name, box in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, tag).text = str(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(ann).write(path)


def test_check_data_on_the_voc_example_reports_the_planted_problems(tmp_path, capsys):
    root = tmp_path / "cells"
    _voc_xml(root / "Annotations" / "a.xml", [("cell", [1, 1, 20, 20]), ("cell", [30, 30, 60, 50])])
    _voc_xml(root / "Annotations" / "b.xml", [("cell", [10, 10, 120, 40])])        # sticks out of the 96-wide image
    _voc_xml(root / "Annotations" / "c.xml", [("cell", [5, 5, 15, 15])])           # its image is missing
    for voc_id in ("a", "b"):
        write_image(root / "JPEGImages" / f"{voc_id}.jpg", 64, 96)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\nc\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    pipeline = ROOT / "pipelines" / "examples" / "voc_1class.yaml"
    code, out, err = run(["check-data", pipeline, "--set", f"data_root={root}/"], capsys)
    assert code == 1, out + err
    train = out.split("data.val")[0]
    assert "problems: 2 (bad_image_file: 1, box_outside_image: 1)" in train
    assert f"bad_image_file: image c: image file not found: {root}/JPEGImages/c.jpg" in train
    assert f"box_outside_image: {root}/Annotations/b.xml (image b), object 0 ('cell')" in train
    assert _report_lines(out, "data.train") == {"cell": [1, 2, 0, 1]}   # a's two boxes; b lost its only one
    assert _report_lines(out, "data.val") == {"cell": [1, 2, 0, 1]}
    assert out.rstrip().endswith("2 problem(s)")

    # fixed: exit 0
    _voc_xml(root / "Annotations" / "b.xml", [("cell", [10, 10, 90, 40])])
    write_image(root / "JPEGImages" / "c.jpg", 64, 96)
    code, out, err = run(["check-data", pipeline, "--set", f"data_root={root}/"], capsys)
    assert code == 0, out + err
    assert _report_lines(out, "data.train") == {"cell": [1, 4, 0, 3]}


def test_check_data_decodes_every_image_and_reads_every_split(tmp_path, capsys):
    root = tmp_path / "d"
    data = {"images": [{"id": 1, "file_name": "ok.png", "height": 32, "width": 48},
                       {"id": 2, "file_name": "bad.png", "height": 32, "width": 48},
                       {"id": 3, "file_name": "small.png", "height": 32, "width": 48}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 8, 8], "iscrowd": 0}
                            for i in (1, 2, 3)]}
    write_coco(root, "instances_train.json", data)
    # a PNG signature followed by garbage passes the look at the first bytes; only decoding finds it
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    write_image(root / "images" / "small.png", 16, 48)          # not the size the annotations give
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[]", test="missing.json")
    code, out, err = run(["check-data", pipeline], capsys)
    assert code == 1, out + err
    train, test = out.split("data.test", 1)
    # named by the readers' look at each file (raydet.data.image_io) or by check-data's decoding, whichever finds it
    assert re.search(r"(bad_image_file|corrupt_image): image id 2 \(.*file_name 'bad.png'.*bad.png", train)
    assert re.search(r"image_size_mismatch: image id 3 \(.*file_name 'small.png'.*48 x 16", train)
    assert "problems: 2 (" in train
    assert "data.test: cannot be read" in out and "unreadable: " in test and "missing.json" in test
    assert "annotation file not found" in test


def _planted_coco(root: Path) -> None:
    """3 images of 64 x 48 (width x height); image 2's box sticks out (x up to 90 > 64 + 1); image 3 has no file."""
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": 48, "width": 64} for i in (1, 2, 3)],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8], "iscrowd": 0},
                            {"id": 11, "image_id": 2, "category_id": 1, "bbox": [40, 4, 50, 10], "iscrowd": 0},
                            {"id": 12, "image_id": 3, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 0}]}
    write_coco(root, "instances_train.json", data)
    (root / "images" / "3.png").unlink()


def test_check_data_counts_a_problem_two_splits_share_once(tmp_path, capsys):
    # train and test read the same file with different transforms (two configs, each read): 2 distinct problems
    root = tmp_path / "d"
    _planted_coco(root)
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[{type: RandomFlip, prob: 0.5}]",
                             test_pipeline="[]")
    code, out, err = run(["check-data", pipeline], capsys)
    assert code == 1, out + err
    train, test = out.split("data.test", 1)
    for split in (train, test):  # each split lists its own problems ...
        assert "problems: 2 (bad_image_file: 1, box_outside_image: 1)" in split
        assert ("box_outside_image: annotation id 11 (annotations[1], image id 2, file_name '2.png'): bbox [40, 4, "
                "50, 10] extends more than 1 px outside the 64 x 48 (width x height) image") in split
    # ... the later one says which it shares, and the total counts them once
    assert ("2 of these 2 problem(s) are also reported for data.train (the same annotation records): counted once "
            "in the total") in test
    assert "also reported" not in train
    # images 1 and 2 kept in each split (3 has no file), 1 box each (2's box dropped); 4 reported, 2 distinct
    assert out.rstrip().endswith("check-data: 2 dataset(s), 4 images, 2 boxes, 2 problem(s)")


def test_check_data_reports_the_problems_that_left_no_usable_image(tmp_path, capsys):
    # every image file is missing: the split cannot be built; the report names the problems that dropped them
    root = tmp_path / "d"
    _planted_coco(root)
    for i in (1, 2):
        (root / "images" / f"{i}.png").unlink()
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[]", extra=", filter_empty_gt: true")
    code, out, err = run(["check-data", pipeline], capsys)
    assert code == 1, out + err
    ann = root / "annotations" / "instances_train.json"
    assert (f"data.train, data.test: cannot be read: {ann}: no usable images after filter_empty_gt (the problems "
            f"below dropped them)") in out
    assert "problems: 4 (bad_image_file: 3, box_outside_image: 1); the first of each kind:" in out
    assert f"bad_image_file: image id 1 (file_name '1.png'): image file not found: {root}/images/1.png" in out
    assert "box_outside_image: annotation id 11 " in out and "unreadable" not in out
    assert out.rstrip().endswith("check-data: 1 dataset(s), 0 images, 0 boxes, 4 problem(s)")


@pytest.mark.parametrize("override, message", [
    ("data.train.exif_orientation=upright",
     "data.train.exif_orientation: CocoDataset expects one of 'auto', 'apply', 'ignore', got 'upright'"),
    ("data.train.on_error=skp", "data.train.on_error: CocoDataset expects one of 'fail', 'skip', got 'skp'"),
    ("data.test.check_images=full", "data.test.check_images: CocoDataset expects bool or one of 'decode', got 'full'"),
])
def test_check_data_exits_2_for_a_pipeline_mistake(tmp_path, capsys, override, message):
    root = tmp_path / "d"
    _planted_coco(root)
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[]")
    code, out, err = run(["check-data", pipeline, "--set", override], capsys)
    assert code == 2 and out == ""
    assert err.strip() == f"error: --set: {message}"


@pytest.mark.parametrize("workers", ["0", "-1", "two"])
def test_check_data_needs_at_least_one_worker(tmp_path, capsys, workers):
    code, out, err = run(["check-data", tmp_path / "p.yaml", "--workers", workers], capsys)
    assert code == 2 and "argument --workers: expected an integer >= 1, got" in err


def test_check_data_quickstart_counts_the_generated_shapes(capsys):
    from raydet.data.synthetic import make_shape_sample

    code, out, err = run(["check-data", QUICKSTART, "--set", "data.train.num_images=10", "data.val.num_images=4",
                          "data.test.num_images=4"], capsys)
    assert code == 0, out + err
    for split, (n, seed, start) in {"data.train": (10, 0, 1), "data.val": (4, 1, 100001)}.items():
        labels = np.concatenate([make_shape_sample(i, 160, 160, 3, seed=seed)[1]["labels"]
                                 for i in range(start, start + n)])
        counts = np.bincount(labels, minlength=3)
        rows = _report_lines(out, split)
        assert [rows[c][1] for c in ("rectangle", "ellipse", "triangle")] == counts.tolist()


@needs_bccd
def test_check_data_bccd_coco_and_voc_counts_equal_the_annotation_files(tmp_path, capsys):
    bccd = BCCD.resolve()
    pipeline = tmp_path / "bccd.yaml"
    pipeline.write_text(f"""
_base_: {QUICKSTART}
data:
  train: {{_delete_: true, type: CocoDataset, ann_file: {bccd}/annotations/instances_train.json,
          img_prefix: {bccd}/JPEGImages/, pipeline: "${{test_pipeline}}"}}
  val: {{_delete_: true, type: VOCDataset, roots: [{bccd}/], split: val, classes: [RBC, WBC, Platelets],
        pipeline: "${{test_pipeline}}"}}
  test: null
""")
    code, out, err = run(["check-data", pipeline], capsys)
    assert code == 0, out + err
    coco = COCO(str(bccd / "annotations" / "instances_train.json"))
    expected = {c["name"]: [c["id"], len(coco.getAnnIds(catIds=[c["id"]])), 0, len(coco.getImgIds(catIds=[c["id"]]))]
                for c in coco.loadCats(coco.getCatIds())}
    assert _report_lines(out, "data.train") == expected
    names = {"RBC": 0, "WBC": 0, "Platelets": 0}
    for voc_id in (bccd / "ImageSets" / "Main" / "val.txt").read_text().split():
        for obj in ET.parse(bccd / "Annotations" / f"{voc_id}.xml").getroot().iter("object"):
            names[obj.find("name").text] += 1
    assert {k: v[1] for k, v in _report_lines(out, "data.val").items()} == names
    assert out.rstrip().endswith(f"check-data: 2 dataset(s), 292 images, {len(coco.getAnnIds()) + sum(names.values())}"
                                 f" boxes, 0 problem(s)")


# ------------------------------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_counts_as_mmdetection_by_hand():
    # classes a (0), b (1). Image 1: gts a [0,0,10,10], b [20,20,30,30], a [40,40,50,50], crowd b [80,80,100,100]
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [80, 80, 100, 100]],
           "labels": [0, 1, 0, 1], "ignore": [False, False, False, True]},
          {"boxes": [[0, 0, 20, 20]], "labels": [1]}]
    det = [{"boxes": [[0, 0, 10, 10],        # a on a: a -> a
                      [20, 20, 30, 30],      # a on b: b -> a, and b is never found: b -> background
                      [60, 60, 70, 70],      # b on nothing: background -> b
                      [40, 40, 50, 50],      # a on a, score 0.2 < 0.3: not counted, so that a is missed
                      [82, 82, 98, 98]],     # b inside the crowd region: counted nowhere
            "scores": [0.9, 0.8, 0.7, 0.2, 0.9], "labels": [0, 0, 1, 0, 1]},
           {"boxes": [[0, 0, 20, 20], [0, 0, 20, 19]],   # two b on one b box: both count (MMDetection)
            "scores": [0.9, 0.8], "labels": [1, 1]}]
    matrix = confusion_matrix(gt, det, 2, score_thr=0.3, tp_iou_thr=0.5)
    np.testing.assert_array_equal(matrix, [[1, 0, 1],
                                           [1, 2, 1],
                                           [0, 1, 0]])


# ------------------------------------------------------------------------------------------------- analyze
def _hand_case(tmp_path: Path) -> tuple[Path, Path]:
    """One 200x200 image. dog (supercategory animal) has 7 boxes: D1 [0,0], D2 [40,0], D3 [80,0] and 4 that no
    detection finds; cat (animal) one box, car (vehicle) one box. All boxes 20x20 (small). The 6 dog detections, by
    score: on the cat, on the car, on background, exactly D1, D2 shifted by 5 (IoU 0.6), D3 shifted by 10 (1/3)."""
    root = tmp_path / "case"
    boxes = {"D1": [0, 0], "D2": [40, 0], "D3": [80, 0], "D4": [0, 40], "D5": [40, 40], "D6": [80, 40],
             "D7": [120, 40], "C1": [0, 80], "V1": [40, 80]}
    anns = [{"id": k + 1, "image_id": 1, "category_id": {"D": 1, "C": 2, "V": 3}[name[0]],
             "bbox": [*xy, 20, 20], "area": 400, "iscrowd": 0} for k, (name, xy) in enumerate(boxes.items())]
    write_coco(root, "instances_train.json", {
        "images": [{"id": 1, "file_name": "one.png", "height": 200, "width": 200}],
        "categories": [{"id": 1, "name": "dog", "supercategory": "animal"},
                       {"id": 2, "name": "cat", "supercategory": "animal"},
                       {"id": 3, "name": "car", "supercategory": "vehicle"}],
        "annotations": anns})
    dets = [([0, 80], 0.95), ([40, 80], 0.9), ([120, 120], 0.85), ([0, 0], 0.8), ([45, 0], 0.7), ([90, 0], 0.6)]
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [*xy, 20, 20], "score": s}
                                   for xy, s in dets]))
    return coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[]"), results


def test_analyze_error_breakdown_and_confusion_matrix_by_hand(tmp_path, capsys):
    pipeline, results = _hand_case(tmp_path)
    code, out, err = run(["analyze", pipeline, results], capsys)
    assert code == 0, err
    analysis = json.loads((results.parent / "analysis" / "analysis.json").read_text())
    # dog, by hand. 7 ground-truth boxes; COCOeval's 101 recall thresholds 0, .01, ..., 1; recall 1/7, 2/7, 3/7 are
    # reached by 15, 29, 43 thresholds. Detections in score order: cat, car, background, D1, D2, D3.
    #   C75: TP only D1 (4th): interpolated precision 1/4 up to recall 1/7       -> 15 * 0.25 / 101
    #   C50: D1, D2 TP: precision 2/5 up to recall 2/7                          -> 29 * 0.4 / 101
    #   Loc: D1, D2, D3 TP: 3/6 up to recall 3/7                                -> 43 * 0.5 / 101
    #   Sim: the detection on the cat (same supercategory) is ignored: 3/5       -> 43 * 0.6 / 101
    #   Oth: the one on the car is ignored too: 3/4                              -> 43 * 0.75 / 101
    #   BG: precision 1 wherever Oth has some                                    -> 43 / 101
    #   FN: 1 everywhere                                                         -> 1
    dog = {"C75": 15 * 0.25 / 101, "C50": 29 * 0.4 / 101, "Loc": 43 * 0.5 / 101, "Sim": 43 * 0.6 / 101,
           "Oth": 43 * 0.75 / 101, "BG": 43 / 101, "FN": 1.0}
    breakdown = analysis["error_breakdown"]["bbox"]
    for area in ("all", "small"):
        got = breakdown["per_class"]["dog"][area]
        assert got == pytest.approx(dog, abs=1e-6)
        # cat and car: ground truth but no detection of their class -> 0 except FN; the mean over the 3 classes
        assert breakdown["per_class"]["cat"][area] == pytest.approx({t: float(t == "FN") for t in ERROR_TYPES})
        assert breakdown["all_classes"][area] == pytest.approx(
            {t: (dog[t] + 2 * float(t == "FN")) / 3 for t in ERROR_TYPES}, abs=1e-6)
    assert all(v is None for v in breakdown["all_classes"]["medium"].values())   # no medium ground truth
    values = [breakdown["per_class"]["dog"]["all"][t] for t in ERROR_TYPES]
    assert values == sorted(values)
    # C75 and C50 are COCOeval's AP at IoU 0.75 / 0.5
    gt = COCO(str(tmp_path / "case" / "annotations" / "instances_train.json"))
    for thr, name in ((0.75, "C75"), (0.5, "C50")):
        ev = COCOeval(gt, gt.loadRes(str(results)), "bbox")
        ev.params.iouThrs, ev.params.catIds = np.array([thr]), [1]
        ev.evaluate(), ev.accumulate()
        assert breakdown["per_class"]["dog"]["all"][name] == pytest.approx(ev.eval["precision"][0, :, 0, 0, -1].mean())
    # the per-class AP table is COCOeval's: dog's AP@[.5:.95] from a COCOeval of dog alone
    ev = COCOeval(gt, gt.loadRes(str(results)), "bbox")
    ev.params.catIds = [1]
    ev.evaluate(), ev.accumulate(), ev.summarize()
    dog_row = analysis["per_class"]["bbox"][0]
    assert dog_row["class"] == "dog" and dog_row["gts"] == 7
    assert dog_row["AP"] == pytest.approx(ev.stats[0]) and dog_row["AP50"] == pytest.approx(ev.stats[1])
    assert analysis["per_class"]["bbox"][1]["AP"] == 0.0
    # confusion matrix (score >= 0.3, IoU >= 0.5), rows dog, cat, car, background:
    #   dog: D1, D2 found by dog detections; D3 (IoU 1/3) and D4..D7 missed -> 5 to background
    #   cat / car: a dog detection on each (1 to dog) and never found (1 to background)
    #   background: the detection on background and the one on D3 (IoU 1/3 < 0.5)
    assert analysis["confusion_matrix"]["matrix"] == [[2, 0, 0, 5], [1, 0, 0, 1], [1, 0, 0, 1], [2, 0, 0, 0]]
    # the files: decodable PNGs of the figures' sizes, one error breakdown per class and one for all
    names = sorted(p.name for p in (results.parent / "analysis").glob("*.png"))
    assert names == ["confusion_matrix.png", "error_breakdown_bbox_all.png", "error_breakdown_bbox_car.png",
                     "error_breakdown_bbox_cat.png", "error_breakdown_bbox_dog.png"]
    assert read_png(results.parent / "analysis" / "error_breakdown_bbox_all.png").shape == (900, 1100, 3)
    cm = read_png(results.parent / "analysis" / "confusion_matrix.png")
    assert cm.shape[0] > 300 and cm.shape[1] > 300 and cm.std() > 10
    assert "dog" in out and "0.142" in out                     # the printed tables (BG over all classes: 0.142)


def test_error_breakdown_png_draws_the_bands_by_hand(tmp_path):
    from raydet.tools.coco_errors import ERROR_COLORS, coco_error_breakdown, plot_error_breakdown

    pipeline, results = _hand_case(tmp_path)
    gt = COCO(str(tmp_path / "case" / "annotations" / "instances_train.json"))
    breakdown = coco_error_breakdown(gt, gt.loadRes(str(results)), "bbox")
    panels = plot_error_breakdown(breakdown, str(tmp_path / "dog.png"), class_index=0)
    png = read_png(tmp_path / "dog.png")
    left, top, right, bottom = panels["all"]

    def at(recall: float, precision: float) -> np.ndarray:
        return png[int(round(bottom - precision * (bottom - top))), int(round(left + recall * (right - left)))]

    # dog's curves (see the test above): C75 0.25 up to recall 1/7; C50 0.4, Loc 0.5, Sim 0.6, Oth 0.75 and BG 1 up
    # to 2/7, 3/7, 3/7, 3/7, 3/7; FN 1 everywhere. Each band lies between its curve and the one below.
    expected = {"C75": (0.05, 0.12), "C50": (0.2, 0.32), "Loc": (0.2, 0.45), "Sim": (0.2, 0.55), "Oth": (0.2, 0.68),
                "BG": (0.2, 0.88), "FN": (0.6, 0.5)}
    for name, (recall, precision) in expected.items():
        color = np.round(np.asarray(ERROR_COLORS[ERROR_TYPES.index(name)]) * 255)
        assert np.abs(at(recall, precision) - color).max() <= 2, (name, at(recall, precision), color)
    # past recall 1/7 C75 is 0, so the C50 band starts at 0; past 2/7 C50 is 0 too, and Loc's band does
    for name, (recall, precision) in {"C50": (0.2, 0.12), "Loc": (0.35, 0.2)}.items():
        color = np.round(np.asarray(ERROR_COLORS[ERROR_TYPES.index(name)]) * 255)
        assert np.abs(at(recall, precision) - color).max() <= 2, (name, at(recall, precision), color)
    # the panels without ground truth draw no band
    left, top, right, bottom = panels["large"]
    assert (png[int(top) + 5:int(top) + 60, int(left) + 5:int(right) - 5] == 255).all()


def test_analyze_maps_infer_ids_back_to_the_dataset_by_path(tmp_path, capsys):
    root = tmp_path / "d"
    data = {"images": [{"id": 10, "file_name": "a.png", "height": 64, "width": 64},
                       {"id": 20, "file_name": "b.png", "height": 64, "width": 64}],
            "categories": [{"id": 4, "name": "x"}, {"id": 9, "name": "y"}],
            "annotations": [{"id": 1, "image_id": 10, "category_id": 4, "bbox": [0, 0, 30, 30], "iscrowd": 0},
                            {"id": 2, "image_id": 20, "category_id": 9, "bbox": [10, 10, 40, 40], "iscrowd": 0}]}
    write_coco(root, "instances_train.json", data)
    pipeline = coco_pipeline(tmp_path / "p.yaml", root, train_pipeline="[]")
    out_dir = tmp_path / "infer"
    out_dir.mkdir()
    # raydet infer on the folder: ids 1, 2 in its own order (b first), category ids of the checkpoint (1 = y, 2 = x)
    (out_dir / "images.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": str(root / "images" / "b.png"), "height": 64, "width": 64},
                   {"id": 2, "file_name": str(root / "images" / "a.png"), "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "y"}, {"id": 2, "name": "x"}]}))
    (out_dir / "results.json").write_text(json.dumps([
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 30], "score": 0.8}]))
    code, out, err = run(["analyze", pipeline, out_dir / "results.json", "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert [r["AP"] for r in analysis["per_class"]["bbox"]] == pytest.approx([1.0, 1.0])
    assert analysis["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]

    # without the map, infer's ids are not the dataset's: one line naming the entry
    (out_dir / "images.json").unlink()
    code, out, err = run(["analyze", pipeline, out_dir / "results.json"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"error: {out_dir / 'results.json'}: entry 0: image_id 1 is not "
                                                   f"an image of CocoDataset(")


def _perturbed_results(coco: COCO, seed: int) -> list[dict]:
    """Detections made from the ground truth: 15% dropped, 10% given another class, boxes jittered, random scores,
    plus a false positive on every third image."""
    rng = np.random.default_rng(seed)
    cat_ids = coco.getCatIds()
    out = []
    for a in coco.loadAnns(coco.getAnnIds()):
        if rng.random() < 0.15:
            continue
        cat = a["category_id"] if rng.random() > 0.1 else int(rng.choice([c for c in cat_ids if c != a["category_id"]]))
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 0.08, 4) * [w, h, w, h]
        out.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                    "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
    for img in coco.getImgIds()[::3]:
        out.append({"image_id": img, "category_id": int(rng.choice(cat_ids)), "score": float(rng.random()),
                    "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 30.0, 30.0]})
    return out


def _brute_force_confusion(coco: COCO, results: list[dict], cat_ids: list[int], score_thr=0.3, iou_thr=0.5):
    """MMDetection's counting, loop by loop, with torchvision's box IoU (no crowd boxes in these sets)."""
    import torch
    from torchvision.ops import box_iou

    n = len(cat_ids)
    m = np.zeros((n + 1, n + 1), np.int64)
    for img in coco.getImgIds():
        gts = coco.loadAnns(coco.getAnnIds(imgIds=[img]))
        dets = [r for r in results if r["image_id"] == img and r["score"] >= score_thr]
        xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
        iou = box_iou(torch.tensor([xyxy(d["bbox"]) for d in dets], dtype=torch.float64).reshape(-1, 4),
                      torch.tensor([xyxy(g["bbox"]) for g in gts], dtype=torch.float64).reshape(-1, 4))
        found = [0] * len(gts)
        for i, d in enumerate(dets):
            p = cat_ids.index(d["category_id"])
            matched = 0
            for j, g in enumerate(gts):
                if iou[i, j] >= iou_thr:
                    matched += 1
                    t = cat_ids.index(g["category_id"])
                    found[j] += t == p
                    m[t, p] += 1
            if not matched:
                m[n, p] += 1
        for j, g in enumerate(gts):
            if not found[j]:
                m[cat_ids.index(g["category_id"]), n] += 1
    return m


def _check_analysis_against_cocoeval(analysis: dict, coco: COCO, results: list[dict]) -> None:
    ev = COCOeval(coco, coco.loadRes(results), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert analysis["overall"]["bbox"]["AP"] == pytest.approx(ev.stats[0])
    rows = analysis["per_class"]["bbox"]
    assert np.mean([r["AP"] for r in rows]) == pytest.approx(ev.stats[0])   # every class has ground truth
    assert np.mean([r["AP50"] for r in rows]) == pytest.approx(ev.stats[1])
    table = analysis["error_breakdown"]["bbox"]["all_classes"]["all"]
    assert table["C50"] == pytest.approx(ev.stats[1]) and table["C75"] == pytest.approx(ev.stats[2])
    for per_class in [analysis["error_breakdown"]["bbox"]["all_classes"]] + list(
            analysis["error_breakdown"]["bbox"]["per_class"].values()):
        values = [per_class["all"][t] for t in ERROR_TYPES]
        assert values == sorted(values) and values[-1] == 1.0


def test_analyze_quickstart_against_cocoeval(tmp_path, capsys):
    from raydet.commands.sections import build_datasets, parse_sections
    from raydet.config import load_config

    overrides = ["data.test.num_images=12"]
    cfg = load_config(QUICKSTART, overrides)
    dataset = build_datasets(cfg, parse_sections(cfg), ("test",))["test"]
    coco = dataset.coco_gt()
    results = _perturbed_results(coco, seed=3)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code, out, err = run(["analyze", QUICKSTART, path, "--score-thr", "0.5", "--set", *overrides], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    _check_analysis_against_cocoeval(analysis, coco, results)
    expected = _brute_force_confusion(coco, results, list(dataset.cat_ids), score_thr=0.5)
    assert analysis["confusion_matrix"]["matrix"] == expected.tolist()
    assert len(list((tmp_path / "analysis").glob("error_breakdown_bbox_*.png"))) == 4


def test_analyze_segm_scores_masks_and_refuses_results_without_them(tmp_path, capsys):
    from raydet.commands.sections import build_datasets, parse_sections
    from raydet.config import load_config

    overrides = ["data.test.num_images=4"]
    cfg = load_config(QUICKSTART, overrides)
    coco = build_datasets(cfg, parse_sections(cfg), ("test",))["test"].coco_gt()
    # the ground-truth masks as results, and the box of the first one a box only 1 px high
    results = []
    for a in coco.loadAnns(coco.getAnnIds()):
        rle = coco.annToRLE(a)
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    results[0]["bbox"] = [*results[0]["bbox"][:3], 1.0]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code, out, err = run(["analyze", QUICKSTART, path, "--types", "bbox", "segm", "--set", *overrides], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["overall"]["segm"]["AP"] == pytest.approx(1.0)               # every mask exact
    assert analysis["overall"]["bbox"]["AP"] < 1.0                               # one box wrong
    assert (tmp_path / "analysis" / "error_breakdown_segm_all.png").exists()
    for r in results[1:]:
        del r["segmentation"]
    path.write_text(json.dumps(results))
    code, out, err = run(["analyze", QUICKSTART, path, "--types", "segm", "--set", *overrides], capsys)
    assert code == 2 and err.strip() == (f"error: {path}: entry 1: no 'segmentation' (--types segm needs the masks "
                                         f"of a mask model's results)")


@needs_bccd
def test_analyze_bccd_against_cocoeval(tmp_path, capsys):
    bccd = BCCD.resolve()
    pipeline = tmp_path / "bccd.yaml"
    pipeline.write_text(f"""
_base_: {QUICKSTART}
data:
  test: {{_delete_: true, type: CocoDataset, ann_file: {bccd}/annotations/instances_test.json,
         img_prefix: {bccd}/JPEGImages/, pipeline: "${{test_pipeline}}"}}
""")
    coco = COCO(str(bccd / "annotations" / "instances_test.json"))
    results = _perturbed_results(coco, seed=0)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    code, out, err = run(["analyze", pipeline, path], capsys)
    assert code == 0, err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    _check_analysis_against_cocoeval(analysis, coco, results)
    assert analysis["confusion_matrix"]["matrix"] == _brute_force_confusion(coco, results, [1, 2, 3]).tolist()
    # BCCD's categories all have supercategory "none": Sim forgives every confusion, as Oth does
    for per_class in analysis["error_breakdown"]["bbox"]["per_class"].values():
        assert per_class["all"]["Sim"] == per_class["all"]["Oth"]
    for name in ("RBC", "WBC", "Platelets", "all"):
        assert read_png(tmp_path / "analysis" / f"error_breakdown_bbox_{name}.png").shape == (900, 1100, 3)


# ------------------------------------------------------------------------------------------------- examples
@pytest.mark.parametrize("name", ["coco_1class.yaml", "coco_sparse_ids.yaml", "voc_1class.yaml"])
def test_example_pipelines_load_with_raydet_config(name, capsys):
    code, out, err = run(["config", ROOT / "pipelines" / "examples" / name], capsys)
    assert code in (0, None), err
    assert "max_epochs: 24" in out and "warmup_iters: 100" in out


def test_coco_1class_example_reads_its_documented_layout(tmp_path, capsys):
    root = tmp_path / "balloons"
    data = {"images": [{"id": 1, "file_name": "x.png", "height": 48, "width": 64}],
            "categories": [{"id": 1, "name": "balloon"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0}]}
    write_coco(root, "instances_train.json", data)
    write_coco(root, "instances_val.json", data)
    code, out, err = run(["check-data", ROOT / "pipelines" / "examples" / "coco_1class.yaml", "--set",
                          f"data_root={root}/"], capsys)
    assert code == 0, out + err
    assert _report_lines(out, "data.train") == {"balloon": [1, 1, 0, 1]}
