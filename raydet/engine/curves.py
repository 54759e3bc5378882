"""Loss and metric curves from a run's ``log.jsonl`` as one PNG (matplotlib, no display needed).

Panels: the training loss and each loss term against the iteration; the learning rate against the iteration; and,
when the run evaluated, each evaluation metric (``bbox/AP``, ``proposal/AR@1000``, ``voc/mAP`` ...) against the
epoch. ``LoggerHook`` writes ``<run folder>/curves.png`` at the end of every run; ``raydet curves LOG`` redraws one.
"""
from __future__ import annotations

import json
import math
import os

__all__ = ["read_log", "curve_series", "plot_curves"]

_SKIP = {"mode", "epoch", "iter", "time", "data_time", "memory_mb", "eta_s", "lr", "grad_norm"}


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (a line that is not JSON, e.g. cut by a crash, is an error naming it)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON record: {exc}") from None
    return records


def curve_series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """``{panel: {series: (xs, ys)}}`` for the panels ``losses`` (x = iteration), ``lr`` (x = iteration) and
    ``metrics`` (x = epoch). Non-finite values, and metrics of -1 (COCOeval: nothing to measure, e.g. APl without
    large objects), are left out. A resumed run's log repeats the iterations redone after the restart; the later
    record of an iteration wins."""
    panels: dict[str, dict[str, dict]] = {"losses": {}, "lr": {}, "metrics": {}}
    for r in records:
        mode = r.get("mode")
        if mode == "train":
            x = r["iter"]
            for k, v in r.items():
                if (k == "loss" or k.startswith("loss_")) and _finite(v):
                    panels["losses"].setdefault(k, {})[x] = v
            if _finite(r.get("lr")):
                panels["lr"].setdefault("lr", {})[x] = r["lr"]
        elif mode == "val":
            x = r["epoch"]
            for k, v in r.items():
                if k not in _SKIP and _finite(v) and v != -1:  # -1: COCOeval's "nothing to measure"
                    panels["metrics"].setdefault(k, {})[x] = v
    return {panel: {name: (sorted(points), [points[x] for x in sorted(points)]) for name, points in series.items()}
            for panel, series in panels.items() if series}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(log_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> dict | None:
    """Draw the curves of ``log_path`` into ``out_path`` (default: ``curves.png`` beside the log). Returns the
    plotted :func:`curve_series`, or None when the log has no record to plot (no file is written then)."""
    series = curve_series(read_log(log_path))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(log_path)), "curves.png")
    labels = {"losses": ("iteration", "loss"), "lr": ("iteration", "learning rate"), "metrics": ("epoch", "value")}
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], series.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=name, linewidth=2.0 if name == "loss" else 1.2,
                    marker="o" if panel == "metrics" else None)
        ax.set_xlabel(labels[panel][0])
        ax.set_ylabel(labels[panel][1])
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "run")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return series
