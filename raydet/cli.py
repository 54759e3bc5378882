"""The ``raydet`` command line.

    raydet config PIPELINE [--set KEY=VALUE ...] [--validate-only]    check the pipeline, print it merged and resolved
    raydet curves LOG [--out PNG]                    draw a run's loss / lr / metric curves
    raydet train | test | tune | infer | benchmark   python -m raydet.<command> (each has its own --help)
    raydet browse PIPELINE --out DIR [--split S] [--num N]     draw images as the model sees them
    raydet check-data PIPELINE                       read and decode every split; report; exit 1 on problems
    raydet analyze PIPELINE RESULTS [--out DIR]      per-class AP, confusion matrix, COCO error breakdown
    raydet convert SRC OUT --from {torchvision,mmdet,detectron2} --pipeline PIPELINE   a checkpoint for raydet

Each subcommand is one ``_add_<name>`` function in :data:`COMMANDS`: it adds its parser and sets ``run``, a
function of the parsed arguments (for the heavy subcommands, ``raydet.<name>.main`` imported on use).
A :class:`~raydet.registry.ConfigError` prints ``error: <message>`` and exits with status 2; any other failure prints
one ``error: <Type>: <message> (raised at ...; full traceback: <file>)`` line and exits with status 1
(:func:`raydet.errors.report_failure`).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .registry import ConfigError

__all__ = ["main", "build_parser", "add_pipeline_arguments"]


def _key_value(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """``PIPELINE`` and ``--set KEY=VALUE ...``, shared by every subcommand that reads a pipeline."""
    parser.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML file")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", type=_key_value, default=[],
        help="override a key, e.g. --set optimizer.lr=0.01 model.backbone.depth=101; values are YAML "
             "(0.01 a float, [1333, 800] a list, null None); overriding a variable changes every key using it; "
             "a mapping merges into the mapping at KEY ('model.backbone={depth: 101, norm_eval: false}' changes "
             "two arguments) unless it has _delete_: true or another type, which replace it")


def _run_config(args: argparse.Namespace) -> None:
    from .commands.validation import validate_pipeline
    from .config import load_config

    cfg = load_config(args.pipeline, args.overrides)
    validate_pipeline(cfg)
    sys.stdout.write(f"ok: {args.pipeline}\n" if args.validate_only else cfg.to_yaml())


def _add_config(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="check a pipeline and print it fully merged",
        description="Check PIPELINE as every command does before Ray starts (each section, the model built on the "
                    "meta device, the hooks, the datasets' arguments and transforms; no annotation file is read), "
                    "then print it with its _base_ files merged, --set overrides applied and ${...} references "
                    "resolved, as YAML. A problem prints one line, 'error: <file>: <dotted key>: <problem>; did you "
                    "mean ...?', on stderr, and exits with status 2.")
    add_pipeline_arguments(parser)
    parser.add_argument("--validate-only", action="store_true",
                        help="only check: print 'ok: PIPELINE' and exit 0, or the error and exit 2")
    parser.set_defaults(run=_run_config)


def _run_curves(args: argparse.Namespace) -> None:
    from .engine.curves import plot_curves

    try:
        series = plot_curves(args.log, args.out)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if series is None:
        raise ConfigError(f"{args.log}: no training or evaluation record to plot")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.log)), "curves.png")
    print(f"{out}: " + "; ".join(f"{panel}: {', '.join(lines)}" for panel, lines in series.items()))


def _add_curves(subparsers) -> None:
    parser = subparsers.add_parser(
        "curves", help="draw a run's loss / lr / metric curves as PNG",
        description="Draw the loss terms and learning rate against the iteration, and the evaluation metrics "
                    "against the epoch, from a run's log.jsonl into one PNG.")
    parser.add_argument("log", metavar="LOG", help="a run's log.jsonl")
    parser.add_argument("--out", default=None, help="PNG file (default: curves.png beside the log)")
    parser.set_defaults(run=_run_curves)


def _load_pipeline(args: argparse.Namespace):
    from .commands.sections import parse_sections
    from .config import load_config

    cfg = load_config(args.pipeline, args.overrides)
    return cfg, parse_sections(cfg)


def _build_split(cfg, sections, split: str):
    """The pipeline's ``data.<split>`` dataset; a data problem (e.g. a missing annotation file) is a ConfigError."""
    from .commands.sections import build_datasets

    if getattr(sections.data, split) is None:
        raise ConfigError(f"{cfg.path}: data.{split}: the pipeline has no {split} dataset")
    return build_datasets(cfg, sections, splits=(split,))[split]


