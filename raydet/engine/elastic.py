"""What a world size does to the batch and the learning rate: the pipeline's ``scaling.on_resize`` rule.

A run's world size (the number of Ray Train workers) is fixed by ``scaling.num_workers: N``, or varies between
``[min, max]`` when Ray Train's elastic scaling shrinks the worker group after a lost worker or node and grows it
when capacity returns. Each worker always takes ``data.images_per_worker`` images per iteration; the learning rate
``optimizer.lr`` is the one for a global batch of ``optimizer.base_batch_size`` images (MMDetection's
``auto_scale_lr.base_batch_size``). For a world of ``W`` workers, ``scaling.on_resize`` chooses:

* ``scale_lr`` (default): keep the per-worker batch; the global batch is ``images_per_worker x W`` and the LR
  follows it by the linear scaling rule, ``lr x images_per_worker x W / base_batch_size`` (Goyal et al. 2017,
  "Accurate, Large Minibatch SGD", section 2.1), i.e. ``lr x W / reference_world`` with ``reference_world =
  base_batch_size / images_per_worker``. With ``optimizer.scale_lr: false`` the LR stays ``lr``.
* ``keep_global_batch``: keep the global batch at ``base_batch_size`` images by gradient accumulation over
  ``base_batch_size / (images_per_worker x W)`` iterations per optimizer step; the LR stays ``lr``. Every world
  size the run may take must divide the reference: the pipeline is refused otherwise, naming the keys.

Resizes and data: a world size changes only when Ray Train starts a new worker group, which continues from the
run's latest checkpoint (:mod:`raydet.train`). Checkpoints are written after whole epochs, so the new group starts
at an epoch boundary: the interrupted epoch is trained again from its start, and the updates the old group made in
it are gone with the old group's state. Epoch ``e`` orders the images by the permutation
``default_rng([seed, e])`` of the dataset, padded by repeating its first images to a multiple of ``W``, and rank
``r`` of ``W`` takes positions ``r, r + W, ...`` (:func:`raydet.commands.loaders.shard_records`): the shards of any
``W`` are disjoint and together hold every image of the epoch once, plus the ``ceil(n / W) x W - n`` padding
copies. So the model a run ends with has trained every epoch exactly once, each image once in it (beyond that
padding and the iterations ``train.max_iters_per_epoch`` or a partial last batch leave out), whatever the resizes.

Plain Python: no Ray, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from raydet.registry import ConfigError

__all__ = ["ON_RESIZE", "WorldPlan", "world_plan", "accumulation_problem"]

ON_RESIZE = ("scale_lr", "keep_global_batch")


@dataclass(frozen=True)
class WorldPlan:
    """The batch and LR of one world size.

    Attributes:
        world: workers.
        accumulation: iterations per optimizer step (1: a step every iteration).
        global_batch: images per optimizer step, ``images_per_worker x world x accumulation``.
        lr: the base learning rate for that batch (before warmup and decay).
    """

    world: int
    accumulation: int
    global_batch: int
    lr: float


def accumulation_problem(base_batch_size: int, images_per_worker: int, worlds) -> str | None:
    """Why ``keep_global_batch`` cannot keep ``base_batch_size`` images per step for every world size in
    ``worlds`` (None when it can): each ``images_per_worker x W`` must divide ``base_batch_size``."""
    bad = [w for w in worlds if base_batch_size % (images_per_worker * w)]
    if not bad:
        return None
    need = images_per_worker * math.lcm(*worlds)
    return (f"keep_global_batch needs optimizer.base_batch_size ({base_batch_size}) to be a multiple of "
            f"data.images_per_worker ({images_per_worker}) x every world size the run may take "
            f"({', '.join(map(str, worlds))}), which {', '.join(map(str, bad))} "
            f"{'is' if len(bad) == 1 else 'are'} not; use a base_batch_size that is a multiple of {need}, "
            f"other scaling.num_workers, or on_resize: scale_lr")


def world_plan(on_resize: str, world: int, images_per_worker: int, lr: float, base_batch_size: int,
               scale_lr: bool = True) -> WorldPlan:
    """The accumulation and base LR for ``world`` workers under ``on_resize`` (see the module docstring).

    Args:
        lr, base_batch_size, scale_lr: the pipeline's ``optimizer`` keys.

    Raises:
        ConfigError: ``keep_global_batch`` with a world size that does not divide the reference batch, or an
            unknown ``on_resize``.
    """
    if on_resize not in ON_RESIZE:
        raise ConfigError(f"scaling.on_resize: expected one of {', '.join(ON_RESIZE)}, got {on_resize!r}")
    if world < 1 or images_per_worker < 1:
        raise ValueError(f"world and images_per_worker must be >= 1, got {world}, {images_per_worker}")
    accumulation = 1
    if on_resize == "keep_global_batch":
        problem = accumulation_problem(base_batch_size, images_per_worker, [world])
        if problem:
            raise ConfigError(f"scaling.on_resize: {problem}")
        accumulation = base_batch_size // (images_per_worker * world)
    batch = images_per_worker * world * accumulation
    return WorldPlan(world, accumulation, batch, lr * batch / base_batch_size if scale_lr else lr)
