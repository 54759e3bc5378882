"""The Ray Data input pipeline: Ray stays at the edge, the transforms are the plain ones of raydet.data.

Flow (one Ray Dataset per pass over the data)::

    RecordTable (raydet.data.record_table) --ray.put once--> the object store (one read-only copy per node)
    (worker: permute when training, BEFORE decoding) --> ray.data.from_items(index rows)
      --map_batches(DecodeAndTransform, ActorPoolStrategy)--> one row per transformed image (numpy columns)
      --(training worker) iter_detection_batches: aspect-ratio groups + collate_detection--> model batches

Input rows carry three ints: ``index`` (the image's position in the records this dataset was built from: a worker's
shard), ``record`` (its row in the RecordTable the actors hold) and ``epoch``. The actors look each record up in the
table (``ray.get`` of its object ref: zero-copy, one copy per node however many actors and training workers read
it), so no annotation travels through Ray Data blocks. Output rows carry

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

import logging
from collections.abc import Iterator

import numpy as np

from raydet.masks import to_rle

from .image_io import CorruptImageError
from .pipeline import build_transforms, load_sample
from .record_table import RecordTable
from .transforms import CollateConfig

__all__ = ["DecodeAndTransform", "build_ray_dataset", "iter_detection_batches", "input_columns", "epoch_order",
           "sample_to_row",
           "row_to_sample", "encode_masks", "decode_masks"]

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


# ----------------------------------------------------------------------------------------------------------
# Index rows in, samples <-> output rows.

def input_columns(records, epoch, index=None) -> dict[str, np.ndarray]:
    """A batch of input rows (see the module docstring): ``records`` (int array) the rows of the actors' table,
    ``epoch`` an int or an int array, ``index`` the positions (default ``0 .. n - 1``)."""
    records = np.asarray(records, np.int64).reshape(-1)
    index = np.arange(len(records)) if index is None else np.asarray(index, np.int64).reshape(-1)
    return {"index": index, "record": records, "epoch": np.broadcast_to(np.asarray(epoch, np.int64), records.shape)}


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
    """Ray Data actor: look each input row's record up, decode its image (raydet.data.image_io) and apply the
    per-image transforms.

    Args:
        records: the :class:`~raydet.data.record_table.RecordTable` the rows' ``record`` column indexes (or a list
            of record dicts), or a Ray object ref of it (fetched once per actor; zero-copy on the node).
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

    def __init__(self, records, loader, pipeline: list, seed: int = 0, with_masks: bool = False,
                 on_error: str = "fail", imports: tuple = ()):
        import importlib

        import cv2

        from raydet.registry import ConfigError

        cv2.setNumThreads(1)  # one thread per actor: the actors are the parallelism
        if not isinstance(records, (RecordTable, list)):  # an object ref: every actor of a node maps one copy
            import ray

            records = ray.get(records)
        self.records = records
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
            record = self.records[int(batch["record"][i])]
            if not self.with_masks:
                record.pop("masks", None)
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


