"""Progress bars with ETA for training, evaluation, inference and studies.

Inside a Ray actor (a Ray Train worker, a Tune trial) the bar is Ray's distributed tqdm
(``ray.experimental.tqdm_ray``): the worker sends its state through its log stream and the driver draws every
worker's bar in place, between the log lines. Elsewhere it is a plain ``tqdm`` bar on stderr.
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar", "in_ray_actor"]


def in_ray_actor() -> bool:
    """Whether this code runs inside a Ray actor (whose stdout Ray forwards to the driver)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def progress_bar(total: int | None, desc: str, unit: str = "it", file=None):
    """A bar over ``total`` steps with rate and ETA, exposing ``update(n)``, ``set_description(text)`` and
    ``close()``. ``file`` (a stream) forces a local tqdm bar written there."""
    if file is None and in_ray_actor():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit=unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=file or sys.stderr, dynamic_ncols=True, mininterval=0.5)
