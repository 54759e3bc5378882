"""Real-photo image inputs: EXIF orientation (raydet.data.image_io's policy, shared by the readers, the Ray Data
decode actors and infer) and damaged JPEG data that still ends with an end-of-image marker.

Every image is built here, small: a grey photo with a red square at a known box. Pillow is the independent reference
for the pixels (``ImageOps.exif_transpose``); the box is placed by hand. No Ray: the actors' classes are called in
this process.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from raydet.data import CocoDataset, CorruptImageError, ImageSizeMismatchError, VOCDataset, read_image
from raydet.data.image_io import image_file_problem, read_image_header

UPRIGHT = (120, 60)            # (height, width) as the photo is shown
BOX = (40, 80, 50, 100)        # x1, y1, x2, y2 of the red square in the upright frame
RED, GREY = (220, 20, 20), (128, 128, 128)
# Pillow's transposes for EXIF orientations 2-8 (ImageOps.exif_transpose), and their inverses (stored from upright)
T = Image.Transpose
TO_UPRIGHT = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_270,
              7: T.TRANSVERSE, 8: T.ROTATE_90}
TO_STORED = {**TO_UPRIGHT, 6: T.ROTATE_90, 8: T.ROTATE_270}


def photo(size=UPRIGHT, box=BOX) -> np.ndarray:
    """uint8 (h, w, 3) RGB: grey with a red square at ``box``."""
    image = np.full((*size, 3), GREY, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = RED
    return image


def save(path: Path, stored: np.ndarray, orientation: int = 1, fmt: str = "JPEG", **kwargs) -> Path:
    """Write ``stored`` pixels with an EXIF orientation tag (4:4:4 JPEG, quality 95, unless kwargs say otherwise)."""
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    if fmt == "JPEG":
        kwargs = {"quality": 95, "subsampling": 0, **kwargs}
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), **kwargs)
    return path


def phone_photo(path: Path, orientation: int) -> Path:
    """A photo shown upright as :func:`photo`, stored as the camera wrote it (rotated / flipped) with its tag."""
    stored = photo() if orientation == 1 else np.asarray(Image.fromarray(photo()).transpose(TO_STORED[orientation]))
    return save(path, stored, orientation)


def pillow_upright(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def is_red(image: np.ndarray, box) -> bool:
    x1, y1, x2, y2 = box
    inside = image[y1 + 2:y2 - 2, x1 + 2:x2 - 2].reshape(-1, 3).astype(int)  # JPEG edges ring a little
    return bool((np.abs(inside - RED) < 24).all())


def coco(tmp_path: Path, images: list[tuple[str, int, int, tuple]], name: str = "ann.json") -> str:
    """A COCO json: (file_name, height, width, box xyxy) per image, one box each."""
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "square"}]}
    for i, (file_name, h, w, (x1, y1, x2, y2)) in enumerate(images, start=1):
        data["images"].append({"id": i, "file_name": file_name, "height": h, "width": w})
        data["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation

@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_decodes_like_pillow_exif_transpose(tmp_path, orientation):
    path = phone_photo(tmp_path / "p.jpg", orientation)
    header = read_image_header(str(path))
    stored = (60, 120) if orientation >= 5 else UPRIGHT
    assert (header.height, header.width, header.orientation) == (*stored, orientation)
    assert header.upright_size == UPRIGHT
    image = read_image(str(path))  # default: upright, as MMCV and Detectron2 read images
    reference = pillow_upright(path)
    assert image.shape == reference.shape == (*UPRIGHT, 3) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - reference).max() <= 2  # two libjpeg-turbo builds
    assert is_red(image, BOX)
    stored_pixels = read_image(str(path), orientation="ignore")
    assert stored_pixels.shape == (*stored, 3)
    with Image.open(path) as im:
        assert np.abs(stored_pixels.astype(int) - np.asarray(im.convert("RGB"))).max() <= 2


@pytest.mark.parametrize("orientation", range(1, 9))
def test_auto_applies_the_rotation_to_images_annotated_upright(tmp_path, orientation):
    """The issue's case for every orientation: the box [40, 80, 50, 100] of the upright 120x60 photo lands on the
    red square, in the reader's record and in every decoder (the dataset's loader, the Ray Data actor's rows)."""
    from raydet.data.ray_data import DecodeAndTransform, input_columns

    phone_photo(tmp_path / "images" / "p.jpg", orientation)
    ds = CocoDataset(coco(tmp_path, [("p.jpg", *UPRIGHT, BOX)]), str(tmp_path / "images"))
    record = ds.records[0]
    assert record["orientation"] == orientation
    np.testing.assert_array_equal(record["boxes"], [BOX])
    image = ds.load_image(record)
    assert image.shape == (*UPRIGHT, 3) and is_red(image, record["boxes"][0].astype(int))
    assert np.abs(image.astype(int) - pillow_upright(tmp_path / "images" / "p.jpg")).max() <= 2

    actor = DecodeAndTransform(ds.records, ds.image_loader(), [], seed=0)  # the training actors, without Ray
    out = actor(input_columns([0], epoch=0))
    np.testing.assert_array_equal(out["image"][0], image)
    np.testing.assert_array_equal(out["boxes"][0], [BOX])
    assert out["error"][0] == ""


