"""Datasets, runs and results in object storage, against a real S3-compatible server: moto's server mode, started on
127.0.0.1 by this module (the port and the fake credentials are in the environment from the start of the session, see
``tests/conftest.py``, so the Ray workers and actors inherit them) and stopped by its process id.

The data is a small COCO set written here (JPEGs + json, raydet.data.synthetic's shapes), put into the bucket with
boto3, the independent client every check reads the bucket back with. One module-wide training run (one epoch, then
``--resume`` to epoch 2) trains from ``s3://`` with its work dir in ``s3://``; ``raydet test`` and ``raydet infer``
then read the checkpoint and images from the bucket and write their results there.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from raydet import fileio

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
BUCKET = "raydet-data"
MISSING_BUCKET = "raydet-no-such-bucket"
TRAIN_IDS, TEST_IDS = range(1, 9), range(101, 105)  # 8 training images (4 iterations an epoch), 4 test images
SIZE = 96


# --------------------------------------------------------------------------------------------------- the server
def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _server(command: list[str], port_env: str, name: str):
    """A test object-storage server started on ``$port_env`` of 127.0.0.1, ready when its port answers; stopped by
    its process id at the end (its objects live in its memory)."""
    port = int(os.environ[port_env])
    if _port_open(port):
        pytest.fail(f"port {port} ({port_env}) is taken: the test {name} cannot start")
    server = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _port_open(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start on port {port} (exit code {server.poll()})")
            time.sleep(0.1)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on the session's port (conftest), with the bucket ``BUCKET``: a boto3 client of it."""
    with _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p"], "RAYDET_TEST_S3_PORT",
                 "S3 server (moto)"):
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
        client.create_bucket(Bucket=BUCKET)
        yield client


