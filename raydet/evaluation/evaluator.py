"""Score a model's predictions on a dataset with the metrics a pipeline asks for."""
from __future__ import annotations

import os

import numpy as np

from raydet.evaluation.coco import evaluate_coco, predictions_to_coco_results, write_coco_results
from raydet.evaluation.metric_names import EVALUATION_METRICS as METRICS
from raydet.evaluation.voc import VOC_MODES, voc_map

__all__ = ["DatasetEvaluator", "METRICS", "default_results_file"]


class DatasetEvaluator:
    """Converts predictions batch by batch into compact per-image results, then scores them all at once.

    Args:
        dataset: a raydet dataset (``records``, ``classes``, ``cat_ids``, ``coco_gt()``).
        metrics: any of "bbox", "segm" (COCO AP), "proposal" (AR@N), "voc_map" (VOC mAP@0.5).
        proposal_nums: N of AR@N for "proposal".
        results_file: where to write the COCO result json (bbox / segm entries), if anywhere.
        voc_mode: the AP of "voc_map": "area" (VOC2010 and later) or "11points" (VOC2007).
        proposals_file: where to write every image's predicted boxes and scores (original-image pixels, labels
            dropped) as a proposal file (:mod:`raydet.data.proposals`), if anywhere: an RPN's proposals for Fast
            R-CNN (``raydet test --out-proposals``).

    Every metric scores against the same ground truth, with the records' meaning of an ignored box and of a valid
    polygon (see :mod:`raydet.evaluation.coco`).
    """

    def __init__(self, dataset, metrics=("bbox",), proposal_nums=(100, 300, 1000), results_file: str | None = None,
                 voc_mode: str = "area", proposals_file: str | None = None):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"evaluation.metric: unknown metric(s) {unknown}; choose from {list(METRICS)}")
        if voc_mode not in VOC_MODES:
            raise ValueError(f"evaluation.voc_mode: expected one of {', '.join(VOC_MODES)}, got {voc_mode!r}")
        self.dataset = dataset
        self.metrics = list(metrics)
        self.proposal_nums = tuple(proposal_nums)
        self.results_file = results_file
        self.voc_mode = voc_mode
        self.proposals_file = proposals_file

    @classmethod
    def from_settings(cls, dataset, evaluation, results_file: str | None = None,
                      proposals_file: str | None = None) -> "DatasetEvaluator":
        """The evaluator of a pipeline's ``evaluation:`` section (:class:`raydet.commands.sections.EvaluationSettings`:
        ``metric``, ``proposal_nums``, ``voc_mode``)."""
        return cls(dataset, evaluation.metric, evaluation.proposal_nums, results_file=results_file,
                   voc_mode=evaluation.voc_mode, proposals_file=proposals_file)

    def convert(self, img_metas: list[dict], predictions: list[dict]) -> list[dict]:
        """Per image: COCO result entries (masks as RLE) and the raw boxes / scores / labels as NumPy."""
        out = []
        for meta, pred in zip(img_metas, predictions):
            pred = {k: v.detach().float().cpu().numpy() if k != "masks" else v.detach().cpu().numpy()
                    for k, v in pred.items()}
            image_id = int(meta["image_id"])
            entries = predictions_to_coco_results([pred], [image_id], list(self.dataset.cat_ids))
            out.append({"image_id": image_id, "coco": entries,
                        "boxes": pred["boxes"], "scores": pred["scores"], "labels": pred["labels"].astype(np.int64)})
        return out

    def evaluate(self, results: list[dict]) -> dict[str, float]:
        results = self._one_per_image(results)
        metrics: dict[str, float] = {}
        entries = [e for r in results for e in r["coco"]]
        if self.results_file:
            write_coco_results(entries, self.results_file)
        if self.proposals_file:
            from raydet.data.proposals import write_proposals

            write_proposals(self.proposals_file, [r["image_id"] for r in results], [r["boxes"] for r in results],
                            [r["scores"] for r in results])
        coco_types = [m for m in self.metrics if m in ("bbox", "segm")]
        if coco_types:
            metrics.update(evaluate_coco(self.dataset.coco_gt(), entries, coco_types))
        if "proposal" in self.metrics:
            boxes_only = [{k: v for k, v in e.items() if k != "segmentation"} for e in entries]
            metrics.update(evaluate_coco(self.dataset.coco_gt(), boxes_only, ["proposal"],
                                         proposal_nums=self.proposal_nums))
        if "voc_map" in self.metrics:
            by_id = {r["image_id"]: r for r in results}
            empty = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                     "labels": np.zeros(0, np.int64)}
            preds = [by_id.get(rec["image_id"], empty) for rec in self.dataset.records]
            metrics.update(voc_map(preds, self.dataset.records, len(self.dataset.classes), 0.5, self.voc_mode,
                                   class_names=list(self.dataset.classes)))
        return metrics

    def _one_per_image(self, results: list[dict]) -> list[dict]:
        """Distributed evaluation may pad shards: keep the first result of each image and check coverage."""
        seen, unique = set(), []
        for r in results:
            if r["image_id"] not in seen:
                seen.add(r["image_id"])
                unique.append(r)
        expected = {int(rec["image_id"]) for rec in self.dataset.records}
        missing = expected - seen
        if missing:
            raise RuntimeError(f"evaluation saw {len(seen)} of {len(expected)} images; missing e.g. "
                               f"{sorted(missing)[:5]}")
        return unique


def default_results_file(work_dir: str | None, name: str = "results.bbox.json") -> str | None:
    return os.path.join(work_dir, name) if work_dir else None
