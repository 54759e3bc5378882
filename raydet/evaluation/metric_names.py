"""The names of the metrics raydet reports (training losses, COCO, proposal recall, VOC), and a check that a
pipeline's evaluation reports a given one (used for ``checkpoint.score_attribute`` and for Tune study metrics)."""
from __future__ import annotations

import re

from raydet.registry import closest

__all__ = ["EVALUATION_METRICS", "COCO_METRIC", "PROPOSAL_METRIC", "TRAIN_METRIC", "METRIC_FORMS", "metric_problem",
           "evaluation_metric_problem"]

# The entries of a pipeline's ``evaluation.metric``: COCO box / mask AP, proposal AR@N, VOC mAP@0.5.
EVALUATION_METRICS = ("bbox", "segm", "proposal", "voc_map")

# The metrics raydet's evaluation reports, and the evaluation.metric entry that produces each.
COCO_METRIC = re.compile(r"(bbox|segm)/(AP|AP50|AP75|APs|APm|APl)")
PROPOSAL_METRIC = re.compile(r"proposal/AR@(\d+)")
TRAIN_METRIC = re.compile(r"train/loss(_\w+)?")
METRIC_FORMS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl", "segm/AP...",
                "proposal/AR@N", "voc/mAP", "train/loss", "train/loss_<term>")


def metric_problem(metric: str, sections) -> str | None:
    """Why the pipeline cannot report ``metric``, or None."""
    ev = sections.evaluation
    if TRAIN_METRIC.fullmatch(metric):
        return None
    m = COCO_METRIC.fullmatch(metric)
    p = PROPOSAL_METRIC.fullmatch(metric)
    if m:
        needed = m.group(1)
    elif p:
        needed = "proposal"
    elif metric == "voc/mAP":
        needed = "voc_map"
    else:
        return (f"'{metric}' is not a metric raydet reports{closest(metric, METRIC_FORMS)} "
                f"(forms: {', '.join(METRIC_FORMS)})")
    if sections.data.val is None:
        return f"'{metric}' comes from the evaluation, but the pipeline has no data.val to evaluate on"
    if needed not in ev.metric:
        return (f"'{metric}' needs '{needed}' in the pipeline's evaluation.metric, which is {ev.metric} "
                f"(add it with set: ['evaluation.metric=[{', '.join([*ev.metric, needed])}]'])")
    if p and int(p.group(1)) not in ev.proposal_nums:
        return (f"'{metric}': {p.group(1)} is not in the pipeline's evaluation.proposal_nums "
                f"{ev.proposal_nums}")
    return None


def evaluation_metric_problem(name) -> str | None:
    """Why ``name`` is not an ``evaluation.metric`` entry (with the closest one), or None."""
    if name in EVALUATION_METRICS:
        return None
    return (f"unknown metric {name!r}{closest(str(name), EVALUATION_METRICS)} "
            f"(one of {', '.join(EVALUATION_METRICS)})")
