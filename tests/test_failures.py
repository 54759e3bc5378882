"""Failure behaviour: a killed training worker is restarted from the last checkpoint, and bad input (corrupt or
truncated images, empty annotation files, no usable image, a checkpoint of another model, a pipeline typo) stops the
command with one clear message naming the file or key, exit status 2 and no traceback."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _polling import wait_for
from raydet.config import load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"


# ----------------------------------------------------------------------------------------------- worker loss
# Every wait below polls for the event it needs, up to this long, and fails saying which event never came: a busy
# machine makes the run slower, never different.
EVENT_TIMEOUT_S = 300.0


def _train_workers() -> list:
    """The Ray Train worker processes on this host (Ray titles actor processes ``ray::<Class>...``)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "ray::RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _wait_for(condition, what: str, timeout_s: float = EVENT_TIMEOUT_S, stop: threading.Event | None = None,
              poll_s: float = 0.05):
    """:func:`_polling.wait_for` with this module's deadline."""
    return wait_for(condition, what, timeout_s, stop, poll_s)


def _kill_paused_worker(marker: Path, registered: Path, release: Path, outcome: dict, done: threading.Event) -> None:
    """Once the worker is paused in epoch 2 (``marker``) and Ray Train has taken the epoch-1 checkpoint
    (``registered``), SIGKILL the paused worker. ``outcome``: ``killed`` (pid), ``paused_at`` (the marker) or
    ``error``; on an error the worker is released (it trains on, and the test fails with the error). ``done``: the
    run is over, stop waiting."""
    import psutil

    try:
        paused = _wait_for(lambda: marker.exists() and json.loads(marker.read_text()),
                           "the training worker never reached iteration 5 (epoch 2)",
                           2 * EVENT_TIMEOUT_S, done)  # Ray Train's start and 5 iterations
        outcome["paused_at"] = paused
        _wait_for(registered.exists, "Ray Train never reported taking the epoch-1 checkpoint while the worker "
                                     "waited in epoch 2", stop=done)
        proc = psutil.Process(paused["pid"])
        title = " ".join(proc.cmdline())
        assert "ray::RayTrainWorker" in title, f"the paused process {paused['pid']} is not a Ray Train worker: {title}"
        proc.send_signal(signal.SIGKILL)
        outcome["killed"] = paused["pid"]
    except BaseException as exc:  # noqa: BLE001  (reported by the test, not lost in this thread)
        outcome["error"] = f"{type(exc).__name__}: {exc}"
        release.touch()


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_finishes(ray_session, tmp_path, worker_hooks):
    """3 epochs of 4 iterations, a checkpoint after each epoch. The worker is killed with SIGKILL during epoch 2;
    with scaling.max_failures=1 Ray Train starts a new worker group, which loads the epoch-1 checkpoint and
    trains epochs 2 and 3: the run ends at iteration 12 and the log shows epoch 2 started again from iteration 5.

    The kill lands at a fixed point whatever the machine's load: a test hook pauses the worker after iteration 5
    (logged), and the kill waits for that and for Ray Train's controller to have taken the epoch-1 checkpoint (a
    report still queued in a killed worker is lost). The restarted worker group finds the marker and does not
    pause."""
    from ray.train import UserCallback
    from test_train_ray import SMALL

    from raydet.train import fit

    class CheckpointTaken(UserCallback):
        """On Ray Train's controller, after the checkpoint manager has registered a report's checkpoint: touch
        ``<folder>/registered_epoch_<epoch>`` (pickled by value: the controller cannot import this test)."""

        def __init__(self, folder: str):
            self.folder = folder

        def after_report(self, run_context, metrics, checkpoint):
            import os

            if checkpoint is not None:
                open(os.path.join(self.folder, f"registered_epoch_{metrics[0]['epoch']}"), "w").close()

    hooks = worker_hooks
    signals = tmp_path / "signals"
    signals.mkdir()
    marker, release = signals / "paused.json", signals / "release"
    cfg = load_config(QUICKSTART, SMALL + [
        "train.max_epochs=3", "data.train.num_images=8", "data.val=null", "scaling.max_failures=1",
        f"runtime.imports=[{hooks}]",
        f"hooks=[{{type: PauseOnceAfterIteration, marker: '{marker}', iteration: 5, release: '{release}'}}]"])
    outcome: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=_kill_paused_worker, daemon=True,
                               args=(marker, signals / "registered_epoch_1", release, outcome, done))
    watcher.start()
    try:
        result = fit(cfg, run_dir=str(tmp_path / "run"), callbacks=[CheckpointTaken(str(signals))])
    finally:
        release.touch()  # whatever happened, no worker stays paused
        done.set()
        watcher.join(timeout=EVENT_TIMEOUT_S)
    assert "error" not in outcome, outcome["error"]
    assert outcome.get("killed"), "no training worker process was killed"
    assert outcome["paused_at"]["epoch"] == 2 and outcome["paused_at"]["iter"] == 5
    out = result.return_value
    assert out["epoch"] == 3 and out["iter"] == 12

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    iters = [r["iter"] for r in records if r["mode"] == "train"]
    restart = next((i for i in range(1, len(iters)) if iters[i] <= iters[i - 1]), None)
    assert restart is not None, f"the log shows no restart: {iters}"
    # before the kill: epoch 1 (iterations 1-4) and iteration 5, where the worker was paused; after: from iteration
    # 5 (the epoch-1 checkpoint), not from 1, to the end
    assert iters[:restart] == [1, 2, 3, 4, 5], iters
    assert iters[restart:] == list(range(5, 13)), iters
    assert outcome["killed"] not in [p.pid for p in _train_workers()]


