"""``python -m raydet.train [PIPELINE] [--set k=v ...] [--resume [CHECKPOINT]] [--work-dir DIR]``: train on Ray.

The driver loads and checks the pipeline, reads the datasets (so bad annotations fail before any worker starts),
connects to a Ray cluster (or starts a local one) and runs a Ray Train ``TorchTrainer``. Each worker builds the
model, wraps it in DDP (NCCL on GPU, gloo on CPU), streams its shard of the images through a Ray Data actor pool
(decode + augment) and runs the hook-driven ``Runner``. With no pipeline, a small quickstart on a generated
dataset runs.

Outputs go to a run folder in the work dir (see :mod:`raydet.workspace`: where a relative work dir resolves under
``ray job submit``, and the layout). ``--resume`` continues the latest checkpoint of the pipeline's runs in the work
dir, in that checkpoint's run folder; ``--resume PATH`` continues from a given checkpoint. The work dir, the data
and the checkpoint to resume may be in object storage (``s3://``, ``gs://``: :mod:`raydet.fileio`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import raydet.data  # noqa: F401  (registers the dataset and transform types)
import raydet.models  # noqa: F401  (registers the model components)
from raydet.commands.loaders import get_datasets, put_datasets, ray_loaders
from raydet.commands.ray_setup import (check_cluster_resources, init_ray, release_ray, scaling_config, setup_logging,
                                       torch_config, train_run_config_kwargs)
from raydet.commands.runner_builder import build_runner, worker_setup
from raydet.commands.sections import build_datasets, resolve_progress, work_dir_of
from raydet.commands.validation import validate_pipeline
from raydet.config import Config, load_config
from raydet import fileio
from raydet.engine.checkpoint import load_checkpoint
from raydet.engine.dist import all_gather_object
from raydet.engine.hooks import CHECKPOINT_SCORE, EpochGateHook, LoggerHook, WorkDirSyncHook
from raydet.errors import keep_traceback, report_failure, wrapped_errors
from raydet.registry import ConfigError
from raydet.workspace import (CHECKPOINT_INFO_FILE, check_shared_storage, checkpoint_record, cluster_node_count,
                              latest_checkpoint, new_attempt_name, new_run_dir, schedule_differences)

__all__ = ["main", "QUICKSTART", "train_loop_per_worker", "fit", "prepare_run", "RunPlan", "check_resume"]

log = logging.getLogger("raydet")

QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


# --------------------------------------------------------------------------------------------------- Ray worker


@keep_traceback  # the driver reports a failure with the worker's full traceback
def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker entry point: config carries the resolved pipeline, an object ref to the datasets, the run
    folder, and the checkpoint to resume from (None for a new run). Rank 0 writes the run's files; into a scratch
    folder copied to the run folder when that is a URI (:class:`~raydet.engine.hooks.WorkDirSyncHook`)."""
    import json
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    cfg, sections, rank, world, device = worker_setup(config)
    # the records arrive as NumPy views of the one copy of this node's object store (RecordTable)
    datasets, records_refs = get_datasets(config["datasets"])

    def report(metrics: dict, state: dict | None):
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if state is None:
            ray.train.report(metrics)
            return
        from raydet.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint

        tmp = tempfile.mkdtemp(prefix="raydet-ckpt-")
        save_checkpoint(state, os.path.join(tmp, CHECKPOINT_FILE))
        with open(os.path.join(tmp, CHECKPOINT_INFO_FILE), "w") as f:  # what it is, readable without loading it
            json.dump({"epoch": metrics.get("epoch"), "iter": metrics.get("iter"), "metrics": metrics}, f)
        # the temporary folder goes once Ray has copied it into the run folder (else ~100 MB stay in /tmp per epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         delete_local_checkpoint_after_upload=True)

    # the run folder, or a scratch folder mirrored to it when it is a URI (the log of a resumed run goes on)
    folder = fileio.MirroredFolder(config["run_dir"], download=("log.jsonl",), prefix="raydet-run-") \
        if rank == 0 else None
    hooks = [EpochGateHook(config["gate_dir"])] if config.get("gate_dir") else []
    if folder is not None and folder.remote:
        hooks.append(WorkDirSyncHook(folder))
    wrap = ray.train.torch.prepare_model if world > 1 or device.type == "cuda" else None
    runner = build_runner(cfg, datasets, device=device, rank=rank, world_size=world, report=report,
                          work_dir=folder.local if folder is not None else None, wrap_model=wrap, sections=sections,
                          extra_hooks=hooks)
    runner.train_loader, runner.val_loader = ray_loaders(datasets, sections, rank, world, runner.iters_per_epoch,
                                                         records_refs)
    if folder is not None and folder.remote:
        runner.get_hook(LoggerHook).destination = folder.target  # the log names the run folder, not the scratch
    # a restart of this command's worker group (scaling.max_failures) continues from Ray's latest checkpoint; the
    # command's first start from the checkpoint it was asked to resume
    checkpoint = ray.train.get_checkpoint()
    source = checkpoint.path if checkpoint is not None else config.get("resume_from")
    if source is not None:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = load_checkpoint(d, map_location=device)
        else:
            state = load_checkpoint(source, map_location=device)
        runner.load_state_dict(state, source=str(source))
        log.info("resumed from %s at epoch %d (iteration %d)", source, runner.epoch, runner.iter)
        if rank == 0:
            with open(folder.path("log.jsonl"), "a") as f:
                f.write(json.dumps({"mode": "resume", "epoch": runner.epoch, "iter": runner.iter,
                                    "checkpoint": _storage_uri(config["run_dir"], str(source))}) + "\n")
    # every rank's node, for the log's record of this worker group (a collective: every rank calls it)
    nodes = all_gather_object(ray.get_runtime_context().get_node_id())
    if rank == 0:
        _log_worker_group(runner, folder.path("log.jsonl"), sections, nodes,
                          state.get("world_size") if source is not None else None)
    finished = False
    try:
        runner.run()
        finished = True
    finally:
        if folder is not None:  # the files so far reach the bucket, also when the run fails
            try:
                folder.close()
            except Exception as exc:  # noqa: BLE001  (the run's own error is the one to report)
                if finished:
                    raise
                log.warning("could not copy the run's files to %s: %s", folder.target, exc)
    return {"metrics": runner.metrics, "epoch": runner.epoch, "iter": runner.iter}


