"""Each Ray Train worker's data: its shard of the records streamed through a Ray Data actor pool.

:func:`ray_loaders` gives a worker its per-epoch training stream (shuffled by seed and epoch, padded so every rank
runs the same number of iterations) and its in-order evaluation stream; :func:`ray_stream` builds one such stream
(records -> decode + augment actors -> batches, see :mod:`raydet.data.ray_data`).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from raydet.commands.sections import Sections

__all__ = ["shard_records", "with_records", "take", "ray_stream", "ray_loaders"]


def shard_records(records: list, rank: int, world_size: int, seed: int | None, epoch: int, pad: bool) -> list:
    """This rank's share of the records; shuffled by (seed, epoch) when seed is given; padded (by repeating) so
    every rank gets the same count when ``pad`` (training: every rank must run the same number of iterations)."""
    order = np.arange(len(records))
    if seed is not None:
        order = np.random.default_rng([seed, epoch]).permutation(len(records))
    if pad and world_size > 1:
        total = math.ceil(len(order) / world_size) * world_size
        order = np.concatenate([order, order[: total - len(order)]])
    return [records[i] for i in order[rank::world_size]]


def with_records(dataset, records: list):
    """A shallow copy of ``dataset`` holding only ``records``."""
    shard = copy.copy(dataset)
    shard.records = records
    return shard


def take(iterable, n: int):
    """The first ``n`` items of ``iterable``; a generator is closed right after (so a Ray Data stream stops now,
    not when it is garbage-collected)."""
    try:
        for i, item in enumerate(iterable):
            if i >= n:
                return
            yield item
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()


def ray_stream(sections: Sections):
    """``(dataset, records, train, epoch) -> batches``: records -> Ray Data actor pool (decode + augment) ->
    aspect-ratio-grouped (training) or in-order (evaluation) batches."""
    from raydet.data.pipeline import build_transforms
    from raydet.data.ray_data import build_ray_dataset, iter_detection_batches

    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the LoggerHook reports progress; bars only add blank lines to worker logs
    context.print_on_execution_start = False
    context.raise_original_map_exception = True  # a bad image reaches the command as our error, not UserCodeException
    sc, batch_size = sections.scaling, sections.data.images_per_worker
    actors = tuple(sc.data_actors) if len(sc.data_actors) > 1 else sc.data_actors[0]

    def stream(dataset, records, train: bool, epoch: int):
        ds = build_ray_dataset(with_records(dataset, records), train=train, seed=sections.seed, epoch=epoch,
                               num_actors=actors, num_cpus_per_actor=sc.data_cpus_per_actor,
                               actor_batch_size=sc.data_batch_size, resources=sc.data_resources,
                               imports=tuple(sections.runtime.imports))
        _, collate_cfg = build_transforms(dataset.pipeline)
        return iter_detection_batches(ds, batch_size, collate_cfg, with_masks=getattr(dataset, "with_masks", False),
                                      train=train)

    return stream


def ray_loaders(datasets: dict, sections: Sections, rank: int, world_size: int, iters_per_epoch: int):
    """This rank's per-epoch training stream (exactly ``iters_per_epoch`` batches) and evaluation stream."""
    stream = ray_stream(sections)
    train_loader = val_loader = None
    if "train" in datasets:
        train_ds = datasets["train"]

        def train_loader(epoch: int):
            records = shard_records(train_ds.records, rank, world_size, sections.seed, epoch, pad=True)
            return take(stream(train_ds, records, True, epoch), iters_per_epoch)

    if "val" in datasets:
        val_ds = datasets["val"]

        def val_loader():
            return stream(val_ds, shard_records(val_ds.records, rank, world_size, None, 0, pad=False), False, 0)

    return train_loader, val_loader
