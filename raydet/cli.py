"""The ``raydet`` command line.

    raydet config PIPELINE [--set KEY=VALUE ...]    print the fully merged, resolved pipeline
    raydet curves LOG [--out PNG]                    draw a run's loss / lr / metric curves
    raydet train | test | tune | infer | benchmark   python -m raydet.<command> (each has its own --help)

Each subcommand is one ``_add_<name>`` function in :data:`COMMANDS`: it adds its parser and sets ``run``, a
function of the parsed arguments (for the heavy subcommands, ``raydet.<name>.main`` imported on use).
A :class:`~raydet.registry.ConfigError` prints ``error: <message>`` and exits with status 2.
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


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """``PIPELINE`` and ``--set KEY=VALUE ...``, shared by every subcommand that reads a pipeline."""
    parser.add_argument("pipeline", metavar="PIPELINE", help="pipeline YAML file")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", type=_key_value, default=[],
        help="override a key, e.g. --set optimizer.lr=0.01 model.backbone.depth=101; values are YAML "
             "(0.01 a float, [1333, 800] a list, null None); overriding a variable changes every key using it")


def _run_config(args: argparse.Namespace) -> None:
    from .config import load_config

    sys.stdout.write(load_config(args.pipeline, args.overrides).to_yaml())


def _add_config(subparsers) -> None:
    parser = subparsers.add_parser(
        "config", help="print the fully merged pipeline",
        description="Print PIPELINE with its _base_ files merged, --set overrides applied and ${...} references "
                    "resolved, as YAML.")
    add_pipeline_arguments(parser)
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


def _forwarding(name: str, help_text: str):
    """A subcommand whose arguments go to ``raydet.<name>.main`` (which has its own --help)."""

    def add(subparsers) -> None:  # listed in --help; main() dispatches before parsing
        subparsers.add_parser(name, help=help_text, add_help=False)

    add.__name__ = f"_add_{name}"
    return add


FORWARDED = ("train", "test", "tune", "infer", "benchmark")

COMMANDS = (
    _add_config,
    _forwarding("train", "train a pipeline on Ray Train (python -m raydet.train)"),
    _forwarding("test", "evaluate a checkpoint (python -m raydet.test)"),
    _forwarding("tune", "run a hyperparameter study on Ray Tune (python -m raydet.tune)"),
    _forwarding("infer", "detect objects in a folder, glob, list or COCO json of images (python -m raydet.infer)"),
    _forwarding("benchmark", "measure training / inference speed, memory and data throughput "
                             "(python -m raydet.benchmark)"),
    _add_curves,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydet", description="Object detection toolbox.")
    parser.add_argument("--version", action="version", version=f"raydet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns 0, or exits with status 2 on a pipeline error (argparse's usage errors too)."""
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
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
