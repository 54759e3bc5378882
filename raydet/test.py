"""``python -m raydet.test PIPELINE CHECKPOINT [--set k=v ...] [--out DIR] [--split test|val] [--out-proposals FILE]``:
evaluate a checkpoint.

The images stream through the same Ray Data pipeline as in training; the Ray Train workers each predict their share,
rank 0 gathers the predictions, writes the COCO result json and a metrics file, and the driver prints the table.
The checkpoint, the pipeline's data and ``--out`` may be in object storage (``s3://``, ``gs://``: :mod:`raydet.fileio`).
``--out-proposals FILE`` also writes every image's predicted boxes and scores as a proposal file
(:mod:`raydet.data.proposals`, a pickle-free ``.npz``): on an RPN pipeline, the proposals a Fast R-CNN pipeline's
``proposal_file`` reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from raydet import fileio
from raydet.config import Config, load_config
from raydet.engine.checkpoint import load_checkpoint, load_model_weights
from raydet.engine.hooks import EvalHook, ProgressBarHook
from raydet.engine.runner import Runner
from raydet.errors import keep_traceback, report_failure
from raydet.evaluation.evaluator import DatasetEvaluator
from raydet.registry import ConfigError
from raydet.commands.loaders import get_datasets, put_datasets, ray_loaders
from raydet.commands.ray_setup import (check_cluster_resources, init_ray, release_ray, scaling_config, setup_logging,
                                       torch_config, train_run_config_kwargs)
from raydet.commands.runner_builder import worker_setup
from raydet.commands.sections import build_datasets, parse_sections, resolve_progress, work_dir_of
from raydet.commands.validation import validate_pipeline
from raydet.workspace import check_shared_storage, cluster_node_count, resolve_work_dir

__all__ = ["main", "evaluate", "eval_loop_per_worker"]


def build_evaluation_runner(cfg: Config, dataset, checkpoint: str, *, device, out_dir: str | None, val_loader,
                            rank: int = 0, world_size: int = 1, out_proposals: str | None = None):
    """A Runner that only evaluates: the pipeline's model with the checkpoint's weights and an EvalHook (plus a
    progress bar over this worker's images, ``runtime.progress``); ``out_proposals``: the proposal file rank 0
    writes (None: none)."""
    sections = parse_sections(cfg)
    model = cfg.build("model")
    state = load_checkpoint(checkpoint, map_location="cpu")
    load_model_weights(model, state["model"], str(checkpoint))
    model.to(device)
    results_file = fileio.join(out_dir, "results.json") if out_dir else None
    evaluator = DatasetEvaluator.from_settings(dataset, sections.evaluation, results_file=results_file,
                                               proposals_file=out_proposals)
    hooks = [EvalHook(evaluator)] + ([ProgressBarHook()] if sections.runtime.progress is True else [])
    return Runner(model, optimizer=None, train_loader=None, val_loader=val_loader, max_epochs=0, hooks=hooks,
                  device=device, amp=sections.train.amp, val_images=len(dataset.records[rank::world_size]))


@keep_traceback  # the driver reports a failure with the worker's full traceback
def eval_loop_per_worker(config: dict) -> dict:
    cfg, sections, rank, world, device = worker_setup(config)
    datasets, records_refs = get_datasets(config["dataset"])  # the records: views of the node's one copy
    dataset = datasets["val"]
    _, val_loader = ray_loaders(datasets, sections, rank, world, iters_per_epoch=0, records_refs=records_refs)
    runner = build_evaluation_runner(cfg, dataset, config["checkpoint"], device=device,
                                     out_dir=config["out_dir"] if rank == 0 else None, val_loader=val_loader,
                                     rank=rank, world_size=world,
                                     out_proposals=config.get("out_proposals") if rank == 0 else None)
    runner.val()
    if rank == 0 and config["out_dir"]:
        fileio.write_text(fileio.join(config["out_dir"], "metrics.json"), json.dumps(runner.metrics, indent=2))
    return {"metrics": runner.metrics}


def evaluate(cfg: Config, checkpoint: str, *, split: str = "test", out_dir: str | None = None,
             out_proposals: str | None = None) -> dict:
    """Evaluate ``checkpoint`` on the pipeline's ``data.<split>`` with the pipeline's scaling; returns the metrics.
    ``out_proposals``: also write the predictions as a proposal file there (:mod:`raydet.data.proposals`)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    sections = validate_pipeline(cfg)  # every section, before Ray starts
    cfg = resolve_progress(cfg)
    # a missing or unreadable checkpoint, or one of another model, fails here, before any worker starts
    load_model_weights(cfg.build("model"), load_checkpoint(checkpoint)["model"], str(checkpoint))
    if getattr(sections.data, split) is None:
        raise ConfigError(f"{cfg.path}: data.{split}: the pipeline has no {split} dataset")
    dataset = build_datasets(cfg, sections, splits=(split,))[split]
    out_dir = _absolute(out_dir) if out_dir else None
    storage = fileio.join(out_dir or work_dir_of(cfg, sections, allow_uri=True), "ray")
    if out_dir:
        fileio.makedirs(out_dir)
    init_ray()
    check_cluster_resources(sections)
    check_shared_storage(storage, "--out", cluster_node_count(), sections.runtime.shared_storage)
    if out_proposals:  # written by rank 0, on whichever node it runs
        check_shared_storage(fileio.dirname(_absolute(out_proposals)), "--out-proposals", cluster_node_count(),
                             sections.runtime.shared_storage)
    trainer = TorchTrainer(
        eval_loop_per_worker,
        train_loop_config={"pipeline": cfg.data, "path": cfg.path, "origins": cfg.origins,
                           "dataset": put_datasets({"val": dataset}), "checkpoint": _absolute(str(checkpoint)),
                           "out_dir": out_dir,
                           "out_proposals": _absolute(out_proposals) if out_proposals else None},
        scaling_config=scaling_config(sections), torch_config=torch_config(sections),
        run_config=RunConfig(name=f"test-{Path(cfg.path).stem}-{os.getpid()}",
                             storage_path=storage, **train_run_config_kwargs()))
    result = trainer.fit()
    return (result.return_value or {}).get("metrics", {})


def _absolute(path: str) -> str:
    """An absolute local path, or the URI as it is."""
    return path if fileio.is_uri(path) else os.path.abspath(path)


def format_metrics(metrics: dict) -> str:
    from raydet.evaluation import format_coco_table, format_voc_table

    parts = []
    coco = {k: v for k, v in metrics.items() if k.split("/")[0] in ("bbox", "segm")}
    if coco:
        parts.append(format_coco_table(coco))
    voc = {k: v for k, v in metrics.items() if k.startswith("voc/")}
    if voc:
        parts.append(format_voc_table(voc))
    other = {k: v for k, v in metrics.items() if k not in coco and k not in voc}
    parts += [f"{k}: {v:.4f}" for k, v in other.items()]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raydet test",
                                     description="Evaluate a checkpoint on a pipeline's test (or val) split.")
    parser.add_argument("pipeline", help="pipeline YAML the checkpoint was trained with")
    parser.add_argument("checkpoint", help="checkpoint file or Ray checkpoint folder")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--out", default=None, help="folder for results.json and metrics.json")
    parser.add_argument("--out-proposals", default=None, metavar="FILE",
                        help="also write each image's predicted boxes and scores as a proposal file (.npz, see "
                             "raydet.data.proposals): an RPN pipeline's proposals for a Fast R-CNN proposal_file")
    args = parser.parse_args(argv)
    setup_logging()
    out = None
    try:
        cfg = load_config(args.pipeline, args.set)
        sections = parse_sections(cfg)
        out = (resolve_work_dir(args.out, work_root=sections.runtime.work_root, key="--out", allow_uri=True)
               if args.out else fileio.join(work_dir_of(cfg, sections, allow_uri=True), "test"))
        metrics = evaluate(cfg, args.checkpoint, split=args.split, out_dir=out, out_proposals=args.out_proposals)
    except Exception as exc:  # one line (ours, or the original behind Ray's wrapping); the traceback to a file
        release_ray()  # no worker output after the error line
        return report_failure(exc, out if out and (fileio.is_uri(out) or os.path.isdir(out)) else None, "test")
    print(format_metrics(metrics))
    print(f"results and metrics written to {out}")
    if args.out_proposals:
        print(f"proposals written to {args.out_proposals}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not __main__'s: Ray pickles the worker function by reference to
    # raydet.test (a function defined in __main__ would be pickled by value, with everything it touches).
    import importlib

    sys.exit(importlib.import_module("raydet.test").main())
