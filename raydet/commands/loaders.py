"""Each Ray Train worker's data: its shard of the records streamed through a Ray Data actor pool.

:func:`ray_loaders` gives a worker its per-epoch training stream (shuffled by seed and epoch, padded so every rank
runs the same number of iterations) and its in-order evaluation stream; :func:`ray_stream` builds one such stream
(records -> decode + augment actors -> batches, see :mod:`raydet.data.ray_data`).
"""
from __future__ import annotations

import copy


from raydet.commands.sections import Sections
from raydet.data.ray_data import epoch_order
from raydet.data.record_table import RecordTable

__all__ = ["shard_records", "with_records", "ray_stream", "ray_loaders", "put_datasets", "get_datasets"]


def put_datasets(datasets: dict) -> dict:
    """Driver side: ``{"datasets": ref, "records": {split: ref}}`` for a train loop config. Each split's records
    (:class:`~raydet.data.record_table.RecordTable`) go into the object store once, on their own: the training
    workers and the decode actors of a node then map that one copy (zero-copy NumPy views) instead of unpickling a
    private copy each; the datasets travel without their records."""
    import ray

    tables = {split: RecordTable.from_records(ds.records) for split, ds in datasets.items()}
    return {"datasets": ray.put({split: with_records(ds, None) for split, ds in datasets.items()}),
            "records": {split: ray.put(table.base) for split, table in tables.items()},
            "views": {split: None if table.base is table else table.indices for split, table in tables.items()}}


def get_datasets(shipped: dict) -> tuple[dict, dict]:
    """Worker side of :func:`put_datasets`: the datasets with their records, and each split's records ref (for
    :func:`ray_loaders`, whose decode actors read the same copy)."""
    import ray

    datasets = ray.get(shipped["datasets"])
    for split, ref in shipped["records"].items():
        table = ray.get(ref)
        view = shipped["views"][split]
        datasets[split] = with_records(datasets[split], table if view is None else table[view])
    return datasets, dict(shipped["records"])


def shard_records(records, rank: int, world_size: int, seed: int | None, epoch: int, pad: bool):
    """This rank's share of the records (a view when ``records`` is a RecordTable, else a list); shuffled by
    (seed, epoch) when seed is given; padded (by repeating) so every rank gets the same count when ``pad``
    (training: every rank must run the same number of iterations)."""
    order = epoch_order(len(records), seed=seed, epoch=epoch, shard=(rank, world_size), pad=pad)
    if isinstance(records, RecordTable):
        return records[order]
    return [records[i] for i in order.tolist()]


def with_records(dataset, records):
    """A shallow copy of ``dataset`` holding only ``records``."""
    shard = copy.copy(dataset)
    shard.records = records
    return shard


def ray_stream(sections: Sections, records_refs: dict | None = None):
    """``(dataset, records, train, epoch, split=None, **options) -> batches``: records -> Ray Data actor pool
    (decode + augment) -> aspect-ratio-grouped (training) or in-order (evaluation) batches. ``records_refs``: each
    split's records in the object store (:func:`get_datasets`); the actors read ``records`` through them. Options:
    ``num_epochs``, ``shard``, ``pad``, ``rows_per_epoch`` (:func:`~raydet.data.ray_data.build_ray_dataset`) and
    ``with_epoch``
    (:func:`~raydet.data.ray_data.iter_detection_batches`)."""
    from raydet.data.pipeline import build_transforms
    from raydet.data.ray_data import build_ray_dataset, iter_detection_batches

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the LoggerHook reports progress; bars only add blank lines to worker logs
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # a bad image reaches the command as our error, not UserCodeException
    sc, batch_size = sections.scaling, sections.data.images_per_worker
    actors = tuple(sc.data_actors) if len(sc.data_actors) > 1 else sc.data_actors[0]

    def stream(dataset, records, train: bool, epoch: int, split: str | None = None, *, num_epochs: int = 1,
               shard: tuple[int, int] | None = None, pad: bool = False, with_epoch: bool = False,
               rows_per_epoch: int | None = None):
        ds = build_ray_dataset(with_records(dataset, records), train=train, seed=sections.seed, epoch=epoch,
                               num_actors=actors, num_cpus_per_actor=sc.data_cpus_per_actor,
                               actor_batch_size=sc.data_batch_size, resources=sc.data_resources,
                               imports=tuple(sections.runtime.imports), num_epochs=num_epochs, shard=shard, pad=pad,
                               rows_per_epoch=rows_per_epoch, records_ref=(records_refs or {}).get(split))
        _, collate_cfg = build_transforms(dataset.pipeline)
        return iter_detection_batches(ds, batch_size, collate_cfg, with_masks=getattr(dataset, "with_masks", False),
                                      train=train, with_epoch=with_epoch)

    return stream


