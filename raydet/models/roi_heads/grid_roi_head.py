"""Grid R-CNN's RoI head (Lu et al. 2019, Sec. 3): classify the RoIs, then locate each detection's box from the
heatmaps of its grid points instead of regressing it."""
from __future__ import annotations

import torch

from raydet.models.head_configs import DetectionConfig
from raydet.models.postprocess import boxes_to_original
from raydet.models.roi_heads.roi_extractors import boxes_to_rois
from raydet.models.roi_heads.standard_roi_head import StandardRoIHead
from raydet.registry import register

__all__ = ["GridRoIHead", "jitter_boxes"]


def jitter_boxes(boxes: torch.Tensor, amplitude: float, img_shape: tuple[int, int]) -> torch.Tensor:
    """(n, 4) boxes moved by up to ``amplitude`` x their size and rescaled by a factor in [1 - a, 1 + a] (uniform,
    per box and side), then clipped to [0, w - 1] x [0, h - 1] (MMDetection's ``GridRoIHead._random_jitter``)."""
    offsets = boxes.new_empty(boxes.shape[0], 4).uniform_(-amplitude, amplitude)
    wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + wh * offsets[:, :2]
    wh = wh * (1 + offsets[:, 2:])
    out = torch.cat([centre - wh / 2, centre + wh / 2], dim=1)
    h, w = img_shape
    return torch.stack([out[:, 0].clamp(0, w - 1), out[:, 1].clamp(0, h - 1), out[:, 2].clamp(0, w - 1),
                        out[:, 3].clamp(0, h - 1)], dim=1)


@register
class GridRoIHead(StandardRoIHead):
    """A classification-only box head (:class:`Shared2FCClsOnlyBBoxHead`) and a :class:`GridHead` on its own 14 x 14
    RoIAlign features (MMDetection's ``GridRoIHead``).

    Training: the box head's loss_cls on the sampled RoIs; the grid head's loss on at most ``max_num_grid`` of the
    positive RoIs, jittered by ``jitter_amplitude`` (MMDetection: 192 and 0.15). Test: class-wise NMS on the RoIs
    (boxes = proposals), then each detection's box is replaced by the one its grid points vote for, clipped to the
    image.

    Args:
        grid_roi_extractor, grid_head: the grid branch.
        The others: :class:`StandardRoIHead`'s (an optional mask branch runs on the corrected boxes).
    """

    def __init__(self, bbox_roi_extractor, bbox_head, assigner, sampler, grid_roi_extractor, grid_head,
                 max_num_grid: int = 192, jitter_amplitude: float = 0.15, mask_roi_extractor=None, mask_head=None,
                 test: DetectionConfig = DetectionConfig()):
        super().__init__(bbox_roi_extractor, bbox_head, assigner, sampler, mask_roi_extractor, mask_head, test)
        if max_num_grid < 1:
            raise ValueError(f"max_num_grid must be >= 1, got {max_num_grid}")
        if not 0 <= jitter_amplitude < 1:
            raise ValueError(f"jitter_amplitude must be in [0, 1), got {jitter_amplitude}")
        self.grid_roi_extractor = grid_roi_extractor
        self.grid_head = grid_head
        self.max_num_grid = max_num_grid
        self.jitter_amplitude = jitter_amplitude

    def loss(self, feats, proposals: list[torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        """loss_cls, loss_grid (and the mask losses); proposals per image (k_i, 4) in input pixels."""
        samples = self.sample(proposals, batch, feats)  # feats: for a loss-ranking sampler (OHEM)
        rois = boxes_to_rois([s.boxes for s in samples])
        cls_score, bbox_pred = self.bbox_forward(feats, rois)
        labels = torch.cat([torch.cat([s.pos_gt_labels, s.pos_gt_labels.new_full((s.num_neg,),
                                                                                  self.bbox_head.num_classes)])
                            for s in samples])
        losses = self.bbox_head.loss(cls_score, bbox_pred, rois, labels, None)
        losses["loss_grid"] = self.grid_loss(feats, samples, batch["img_metas"])
        if self.with_mask:
            losses.update(self.mask_loss(feats, samples, batch))
        return losses

    def grid_loss(self, feats, samples, img_metas: list[dict]) -> torch.Tensor:
        boxes = torch.cat([jitter_boxes(s.pos_boxes, self.jitter_amplitude, meta["img_shape"][:2])
                           for s, meta in zip(samples, img_metas)])
        gt_boxes = torch.cat([s.pos_gt_boxes for s in samples])
        if boxes.shape[0] == 0:  # no positive RoI: keep the grid head in the graph (DDP)
            return sum(p.sum() for p in self.grid_head.parameters()) * 0.0
        image = torch.cat([boxes.new_full((s.num_pos,), i) for i, s in enumerate(samples)])
        keep = torch.randperm(boxes.shape[0], device=boxes.device)[: self.max_num_grid]
        rois = torch.cat([image[keep, None], boxes[keep]], dim=1)
        fused, unfused = self.grid_head(self.grid_roi_extractor(feats, rois))
        return self.grid_head.loss(fused, unfused, self.grid_head.targets(boxes[keep], gt_boxes[keep]))

    @torch.no_grad()
    def predict(self, feats, proposals: list[torch.Tensor], img_metas: list[dict]) -> list[dict]:
        """Detections per image in original-image pixels (boxes, scores, labels, and masks with a mask head)."""
        rois = boxes_to_rois(proposals)
        cls_score, _ = self.bbox_forward(feats, rois)
        counts = [p.shape[0] for p in proposals]
        dets = [self.bbox_head.predict_boxes(r, c, None, meta["img_shape"][:2], self.test)
                for meta, r, c in zip(img_metas, rois.split(counts), cls_score.split(counts))]
        boxes = [d[0] for d in dets]
        det_rois = boxes_to_rois(boxes)
        if det_rois.shape[0]:
            fused, _ = self.grid_head(self.grid_roi_extractor(feats, det_rois))
            corrected = self.grid_head.predict_boxes(fused, det_rois[:, 1:]).split([b.shape[0] for b in boxes])
            boxes = []
            for meta, b in zip(img_metas, corrected):
                h, w = meta["img_shape"][:2]
                boxes.append(torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w),
                                          b[:, 3].clamp(0, h)], dim=1))
        results = [{"boxes": boxes_to_original(b, meta), "scores": d[1], "labels": d[2]}
                   for meta, b, d in zip(img_metas, boxes, dets)]
        if self.with_mask:
            self.predict_masks(feats, boxes, results, img_metas)
        return results