def test_auto_keeps_the_stored_frame_when_the_annotations_are_in_it(tmp_path):
    stored_box = (80, 20, 100, 30)  # in the stored 60 high x 120 wide pixels
    save(tmp_path / "images" / "p.jpg", photo((60, 120), stored_box), orientation=6)
    ds = CocoDataset(coco(tmp_path, [("p.jpg", 60, 120, stored_box)]), str(tmp_path / "images"))
    assert ds.records[0]["orientation"] == 1
    image = ds.load_image(ds.records[0])
    assert image.shape == (60, 120, 3) and is_red(image, stored_box)
    with Image.open(tmp_path / "images" / "p.jpg") as im:
        assert np.abs(image.astype(int) - np.asarray(im.convert("RGB"))).max() <= 2


def test_a_size_matching_neither_frame_is_an_error_naming_the_image_when_read(tmp_path):
    phone_photo(tmp_path / "images" / "p.jpg", 6)
    phone_photo(tmp_path / "images" / "q.jpg", 6)
    ann = coco(tmp_path, [("p.jpg", 100, 100, (10, 10, 20, 20)), ("q.jpg", *UPRIGHT, BOX)])
    with pytest.raises(ValueError) as info:
        CocoDataset(ann, str(tmp_path / "images"))
    text = str(info.value)
    assert ("image_size_mismatch: image id 1 (file_name 'p.jpg'): the annotations give the image size 100 x 100 "
            "(width x height) but the image is 120 x 60 as stored, 60 x 120 upright (EXIF orientation 6)") in text
    assert str(tmp_path / "images" / "p.jpg") in text
    with pytest.warns(UserWarning, match=r"image_size_mismatch: 1"):
        ds = CocoDataset(ann, str(tmp_path / "images"), on_error="skip")
    assert [r["file_name"] for r in ds.records] == ["q.jpg"]


def test_the_orientation_log_line_counts_in_words_that_agree(tmp_path, caplog):
    phone_photo(tmp_path / "images" / "p.jpg", 6)
    phone_photo(tmp_path / "images" / "q.jpg", 6)
    prefix = str(tmp_path / "images")
    one = coco(tmp_path, [("p.jpg", *UPRIGHT, BOX)], "one.json")
    two = coco(tmp_path, [("p.jpg", *UPRIGHT, BOX), ("q.jpg", 60, 120, (80, 20, 100, 30))], "two.json")
    with caplog.at_level(logging.INFO, logger="raydet.data.datasets"):
        CocoDataset(one, prefix)
        CocoDataset(two, prefix)
    lines = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert lines == [f"{one}: 1 image carries an EXIF orientation (exif_orientation=auto): 1 is used upright, 0 are "
                     f"used as stored",
                     f"{two}: 2 images carry an EXIF orientation (exif_orientation=auto): 1 is used upright, 1 is "
                     f"used as stored"]