def _run_browse(args: argparse.Namespace) -> None:
    from .tools.browse import browse_dataset

    cfg, sections = _load_pipeline(args)
    dataset = _build_split(cfg, sections, args.split)
    try:
        paths = browse_dataset(dataset, args.out, num=args.num, seed=sections.seed, epoch=args.epoch)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"raydet: drew {len(paths)} of the {len(dataset)} images of data.{args.split} ({dataset!r}) into "
          f"{args.out}")


def _add_browse(subparsers) -> None:
    parser = subparsers.add_parser(
        "browse", help="draw a split's images as the model sees them, with boxes, masks and class names (PNG)",
        description="Decode each image of the split, apply the split's per-image transforms with the training "
                    "random draws of --epoch, pad it as the batch step does (the padding in the Normalize mean "
                    "colour, which the model sees as 0), draw the boxes (ignored ones in grey), masks and class "
                    "names, and write OUT/<file stem>.png. No Ray.")
    add_pipeline_arguments(parser)
    parser.add_argument("--split", default="train", choices=["train", "val", "test"], help="default: train")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--num", type=int, default=None, metavar="N", help="only the first N images (default: all)")
    parser.add_argument("--epoch", type=int, default=0, metavar="E",
                        help="0-based training epoch whose random flips / scales to show (default 0)")
    parser.set_defaults(run=_run_browse)


def _run_check_data(args: argparse.Namespace) -> None:
    from .config import load_config
    from .tools.check_data import check_pipeline, default_workers, format_report

    reports = check_pipeline(load_config(args.pipeline, args.overrides), workers=args.workers or default_workers())
    print(format_report(reports))
    if any(r.num_problems for r in reports):
        raise SystemExit(1)


def _add_check_data(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-data", help="read every split, decode every image, report counts and problems (exit 1 on problems)",
        description="Read data.train, data.val and data.test as training does (counting every problem instead of "
                    "stopping), decode every image with the datasets' decoder, and print per split: images, boxes "
                    "per class, a box-size histogram and the problems by kind with the first record of each named. "
                    "Exits 1 when there is a problem, 2 for a pipeline mistake. No Ray.")
    add_pipeline_arguments(parser)
    parser.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                        help="decoding threads, >= 1 (default: the CPU count, at most 8)")
    parser.set_defaults(run=_run_check_data)


def _run_analyze(args: argparse.Namespace) -> None:
    from .tools.analyze import analyze_results, format_analysis, load_results, map_infer_ids

    cfg, sections = _load_pipeline(args)
    dataset = _build_split(cfg, sections, args.split)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)), "analysis")
    images = args.images or os.path.join(os.path.dirname(os.path.abspath(args.results)), "images.json")
    try:
        entries = load_results(args.results)
        if args.images or os.path.exists(images):
            entries = map_infer_ids(entries, images, dataset)
        result = analyze_results(dataset, entries, out, iou_types=args.types, score_thr=args.score_thr,
                                 tp_iou_thr=args.tp_iou_thr, source=args.results)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(format_analysis(result))
    print(f"raydet: {len(entries)} detections on {len(dataset)} images of data.{args.split}; figures and "
          f"analysis.json in {out}")


