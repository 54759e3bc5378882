"""A pipeline's Runner (model, optimizer, hooks) in one process: what each Ray Train worker runs.

:func:`build_runner` is plain PyTorch and needs no Ray (tests and benchmarks call it directly);
:func:`worker_setup` reads the pipeline a Ray Train worker was given.
"""
from __future__ import annotations

import logging
import math

import torch

import raydet.data  # noqa: F401  (registers the dataset and transform types)
import raydet.models  # noqa: F401  (registers the model components)
from raydet.commands.ray_setup import setup_logging
from raydet.commands.sections import parse_sections
from raydet.config import Config
from raydet.engine.hooks import (CheckpointHook, EvalHook, LoggerHook, LrSchedulerHook, OptimizerHook,
                                 ProgressBarHook, build_hook)
from raydet.engine.elastic import world_plan
from raydet.engine.optim import build_optimizer, parse_lr_schedule, parse_optimizer
from raydet.engine.runner import Runner
from raydet.evaluation.evaluator import DatasetEvaluator
from raydet.registry import build_context

__all__ = ["build_runner", "worker_setup"]

log = logging.getLogger("raydet")


def build_runner(cfg: Config, datasets: dict, *, device, rank: int = 0, world_size: int = 1, train_loader=None,
                 val_loader=None, report=None, work_dir: str | None = None, wrap_model=None, sections=None,
                 extra_hooks=()) -> Runner:
    """Model, optimizer, hooks and Runner from a pipeline (plain PyTorch; no Ray needed).

    ``train_loader(epoch)`` / ``val_loader()`` yield batches of this worker; ``wrap_model`` wraps the model for
    distributed training (e.g. ``ray.train.torch.prepare_model``).
    """
    sections = sections or parse_sections(cfg)
    torch.manual_seed(sections.seed)  # identical initial weights on every rank
    model = cfg.build("model")
    if sections.train.sync_bn and world_size > 1:
        if torch.device(device).type == "cpu":  # torch's SyncBatchNorm runs on accelerators only
            log.warning("train.sync_bn: SyncBatchNorm needs GPUs; the CPU workers keep per-worker BatchNorm")
        else:
            from raydet.models.norm import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
    model = wrap_model(model) if wrap_model is not None else model.to(device)
    torch.manual_seed(sections.seed + rank)  # different sampling on every rank

    with build_context(file=cfg.path, origins=cfg.origins):
        opt_cfg = parse_optimizer(cfg.get("optimizer"))
        schedule = parse_lr_schedule(cfg.get("lr_schedule"))
    # the LR and the accumulation for this world size (scaling.on_resize; a resized run builds its runner again)
    with build_context(file=cfg.path, origins=cfg.origins):
        plan = world_plan(sections.scaling.on_resize, world_size, sections.data.images_per_worker, opt_cfg.lr,
                          opt_cfg.base_batch_size, opt_cfg.scale_lr)
    lr = plan.lr
    optimizer = build_optimizer(model, opt_cfg, lr)

    hooks = [LrSchedulerHook(lr, schedule),
             OptimizerHook(opt_cfg.grad_clip, fp16_scaler=sections.train.amp == "fp16",
                           nonfinite=sections.train.nonfinite_loss, device=torch.device(device).type,
                           accumulation=plan.accumulation),
             CheckpointHook(sections.checkpoint.interval, sections.checkpoint.score_attribute,
                            sections.checkpoint.score_order),
             LoggerHook(sections.runtime.log_interval, sections.runtime.tensorboard,
                        curves=sections.runtime.curves)]
    if sections.runtime.progress is True:  # fit() / evaluate() resolve "auto" on the driver
        hooks.append(ProgressBarHook())
    if "val" in datasets:
        evaluator = DatasetEvaluator.from_settings(datasets["val"], sections.evaluation)
        hooks.append(EvalHook(evaluator, sections.evaluation.interval))
    for i, spec in enumerate(cfg.get("hooks") or []):
        with build_context(file=cfg.path, origins=cfg.origins):
            hooks.append(build_hook(spec, f"hooks[{i}]"))
    hooks.extend(extra_hooks)

    n_train = len(datasets["train"].records)
    per_rank = math.ceil(n_train / world_size)
    iters = max(per_rank // sections.data.images_per_worker, 1)
    if sections.train.max_iters_per_epoch:
        iters = min(iters, sections.train.max_iters_per_epoch)
    meta = {"pipeline": cfg.to_yaml(), "classes": list(datasets["train"].classes),
            "cat_ids": list(datasets["train"].cat_ids)}
    val_images = len(datasets["val"].records[rank::world_size]) if "val" in datasets else None
    return Runner(model, optimizer, train_loader=train_loader, val_loader=val_loader,
                  max_epochs=sections.train.max_epochs, hooks=hooks, device=device, amp=sections.train.amp,
                  report=report, work_dir=work_dir, iters_per_epoch=iters, meta=meta, val_images=val_images)


def worker_setup(config: dict):
    """Inside a Ray Train worker: (pipeline Config, its Sections, rank, world size, device)."""
    import ray.train
    import ray.train.torch

    setup_logging()
    cfg = Config(config["pipeline"], config["path"], config["origins"])
    ctx = ray.train.get_context()
    return cfg, parse_sections(cfg), ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