def test_apply_and_ignore_allow_one_frame_each(tmp_path):
    phone_photo(tmp_path / "images" / "p.jpg", 6)
    upright = coco(tmp_path, [("p.jpg", *UPRIGHT, BOX)], "upright.json")
    stored = coco(tmp_path, [("p.jpg", 60, 120, (80, 20, 100, 30))], "stored.json")
    prefix = str(tmp_path / "images")
    assert CocoDataset(upright, prefix, exif_orientation="apply").records[0]["orientation"] == 6
    assert CocoDataset(stored, prefix, exif_orientation="ignore").records[0]["orientation"] == 1
    with pytest.raises(ValueError, match=r"image_size_mismatch: .*the annotations give the image size 120 x 60 "
                                         r"\(width x height\) .*\(exif_orientation: auto accepts either frame\)"):
        CocoDataset(stored, prefix, exif_orientation="apply")
    with pytest.raises(ValueError, match=r"image_size_mismatch: .*image size 60 x 120 .*120 x 60 as stored"):
        CocoDataset(upright, prefix, exif_orientation="ignore")
    with pytest.raises(ValueError, match=r"exif_orientation must be one of \('auto', 'apply', 'ignore'\)"):
        CocoDataset(upright, prefix, exif_orientation="rotate")


def test_without_the_reading_check_the_decoder_resolves_the_same_policy(tmp_path):
    phone_photo(tmp_path / "images" / "p.jpg", 8)
    ds = CocoDataset(coco(tmp_path, [("p.jpg", *UPRIGHT, BOX)]), str(tmp_path / "images"), check_images=False)
    assert "orientation" not in ds.records[0]
    image = ds.load_image(ds.records[0])
    assert image.shape == (*UPRIGHT, 3) and is_red(image, BOX)
    bad = CocoDataset(coco(tmp_path, [("p.jpg", 70, 70, (1, 1, 9, 9))], "bad.json"), str(tmp_path / "images"),
                      check_images=False)
    with pytest.raises(ImageSizeMismatchError,
                       match=r"image id 1: the annotations give the image size 70 x 70 .*p\.jpg"):
        bad.load_image(bad.records[0])


def test_voc_reader_and_a_missing_size_use_the_header(tmp_path):
    root = tmp_path / "VOC"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    phone_photo(root / "JPEGImages" / "a.jpg", 6)
    phone_photo(root / "JPEGImages" / "b.jpg", 5)
    obj = (f"<object><name>cat</name><difficult>0</difficult><bndbox><xmin>{BOX[0]}</xmin><ymin>{BOX[1]}</ymin>"
           f"<xmax>{BOX[2]}</xmax><ymax>{BOX[3]}</ymax></bndbox></object>")
    (root / "Annotations" / "a.xml").write_text(f"<annotation><size><width>60</width><height>120</height></size>"
                                                f"{obj}</annotation>")
    (root / "Annotations" / "b.xml").write_text(f"<annotation>{obj}</annotation>")  # no <size>
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    ds = VOCDataset([str(root)], "train")
    assert [(r["height"], r["width"], r["orientation"]) for r in ds.records] == [(*UPRIGHT, 6), (*UPRIGHT, 5)]
    for record in ds.records:
        assert is_red(ds.load_image(record), BOX)
    with pytest.warns(UserWarning, match=r"(?s)box_outside_image: 1, image_size_mismatch: 1.*image a: the "
                                         r"annotations give the image size 60 x 120 \(width x height\) .*a\.jpg"):
        stored = VOCDataset([str(root)], "train", exif_orientation="ignore", on_error="skip")
    # b's size is read as stored (120 x 60, width x height), where its upright box no longer fits
    assert [(r["voc_id"], r["height"], r["width"], len(r["boxes"])) for r in stored.records] == [("b", 60, 120, 0)]


def test_a_png_exif_orientation_is_applied_too(tmp_path):
    stored = np.asarray(Image.fromarray(photo()).transpose(TO_STORED[6]))
    path = save(tmp_path / "p.png", stored, orientation=6, fmt="PNG")
    image = read_image(str(path))
    np.testing.assert_array_equal(image, pillow_upright(path))  # lossless: exactly Pillow's pixels
    np.testing.assert_array_equal(image, photo())


# ----------------------------------------------------------------------------------------------------------
# Damaged JPEG data that still ends with FF D9

