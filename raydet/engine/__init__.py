"""The training engine: the per-worker loop (Runner), its hooks, schedules and checkpoints.

Plain PyTorch: the same Runner runs inside a Ray Train worker, a unit test or a notebook. Ray enters only through
the ``report`` callable and the data loaders that ``raydet.train`` hands to it.
"""
from raydet.engine.hooks import (CheckpointHook, EvalHook, Hook, LoggerHook, LrSchedulerHook, OptimizerHook,
                                 Priority)
from raydet.engine.runner import Runner

__all__ = ["Runner", "Hook", "Priority", "LrSchedulerHook", "OptimizerHook", "CheckpointHook", "LoggerHook",
           "EvalHook"]