# ----------------------------------------------------------------------------------------------- bad input
def _coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def _jpeg(path: Path, size: int = 64) -> bytes:
    import cv2

    image = np.full((size, size, 3), 127, np.uint8)
    cv2.rectangle(image, (8, 8), (40, 40), (0, 0, 255), -1)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    path.write_bytes(data.tobytes())
    return data.tobytes()


def _coco_pipeline(tmp_path: Path, ann: Path, extra: str = "") -> Path:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        f"_base_: {QUICKSTART}\n"
        "num_classes: 1\n"
        "data:\n"
        f"  train: {{_delete_: true, type: CocoDataset, ann_file: {ann}, img_prefix: {tmp_path}/, "
        "pipeline: '${train_pipeline}', filter_empty_gt: true}\n"
        "  val: null\n  test: null\n" + extra)
    return pipeline


def _train_error(capsys, argv) -> str:
    from raydet.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: "):]


def _one_image(tmp_path: Path, name: str = "a.jpg") -> tuple[list, list]:
    images = [{"id": 1, "file_name": name, "height": 64, "width": 64}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 32, 32], "area": 1024, "iscrowd": 0}]
    return images, annotations


def test_a_corrupt_image_is_named(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"this is not an image")
    pipeline = _coco_pipeline(tmp_path, _coco(tmp_path, *_one_image(tmp_path)))
    err = _train_error(capsys, [str(pipeline), "--work-dir", str(tmp_path / "w")])
    assert "a.jpg" in err and "annotations.json" in err


def test_a_truncated_jpeg_is_named(tmp_path, capsys):
    data = _jpeg(tmp_path / "full.jpg")
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    pipeline = _coco_pipeline(tmp_path, _coco(tmp_path, *_one_image(tmp_path)))
    err = _train_error(capsys, [str(pipeline), "--work-dir", str(tmp_path / "w")])
    assert "a.jpg" in err and "truncated" in err


def test_an_empty_annotation_file_is_named(tmp_path, capsys):
    ann = tmp_path / "annotations.json"
    ann.write_text("")
    err = _train_error(capsys, [str(_coco_pipeline(tmp_path, ann)), "--work-dir", str(tmp_path / "w")])
    assert str(ann) in err


def test_a_dataset_with_zero_usable_images_is_refused(tmp_path, capsys):
    """Every image is skipped (corrupt, with on_error: skip) or has no object: nothing to train on."""
    images = [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64},
              {"id": 2, "file_name": "b.jpg", "height": 64, "width": 64}]
    (tmp_path / "a.jpg").write_bytes(b"broken")
    _jpeg(tmp_path / "b.jpg")
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 32, 32], "area": 1024, "iscrowd": 0}]
    pipeline = _coco_pipeline(tmp_path, _coco(tmp_path, images, annotations))
    with pytest.warns(UserWarning, match=r"annotations\.json: skipped 1 problem\(s\) \(bad_image_file: 1\)"):
        err = _train_error(capsys, [str(pipeline), "--work-dir", str(tmp_path / "w"),
                                    "--set", "data.train.on_error=skip"])
    assert "annotations.json" in err and "no usable image" in err