def _get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(client, prefix: str) -> dict[str, int]:
    """key -> size of the objects under ``prefix`` (directory markers left out)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", []) if not o["Key"].endswith("/")})
    return out


# --------------------------------------------------------------------------------------------------- the data
def _coco_split(ids, seed: int) -> tuple[dict, dict[str, bytes]]:
    """A COCO json of synthetic shapes and its JPEG files (name -> bytes)."""
    from raydet.data.synthetic import CLASSES, make_shape_sample

    images, annotations, files = [], [], {}
    for image_id in ids:
        pixels, record = make_shape_sample(image_id, SIZE, SIZE, 3, seed=seed)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        name = f"img_{image_id:04d}.jpg"
        files[name] = jpeg.tobytes()
        images.append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
        for (x1, y1, x2, y2), label in zip(record["boxes"].tolist(), record["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}, files


@pytest.fixture(scope="module")
def dataset(s3):
    """The COCO set in the bucket under ``data/``: ``{"train": json, "test": json, "files": {name: bytes}}``."""
    out = {"files": {}}
    for split, ids, seed in (("train", TRAIN_IDS, 0), ("test", TEST_IDS, 1)):
        ann, files = _coco_split(ids, seed)
        s3.put_object(Bucket=BUCKET, Key=f"data/annotations/{split}.json", Body=json.dumps(ann).encode())
        for name, data in files.items():
            s3.put_object(Bucket=BUCKET, Key=f"data/images/{name}", Body=data)
        out[split] = ann
        out["files"].update(files)
    return out


def _overrides(data_root: str, *extra: str) -> list[str]:
    """The quickstart shrunk as in test_train_ray (SMALL), reading the COCO set under ``data_root``."""
    from test_train_ray import SMALL

    small = [o for o in SMALL if not o.startswith(("data.train.", "data.val.", "data.test."))]
    coco = ("{type: CocoDataset, ann_file: '${data_root}annotations/%s.json', img_prefix: '${data_root}images/', "
            "pipeline: '${%s_pipeline}'%s}")
    return small + [f"data_root={data_root}", "data.train=" + coco % ("train", "train", ", filter_empty_gt: true"),
                    "data.val=null", "data.test=" + coco % ("test", "test", ""), "runtime.tensorboard=true",
                    "runtime.curves=true",
                    "model.roi_head.test.score_thr=0.0", *extra]  # score_thr 0: every image gets detections


# --------------------------------------------------------------------------------------------------- fileio (no Ray)
def test_uris_are_joined_and_split_like_paths():
    assert fileio.is_uri("s3://b/k") and fileio.is_uri("gs://b") and not fileio.is_uri("/data/s3://x")
    assert not fileio.is_uri("relative/path") and not fileio.is_uri(Path("/x"))
    assert fileio.join("s3://b/root/", "images", "a.jpg") == "s3://b/root/images/a.jpg"
    assert fileio.join("s3://b", "x") == "s3://b/x"
    assert fileio.join("/local/root", "s3://b/x") == "s3://b/x"  # a URI part starts over, as an absolute path does
    assert fileio.join("/local", "a", "b") == os.path.join("/local", "a", "b")
    assert fileio.dirname("s3://b/a/c.json") == "s3://b/a" and fileio.dirname("s3://b/a") == "s3://b"
    assert fileio.basename("gs://b/run/ray/") == "ray" and fileio.basename("/x/y.pt") == "y.pt"


def test_a_scheme_pyarrow_lacks_goes_through_fsspec():
    pytest.importorskip("fsspec")
    fileio.write_text("memory://raydet-test/a/x.txt", "hi")  # fsspec's in-process file system
    assert fileio.read_text("memory://raydet-test/a/x.txt") == "hi"
    assert [e.path for e in fileio.list_files("memory://raydet-test")] == ["memory://raydet-test/a/x.txt"]
    with pytest.raises(fileio.StorageNotFoundError, match=r"^memory://raydet-test/a/y: not found"):
        fileio.read_bytes("memory://raydet-test/a/y")
    with pytest.raises(fileio.StorageError, match=r"^nosuch://x/y: no file system for this scheme"):
        fileio.read_bytes("nosuch://x/y")
    fileio.remove_tree("memory://raydet-test")
    assert fileio.list_files("memory://raydet-test") == []


def test_files_round_trip_through_the_bucket(s3, tmp_path):
    payload = bytes(range(256)) * 1000
    fileio.write_bytes(f"s3://{BUCKET}/unit/blob.bin", payload)
    assert _get(s3, "unit/blob.bin") == payload  # read back by boto3
    s3.put_object(Bucket=BUCKET, Key="unit/notes/a.txt", Body="héllo\n".encode())
    assert fileio.read_text(f"s3://{BUCKET}/unit/notes/a.txt") == "héllo\n"
    assert fileio.read_bytes(f"s3://{BUCKET}/unit/blob.bin") == payload
    assert fileio.read_ends(f"s3://{BUCKET}/unit/blob.bin", 10, 5) == (payload[:10], payload[-5:], len(payload))
    assert fileio.isfile(f"s3://{BUCKET}/unit/blob.bin") and not fileio.isdir(f"s3://{BUCKET}/unit/blob.bin")
    assert fileio.isdir(f"s3://{BUCKET}/unit/notes") and fileio.exists(f"s3://{BUCKET}/unit/notes/a.txt")
    assert not fileio.exists(f"s3://{BUCKET}/unit/nothing") and not fileio.exists(f"s3://{MISSING_BUCKET}/x")
    listed = {e.path: e.size for e in fileio.list_files(f"s3://{BUCKET}/unit")}
    assert listed == {f"s3://{BUCKET}/{k}": n for k, n in _keys(s3, "unit/").items()}
    assert listed == {f"s3://{BUCKET}/unit/blob.bin": len(payload), f"s3://{BUCKET}/unit/notes/a.txt": 7}
    assert fileio.list_files(f"s3://{BUCKET}/unit/none") == []
    assert fileio.stat(f"s3://{BUCKET}/unit/blob.bin").size == len(payload)

    local = tmp_path / "up"
    (local / "tb").mkdir(parents=True)
    (local / "log.jsonl").write_text("1\n")
    (local / "tb" / "events").write_bytes(b"e" * 10)
    assert sorted(fileio.upload_folder(str(local), f"s3://{BUCKET}/unit/up")) == [
        f"s3://{BUCKET}/unit/up/log.jsonl", f"s3://{BUCKET}/unit/up/tb/events"]
    fileio.download_file(f"s3://{BUCKET}/unit/up/tb/events", str(tmp_path / "down" / "events"))
    assert (tmp_path / "down" / "events").read_bytes() == b"e" * 10
    fileio.remove_tree(f"s3://{BUCKET}/unit")
    assert _keys(s3, "unit/") == {}


def test_a_missing_bucket_or_key_is_one_line_naming_the_uri(s3):
    with pytest.raises(fileio.StorageNotFoundError) as missing_bucket:
        fileio.read_bytes(f"s3://{MISSING_BUCKET}/data/a.json")
    assert str(missing_bucket.value) == (f"s3://{MISSING_BUCKET}/data/a.json: not found (the bucket "
                                         f"'{MISSING_BUCKET}' does not exist)")
    with pytest.raises(fileio.StorageNotFoundError) as missing_key:
        fileio.read_bytes(f"s3://{BUCKET}/no/such/key.json")
    assert str(missing_key.value) == (f"s3://{BUCKET}/no/such/key.json: not found (no object with this key in bucket "
                                      f"'{BUCKET}')")
    for exc in (missing_bucket.value, missing_key.value):  # a FileNotFoundError, and one of raydet's named errors
        assert isinstance(exc, FileNotFoundError) and "\n" not in str(exc)
    with pytest.raises(fileio.StorageNotFoundError, match=rf"^s3://{MISSING_BUCKET}/w: not found \(the bucket"):
        fileio.list_files(f"s3://{MISSING_BUCKET}/w")
    with pytest.raises(fileio.StorageNotFoundError, match=rf"^s3://{MISSING_BUCKET}/w/x: not found \(the bucket"):
        fileio.write_text(f"s3://{MISSING_BUCKET}/w/x", "text")


def test_a_mirrored_folder_uploads_what_changed_and_continues_a_log(s3):
    s3.put_object(Bucket=BUCKET, Key="mirror/log.jsonl", Body=b'{"iter": 1}\n')
    folder = fileio.MirroredFolder(f"s3://{BUCKET}/mirror", download=("log.jsonl", "absent.txt"))
    scratch = folder.local
    assert Path(folder.path("log.jsonl")).read_text() == '{"iter": 1}\n'  # fetched to go on growing
    assert folder.sync() == []  # nothing changed since
    with open(folder.path("log.jsonl"), "a") as f:
        f.write('{"iter": 2}\n')
    os.makedirs(folder.path("tb"))
    Path(folder.path("tb", "events.1")).write_bytes(b"tb")
    assert sorted(folder.sync()) == [f"s3://{BUCKET}/mirror/log.jsonl", f"s3://{BUCKET}/mirror/tb/events.1"]
    assert _get(s3, "mirror/log.jsonl") == b'{"iter": 1}\n{"iter": 2}\n'
    Path(folder.path("curves.png")).write_bytes(b"png")
    folder.close()
    assert _keys(s3, "mirror/") == {"mirror/log.jsonl": 24, "mirror/tb/events.1": 2, "mirror/curves.png": 3}
    assert not os.path.exists(scratch)  # the scratch folder goes


def test_the_readers_read_annotations_and_images_from_the_bucket(s3, dataset, tmp_path):
    """CocoDataset and VOCDataset over s3:// give the records of the same files on a local disk; images decode to
    Pillow's pixels of the same bytes."""
    from PIL import Image

    from raydet.data.datasets import CocoDataset, VOCDataset, read_image

    local = tmp_path / "coco"
    (local / "images").mkdir(parents=True)
    (local / "test.json").write_text(json.dumps(dataset["test"]))
    for im in dataset["test"]["images"]:
        (local / "images" / im["file_name"]).write_bytes(dataset["files"][im["file_name"]])
    remote = CocoDataset(f"s3://{BUCKET}/data/annotations/test.json", f"s3://{BUCKET}/data/images/")
    disk = CocoDataset(str(local / "test.json"), str(local / "images"))
    assert len(remote.records) == len(disk.records) == len(TEST_IDS)
    for r, d in zip(remote.records, disk.records):
        assert r["img_path"] == f"s3://{BUCKET}/data/images/{d['file_name']}"
        assert (r["image_id"], r["orientation"]) == (d["image_id"], d["orientation"]) == (r["image_id"], 1)
        np.testing.assert_array_equal(r["boxes"], d["boxes"])
        np.testing.assert_array_equal(r["labels"], d["labels"])
    first = remote.records[0]
    expected = np.asarray(Image.open(io.BytesIO(dataset["files"][first["file_name"]])).convert("RGB"))
    np.testing.assert_array_equal(read_image(first["img_path"], first["image_id"]), expected)
    with pytest.raises(FileNotFoundError, match=rf"^image id 7: image file not found: s3://{BUCKET}/data/nope.jpg "
                                                rf"\(no object with this key in bucket '{BUCKET}'\)$"):
        read_image(f"s3://{BUCKET}/data/nope.jpg", 7)

    # Pascal VOC: the split list, the xml files (fetched in parallel) and the images, in the bucket
    xml = ("<annotation><size><width>96</width><height>96</height></size><object><name>{}</name><difficult>0"
           "</difficult><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>"
           "</annotation>")
    objects = {"a": ("rectangle", 10, 12, 40, 50), "b": ("ellipse", 5, 6, 70, 80)}
    s3.put_object(Bucket=BUCKET, Key="voc/ImageSets/Main/trainval.txt", Body=b"a\nb\nc\n")  # c has no xml
    for voc_id, obj in objects.items():
        s3.put_object(Bucket=BUCKET, Key=f"voc/Annotations/{voc_id}.xml", Body=xml.format(*obj).encode())
        s3.put_object(Bucket=BUCKET, Key=f"voc/JPEGImages/{voc_id}.jpg", Body=dataset["files"]["img_0101.jpg"])
    with pytest.warns(UserWarning, match=rf"missing_annotation_file: s3://{BUCKET}/voc/Annotations/c\.xml \(image c\): "
                                         rf"file not found \(no object with this key in bucket '{BUCKET}'\)"):
        voc = VOCDataset(f"s3://{BUCKET}/voc/", "trainval", classes=["rectangle", "ellipse"], on_error="skip")
    assert [r["voc_id"] for r in voc.records] == ["a", "b"]
    assert [r["boxes"].tolist() for r in voc.records] == [[[10, 12, 40, 50]], [[5, 6, 70, 80]]]
    assert [r["labels"].tolist() for r in voc.records] == [[0], [1]]
    assert voc.records[1]["img_path"] == f"s3://{BUCKET}/voc/JPEGImages/b.jpg"