def _add_analyze(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="per-class AP, confusion matrix and COCO error breakdown of a results.json",
        description="Score RESULTS (the COCO results json of raydet test --out or raydet infer) on the pipeline's "
                    "split: print the per-class AP table, and write confusion_matrix.png, the COCO error breakdown "
                    "(PR curves at C75 / C50 / Loc / Sim / Oth / BG / FN) for all classes and per class, and "
                    "analysis.json. With an images.json beside RESULTS (raydet infer on a folder), image ids are "
                    "mapped to the split's images by path. No Ray.")
    add_pipeline_arguments(parser)
    parser.add_argument("results", metavar="RESULTS", help="COCO results json")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    parser.add_argument("--out", default=None, metavar="DIR", help="default: analysis/ beside RESULTS")
    parser.add_argument("--images", default=None, metavar="JSON",
                        help="raydet infer's images.json (default: the one beside RESULTS, if any)")
    parser.add_argument("--types", nargs="+", default=["bbox"], choices=["bbox", "segm"],
                        help="COCOeval iou types (default bbox; segm needs masks in RESULTS and the dataset)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="confusion matrix: detections kept (0.3)")
    parser.add_argument("--tp-iou-thr", type=float, default=0.5, help="confusion matrix: IoU of a match (0.5)")
    parser.set_defaults(run=_run_analyze)


def _forwarding(name: str, help_text: str):
    """A subcommand whose arguments go to ``raydet.<name>.main`` (which has its own --help)."""

    def add(subparsers) -> None:  # listed in --help; main() dispatches before parsing
        subparsers.add_parser(name, help=help_text, add_help=False)

    add.__name__ = f"_add_{name}"
    return add


FORWARDED = ("train", "test", "tune", "infer", "benchmark")

def _run_convert(args: argparse.Namespace) -> None:
    from .interop import ConversionError, convert_checkpoint

    try:
        report = convert_checkpoint(args.src, args.out, source_format=args.source_format, pipeline=args.pipeline,
                                    overrides=args.overrides)
    except (ConversionError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    print(report.summary())
    print(f"raydet: wrote {args.out} ({len(report.classes)} classes) for {args.pipeline}; evaluate it with "
          f"raydet test {args.pipeline} {args.out}")


def _add_convert(subparsers) -> None:
    from .interop import SOURCE_FORMATS

    parser = subparsers.add_parser(
        "convert", help="convert another toolbox's detector checkpoint into a raydet checkpoint",
        description="Map the tensors of SRC (a state dict of --from's format) onto the model of --pipeline and "
                    "write a raydet checkpoint to OUT that raydet test / raydet infer load with that pipeline, with "
                    "the class names and category ids in its meta. Class slots are converted (torchvision: "
                    "background 0 and 91 COCO-id slots -> 80 classes with the background last); the class names "
                    "come from the checkpoint's meta (MMDetection) or the pipeline; Detectron2's .pkl files are read "
                    "with numpy arrays as the only pickled objects allowed. Every source tensor "
                    "is placed or reported; a checkpoint of another architecture fails with the first mismatching "
                    "keys and shapes, and nothing is written. No Ray.")
    parser.add_argument("src", metavar="SRC", help="the source checkpoint (e.g. a torchvision .pth)")
    parser.add_argument("out", metavar="OUT", help="the raydet checkpoint to write")
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(SOURCE_FORMATS),
                        help="the source's format")
    parser.add_argument("--pipeline", required=True, metavar="PIPELINE",
                        help="the pipeline whose model the checkpoint is for (e.g. pipelines/zoo/torchvision/...)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", type=_key_value, default=[],
        help="override pipeline keys, as for every command")
    parser.set_defaults(run=_run_convert)


COMMANDS = (
    _add_config,
    _forwarding("train", "train a pipeline on Ray Train (python -m raydet.train)"),
    _forwarding("test", "evaluate a checkpoint (python -m raydet.test)"),
    _forwarding("tune", "run a hyperparameter study on Ray Tune (python -m raydet.tune)"),
    _forwarding("infer", "detect objects in a folder, glob, list or COCO json of images (python -m raydet.infer)"),
    _forwarding("benchmark", "measure training / inference speed, memory and data throughput "
                             "(python -m raydet.benchmark)"),
    _add_curves,
    _add_browse,
    _add_check_data,
    _add_analyze,
    _add_convert,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydet", description="Object detection toolbox.")
    parser.add_argument("--version", action="version", version=f"raydet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0, or exits with status 2 on a pipeline error (argparse's usage errors too) and 1
    on any other failure (one ``error:`` line, see :func:`raydet.errors.report_failure`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in FORWARDED:  # their own parsers handle everything after the command, --help included
        import importlib

        code = importlib.import_module(f"raydet.{argv[0]}").main(argv[1:])
        if code:
            raise SystemExit(code)
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BrokenPipeError:  # the reader of the output has gone (`raydet analyze ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit would raise it again
        raise SystemExit(1) from None
    except Exception as exc:  # one line: a pipeline error (status 2), or anything else with its traceback in a file
        from .errors import report_failure

        raise SystemExit(report_failure(exc, None, args.command)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