def textured(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def damaged_jpegs(folder: Path) -> dict[str, Path]:
    """A valid JPEG and two damaged copies that keep the start and end-of-image markers: 40 bytes zeroed in the
    middle of the scan, and the scan cut in half with FF D9 appended."""
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(textured()).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    sos = data.rfind(b"\xff\xda")
    middle = sos + (len(data) - sos) // 2
    zeroed = bytearray(data)
    zeroed[middle:middle + 40] = bytes(40)
    files = {"good": data, "zeroed": bytes(zeroed), "cut": data[:middle] + b"\xff\xd9"}
    for name, content in files.items():
        (folder / f"{name}.jpg").write_bytes(content)
    return {name: folder / f"{name}.jpg" for name in files}


def test_damaged_jpeg_data_is_a_corrupt_image_error_naming_the_file(tmp_path):
    files = damaged_jpegs(tmp_path)
    np.testing.assert_array_equal(read_image(str(files["good"])), np.asarray(Image.open(files["good"])))
    for name in ("zeroed", "cut"):
        path = files[name]
        assert image_file_problem(str(path)) is None  # start and end markers: the cheap look passes it
        decoded = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape == (64, 96, 3)  # OpenCV alone returns made-up pixels
        with pytest.raises(CorruptImageError, match=rf"image id 7: cannot decode image file \(damaged JPEG data, "
                                                    rf"libjpeg: Corrupt JPEG data: .*\): .*{name}\.jpg$"):
            read_image(str(path), 7)


def test_other_jpeg_flavours_and_png_still_decode(tmp_path):
    image = textured(seed=1)
    gray = save(tmp_path / "gray.jpg", image[..., 0])
    progressive = save(tmp_path / "prog.jpg", image, progressive=True)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(image).convert("CMYK").save(cmyk, "JPEG", quality=95)
    png = save(tmp_path / "a.png", image, fmt="PNG")
    for path in (gray, progressive, cmyk):
        with Image.open(path) as im:
            reference = np.asarray(im.convert("RGB"))
        assert np.abs(read_image(str(path)).astype(int) - reference).max() <= 2, path
    np.testing.assert_array_equal(read_image(str(png)), image)


def test_check_images_decode_finds_damaged_images_when_the_annotations_are_read(tmp_path):
    files = damaged_jpegs(tmp_path / "images")
    save(tmp_path / "images" / "ok.png", textured(seed=2), fmt="PNG")
    ann = coco(tmp_path, [(f"{name}.jpg", 64, 96, (8, 8, 40, 40)) for name in ("good", "zeroed", "cut")]
               + [("ok.png", 64, 96, (8, 8, 40, 40))])
    prefix = str(tmp_path / "images")
    assert len(CocoDataset(ann, prefix)) == 4  # the header check cannot see inside the scan
    with pytest.raises(ValueError) as info:
        CocoDataset(ann, prefix, check_images="decode")
    text = str(info.value)
    assert "2 problem(s) (corrupt_image: 2)" in text
    assert "image id 2 (file_name 'zeroed.jpg'): cannot decode image file (damaged JPEG data" in text
    assert str(files["cut"]) in text
    with pytest.warns(UserWarning, match=r"skipped 2 problem\(s\) \(corrupt_image: 2\)"):
        ds = CocoDataset(ann, prefix, check_images="decode", on_error="skip")
    assert [r["file_name"] for r in ds.records] == ["good.jpg", "ok.png"]
    with pytest.raises(ValueError, match=r"check_images must be true, false or 'decode', got 'full'"):
        CocoDataset(ann, prefix, check_images="full")


# ----------------------------------------------------------------------------------------------------------
# on_error: skip at decode time in training

def decoded_rows(tmp_path: Path, order: list[str], on_error: str):
    """The Ray Data actor's output for images in ``order`` (no Ray), and the dataset."""
    from raydet.data.ray_data import DecodeAndTransform, input_columns

    damaged_jpegs(tmp_path / "images")
    for seed, name in enumerate(("a", "c")):
        save(tmp_path / "images" / f"{name}.png", textured(seed=seed), fmt="PNG")
    files = {"a": "a.png", "b": "zeroed.jpg", "c": "c.png", "d": "cut.jpg"}
    ds = CocoDataset(coco(tmp_path, [(files[n], 64, 96, (8, 8, 40, 40)) for n in order]), str(tmp_path / "images"),
                     on_error=on_error)
    actor = DecodeAndTransform(ds.records, ds.image_loader(), [], seed=0, on_error=on_error)
    return actor(input_columns(np.arange(len(ds.records)), epoch=0)), ds


class Rows:
    """Stands in for a Ray dataset: ``iter_batches`` yields the given column batch."""

    def __init__(self, cols):
        self.cols = cols

    def iter_batches(self, **kwargs):
        yield self.cols


@pytest.mark.parametrize("order, image_ids", [(["a", "b", "c"], [1, 1, 3]), (["b", "a", "c"], [2, 2, 3])])
def test_skip_replaces_an_image_that_fails_to_decode_and_counts_it(tmp_path, caplog, order, image_ids):
    from raydet.data.ray_data import iter_detection_batches
    from raydet.data.transforms import CollateConfig

    cols, _ = decoded_rows(tmp_path, order, "skip")
    bad = order.index("b")
    assert [bool(e) for e in cols["error"]] == [i == bad for i in range(3)]
    assert "zeroed.jpg" in cols["error"][bad] and "damaged JPEG data" in cols["error"][bad]
    with caplog.at_level(logging.WARNING, logger="raydet.data.ray_data"):
        batches = list(iter_detection_batches(Rows(cols), 3, CollateConfig(), with_masks=False, train=True))
    assert len(batches) == 1  # every image still has a place: each worker runs its iterations
    assert [m["image_id"] for m in batches[0]["img_metas"]] == image_ids
    assert batches[0]["skipped_images"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "on_error=skip" in warnings[0] and "zeroed.jpg" in warnings[0]
    with pytest.raises(CorruptImageError, match=r"zeroed\.jpg"):  # evaluation never leaves an image out
        list(iter_detection_batches(Rows(cols), 3, CollateConfig(), with_masks=False, train=False))


def test_fail_names_the_file_and_all_unusable_is_an_error(tmp_path):
    from raydet.data.ray_data import iter_detection_batches
    from raydet.data.transforms import CollateConfig

    with pytest.raises(CorruptImageError, match=r"image id 2: cannot decode image file \(damaged JPEG .*zeroed\.jpg"):
        decoded_rows(tmp_path / "fail", ["a", "b"], "fail")
    cols, _ = decoded_rows(tmp_path / "all", ["b", "d"], "skip")
    with pytest.raises(CorruptImageError, match=r"none of the 2 images .* first: .*zeroed\.jpg"):
        list(iter_detection_batches(Rows(cols), 2, CollateConfig(), with_masks=False, train=True))


def test_the_logger_hook_sums_the_skipped_images_of_the_epoch():
    import torch

    from raydet.engine.hooks import LoggerHook

    hook = LoggerHook(interval=100, tensorboard=False)
    runner = SimpleNamespace(rank=1, work_dir=None, iter=0, epoch=0, data_time=0.0, batch={},
                             losses={"loss_cls": torch.tensor(0.5)}, loss=torch.tensor(0.5))
    hook.before_run(runner)
    for epoch_batches, expected in (([{"skipped_images": 1}, {}, {"skipped_images": 2}], 3), ([{}, {}], None)):
        hook.before_train_epoch(runner)
        for batch in epoch_batches:
            runner.batch = batch
            hook.before_train_iter(runner)
            hook.after_train_iter(runner)
            runner.iter += 1
        assert runner.epoch_log.get("train/skipped_images") == expected


# ----------------------------------------------------------------------------------------------------------
# infer: a phone photo's boxes are in the upright frame

def test_infer_predicts_on_the_upright_photo(tmp_path):
    """The inference actor (in this process) on an orientation-6 phone photo gives exactly the predictions for a
    lossless PNG of the same pixels turned upright by Pillow; with a COCO json size of the stored frame it keeps
    the stored pixels, and a size of neither frame is an error naming the file."""
    import torch

    from raydet.config import load_config
    from raydet.infer import DetectionPredictor, infer
    from test_infer import CLASSES, OVERRIDES, QUICKSTART

    photo_path = phone_photo(tmp_path / "phone.jpg", 6)
    stored = read_image(str(photo_path), orientation="ignore")
    save(tmp_path / "upright.png", np.asarray(Image.fromarray(stored).transpose(T.ROTATE_270)), fmt="PNG")

    cfg = load_config(QUICKSTART, OVERRIDES)
    torch.manual_seed(0)
    model = cfg.build("model")
    with torch.no_grad():  # favour class 1, so that some boxes score high
        model.roi_head.bbox_head.fc_cls.bias.copy_(torch.tensor([1.0, 2.5, 0.0, -2.0]))
    predictor = DetectionPredictor(cfg.data, cfg.path, cfg.origins, [model.state_dict()], "seeded",
                                   cfg.get("data.test.pipeline"), classes=CLASSES)

    def run(path: Path, h: int = 0, w: int = 0) -> dict:
        return predictor({"index": np.array([0]), "image_id": np.array([1]), "path": np.array([str(path)]),
                          "height": np.array([h]), "width": np.array([w]), "vis_path": np.array([""])})

    phone, upright = run(photo_path), run(tmp_path / "upright.png")
    assert phone["error"][0] == "" and (phone["height"][0], phone["width"][0]) == UPRIGHT
    assert len(upright["scores"][0]) > 0
    np.testing.assert_array_equal(phone["boxes"][0], upright["boxes"][0])
    np.testing.assert_array_equal(phone["scores"][0], upright["scores"][0])
    as_stored = run(photo_path, 60, 120)  # a COCO json in the stored frame
    assert (as_stored["height"][0], as_stored["width"][0]) == (60, 120)
    wrong = run(photo_path, 50, 50)
    assert wrong["error_kind"][0] == "image_size_mismatch" and str(photo_path) in wrong["error"][0]
    with pytest.raises(ValueError, match=r"--exif-orientation must be one of auto, apply, ignore, got 'sideways'"):
        infer(cfg, str(tmp_path / "none.pt"), [str(photo_path)], str(tmp_path / "out"), exif_orientation="sideways")


# ----------------------------------------------------------------------------------------------------------
# End to end (Ray): a phone photo and a damaged JPEG in one training run

def test_training_uses_the_phone_photo_upright_and_skips_a_damaged_jpeg(ray_session, tmp_path, capsys):
    """One epoch of the quickstart model on four 64x96 (upright) images: an orientation-6 phone photo annotated
    upright (stored 96x64: without the rotation the decoded size would not match), two plain ones and one with
    damaged scan data under ``on_error: skip``. Training finishes, and the log and the checkpoint's metrics count
    the one replaced image."""
    from test_train_ray import SMALL

    from raydet.train import main

    folder = tmp_path / "images"
    box = (20, 10, 60, 40)
    save(folder / "phone.jpg", np.asarray(Image.fromarray(photo((64, 96), box)).transpose(TO_STORED[6])), 6)
    save(folder / "a.jpg", photo((64, 96), box))
    save(folder / "b.png", photo((64, 96), box), fmt="PNG")
    damaged_jpegs(folder)
    ann = coco(tmp_path, [(name, 64, 96, box) for name in ("phone.jpg", "a.jpg", "b.png", "zeroed.jpg")])
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"_base_: {Path(__file__).resolve().parents[1] / 'pipelines' / 'quickstart.yaml'}\n"
        "num_classes: 1\n"
        "data:\n"
        f"  train: {{_delete_: true, type: CocoDataset, ann_file: {ann}, img_prefix: {folder}/, "
        "pipeline: '${train_pipeline}', on_error: skip}\n"
        "  val: null\n  test: null\n")
    small = [o for o in SMALL if not o.startswith(("data.val", "data.test", "data.train"))]
    work_dir = tmp_path / "w"
    assert main([str(pipeline), "--work-dir", str(work_dir), "--set", *small, "train.max_epochs=1"]) == 0, \
        capsys.readouterr().err
    logs = [json.loads(line) for line in next(work_dir.glob("*/log.jsonl")).read_text().splitlines()]
    train = [r for r in logs if r["mode"] == "train"]
    assert [r["iter"] for r in train] == [1, 2]  # 4 images, 2 per batch: nothing lost to the skipped one
    assert train[-1]["skipped_images"] == 1
    info = json.loads(next(work_dir.glob("*/ray/*/checkpoint_*/checkpoint.json")).read_text())
    assert info["metrics"]["train/skipped_images"] == 1