def test_a_proposal_file_in_the_bucket_is_written_and_read_by_a_dataset(s3, dataset):
    """raydet.data.proposals through s3://: the file a CocoDataset's proposal_file reads; a missing one names it."""
    from raydet.data.datasets import CocoDataset
    from raydet.data.proposals import write_proposals

    uri = f"s3://{BUCKET}/proposals/test.npz"
    boxes = [np.array([[1, 2, 30, 40], [5, 5, 9, 9]], np.float32) + i for i in range(len(TEST_IDS))]
    write_proposals(uri, list(TEST_IDS), boxes, [np.array([0.2, 0.7], np.float32)] * len(TEST_IDS))
    ds = CocoDataset(f"s3://{BUCKET}/data/annotations/test.json", f"s3://{BUCKET}/data/images/", proposal_file=uri,
                     num_max_proposals=1, check_images=False)
    assert [r["proposals"].tolist() for r in ds.records] == [[[5 + i, 5 + i, 9 + i, 9 + i]] for i in range(4)]
    with pytest.raises(ValueError, match=rf"^s3://{BUCKET}/proposals/absent\.npz: proposal file not found \(no "
                                         rf"object with this key in bucket '{BUCKET}'\)$"):
        CocoDataset(f"s3://{BUCKET}/data/annotations/test.json", f"s3://{BUCKET}/data/images/",
                    proposal_file=f"s3://{BUCKET}/proposals/absent.npz", check_images=False)