@pytest.mark.parametrize("text, key, suggestion", [
    ("model:\n  backbone: {detph: 18}\n", "model.backbone.detph", "depth"),
    ("trian: {max_epochs: 1}\n", "trian", "train"),
    ("train: {max_epoch: 1}\n", "train.max_epoch", "max_epochs"),
    ("scaling: {num_worker: 2}\n", "scaling.num_worker", "num_workers"),
])
def test_a_pipeline_typo_is_named_with_a_suggestion(tmp_path, capsys, text, key, suggestion):
    pipeline = tmp_path / "typo.yaml"
    pipeline.write_text(f"_base_: {QUICKSTART}\n" + text)
    err = _train_error(capsys, [str(pipeline), "--work-dir", str(tmp_path)])
    assert f"{pipeline}: {key}" in err and f"did you mean '{suggestion}'" in err


def test_a_checkpoint_of_another_model_is_named(tmp_path, capsys):
    """raydet test with a RetinaNet checkpoint for the quickstart's Faster R-CNN."""
    from raydet.engine.checkpoint import save_checkpoint
    from raydet.test import main

    retina = load_config(ROOT / "pipelines" / "retinanet_r50_fpn_1x_coco.yaml",
                         ["model.backbone.depth=18", "model.neck.in_channels=[64,128,256,512]"]).build("model")
    ckpt = save_checkpoint({"model": retina.state_dict(), "epoch": 1, "iter": 1}, tmp_path / "retina.pt")
    assert main([str(QUICKSTART), str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "Traceback" not in err
    assert "does not fit this model" in err and "keys missing from the checkpoint" in err


def test_an_image_that_fails_to_decode_mid_run_stops_training_naming_it(ray_session, tmp_path, capsys):
    """A JPEG that looks complete (a valid header, start and end markers) but has damaged scan data passes the
    reader's check and fails in a Ray Data decode actor; the command prints that error, not Ray's wrapping of it,
    and exits 1."""
    images, annotations = _one_image(tmp_path)
    data = bytearray(_jpeg(tmp_path / "full.jpg"))
    middle = (data.rfind(b"\xff\xda") + len(data)) // 2
    data[middle:middle + 16] = bytes(16)  # zeroed mid-scan: libjpeg warns, OpenCV alone would return the pixels
    (tmp_path / "a.jpg").write_bytes(bytes(data))
    pipeline = _coco_pipeline(tmp_path, _coco(tmp_path, images, annotations))
    from test_train_ray import SMALL

    from raydet.train import main

    small = [o for o in SMALL if not o.startswith(("data.val", "data.test", "data.train"))]
    assert main([str(pipeline), "--work-dir", str(tmp_path / "w"), "--set", *small, "train.max_epochs=1"]) == 1
    err = capsys.readouterr().err
    line = err[err.index("error: "):].strip()
    assert line.startswith("error: image id 1: cannot decode image file") and "a.jpg" in line
    assert "Traceback" not in line and "RayTaskError" not in line


# ----------------------------------------------------------------------------------------------- interrupted write
CHILD = r'''
import sys, time, torch
from raydet.engine.checkpoint import save_checkpoint

path, marker = sys.argv[1], sys.argv[2]
save_checkpoint({"model": {"w": torch.ones(4)}, "epoch": 1, "iter": 10}, path)
real_save = torch.save

def slow_save(obj, f):  # half the bytes, then the process is killed while "writing"
    f.write(b"PK\x03\x04 half a checkpoint")
    f.flush()
    open(marker, "w").close()
    time.sleep(600)

torch.save = slow_save
save_checkpoint({"model": {"w": torch.zeros(4)}, "epoch": 2, "iter": 20}, path)
'''


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    """SIGKILL in the middle of a checkpoint write (no Python cleanup runs): the checkpoint file is still the
    previous, complete one, and the half-written temporary file beside it is never what a load picks up."""
    import subprocess
    import sys

    from raydet.engine.checkpoint import load_checkpoint

    path, marker = tmp_path / "run" / "checkpoint.pt", tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker)], cwd=ROOT)
    try:
        deadline = time.monotonic() + EVENT_TIMEOUT_S  # the child imports torch first: slow on a busy machine
        while not marker.exists():
            assert child.poll() is None, f"the writer exited ({child.returncode}) before its second save"
            assert time.monotonic() < deadline, f"the writer did not start its second save in {EVENT_TIMEOUT_S:.0f} s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=EVENT_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers[0].startswith(".checkpoint.pt.") and leftovers[1:] == ["checkpoint.pt"]
    for where in (path, path.parent):  # the file, or the folder as Ray hands it over
        state = load_checkpoint(where)
        assert state["epoch"] == 1 and state["iter"] == 10 and state["model"]["w"].tolist() == [1.0] * 4
