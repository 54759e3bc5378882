"""raydet.data.datasets: COCO / VOC / synthetic readers on tiny hand-written fixtures (and the shared real sets)."""
import json
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from raydet.data import CocoDataset, CorruptImageError, SyntheticShapesDataset, VOCDataset
from raydet.data.datasets import NoUsableImagesError
from raydet.masks import bitmap_to_box, instance_masks_to_bitmaps
from raydet.registry import build

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def write_image(path: Path, h: int, w: int, value: int = 0) -> np.ndarray:
    """Write an RGB image (stored as BGR by cv2) and return its RGB pixels."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = value, 100, 200
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def coco_fixture() -> dict:
    """3 images, categories with ids 7 and 3 (so labels follow sorted ids: 3 -> 0, 7 -> 1)."""
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 2, "file_name": "b.png", "height": 50, "width": 30},
                   {"id": 5, "file_name": "c.png", "height": 40, "width": 60}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10], "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]], "area": 200},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40], "iscrowd": 1,
             "segmentation": {"size": [40, 60], "counts": [0, 2400]}, "area": 2400},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [1.5, 2.5, 4, 6], "iscrowd": 0,
             "segmentation": [[1.5, 2.5, 5.5, 2.5, 5.5, 8.5]], "area": 12},
            {"id": 13, "image_id": 5, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 1,
             "segmentation": {"size": [40, 60], "counts": [0, 2400]}, "area": 100},
        ],
    }


def write_coco(tmp_path: Path, data: dict, name: str = "ann.json") -> tuple[str, str]:
    img_dir = tmp_path / "images"
    for im in data["images"]:
        if im["height"] > 0 and not (img_dir / im["file_name"]).exists():
            write_image(img_dir / im["file_name"], im["height"], im["width"], value=im["id"])
    ann = tmp_path / name
    ann.write_text(json.dumps(data))
    return str(ann), str(img_dir) + "/"


# ----------------------------------------------------------------------------------------------------------
# COCO

def test_coco_labels_crowd_and_boxes(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    ds = CocoDataset(ann, prefix, with_masks=True)
    assert ds.classes == ("cat", "dog") and ds.cat_ids == [3, 7] and len(ds) == 3
    a, b, c = ds.records
    np.testing.assert_array_equal(a["labels"], [1, 0])  # category 7 -> label 1, category 3 -> label 0
    np.testing.assert_array_equal(a["ignore"], [False, True])  # iscrowd -> ignore
    np.testing.assert_allclose(a["boxes"], [[10, 5, 30, 15], [0, 0, 60, 40]])  # xywh -> xyxy
    assert a["boxes"].dtype == np.float32 and a["labels"].dtype == np.int64
    np.testing.assert_allclose(b["boxes"], [[1.5, 2.5, 5.5, 8.5]])
    assert (b["height"], b["width"], b["file_name"]) == (50, 30, "b.png")
    assert len(a["masks"]) == 2 and isinstance(a["masks"][1], dict)
    np.testing.assert_array_equal(ds.load_image(b), write_image(tmp_path / "x.png", 50, 30, value=2))
    gt = ds.coco_gt()
    assert sorted(gt.getImgIds()) == [1, 2, 5] and sorted(gt.getAnnIds()) == [10, 11, 12, 13]
    assert gt.anns[11]["area"] == 2400  # the file's own areas reach COCOeval


def test_coco_classes_select_and_order(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    ds = CocoDataset(ann, prefix, classes=["dog"], num_classes=1)
    assert ds.classes == ("dog",) and ds.cat_ids == [7]
    np.testing.assert_array_equal(ds.records[0]["labels"], [0])
    assert len(ds.records[1]["labels"]) == 0
    assert sorted(ds.coco_gt().getAnnIds()) == [10] and ds.coco_gt().getCatIds() == [7]
    swapped = CocoDataset(ann, prefix, classes=["dog", "cat"])
    assert swapped.cat_ids == [7, 3]
    np.testing.assert_array_equal(swapped.records[0]["labels"], [0, 1])
    with pytest.raises(ValueError, match=r"ann\.json.*\['cow'\] are not categories"):
        CocoDataset(ann, prefix, classes=["cow"])


def test_coco_num_classes_mismatch_names_file_and_numbers(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    with pytest.raises(ValueError, match=r"ann\.json: num_classes=80 but the dataset has 2 classes"):
        CocoDataset(ann, prefix, num_classes=80)


def _mutate(kind):
    data = coco_fixture()
    anns, images = data["annotations"], data["images"]
    if kind == "unknown_category":
        anns[0]["category_id"] = 99
        return data, r"annotation id 10 \(annotations\[0\], image id 1, file_name 'a\.png'\): unknown category id 99"
    if kind == "duplicate_image_id":
        images.append({"id": 2, "file_name": "d.png", "height": 10, "width": 10})
        return data, r"image id 2 \(images\[3\], file_name 'd\.png'\): duplicate image id"
    if kind == "duplicate_annotation_id":
        anns.append(dict(anns[2]))
        return data, r"annotation id 12 \(annotations\[4\], image id 2, file_name 'b\.png'\): duplicate annotation id"
    if kind == "box_outside_image":
        anns[2]["bbox"] = [20, 2, 12, 6]  # x2 = 32 > 30 + 1
        return data, r"annotation id 12 .*file_name 'b\.png'\): bbox \[20, 2, 12, 6\] extends more than 1 px"
    if kind == "nonpositive_box":
        anns[2]["bbox"] = [1, 2, 0, 6]
        return data, r"annotation id 12 .*: bbox \[1, 2, 0, 6\] has non-positive size"
    if kind == "missing_image":
        anns[2]["image_id"] = 42
        return data, r"annotation id 12 \(annotations\[2\], image id 42\): refers to image id 42, which is not in"
    if kind == "malformed_segmentation":
        anns[2]["segmentation"] = [[1, 2, 3]]
        return data, r"annotation id 12 .*file_name 'b\.png'\): segmentation: polygon 0 has an odd number"
    if kind == "malformed_box":
        anns[2]["bbox"] = [1, 2, 3]
        return data, r"annotation id 12 .*: bbox must be 4 finite numbers"
    if kind == "bad_image":
        images[1]["height"] = 0
        return data, r"image id 2 \(images\[1\], file_name 'b\.png'\): height and width must be positive"
    raise AssertionError(kind)


KINDS = ["unknown_category", "duplicate_image_id", "duplicate_annotation_id", "box_outside_image", "nonpositive_box",
         "missing_image", "malformed_segmentation", "malformed_box", "bad_image"]


@pytest.mark.parametrize("kind", KINDS)
def test_coco_validation_fail_names_file_and_record(tmp_path, kind):
    data, message = _mutate(kind)
    ann, prefix = write_coco(tmp_path, data)
    with pytest.raises(ValueError) as info:
        CocoDataset(ann, prefix, with_masks=True)
    text = str(info.value)
    count = 2 if kind == "bad_image" else 1  # a bad image entry also drops (and reports) its annotation
    assert text.startswith(ann) and f"{count} problem(s)" in text and f"{kind}: 1" in text
    assert re.search(message, text), text


@pytest.mark.parametrize("kind", KINDS)
def test_coco_skip_warns_once_and_keeps_everything_else(tmp_path, kind):
    data, message = _mutate(kind)
    ann, prefix = write_coco(tmp_path, data)
    clean = CocoDataset(*write_coco(tmp_path, coco_fixture(), "clean.json"), with_masks=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDataset(ann, prefix, with_masks=True, on_error="skip")
    ours = [w for w in caught if issubclass(w.category, UserWarning) and ann in str(w.message)]
    assert len(ours) == 1 and f"{kind}: 1" in str(ours[0].message)
    assert re.search(message, str(ours[0].message))
    # exactly one annotation (or one image with its annotation) is gone; the rest is identical
    dropped_ann = 12 if kind in ("box_outside_image", "nonpositive_box", "missing_image", "malformed_segmentation",
                                 "malformed_box", "bad_image") else 10 if kind == "unknown_category" else None
    kept = {a for r in ds.records for a in r["ann_ids"]}
    assert kept == {10, 11, 12, 13} - {dropped_ann}
    expected_images = [1, 5] if kind == "bad_image" else [1, 2, 5]
    assert [r["image_id"] for r in ds.records] == expected_images
    for r in ds.records:
        ref = next(c for c in clean.records if c["image_id"] == r["image_id"])
        keep = [i for i, a in enumerate(ref["ann_ids"]) if a in kept]
        np.testing.assert_array_equal(r["boxes"], ref["boxes"][keep])
        np.testing.assert_array_equal(r["labels"], ref["labels"][keep])


def test_coco_multiple_problems_counted(tmp_path):
    data = coco_fixture()
    for a in data["annotations"]:
        a["category_id"] = 99
    ann, prefix = write_coco(tmp_path, data)
    with pytest.raises(ValueError, match=r"4 problem\(s\) \(unknown_category: 4\)"):
        CocoDataset(ann, prefix)


def test_coco_clips_within_one_pixel(tmp_path):
    data = coco_fixture()
    data["annotations"][2]["bbox"] = [-0.5, 2, 30.5, 48.8]  # x in [-0.5, 30] on a 30 x 50 image, y2 = 50.8
    ann, prefix = write_coco(tmp_path, data)
    ds = CocoDataset(ann, prefix)
    np.testing.assert_allclose(ds.records[1]["boxes"], [[0, 2, 30, 50]])


def test_coco_unreadable_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON \(line 1"):
        CocoDataset(str(bad), str(tmp_path))
    with pytest.raises(ValueError, match=r"missing\.json: annotation file not found"):
        CocoDataset(str(tmp_path / "missing.json"), str(tmp_path))
    bad.write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"bad\.json: missing or invalid 'categories'"):
        CocoDataset(str(bad), str(tmp_path))


def test_filter_empty_gt_and_eval_keeps_all(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    train = CocoDataset(ann, prefix, filter_empty_gt=True)
    assert [r["image_id"] for r in train.records] == [1, 2]  # image 5 only has a crowd box
    assert [r["image_id"] for r in CocoDataset(ann, prefix).records] == [1, 2, 5]
    data = coco_fixture()
    for a in data["annotations"]:
        a["iscrowd"] = 1
    ann2, _ = write_coco(tmp_path, data, "crowd.json")
    with pytest.raises(ValueError, match=r"crowd\.json: no usable images after filter_empty_gt"):
        CocoDataset(ann2, prefix, filter_empty_gt=True)
    data["images"] = []
    ann3, _ = write_coco(tmp_path, {**data, "annotations": []}, "empty.json")
    with pytest.raises(ValueError, match=r"empty\.json: no usable images"):
        CocoDataset(ann3, prefix)


def test_corrupt_and_missing_images_raise_clear_errors(tmp_path):
    data = coco_fixture()
    data["images"][0]["file_name"] = "a.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # scan data > half the file
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), noise)
    ann, prefix = write_coco(tmp_path, data)
    ds = CocoDataset(ann, prefix)
    jpg = Path(prefix) / "a.jpg"
    good = jpg.read_bytes()
    assert ds.load_image(ds.records[0]).shape == (40, 60, 3)
    jpg.write_bytes(good[: len(good) // 2])  # truncated: OpenCV alone would decode a grey lower half
    with pytest.raises(CorruptImageError, match=r"image id 1: truncated JPEG.*a\.jpg"):
        ds.load_image(ds.records[0])
    jpg.write_bytes(b"not an image at all")
    with pytest.raises(CorruptImageError, match=r"image id 1: cannot decode.*a\.jpg"):
        ds.load_image(ds.records[0])
    jpg.unlink()
    with pytest.raises(FileNotFoundError, match=r"image id 1: image file not found: .*a\.jpg"):
        ds.load_image(ds.records[0])


def test_build_from_config_with_pipeline(tmp_path):
    ann, prefix = write_coco(tmp_path, coco_fixture())
    ds = build({"type": "CocoDataset", "ann_file": ann, "img_prefix": prefix,
                "pipeline": [{"type": "Resize", "scale": [1333, 800]}, {"type": "Pad", "size_divisor": 32}]},
               path="data.train")
    assert len(ds) == 3 and [type(t).__name__ for t in ds.pipeline] == ["Resize", "Pad"]
    with pytest.raises(ValueError, match=r"data\.train\.pipeline\[0\]\.type: unknown type 'Flip'"):
        build({"type": "CocoDataset", "ann_file": ann, "img_prefix": prefix, "pipeline": [{"type": "Flip"}]},
              path="data.train")


# ----------------------------------------------------------------------------------------------------------
# VOC

def write_voc(root: Path, items: dict, split: str = "train") -> None:
    """items: voc_id -> (h, w, [(name, xmin, ymin, xmax, ymax, difficult)])."""
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for voc_id, (h, w, objects) in items.items():
        objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                       for n, x1, y1, x2, y2, d in objects)
        (root / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><filename>{voc_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")
        write_image(root / "JPEGImages" / f"{voc_id}.jpg", h, w)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")


def test_voc_reader(tmp_path):
    write_voc(tmp_path / "VOC2007", {"000001": (40, 60, [("dog", 1, 2, 30, 20, 0), ("cat", 5, 5, 10, 10, 1)]),
                                      "000002": (30, 30, [])})
    write_voc(tmp_path / "VOC2012", {"2012_000001": (20, 20, [("cat", 0, 0, 20, 20, 0)])})
    ds = VOCDataset([str(tmp_path / "VOC2007"), str(tmp_path / "VOC2012")], "train")
    assert len(ds.classes) == 20 and ds.cat_ids == list(range(1, 21))
    assert [r["image_id"] for r in ds.records] == [1, 2, 3]
    r = ds.records[0]
    np.testing.assert_allclose(r["boxes"], [[1, 2, 30, 20], [5, 5, 10, 10]])  # the VOC integers, no shift
    np.testing.assert_array_equal(r["labels"], [11, 7])  # dog, cat in VOC order
    np.testing.assert_array_equal(r["ignore"], [False, True])  # difficult -> ignore
    assert r["voc_id"] == "000001" and r["file_name"] == "VOC2007/JPEGImages/000001.jpg"
    assert ds.records[2]["img_path"].endswith("VOC2012/JPEGImages/2012_000001.jpg")
    assert ds.load_image(ds.records[2]).shape == (20, 20, 3)
    plain = VOCDataset([str(tmp_path / "VOC2007")], "train", with_difficult_as_ignore=False, filter_empty_gt=True)
    assert len(plain) == 1 and not plain.records[0]["ignore"].any()
    assert plain.coco_gt().getAnnIds() == [1, 2]


def test_voc_errors_name_the_xml(tmp_path):
    write_voc(tmp_path, {"a": (40, 60, [("zebra", 1, 2, 30, 20, 0), ("cat", 1, 1, 70, 20, 0)]),
                         "b": (40, 60, [("cat", 1, 1, 10, 10, 0)])})
    with pytest.raises(ValueError) as info:
        VOCDataset([str(tmp_path)], "train")
    text = str(info.value)
    assert "1 problem(s) (box_outside_image: 1)" in text  # 'zebra' is not a class: dropped, not a problem
    assert ("a.xml (image a), object 1 ('cat'): box [1.0, 1.0, 70.0, 20.0] extends more than 1 px outside the "
            "60 x 40 (width x height) image") in text
    with pytest.warns(UserWarning, match=r"skipped 1 problem\(s\) \(box_outside_image: 1\)"):
        ds = VOCDataset([str(tmp_path)], "train", on_error="skip")
    assert [len(r["boxes"]) for r in ds.records] == [0, 1]
    with pytest.raises(ValueError, match="num_classes=3 but the dataset has 20 classes"):
        VOCDataset([str(tmp_path)], "train", num_classes=3)
    with pytest.raises(ValueError, match=r"Main/val\.txt: cannot read the split file"):
        VOCDataset([str(tmp_path)], "val")


def test_voc_trains_a_subset_of_its_classes_and_drops_the_other_objects(tmp_path, caplog):
    # a: 2 RBC + 1 WBC; b: 1 Platelets only; c: 1 WBC (difficult). classes=[WBC] keeps 2 boxes, drops 3 objects.
    write_voc(tmp_path, {"a": (64, 96, [("RBC", 1, 2, 30, 20, 0), ("WBC", 40, 10, 90, 60, 0),
                                        ("RBC", 5, 5, 10, 10, 0)]),
                         "b": (64, 64, [("Platelets", 3, 3, 9, 9, 0)]),
                         "c": (64, 64, [("WBC", 0, 0, 64, 64, 1)])})
    with caplog.at_level("INFO", logger="raydet.data.datasets"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no problem, no skip warning: on_error "fail" passes
        ds = VOCDataset([str(tmp_path)], "train", classes=["WBC"])
    assert ds.classes == ("WBC",) and ds.problems.counts == {}
    assert [r["voc_id"] for r in ds.records] == ["a", "b", "c"]
    np.testing.assert_allclose(ds.records[0]["boxes"], [[40, 10, 90, 60]])
    np.testing.assert_array_equal(ds.records[0]["labels"], [0])
    assert len(ds.records[1]["boxes"]) == 0 and ds.records[2]["ignore"].tolist() == [True]
    info = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "dropped" in r.getMessage()]
    assert info == [f"{ds.sources}: dropped 3 objects of classes not in `classes` (RBC: 2, Platelets: 1)"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # filter_empty_gt: b has no object left; c only an ignored (difficult) one
    kept = VOCDataset([str(tmp_path)], "train", classes=["WBC"], filter_empty_gt=True)
    assert [r["voc_id"] for r in kept.records] == ["a"]


def test_voc_warns_about_a_class_no_object_names(tmp_path, caplog):
    write_voc(tmp_path, {"a": (64, 64, [("RBC", 1, 2, 30, 20, 0), ("WBC", 40, 10, 60, 60, 0)])})
    with caplog.at_level("INFO", logger="raydet.data.datasets"):
        ds = VOCDataset([str(tmp_path)], "train", classes=["WBC", "RBCs"])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [f"{ds.sources}: `classes` entry 'RBCs' names no object of this split (a typo in `classes`?); "
                      f"the objects' names: RBC (1), WBC (1)"]
    assert ds.records[0]["labels"].tolist() == [0]
    caplog.clear()
    with caplog.at_level("INFO", logger="raydet.data.datasets"):
        VOCDataset([str(tmp_path)], "train", classes=["RBC", "WBC"])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_voc_with_no_object_of_the_classes_left_names_the_problems_or_the_filter(tmp_path):
    write_voc(tmp_path, {"a": (64, 64, [("RBC", 1, 2, 30, 20, 0)]), "b": (64, 64, [("WBC", 1, 2, 30, 20, 0)])})
    (tmp_path / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(ValueError, match=r"no usable images after filter_empty_gt$"):
        VOCDataset([str(tmp_path)], "train", classes=["Platelets"], filter_empty_gt=True, check_images=False)
    with pytest.warns(UserWarning), pytest.raises(NoUsableImagesError) as info:
        VOCDataset([str(tmp_path)], "train", classes=["WBC"], filter_empty_gt=True, on_error="skip")
    assert "no usable images after filter_empty_gt; 1 problem(s) dropped images or annotations (bad_image_file: 1)" \
        in str(info.value)
    assert info.value.problems.counts == {"bad_image_file": 1}
    assert info.value.problems.all[0][1].startswith("image b: image file not found: ")


# ----------------------------------------------------------------------------------------------------------
# Synthetic

def test_synthetic_dataset_regenerates_images():
    ds = SyntheticShapesDataset(4, height=64, width=96, seed=3, start_id=10)
    assert [r["image_id"] for r in ds.records] == [10, 11, 12, 13] and ds.cat_ids == [1, 2, 3]
    from raydet.data.synthetic import make_shape_sample
    image, rec = make_shape_sample(12, 64, 96, 3, seed=3)
    np.testing.assert_array_equal(ds.load_image(ds.records[2]), image)
    np.testing.assert_array_equal(ds.records[2]["boxes"], rec["boxes"])
    assert "masks" not in SyntheticShapesDataset(2, with_masks=False).records[0]
    with pytest.raises(ValueError, match="num_classes=80"):
        SyntheticShapesDataset(2, num_classes=80)


# ----------------------------------------------------------------------------------------------------------
# The real small datasets in ../shared/data (skipped in a plain clone)

def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found (the shared real datasets live next to the project, not in it)")
    return path


def test_bccd_voc_and_coco_readers_agree():
    root = _shared("bccd")
    coco = CocoDataset(str(root / "annotations" / "instances_val.json"), str(root / "JPEGImages") + "/")
    voc = VOCDataset([str(root)], "val", classes=["RBC", "WBC", "Platelets"])
    assert coco.classes == voc.classes and len(coco) == len(voc) == 87
    by_name = {Path(r["file_name"]).name: r for r in voc.records}
    for rec in coco.records:
        other = by_name[rec["file_name"]]
        np.testing.assert_array_equal(rec["boxes"], other["boxes"])
        np.testing.assert_array_equal(rec["labels"], other["labels"])
    img = coco.load_image(coco.records[0])
    assert img.shape == (480, 640, 3) and img.dtype == np.uint8
    # OpenCV decodes BGR; the reader must hand out RGB
    np.testing.assert_array_equal(img, cv2.imread(coco.records[0]["img_path"])[..., ::-1])


def test_nuts_labelme_masks_match_boxes():
    root = _shared("nuts_labelme")
    ds = CocoDataset(str(root / "annotations" / "instances_val.json"), str(root / "images") + "/", with_masks=True)
    assert ds.classes == ("date", "fig", "hazelnut") and len(ds) == 4
    total = 0
    for rec in ds.records:
        bitmaps = instance_masks_to_bitmaps(rec["masks"], rec["height"], rec["width"])
        # bbox = polygon extent; rasterisation keeps pixels whose centre is inside, so a sharp vertex may lose
        # up to ~1.5 px of extent
        np.testing.assert_allclose(bitmap_to_box(bitmaps), rec["boxes"], atol=1.5)
        total += len(rec["boxes"])
    assert total == 33


def test_builds_from_the_coco_pipeline_yaml(tmp_path):
    from raydet.config import load_config

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "annotations").mkdir()
    data = coco_fixture()
    write_coco(tmp_path, data)
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    (tmp_path / "train2017").symlink_to(tmp_path / "images")
    cfg = load_config(root / "pipelines" / "_base_" / "datasets" / "coco_instance.yaml",
                      [f"data_root={tmp_path}/"])
    ds = cfg.build("data.train")
    assert ds.with_masks and ds.filter_empty_gt and [r["image_id"] for r in ds.records] == [1, 2]
    assert [type(t).__name__ for t in ds.pipeline] == ["Resize", "RandomFlip", "Normalize", "Pad"]
    assert ds.load_image(ds.records[0]).shape == (40, 60, 3)