def test_checkpoints_in_the_bucket_are_found_without_downloading_them(s3, monkeypatch):
    """--resume's search: the latest complete checkpoint of a work dir's runs (an upload cut short, without its
    checkpoint.json, is skipped); work dirs resolve to URIs for the commands that write there."""
    from raydet.registry import ConfigError
    from raydet.workspace import (WORK_ROOT_ENV, checkpoint_record, find_checkpoints, latest_checkpoint, new_run_dir,
                                  resolve_work_dir)

    work = f"s3://{BUCKET}/ckpts/work"
    layout = [("r1/ray/a1/checkpoint_1", {"epoch": 1, "iter": 4}), ("r1/ray/a2/checkpoint_2", {"epoch": 2, "iter": 8}),
              ("r2/ray/a3/checkpoint_3", None)]  # the newest, cut short
    for folder, info in layout:  # written in path order: whether their times tie (whole seconds) or not, the order
        s3.put_object(Bucket=BUCKET, Key=f"ckpts/work/{folder}/checkpoint.pt", Body=b"weights")
        if info is not None:
            s3.put_object(Bucket=BUCKET, Key=f"ckpts/work/{folder}/checkpoint.json", Body=json.dumps(info).encode())
    found = find_checkpoints(work)
    assert [(c.epoch, c.iter, c.run_dir) for c in found] == [(1, 4, f"{work}/r1"), (2, 8, f"{work}/r1")]
    latest = latest_checkpoint(work)
    assert latest.path == f"{work}/r1/ray/a2/checkpoint_2/checkpoint.pt"  # "weights" is no torch file: not loaded
    assert latest_checkpoint(f"{work}/r1").path == latest.path  # a run folder's own
    assert latest_checkpoint(f"s3://{BUCKET}/ckpts/empty") is None
    given = checkpoint_record(f"{work}/r1/ray/a1/checkpoint_1")  # --resume s3://.../checkpoint_1 (a Ray folder)
    assert (given.path, given.epoch, given.iter, given.run_dir) == (found[0].path, 1, 4, f"{work}/r1")
    assert new_run_dir(work).startswith(f"{work}/20")

    assert resolve_work_dir(f"{work}/", allow_uri=True) == work
    assert resolve_work_dir("work_dirs/q", work_root=f"s3://{BUCKET}/root/", allow_uri=True) == \
        f"s3://{BUCKET}/root/work_dirs/q"
    monkeypatch.setenv(WORK_ROOT_ENV, f"gs://{BUCKET}/env_root")
    assert resolve_work_dir("q", allow_uri=True) == f"gs://{BUCKET}/env_root/q"
    with pytest.raises(ConfigError, match=r"^RAYDET_WORK_ROOT: gs://.*: a URI is not supported as a work dir yet by "
                                          r"this command"):
        resolve_work_dir("q")  # raydet tune, benchmark