def epoch_order(num_records: int, *, seed: int | None, epoch: int, shard: tuple[int, int] | None = None,
                pad: bool = False) -> np.ndarray:
    """The positions of the records one pass reads, in order (int64).

    ``seed`` None: ``0 .. n - 1``; else the permutation ``default_rng([seed, epoch])``. ``shard=(rank, world)``:
    positions ``rank::world`` of that order; with ``pad``, the order first grows by repeating its first
    ``ceil(n / world) * world - n`` positions, so every rank gets ``ceil(n / world)`` records (training: every rank
    runs the same number of iterations; the repeated images are the documented padding).

    Raises ValueError for a shard outside ``0 <= rank < world``.
    """
    order = np.arange(num_records) if seed is None else np.random.default_rng([seed, epoch]).permutation(num_records)
    if shard is None:
        return order
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if pad and world > 1:
        total = -(-num_records // world) * world
        order = np.concatenate([order, order[: total - num_records]])
    return order[rank::world]


def _pool_sizes(num_actors: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (num_actors, num_actors) if isinstance(num_actors, int) else tuple(num_actors)
    if not 1 <= lo <= hi:
        raise ValueError(f"num_actors must be an int >= 1 or (min, max) with 1 <= min <= max, got {num_actors!r}")
    return int(lo), int(hi)


def build_ray_dataset(dataset, *, train: bool, seed: int = 0, epoch: int = 0,
                      num_actors: int | tuple[int, int] = 1, num_cpus_per_actor: float = 0.5,
                      actor_batch_size: int = 8, resources: dict | None = None, num_epochs: int = 1,
                      shard: tuple[int, int] | None = None, pad: bool = False, rows_per_epoch: int | None = None,
                      imports: tuple = (), records_ref=None):
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
            datasets with exact coverage, e.g. for distributed evaluation); ``pad``: every rank gets the same
            count (:func:`epoch_order`; training).
        rows_per_epoch: only the first ``rows_per_epoch`` records of each epoch's order (an epoch cut short by
            ``train.max_iters_per_epoch`` decodes no image its batches cannot use); None: all.
        imports: modules that register user transforms (``runtime.imports``), imported by the actors when the
            pipeline needs them (:class:`DecodeAndTransform`).
        records_ref: a Ray object ref of ``dataset.records``' base table (:attr:`RecordTable.base`) already in the
            object store (the commands put each split's table once, :func:`raydet.commands.loaders.put_datasets`);
            None: the table is put here, once for this dataset.
    """
    import ray

    if num_epochs < 1 or actor_batch_size < 1:
        raise ValueError(f"num_epochs and actor_batch_size must be >= 1, got {num_epochs}, {actor_batch_size}")
    lo, hi = _pool_sizes(num_actors)
    with_masks = bool(getattr(dataset, "with_masks", False))
    table = RecordTable.from_records(dataset.records)
    rows_in_base = table.indices  # a worker's shard is a view: its records' rows in the table the actors hold
    positions, epochs = [], []
    for e in range(epoch, epoch + num_epochs):
        order = epoch_order(len(table), seed=seed if train else None, epoch=e, shard=shard, pad=pad)
        positions.append(order[:rows_per_epoch])
        epochs.append(np.full(len(positions[-1]), e, np.int64))
    positions = np.concatenate(positions)
    if not len(positions):
        raise ValueError(f"build_ray_dataset: no records to read (dataset of {len(table)} images, shard {shard})")
    rows = [{"index": i, "record": r, "epoch": e} for i, r, e in
            zip(positions.tolist(), rows_in_base[positions].tolist(), np.concatenate(epochs).tolist())]
    if records_ref is None:
        records_ref = ray.put(table.base)

    # Small input blocks stream out sooner, but every block costs the driver ~3 ms in from_items: one block per
    # actor batch, at most max(200, 4 x actors) blocks.
    num_blocks = max(1, min(-(-len(rows) // actor_batch_size), max(_MAX_BLOCKS, 4 * hi)))
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks)
    ds = ds.map_batches(
        DecodeAndTransform,
        fn_constructor_kwargs={"records": records_ref, "loader": dataset.image_loader(),
                               "pipeline": list(dataset.pipeline), "seed": seed, "with_masks": with_masks,
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
                           device=None, drop_last: bool = False, prefetch_batches: int = 1,
                           with_epoch: bool = False) -> Iterator[dict]:
    """Model batches (raydet.structures Batch) from a Ray ``Dataset`` or ``DataIterator`` of output rows.

    Training: rows go to one of two buffers, landscape (w >= h) or portrait (w < h), and a batch is emitted when a
    buffer holds ``batch_size`` rows, so a batch never mixes orientations (MMDetection's GroupSampler). At the
    end, the partial buffers are emitted too (unless ``drop_last``). A row whose image could not be used
    (``error``, the dataset's ``on_error: skip``) is logged as a one-line warning naming the file, and a copy of
    the latest usable image of the stream takes its place (MMDetection's training datasets pick another image
    for one they cannot use): every worker still runs its iterations, as DDP needs. The batch then carries
    ``skipped_images`` (how many of its images are such copies), which the LoggerHook sums per epoch.
    Evaluation: batches in arrival order (the dataset's order, see :func:`build_ray_dataset`), every image once.
    A batch never spans two epochs (a dataset of several, ``num_epochs``): when the rows' ``epoch`` changes, the
    partial buffers are emitted first (as at the end). ``with_epoch``: yield ``(epoch, batch)`` pairs.

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

    latest, pending, first_error, current = None, 0, "", None
    for cols in data.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches):
        errors = cols.get("error")
        epochs = cols["epoch"].tolist() if "epoch" in cols else [None] * len(cols["index"])
        for i in range(len(cols["index"])):
            if epochs[i] != current:  # a new epoch: what is left of the previous one goes first
                if pending and latest is None:
                    raise CorruptImageError(f"on_error=skip: none of the {pending} images of this worker's share "
                                            f"of epoch {current} could be used; first: {first_error}")
                for key in (True, False):
                    if buffers[key] and not drop_last:
                        yield (current, collate(key)) if with_epoch else collate(key)
                    buffers[key], copies[key] = [], 0
                current = epochs[i]
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
                    yield (current, collate(key)) if with_epoch else collate(key)
    if pending:
        raise CorruptImageError(f"on_error=skip: none of the {pending} images of this worker's share of the epoch "
                                f"could be used; first: {first_error}")
    for key in (True, False):
        if buffers[key] and not drop_last:
            yield (current, collate(key)) if with_epoch else collate(key)
