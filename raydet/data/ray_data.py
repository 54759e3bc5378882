"""The Ray Data input pipeline: Ray stays at the edge, the transforms are the plain ones of raydet.data.

Flow (one Ray Dataset per pass over the data)::

    records --(driver: permute when training, BEFORE decoding)--> ray.data.from_items(light rows)
      --map_batches(DecodeAndTransform, ActorPoolStrategy)--> one row per transformed image (numpy columns)
      --(training worker) iter_detection_batches: aspect-ratio groups + collate_detection--> model batches

Light rows (the input) carry ``index, image_id, epoch, img_path, file_name, height, width``, ``orientation`` (the
EXIF orientation the decoder applies, decided by the reader; 0 = not decided, the loader resolves its policy), the
annotation arrays ``boxes`` (n, 4) float32, ``labels`` (n,) int64, ``ignore`` (n,) bool, with masks
``masks_json`` (the record's polygons / RLE as a JSON string), when the dataset has a ``proposal_file``,
``proposals`` (p, 4) float32, and when it has a ``seg_prefix``, ``seg_map_path`` (str). Output rows carry

    image         uint8 (h, w, 3) RGB, after the per-image transforms (uint8 keeps object-store traffic 4x lower)
    boxes         float32 (n, 4) (n may be 0), labels int64 (n,), ignore_boxes float32 (k, 4)
    proposals     (with a proposal file) float32 (p, 4), transformed as boxes are
    image_id, index, epoch, ori_h, ori_w (int64), scale_x, scale_y (float64), flip (bool)
    masks         (with masks) str: the n instance masks as compressed COCO RLE at the transformed size, their
                  ``counts`` joined by single spaces ("" when n == 0). RLE counts use the characters 48..111 only.
    seg_map       (with a ``seg_prefix``) uint8 (h, w): the semantic map after the image's transforms (a dense
                  map of up to 256 ids, carried as the image is: a tensor column, a third of the image's bytes)
    error         str: "" or, for an image that could not be used under the training dataset's ``on_error: skip``
                  (missing, corrupt, a size that fits no frame), why; the row then holds a 1x1 placeholder image
                  and :func:`iter_detection_batches` puts a copy of another image of the epoch in its place.

Arrow stores the arrays as (variable-shaped) tensor columns and the masks as a string column; nested Python
lists are avoided on purpose (they become object columns that Ray cannot type).

The actors import NumPy, OpenCV and pycocotools only (not torch), which keeps their start-up short.

CPU budget: Ray Train excludes its workers' CPUs from Ray Data's budget; if the decode actors ask for more CPU
than is left, the pipeline stalls (``backpressured:tasks(ResourceBudget)``). The default
``num_cpus_per_actor=0.5`` leaves room next to the training workers on small nodes; ``resources`` can pin the
actors to CPU-only nodes (custom resources).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np

from raydet.masks import to_rle

from .image_io import CorruptImageError
from .pipeline import build_transforms, load_sample
from .transforms import CollateConfig

__all__ = ["DecodeAndTransform", "build_ray_dataset", "iter_detection_batches", "record_to_row", "row_to_record",
           "sample_to_row", "row_to_sample", "encode_masks", "decode_masks"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Masks <-> one string column.

def encode_masks(masks: list, height: int, width: int) -> str:
    """Instance masks (polygons / RLE at height x width) -> their compressed RLE counts joined by spaces."""
    return " ".join(to_rle(m, height, width)["counts"].decode("ascii") for m in masks)


def decode_masks(text: str, height: int, width: int) -> list[dict]:
    """Inverse of :func:`encode_masks`: a list of COCO RLE dicts (``counts`` as bytes)."""
    if not text:
        return []
    return [{"size": [int(height), int(width)], "counts": c.encode("ascii")} for c in str(text).split(" ")]


def _json_safe_mask(mask):
    if isinstance(mask, dict):
        counts = mask.get("counts")
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        elif isinstance(counts, np.ndarray):
            counts = counts.tolist()
        return {"size": [int(s) for s in mask["size"]], "counts": counts}
    return [np.asarray(p, dtype=np.float64).ravel().tolist() for p in mask]


# ----------------------------------------------------------------------------------------------------------
# Records <-> light rows, samples <-> output rows.

def record_to_row(record: dict, index: int, epoch: int, with_masks: bool) -> dict:
    """A record -> the light input row of the Ray Dataset (numpy arrays and scalars only)."""
    row = {
        "index": int(index),
        "image_id": int(record["image_id"]),
        "epoch": int(epoch),
        "img_path": str(record.get("img_path", "")),
        "file_name": str(record.get("file_name", "")),
        "height": int(record["height"]),
        "width": int(record["width"]),
        "orientation": int(record.get("orientation") or 0),
        "boxes": np.asarray(record["boxes"], np.float32).reshape(-1, 4),
        "labels": np.asarray(record["labels"], np.int64).reshape(-1),
        "ignore": np.asarray(record.get("ignore", np.zeros(len(record["labels"]), bool)), bool).reshape(-1),
    }
    if with_masks:
        row["masks_json"] = json.dumps([_json_safe_mask(m) for m in record["masks"]])
    if record.get("proposals") is not None:
        row["proposals"] = np.asarray(record["proposals"], np.float32).reshape(-1, 4)
    if record.get("seg_map_path"):
        row["seg_map_path"] = str(record["seg_map_path"])
    return row


def row_to_record(batch: dict, i: int, with_masks: bool) -> dict:
    """Row ``i`` of a numpy batch of light rows -> a record."""
    record = {
        "image_id": int(batch["image_id"][i]),
        "file_name": str(batch["file_name"][i]),
        "img_path": str(batch["img_path"][i]),
        "height": int(batch["height"][i]),
        "width": int(batch["width"][i]),
        "boxes": np.asarray(batch["boxes"][i], np.float32).reshape(-1, 4),
        "labels": np.asarray(batch["labels"][i], np.int64).reshape(-1),
        "ignore": np.asarray(batch["ignore"][i], bool).reshape(-1),
    }
    if "orientation" in batch and int(batch["orientation"][i]):
        record["orientation"] = int(batch["orientation"][i])
    if with_masks:
        record["masks"] = json.loads(str(batch["masks_json"][i]))
    if "proposals" in batch:
        record["proposals"] = np.asarray(batch["proposals"][i], np.float32).reshape(-1, 4)
    if "seg_map_path" in batch:
        record["seg_map_path"] = str(batch["seg_map_path"][i])
    return record


def sample_to_row(sample: dict, with_masks: bool) -> dict:
    """A transformed sample -> an output row (see the module docstring)."""
    h, w = sample["image"].shape[:2]
    row = {
        "image": np.ascontiguousarray(sample["image"], dtype=np.uint8),
        "boxes": np.asarray(sample["boxes"], np.float32).reshape(-1, 4),
        "labels": np.asarray(sample["labels"], np.int64).reshape(-1),
        "ignore_boxes": np.asarray(sample["ignore_boxes"], np.float32).reshape(-1, 4),
        "image_id": int(sample["image_id"]),
        "ori_h": int(sample["ori_shape"][0]),
        "ori_w": int(sample["ori_shape"][1]),
        "scale_x": float(sample["scale_factor"][0]),
        "scale_y": float(sample["scale_factor"][1]),
        "flip": bool(sample["flip"]),
    }
    if with_masks:
        row["masks"] = encode_masks(sample["masks"], h, w)
    if sample.get("proposals") is not None:
        row["proposals"] = np.asarray(sample["proposals"], np.float32).reshape(-1, 4)
    if sample.get("seg_map") is not None:
        row["seg_map"] = np.ascontiguousarray(sample["seg_map"], dtype=np.uint8)
    return row


def row_to_sample(batch: dict, i: int, with_masks: bool) -> dict:
    """Row ``i`` of a numpy batch of output rows -> a sample for :func:`collate_detection`."""
    image = np.asarray(batch["image"][i])
    h, w = image.shape[:2]
    sample = {
        "image": image,
        "boxes": np.asarray(batch["boxes"][i], np.float32).reshape(-1, 4),
        "labels": np.asarray(batch["labels"][i], np.int64).reshape(-1),
        "ignore_boxes": np.asarray(batch["ignore_boxes"][i], np.float32).reshape(-1, 4),
        "image_id": int(batch["image_id"][i]),
        "index": int(batch["index"][i]),
        "ori_shape": (int(batch["ori_h"][i]), int(batch["ori_w"][i])),
        "img_shape": (h, w),
        "scale_factor": (float(batch["scale_x"][i]), float(batch["scale_y"][i])),
        "flip": bool(batch["flip"][i]),
    }
    if with_masks:
        sample["masks"] = decode_masks(batch["masks"][i], h, w)
    if "proposals" in batch:
        sample["proposals"] = np.asarray(batch["proposals"][i], np.float32).reshape(-1, 4)
    if "seg_map" in batch:
        sample["seg_map"] = np.asarray(batch["seg_map"][i], np.uint8)
    return sample


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows -> numpy columns; array-valued columns become 1-d object arrays (one array per row)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if isinstance(values[0], np.ndarray):
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[key] = col
        else:
            out[key] = np.asarray(values)
    return out


class DecodeAndTransform:
    """Ray Data actor: decode each light row's image (raydet.data.image_io) and apply the per-image transforms.

    Args:
        loader: picklable ``record -> image`` (``dataset.image_loader()``).
        pipeline: the dataset's pipeline list (``Normalize`` / ``Pad`` are left to the collate step).
        seed: augmentation seed; image ``i`` of epoch ``e`` uses ``default_rng([seed, e, image_id])``.
        with_masks: carry instance masks (as the RLE string column ``masks``).
        on_error: ``"fail"``: an image that cannot be used (OSError: missing, :class:`CorruptImageError`, a size
            that fits no frame) raises, naming the file; ``"skip"``: its row carries the reason in ``error`` (see
            the module docstring).
        imports: the pipeline's ``runtime.imports``, for user transforms they register: when the pipeline names a
            type that is not registered, these modules are imported in order until it builds (a pipeline of
            raydet's own transforms imports none of them: an actor starts in a fraction of a second).
    """

    def __init__(self, loader, pipeline: list, seed: int = 0, with_masks: bool = False, on_error: str = "fail",
                 imports: tuple = ()):
        import importlib

        import cv2

        from raydet.registry import ConfigError

        cv2.setNumThreads(1)  # one thread per actor: the actors are the parallelism
        self.loader = loader
        pending = list(imports)
        while True:
            try:
                self.transforms, _ = build_transforms(pipeline)
                break
            except ConfigError:
                if not pending:
                    raise
                importlib.import_module(pending.pop(0))
        self.seed = seed
        self.with_masks = with_masks
        self.on_error = on_error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for i in range(len(batch["index"])):
            record = row_to_record(batch, i, self.with_masks)
            try:
                sample = load_sample(self.loader, record, self.transforms, seed=self.seed,
                                     epoch=int(batch["epoch"][i]), with_masks=self.with_masks)
                error = ""
            except OSError as exc:
                if self.on_error != "skip":
                    raise
                sample = {"image": np.zeros((1, 1, 3), np.uint8), "boxes": np.zeros((0, 4), np.float32),
                          "labels": np.zeros(0, np.int64), "ignore_boxes": np.zeros((0, 4), np.float32),
                          "image_id": record["image_id"], "ori_shape": (1, 1), "scale_factor": (1.0, 1.0),
                          "flip": False, "masks": []}
                if "proposals" in record:  # every row of the dataset has the same columns
                    sample["proposals"] = np.zeros((0, 4), np.float32)
                if "seg_map_path" in record:
                    sample["seg_map"] = np.full((1, 1), 255, np.uint8)
                error = str(exc)
            row = sample_to_row(sample, self.with_masks)
            row["error"] = error
            row["index"] = int(batch["index"][i])
            row["epoch"] = int(batch["epoch"][i])
            rows.append(row)
        return rows_to_columns(rows)


_MAX_BLOCKS = 200


def _pool_sizes(num_actors: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (num_actors, num_actors) if isinstance(num_actors, int) else tuple(num_actors)
    if not 1 <= lo <= hi:
        raise ValueError(f"num_actors must be an int >= 1 or (min, max) with 1 <= min <= max, got {num_actors!r}")
    return int(lo), int(hi)


def build_ray_dataset(dataset, *, train: bool, seed: int = 0, epoch: int = 0,
                      num_actors: int | tuple[int, int] = 1, num_cpus_per_actor: float = 0.5,
                      actor_batch_size: int = 8, resources: dict | None = None, num_epochs: int = 1,
                      shard: tuple[int, int] | None = None, imports: tuple = ()):
    """A ``ray.data.Dataset`` of transformed images (one row per image, see the module docstring).

    Args:
        dataset: a raydet dataset (``records``, ``pipeline``, ``with_masks``, ``image_loader()``).
        train: permute the records (seeded by ``[seed, epoch]``) before decoding; evaluation keeps the record order.
            Training follows the dataset's ``on_error`` for images that fail when decoded (``skip``: replaced, see
            :func:`iter_detection_batches`); evaluation always stops with the error, as an image left out would
            change what the metrics measure (``check_images: decode`` finds such images when the annotations are
            read).
            Both set ``preserve_order`` on this dataset's DataContext, so rows arrive in that order whichever actor
            finishes first: a seeded run sees the same batches every time, and a resumed run the batches an
            uninterrupted one would have seen.
        seed, epoch: the shuffle and augmentation seeds (image rng = ``default_rng([seed, epoch, image_id])``).
        num_actors: fixed actor-pool size, or (min, max) for an autoscaling pool.
        num_cpus_per_actor: CPUs reserved by each decode actor. Keep it fractional (default 0.5) when Ray Train
            workers share the node: their CPUs are excluded from Ray Data's budget, and actors that do not fit
            stall the pipeline.
        actor_batch_size: images per actor call (and rows per input block up to 200 blocks, so the output streams
            in small blocks).
        resources: extra Ray resources per actor, e.g. ``{"data_node": 0.01}`` to place them on CPU-only nodes.
        num_epochs: the rows of epochs ``epoch .. epoch + num_epochs - 1`` in one dataset (each epoch permuted
            separately, each row augmented with its own epoch), so one actor pool serves several epochs.
        shard: ``(rank, world_size)``: only records ``rank::world_size`` of each epoch's order (per-worker
            datasets with exact coverage, e.g. for distributed evaluation).
        imports: modules that register user transforms (``runtime.imports``), imported by the actors when the
            pipeline needs them (:class:`DecodeAndTransform`).
    """
    import ray

    if num_epochs < 1 or actor_batch_size < 1:
        raise ValueError(f"num_epochs and actor_batch_size must be >= 1, got {num_epochs}, {actor_batch_size}")
    lo, hi = _pool_sizes(num_actors)
    with_masks = bool(getattr(dataset, "with_masks", False))
    records = dataset.records
    base_rows: dict[int, dict] = {}
    rows = []
    for e in range(epoch, epoch + num_epochs):
        order = np.random.default_rng([seed, e]).permutation(len(records)) if train else np.arange(len(records))
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
            order = order[rank::world]
        for i in order.tolist():
            if i not in base_rows:
                base_rows[i] = record_to_row(records[i], i, e, with_masks)
            rows.append({**base_rows[i], "epoch": e})
    if not rows:
        raise ValueError(f"build_ray_dataset: no records to read (dataset of {len(records)} images, shard {shard})")

    # Small input blocks stream out sooner, but every block costs the driver ~3 ms in from_items: one block per
    # actor batch, at most max(200, 4 x actors) blocks (a 118k-image epoch: ~3 s instead of ~17 s at 4096 blocks).
    num_blocks = max(1, min(-(-len(rows) // actor_batch_size), max(_MAX_BLOCKS, 4 * hi)))
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        DecodeAndTransform,
        fn_constructor_kwargs={"loader": dataset.image_loader(), "pipeline": list(dataset.pipeline), "seed": seed,
                               "with_masks": with_masks,
                               "on_error": getattr(dataset, "on_error", "fail") if train else "fail",
                               "imports": tuple(imports)},
        batch_size=actor_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=num_cpus_per_actor,
        resources=resources,
        udf_modifying_row_count=False,
    )
    ds.context.execution_options.preserve_order = True
    return ds


# ----------------------------------------------------------------------------------------------------------
# Worker side: rows -> grouped, collated batches.

def iter_detection_batches(data, batch_size: int, collate_cfg: CollateConfig, with_masks: bool, train: bool,
                           device=None, drop_last: bool = False, prefetch_batches: int = 1) -> Iterator[dict]:
    """Model batches (raydet.structures Batch) from a Ray ``Dataset`` or ``DataIterator`` of output rows.

    Training: rows go to one of two buffers, landscape (w >= h) or portrait (w < h), and a batch is emitted when a
    buffer holds ``batch_size`` rows, so a batch never mixes orientations (MMDetection's GroupSampler). At the
    end, the partial buffers are emitted too (unless ``drop_last``). A row whose image could not be used
    (``error``, the dataset's ``on_error: skip``) is logged as a one-line warning naming the file, and a copy of
    the latest usable image of the stream takes its place (MMDetection's training datasets pick another image
    for one they cannot use): every worker still runs its iterations, as DDP needs. The batch then carries
    ``skipped_images`` (how many of its images are such copies), which the LoggerHook sums per epoch.
    Evaluation: batches in arrival order (the dataset's order, see :func:`build_ray_dataset`), every image once.

    Raises :class:`CorruptImageError` when no usable image arrives at all (training), or an evaluation row carries
    an error.
    """
    from .collate import collate_detection  # torch: imported on the training worker only

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buffers: dict[bool, list[dict]] = {True: [], False: []}
    copies = {True: 0, False: 0}  # per buffer: how many of its samples stand in for unusable images

    def collate(key: bool) -> dict:
        batch = collate_detection(buffers[key], collate_cfg, with_masks, device)
        if copies[key]:
            batch["skipped_images"] = copies[key]
        buffers[key], copies[key] = [], 0
        return batch

    latest, pending, first_error = None, 0, ""
    for cols in data.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches):
        errors = cols.get("error")
        for i in range(len(cols["index"])):
            error = str(errors[i]) if errors is not None else ""
            if error:
                if not train:
                    raise CorruptImageError(error)
                logger.warning("on_error=skip: %s (a copy of another image of this epoch takes its place)", error)
                first_error = first_error or error
                pending += 1
                if latest is None:
                    continue
                todo = [(latest, 1)] * pending
            else:
                latest = row_to_sample(cols, i, with_masks)
                todo = [(latest, 0)] + [(latest, 1)] * pending
            pending = 0
            for sample, copy in todo:
                h, w = sample["img_shape"]
                key = bool(w >= h) if train else True
                buffers[key].append(sample)
                copies[key] += copy
                if len(buffers[key]) == batch_size:
                    yield collate(key)
    if pending:
        raise CorruptImageError(f"on_error=skip: none of the {pending} images of this worker's share of the epoch "
                                f"could be used; first: {first_error}")
    for key in (True, False):
        if buffers[key] and not drop_last:
            yield collate(key)