def test_a_missing_bucket_or_key_fails_each_command_with_one_line(s3, dataset, capsys):
    """Before any Ray worker starts: the annotation file, the work dir, the checkpoint and the inputs."""
    import raydet.infer
    import raydet.test
    import raydet.train

    def error_line(rc: int) -> str:
        assert rc == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        return lines[0]

    work = f"s3://{BUCKET}/errors"
    args = [str(QUICKSTART), "--work-dir", work, "--set"]
    # the dataset's build error names the key that configured it, then the URI
    assert error_line(raydet.train.main(args + _overrides(f"s3://{MISSING_BUCKET}/data/"))) == (
        f"error: --set: data.train: building CocoDataset failed: s3://{MISSING_BUCKET}/data/annotations/train.json: "
        f"annotation file not found (the bucket '{MISSING_BUCKET}' does not exist)")
    assert error_line(raydet.train.main(args + _overrides(f"s3://{BUCKET}/nothing/"))) == (
        f"error: --set: data.train: building CocoDataset failed: s3://{BUCKET}/nothing/annotations/train.json: "
        f"annotation file not found (no object with this key in bucket '{BUCKET}')")
    assert error_line(raydet.train.main([str(QUICKSTART), "--work-dir", f"s3://{MISSING_BUCKET}/work", "--set",
                                         *_overrides(f"s3://{BUCKET}/data/")])) == (
        f"error: s3://{MISSING_BUCKET}/work: not found (the bucket '{MISSING_BUCKET}' does not exist)")
    assert _keys(s3, "errors/") == {}  # nothing was written for the runs that did not start
    assert error_line(raydet.test.main([str(QUICKSTART), f"s3://{BUCKET}/nothing/checkpoint.pt", "--set",
                                        *_overrides(f"s3://{BUCKET}/data/")])) == (
        f"error: checkpoint not found: s3://{BUCKET}/nothing/checkpoint.pt (no object with this key in bucket "
        f"'{BUCKET}')")
    assert error_line(raydet.infer.main([str(QUICKSTART), f"s3://{BUCKET}/nothing/checkpoint.pt",
                                         f"s3://{MISSING_BUCKET}/images/", "--out", f"s3://{BUCKET}/errors/infer",
                                         "--set", *_overrides(f"s3://{BUCKET}/data/")])) == (
        f"error: input not found: s3://{MISSING_BUCKET}/images/ (the bucket '{MISSING_BUCKET}' does not exist)")