def _log_worker_group(runner, log_file: str, sections, nodes: list, checkpoint_world: int | None) -> None:
    """Rank 0, when a worker group starts: a ``workers`` record in the run log (world size, each rank's node id,
    the epochs and iterations done, the base LR and accumulation of this world size); and a ``resize`` record
    (``old_world``, ``new_world``, the same numbers) with a console line when the world size differs from the
    previous worker group's in this run folder (the log's latest ``workers`` record), or else from the checkpoint
    it continues. See :mod:`raydet.engine.elastic` for what a world size does to the batch and the LR."""
    import json

    from raydet.engine.hooks import LrSchedulerHook, OptimizerHook

    old = None
    if os.path.exists(log_file):
        with open(log_file) as f:
            for line in f:
                if '"mode": "workers"' in line:
                    old = json.loads(line).get("world")
    old = old if old is not None else checkpoint_world
    world = len(nodes)
    accumulation = runner.get_hook(OptimizerHook).accumulation
    plan = {"epoch": runner.epoch, "iter": runner.iter, "on_resize": sections.scaling.on_resize,
            "lr": runner.get_hook(LrSchedulerHook).base_lr, "accumulation": accumulation,
            "global_batch": sections.data.images_per_worker * world * accumulation}
    records = [{"mode": "workers", "world": world, "nodes": nodes, **plan}]
    if old is not None and old != world:
        records.insert(0, {"mode": "resize", "old_world": old, "new_world": world, **plan})
        log.info("resized from %d to %d workers after epoch %d (iteration %d): on_resize %s: lr %.4g, accumulation "
                 "%d, global batch %d", old, world, runner.epoch, runner.iter, plan["on_resize"], plan["lr"],
                 accumulation, plan["global_batch"])
    with open(log_file, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _storage_uri(run_dir: str, path: str) -> str:
    """A path Ray Train gives for a checkpoint in the run folder's storage as the user names it: Ray's paths in
    object storage lack the scheme (``bucket/key``), so ``s3://bucket/key`` when the run folder is a URI."""
    if fileio.is_uri(run_dir) and not fileio.is_uri(path):
        return f"{run_dir.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


# --------------------------------------------------------------------------------------------------- driver


@dataclass
class RunPlan:
    """Where a training command writes (``run_dir``) and what it continues from (``resume_from``, a checkpoint
    file, or None for a new run); ``note`` says which, for the console."""

    work_dir: str
    run_dir: str
    resume_from: str | None
    note: str


def prepare_run(work_dir: str, resume: bool | str = False) -> RunPlan:
    """The run folder and checkpoint for ``--resume`` (True: the latest checkpoint of the runs in ``work_dir``;
    a path: that checkpoint file or Ray checkpoint folder; False: none).

    A resumed run continues in the run folder its checkpoint belongs to (its log goes on); a checkpoint from
    elsewhere (a file outside any run folder) starts a new run folder. With ``--resume`` and no checkpoint in the
    work dir, a new run starts, and the note says so.

    Raises:
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
    """
    if resume is True:
        record = latest_checkpoint(work_dir)
        if record is None:
            run_dir = new_run_dir(work_dir)
            return RunPlan(work_dir, run_dir, None, f"--resume: no checkpoint found in {work_dir}; starting a new "
                                                   f"run in {run_dir}")
    elif resume:
        record = checkpoint_record(resume)
    else:
        run_dir = new_run_dir(work_dir)
        return RunPlan(work_dir, run_dir, None, f"new run in {run_dir}")
    run_dir = record.run_dir or new_run_dir(work_dir)
    at = f" (epoch {record.epoch}, iteration {record.iter})" if record.epoch is not None else ""
    return RunPlan(work_dir, run_dir, record.path,
                   f"resuming run {run_dir} from checkpoint {record.path}{at}")


def check_resume(cfg: Config, checkpoint: str, allow_changes: bool) -> None:
    """Refuse to resume ``checkpoint`` with a pipeline that differs from its own in keys that change the model or
    the schedule (:data:`raydet.workspace.SCHEDULE_KEYS`), naming them, unless ``allow_changes``.

    Raises:
        ConfigError: naming the checkpoint and the differing keys.
    """
    import yaml

    state = load_checkpoint(checkpoint, mmap=True)
    text = (state.get("meta") or {}).get("pipeline")
    if not text:
        return
    changed = schedule_differences(yaml.safe_load(text) or {}, cfg.data)
    if not changed:
        return
    message = (f"--resume: the pipeline differs from the one checkpoint {checkpoint} was trained with, in "
               f"{', '.join(changed[:8])}" + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""))
    if not allow_changes:
        raise ConfigError(message + "; continue anyway with --allow-changes, or start a new run without --resume")
    log.warning("%s; continuing (--allow-changes)", message)


