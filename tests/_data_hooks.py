"""A transform that Ray tests load into Ray Data's decode actors (``runtime.imports`` + the pipeline): it records
the Ray node it runs on (``tests/multinode_scenarios.py``). Kept apart from ``tests/_worker_hooks.py`` so that a
decode actor imports only this light module (raydet's transforms, not its models).

Not a test module (pytest collects ``test_*.py`` only).
"""
from __future__ import annotations

import json
import os

from raydet.data.transforms import Transform
from raydet.registry import REGISTRY, register

__all__ = ["RecordNode"]


class RecordNode(Transform):
    """A pass-through per-image transform that records where it runs: the first image of each process writes
    ``<folder>/<prefix>_<pid>.json`` (``node``: Ray's node id, ``pid``). In a pipeline, it shows on which nodes
    Ray Data's decode actors ran."""

    def __init__(self, folder: str, prefix: str = "decode"):
        self.folder, self.prefix, self.written = folder, prefix, False

    def __call__(self, sample: dict, rng) -> dict:
        if not self.written:
            import ray

            path = os.path.join(self.folder, f"{self.prefix}_{os.getpid()}.json")
            with open(f"{path}.tmp", "w") as f:
                json.dump({"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}, f)
            os.replace(f"{path}.tmp", path)
            self.written = True
        return dict(sample)


if "RecordNode" not in REGISTRY:  # imported under a second name in the same process: keep the first
    register(RecordNode)