# --------------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def trained(ray_session, s3, dataset):
    """One epoch from s3:// into an s3:// work dir, then ``--resume`` to epoch 2: the keys after each run."""
    import raydet.train

    work = f"s3://{BUCKET}/work"
    overrides = _overrides(f"s3://{BUCKET}/data/")
    assert raydet.train.main([str(QUICKSTART), "--work-dir", work, "--set", *overrides, "train.max_epochs=1"]) == 0
    first = _keys(s3, "work/")
    assert raydet.train.main([str(QUICKSTART), "--work-dir", work, "--resume", "--allow-changes",
                              "--set", *overrides, "train.max_epochs=2"]) == 0
    return {"work": work, "first": first, "second": _keys(s3, "work/"), "overrides": overrides}


def _checkpoints(keys: dict) -> list[str]:
    return sorted(k for k in keys if k.endswith("/checkpoint.pt"))


def _load(client, key: str) -> dict:
    import torch

    return torch.load(io.BytesIO(_get(client, key)), map_location="cpu", weights_only=False)


def test_training_from_the_bucket_writes_its_run_folder_there(s3, trained):
    """Checkpoints (Ray Train's storage), pipeline.yaml, log.jsonl, tb/ and curves.png all land in the bucket."""
    (first,) = _checkpoints(trained["first"])
    run = first.split("/ray/")[0]  # work/<run folder>
    assert run.startswith("work/20") and f"{run}/log.jsonl" in trained["first"]
    state = _load(s3, first)
    assert (state["epoch"], state["iter"]) == (1, 4)  # 8 images at 2 per worker
    assert json.loads(_get(s3, first.replace("checkpoint.pt", "checkpoint.json")))["epoch"] == 1
    import yaml

    pipeline = yaml.safe_load(_get(s3, f"{run}/pipeline.yaml"))
    assert pipeline["data"]["train"]["ann_file"] == f"s3://{BUCKET}/data/annotations/train.json"
    assert pipeline["data"]["train"]["img_prefix"] == f"s3://{BUCKET}/data/images/"
    assert _get(s3, f"{run}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(k.startswith(f"{run}/tb/events.out.tfevents") for k in trained["first"])


def test_a_resumed_run_continues_from_the_checkpoint_in_the_bucket(s3, trained):
    (first,) = _checkpoints(trained["first"])
    second = [k for k in _checkpoints(trained["second"]) if k != first]
    assert len(second) == 1 and second[0].split("/ray/")[0] == first.split("/ray/")[0]  # the same run folder
    run = first.split("/ray/")[0]
    records = [json.loads(line) for line in _get(s3, f"{run}/log.jsonl").decode().splitlines()]
    modes = [r["mode"] for r in records]
    at = modes.index("resume")
    assert records[at] == {"mode": "resume", "epoch": 1, "iter": 4, "checkpoint": f"s3://{BUCKET}/{first}"}
    assert [(r["epoch"], r["iter"]) for r in records[:at] if r["mode"] == "train"] == [(1, i) for i in range(1, 5)]
    assert [(r["epoch"], r["iter"]) for r in records[at + 1:] if r["mode"] == "train"] == [(2, i) for i in range(5, 9)]
    old, new = _load(s3, first), _load(s3, second[0])
    assert (new["epoch"], new["iter"]) == (2, 8)
    key = "roi_head.bbox_head.fc_cls.weight"
    assert not np.array_equal(old["model"][key].numpy(), new["model"][key].numpy())


def test_test_and_infer_read_from_and_write_to_the_bucket(s3, trained, dataset):
    """``raydet test`` writes results.json and metrics.json to s3:// (the metrics are pycocotools' on that
    results.json); ``raydet infer`` on the bucket's image folder writes detections for every image, the same as
    ``raydet test``'s on the test images, and draws them into the bucket."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import raydet.infer
    import raydet.test

    (checkpoint,) = [k for k in _checkpoints(trained["second"]) if k not in trained["first"]]
    ckpt_uri = f"s3://{BUCKET}/{checkpoint.rsplit('/', 1)[0]}"  # the Ray checkpoint folder
    assert raydet.test.main([str(QUICKSTART), ckpt_uri, "--out", f"s3://{BUCKET}/test-out",
                             "--set", *trained["overrides"]]) == 0
    results = json.loads(_get(s3, "test-out/results.json"))
    metrics = json.loads(_get(s3, "test-out/metrics.json"))
    assert {r["image_id"] for r in results} == set(TEST_IDS)
    gt = COCO()
    gt.dataset = json.loads(json.dumps(dataset["test"]))
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert metrics["bbox/AP"] == pytest.approx(evaluation.stats[0], abs=1e-4)
    assert metrics["bbox/AP50"] == pytest.approx(evaluation.stats[1], abs=1e-4)

    # --batch-size 2: the test images are batched as in `raydet test` (2 per worker), so the predictions agree
    assert raydet.infer.main([str(QUICKSTART), ckpt_uri, f"s3://{BUCKET}/data/images/", "--out",
                              f"s3://{BUCKET}/infer-out", "--format", "coco,parquet", "--draw", "--batch-size", "2",
                              "--set", *trained["overrides"]]) == 0
    images = json.loads(_get(s3, "infer-out/images.json"))["images"]
    names = sorted(dataset["files"])
    assert [im["file_name"] for im in images] == [f"s3://{BUCKET}/data/images/{n}" for n in names]
    assert all((im["height"], im["width"]) == (SIZE, SIZE) for im in images)
    inferred = json.loads(_get(s3, "infer-out/results.json"))
    assert {r["image_id"] for r in inferred} == {im["id"] for im in images}  # detections for every image
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(_get(s3, "infer-out/results.parquet"))).to_pydict()
    assert len(table["image_id"]) == len(inferred)
    for im in images:
        png = np.frombuffer(_get(s3, f"infer-out/vis/{Path(im['file_name']).stem}.png"), np.uint8)
        assert cv2.imdecode(png, cv2.IMREAD_COLOR).shape == (SIZE, SIZE, 3)

    test_id = {f"s3://{BUCKET}/data/images/{im['file_name']}": im["id"] for im in dataset["test"]["images"]}
    by_image: dict[int, list] = {}
    for r in inferred:
        by_image.setdefault(r["image_id"], []).append(r)
    for im in images:
        if im["file_name"] not in test_id:
            continue
        mine = sorted(by_image[im["id"]], key=lambda r: -r["score"])[:10]
        theirs = sorted((r for r in results if r["image_id"] == test_id[im["file_name"]]), key=lambda r: -r["score"])
        for a, b in zip(mine, theirs[:10]):
            assert a["category_id"] == b["category_id"]
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)


# --------------------------------------------------------------------------------------------------- gs://
def _gcs_url(path: str) -> str:
    return f"{os.environ['STORAGE_EMULATOR_HOST']}{path}"


def _gcs_upload(name: str, data: bytes) -> None:
    """Upload through the GCS JSON API itself (urllib), not through raydet."""
    import urllib.parse
    import urllib.request

    url = _gcs_url(f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}")
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST")) as response:
        assert response.status == 200


def _gcs_download(name: str) -> bytes:
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(_gcs_url(f"/download/storage/v1/b/{BUCKET}/o/"
                                         f"{urllib.parse.quote(name, safe='')}?alt=media")) as response:
        return response.read()


@pytest.fixture(scope="module")
def gcs():
    """gcp-storage-emulator on the session's port (conftest sets ``STORAGE_EMULATOR_HOST`` before Ray starts), with
    the bucket ``BUCKET``, in memory."""
    script = Path(sys.executable).parent / "gcp-storage-emulator"
    with _server([str(script), "start", "-H", "127.0.0.1", "-M", "-q", "--default-bucket", BUCKET, "--port"],
                 "RAYDET_TEST_GCS_PORT", "GCS emulator (gcp-storage-emulator)") as port:
        yield port


def test_a_dataset_in_a_gcs_bucket_is_read_decoded_and_written_through_gs_uris(ray_session, gcs):
    """gs:// as s3://: the annotations read by the driver, each image fetched by the Ray Data decode actors (equal to
    Pillow's decoding of the uploaded bytes), a file raydet writes is in the bucket (read back through the GCS API
    itself), and a missing key or bucket is one line naming the URI."""
    from PIL import Image

    from raydet.data import CocoDataset, build_ray_dataset

    ids = range(1, 5)
    ann, files = _coco_split(ids, seed=3)
    _gcs_upload("gsdata/annotations/train.json", json.dumps(ann).encode())
    for name, data in files.items():
        _gcs_upload(f"gsdata/images/{name}", data)
    root = f"gs://{BUCKET}/gsdata"
    assert sorted(e.path for e in fileio.list_files(f"{root}/images")) == sorted(f"{root}/images/{n}" for n in files)

    ds = CocoDataset(f"{root}/annotations/train.json", f"{root}/images/", check_images=True)
    assert [r["image_id"] for r in ds.records] == list(ids)
    assert [r["img_path"] for r in ds.records] == [f"{root}/images/{im['file_name']}" for im in ann["images"]]
    rows = build_ray_dataset(ds, train=False, actor_batch_size=2).take_all()
    assert [int(r["image_id"]) for r in rows] == list(ids)
    for row, image in zip(rows, ann["images"]):
        expected = np.asarray(Image.open(io.BytesIO(files[image["file_name"]])).convert("RGB"))
        assert row["image"].shape == expected.shape and np.abs(row["image"].astype(int) - expected).max() <= 2
        boxes = [[x, y, x + w, y + h] for a in ann["annotations"] if a["image_id"] == image["id"]
                 for x, y, w, h in [a["bbox"]]]
        np.testing.assert_allclose(row["boxes"], boxes, atol=1e-4)

    fileio.write_text(f"{root}/runs/r1/pipeline.yaml", "model: {}\n")
    assert _gcs_download("gsdata/runs/r1/pipeline.yaml") == b"model: {}\n"
    with pytest.raises(FileNotFoundError, match=rf"^{root}/nope.json: not found \(no object with this key in "
                                                rf"bucket '{BUCKET}'\)$"):
        fileio.read_bytes(f"{root}/nope.json")
    with pytest.raises(ValueError, match=rf"^gs://{MISSING_BUCKET}/a.json: annotation file not found \(the bucket "
                                         rf"'{MISSING_BUCKET}' does not exist\)$"):
        CocoDataset(f"gs://{MISSING_BUCKET}/a.json", f"gs://{MISSING_BUCKET}/images/")