# One Ray Dataset holds at most this many rows (a run of epochs longer than that gets several datasets in turn).
MAX_ROWS_PER_DATASET = 1_000_000


class EpochStreams:
    """A training loader, ``epoch -> exactly iters_per_epoch batches``, that keeps one Ray Data actor pool for a
    run of epochs instead of starting one per epoch.

    ``open_stream(first_epoch, num_epochs)`` gives ``(epoch, batch)`` pairs of one dataset holding epochs
    ``first_epoch .. first_epoch + num_epochs - 1`` (each epoch its own permutation and shard, no batch spanning
    two). A dataset ends where ``last_epoch(first_epoch)`` says: after an epoch that evaluates (the evaluation pass
    starts its own pool, and two pools of one node would compete for the CPUs Ray Data may use) or after the
    last epoch. Asked for an epoch other than the next one (a resumed or restarted run), it opens a new dataset.
    Batches an epoch produced beyond ``iters_per_epoch`` (aspect-ratio groups can leave two partial batches) are
    skipped.
    """

    def __init__(self, open_stream, iters_per_epoch: int, last_epoch):
        self._open, self._iters, self._last_epoch = open_stream, iters_per_epoch, last_epoch
        self._it = None
        self._next = self._end = None
        self._held = None  # the first batch of the next epoch, read while finishing this one
        self.datasets_opened = 0

    def __call__(self, epoch: int):
        if self._it is None or epoch != self._next or epoch > self._end:
            self.close()
            self._end = self._last_epoch(epoch)
            self._it = self._open(epoch, self._end - epoch + 1)
            self.datasets_opened += 1
        self._next = epoch + 1
        return self._batches(epoch, self._it)

    def _batches(self, epoch: int, it):
        done = 0
        try:
            while done < self._iters:
                if self._it is not it:  # a newer call replaced this stream (a caller kept this generator)
                    return
                item, self._held = self._held or next(it, None), None
                if item is None:
                    return
                if item[0] < epoch:  # the rest of an earlier epoch
                    continue
                if item[0] > epoch:
                    self._held = item
                    return
                yield item[1]
                done += 1
        finally:
            if epoch >= self._end and self._it is it:
                self.close()

    def close(self) -> None:
        """Stop the current dataset now (its actors go), not when it is garbage-collected."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it, self._held = None, None


def ray_loaders(datasets: dict, sections: Sections, rank: int, world_size: int, iters_per_epoch: int,
                records_refs: dict | None = None):
    """This rank's training loader (:class:`EpochStreams`: ``epoch -> exactly iters_per_epoch batches``, one actor
    pool per run of epochs up to the next evaluation) and evaluation stream; ``records_refs``: each split's records
    in the object store (:func:`get_datasets`)."""
    stream = ray_stream(sections, records_refs)
    train_loader = val_loader = None
    if "train" in datasets:
        train_ds = datasets["train"]
        max_epochs, interval = sections.train.max_epochs, sections.evaluation.interval
        per_epoch = max(1, -(-len(train_ds.records) // world_size))

        def last_epoch(first: int) -> int:
            end = max_epochs - 1
            if "val" in datasets:  # EvalHook: after epoch e when (e + 1) % interval == 0, and after the last
                end = min(end, first + (interval - 1 - first % interval))
            return max(first, min(end, first + MAX_ROWS_PER_DATASET // per_epoch - 1))

        # an epoch cut short (train.max_iters_per_epoch) decodes only the images its batches can use: `iters` full
        # batches need at most iters x batch images plus what the two aspect-ratio buffers may hold back
        batch = sections.data.images_per_worker
        needed = iters_per_epoch * batch + 2 * (batch - 1)
        rows_per_epoch = needed if needed < per_epoch else None

        def open_stream(first: int, count: int):
            return stream(train_ds, train_ds.records, True, first, "train", num_epochs=count,
                          shard=(rank, world_size), pad=True, with_epoch=True, rows_per_epoch=rows_per_epoch)

        train_loader = EpochStreams(open_stream, iters_per_epoch, last_epoch)

    if "val" in datasets:
        val_ds = datasets["val"]

        def val_loader():
            return stream(val_ds, shard_records(val_ds.records, rank, world_size, None, 0, pad=False), False, 0,
                          "val")

    return train_loader, val_loader
