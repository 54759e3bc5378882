"""Ray start-up and the cluster checks every command makes before it asks Ray for workers.

:func:`init_ray` joins the cluster in ``RAY_ADDRESS`` (``ray job submit``) or starts a local one;
:func:`check_cluster_resources` fails clearly, instead of waiting forever, on a pipeline the cluster cannot place;
:func:`scaling_config` and :func:`torch_config` turn the ``scaling:`` section into Ray Train's configs.
"""
from __future__ import annotations

import logging
import os
import sys

from raydet.commands.sections import Sections
from raydet.registry import ConfigError

__all__ = ["setup_logging", "init_ray", "check_cluster_resources", "scaling_config", "torch_config"]

log = logging.getLogger("raydet")


def setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=False)
    logging.getLogger("raydet").setLevel(logging.INFO)


def init_ray():
    """Connect to the cluster in RAY_ADDRESS (``ray job submit``) or a running local one; else start one."""
    import ray

    if ray.is_initialized():
        return
    ray.init(logging_level=logging.WARNING, log_to_driver=True)


def check_cluster_resources(sections: Sections) -> None:
    """Fail clearly, instead of waiting forever, when no node has a custom resource the pipeline places workers or
    actors with, or when the training workers leave no CPU for the decode actors.

    Ray Train workers hold their CPUs for the whole run; each worker's Ray Data stream needs at least
    ``data_actors[0]`` actors of ``data_cpus_per_actor`` CPUs on top. On a cluster we connected to (RAY_ADDRESS,
    e.g. under ``ray job submit``), which may autoscale, this is only a warning.
    """
    import ray

    sc = sections.scaling
    total_resources = ray.cluster_resources()
    for key, wanted in (("scaling.resources_per_worker", sc.resources_per_worker),
                        ("scaling.data_resources", sc.data_resources)):
        missing = sorted(set(wanted or {}) - set(total_resources))
        if missing:
            custom = sorted(k for k in total_resources if k not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not k.startswith("node:"))
            message = (f"{key}: no node of the cluster has the resource(s) {missing} (custom resources here: "
                       f"{custom or 'none'}); the Ray Train workers or decode actors would wait forever. Declare "
                       f"them on the node types (see clusters/) or remove them from the pipeline.")
            if os.environ.get("RAY_ADDRESS"):  # a cluster we joined may autoscale such nodes in
                log.warning(message)
            else:
                raise ConfigError(message)
    if sc.data_resources:  # actors go to other (CPU-only) nodes
        return
    workers = sc.num_workers * sc.cpus_per_worker
    actors = sc.num_workers * sc.data_actors[0] * sc.data_cpus_per_actor
    total = total_resources.get("CPU", 0.0)
    if workers + actors <= total + 1e-9:
        return
    message = (f"scaling: {sc.num_workers} workers x {sc.cpus_per_worker} CPU + {sc.num_workers} x "
               f"{sc.data_actors[0]} decode actors x {sc.data_cpus_per_actor} CPU = {workers + actors:g} CPUs, but the "
               f"cluster has {total:g}; the data pipeline would wait forever. Lower scaling.cpus_per_worker or "
               f"scaling.data_cpus_per_actor, or use fewer workers.")
    if os.environ.get("RAY_ADDRESS"):
        log.warning(message)
    else:
        raise ConfigError(message)


def scaling_config(sections: Sections):
    """Ray Train's ScalingConfig from the pipeline's ``scaling:`` section."""
    from ray.train import ScalingConfig

    sc = sections.scaling
    resources = {"CPU": sc.cpus_per_worker, **(sc.resources_per_worker or {})}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    return ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources)


def torch_config(sections: Sections):
    """Ray Train's TorchConfig: the DDP process-group backend, NCCL between GPU workers, gloo between CPU ones."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if sections.scaling.use_gpu else "gloo")