_STORAGE_FAILURE = "Unable to set up cluster storage"


def fit(cfg: Config, *, run_dir: str, resume_from: str | None = None, callbacks=(), gate_dir: str | None = None,
        allow_changes: bool = False):
    """Run the pipeline's training on Ray Train, writing into ``run_dir``; returns Ray Train's ``Result`` (rank 0's
    final ``{"metrics", "epoch", "iter"}`` in ``return_value``).

    Args:
        run_dir: the run folder (``log.jsonl``, ``curves.png``, ``tb/``, ``pipeline.yaml``, ``ray/<attempt>/``
            checkpoints); see :func:`prepare_run`.
        resume_from: a checkpoint to continue from (model, optimizer, scaler, epoch, iteration, RNG).
        callbacks: Ray Train ``UserCallback`` objects for the run (``raydet.tune`` passes Tune's
            ``TuneReportCallback`` so every epoch's report reaches the study).
        gate_dir: with :class:`~raydet.engine.hooks.EpochGateHook`, each epoch but the last waits for a decision
            file in this folder (``raydet tune``).
        allow_changes: resume even when the pipeline's model or schedule keys differ from the checkpoint's.

    Raises:
        ConfigError: a bad pipeline, a cluster that cannot run it, a run folder other nodes cannot reach, or a
            resume with changed keys.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raydet.commands.restart_notice import RestartNotice

    sections = validate_pipeline(cfg)  # every section (the model on the meta device), before Ray starts
    cfg = resolve_progress(cfg)
    if resume_from is not None:
        check_resume(cfg, resume_from, allow_changes)
    datasets = build_datasets(cfg, sections)
    init_ray()
    check_cluster_resources(sections)
    run_dir = run_dir if fileio.is_uri(run_dir) else os.path.abspath(run_dir)
    check_shared_storage(run_dir, "work_dir", cluster_node_count(), sections.runtime.shared_storage)
    fileio.makedirs(run_dir)
    fileio.write_text(fileio.join(run_dir, "pipeline.yaml"), cfg.to_yaml())
    ck = sections.checkpoint
    run_config = RunConfig(
        name=new_attempt_name(), storage_path=fileio.join(run_dir, "ray"),
        failure_config=FailureConfig(max_failures=sections.scaling.max_failures),
        callbacks=[*callbacks, RestartNotice(sections.scaling.max_failures)],
        checkpoint_config=CheckpointConfig(
            num_to_keep=ck.num_to_keep, checkpoint_score_order=ck.score_order,
            checkpoint_score_attribute=CHECKPOINT_SCORE if ck.score_attribute else None),
        **train_run_config_kwargs())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"pipeline": cfg.data, "path": cfg.path, "origins": cfg.origins,
                           "datasets": put_datasets(datasets), "run_dir": run_dir,
                           "resume_from": (resume_from if fileio.is_uri(str(resume_from)) else
                                           os.path.abspath(resume_from)) if resume_from else None,
                           "gate_dir": gate_dir},
        scaling_config=scaling_config(sections), torch_config=torch_config(sections),
        run_config=run_config)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigint = signal.getsignal(signal.SIGINT) if on_main_thread else None
    try:
        return trainer.fit()
    except SystemExit:
        # Ctrl-C: Ray Train's SIGINT handler aborts the run (workers stopped; the checkpoints already written stay)
        # and exits; the command reports it as an interrupt
        raise KeyboardInterrupt from None
    except Exception as exc:
        if any(_STORAGE_FAILURE in str(e) for e in wrapped_errors(exc)) and fileio.is_uri(run_dir):
            raise ConfigError(f"work_dir: {run_dir}: Ray Train cannot write its checkpoints there; check the bucket "
                              f"and that every node has credentials for it ({fileio.CREDENTIALS_HINT})") from None
        if any(_STORAGE_FAILURE in str(e) for e in wrapped_errors(exc)):
            raise ConfigError(f"work_dir: {run_dir}: Ray Train's workers cannot reach it from every node; set "
                              f"runtime.work_root or RAYDET_WORK_ROOT (or work_dir) to storage every node mounts "
                              f"(NFS, EFS, Filestore)") from None
        raise
    finally:
        if on_main_thread:  # Ray Train leaves its handler installed
            signal.signal(signal.SIGINT, previous_sigint)


def _discard_if_empty(plan: RunPlan | None) -> None:
    """A new run folder that a failed start left empty goes (a folder with anything in it stays)."""
    if plan is None or plan.resume_from is not None:
        return
    try:
        os.rmdir(plan.run_dir)
    except OSError:  # not empty, or already gone
        pass


def main(argv=None) -> int:
    from raydet.evaluation import format_coco_table

    parser = argparse.ArgumentParser(prog="raydet train", description="Train a detector on Ray Train.")
    parser.add_argument("pipeline", nargs="?", default=None, help="pipeline YAML (default: the quickstart)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override pipeline keys, values parsed as YAML")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the latest checkpoint of this pipeline's runs in the work dir (or the given "
                             "checkpoint file / folder); with none found, a new run starts")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume even if the pipeline's model or schedule keys differ from the checkpoint's")
    parser.add_argument("--work-dir", default=None,
                        help="folder of this pipeline's runs (default: <pipeline work_dir>/<pipeline name>)")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and args.resume.endswith((".yaml", ".yml")) and args.pipeline is None:
        args.pipeline, args.resume = args.resume, True  # `--resume PIPELINE.yaml`: the flag, then the pipeline
    setup_logging()
    pipeline = Path(args.pipeline) if args.pipeline else QUICKSTART
    plan = None
    try:
        cfg = load_config(pipeline, args.set)
        sections = validate_pipeline(cfg)
        plan = prepare_run(work_dir_of(cfg, sections, args.work_dir, allow_uri=True), args.resume)
        log.info("raydet: %s", plan.note)
        result = fit(cfg, run_dir=plan.run_dir, resume_from=plan.resume_from, allow_changes=args.allow_changes)
    except KeyboardInterrupt:
        _discard_if_empty(plan)
        where = f" in {plan.run_dir}" if plan and _isdir(plan.run_dir) else ""
        print(f"\nraydet: interrupted; the checkpoints written so far are kept{where}. Continue with: "
              f"python -m raydet.train {pipeline} --resume" + (f" --work-dir {plan.work_dir}" if args.work_dir else ""),
              file=sys.stderr)
        return 130
    except Exception as exc:  # one line (ours, or the original behind Ray's wrapping); the traceback to a file
        release_ray()  # no worker output after the error line
        _discard_if_empty(plan)
        folder = next((d for d in (plan.run_dir, plan.work_dir) if _isdir(d)), None) if plan else None
        return report_failure(exc, folder, "train")
    out = result.return_value or {}
    metrics = out.get("metrics") or {}
    print(f"\nraydet: trained {out.get('epoch')} epochs ({out.get('iter')} iterations); run folder {plan.run_dir}")
    if metrics:
        print(format_coco_table(metrics) if any(k.split("/")[0] in ("bbox", "segm") for k in metrics)
              else "\n".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if result.checkpoint is not None:
        print(f"latest checkpoint: {_storage_uri(plan.run_dir, result.checkpoint.path)}")
    return 0


def _isdir(path: str) -> bool:
    """Whether a folder exists (a URI: has objects), False when that cannot be found out."""
    try:
        return fileio.isdir(path)
    except OSError:
        return False


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles the worker function by reference to
    # raydet.train (a function defined in __main__ would be pickled by value, with everything it touches).
    sys.exit(importlib.import_module("raydet.train").main())
