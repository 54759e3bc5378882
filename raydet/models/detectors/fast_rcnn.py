"""Fast R-CNN (Girshick 2015): an RoI head on precomputed proposals, no region proposal network.

The proposals come with the data (a dataset's ``proposal_file``, :mod:`raydet.data.proposals`, e.g. written by
``raydet test --out-proposals`` on an RPN pipeline): the batch's ``proposals`` (raydet.structures), one float32
(k_i, 4) tensor per image in input pixels, already resized and flipped with the image. As in MMDetection's
``FastRCNN`` (a ``TwoStageDetector`` without ``rpn_head``) the RoI head samples them (adding the ground-truth boxes,
the sampler's ``add_gt_as_proposals``) in training and classifies and refines them at test time.
"""
from __future__ import annotations

import torch

from raydet.models.detectors.base import BaseDetector, require_component
from raydet.registry import register

__all__ = ["FastRCNN"]


@register
class FastRCNN(BaseDetector):
    """``backbone`` -> ``neck`` -> ``roi_head`` on ``batch["proposals"]``.

    Raises:
        ValueError: the batch has no ``proposals`` (the dataset needs a ``proposal_file``), or not one tensor per
            image.
    """

    requires_proposals = True  # the batch must carry ``proposals`` (read by raydet benchmark and raydet infer)

    def __init__(self, backbone, neck, roi_head):
        super().__init__(backbone, neck)
        require_component(type(self).__name__, "roi_head", roi_head, ("loss", "predict"),
                          "a roi_head (e.g. {type: StandardRoIHead, ...})")
        if getattr(roi_head, "with_mask", False):
            raise ValueError("FastRCNN's roi_head has a mask branch; Fast R-CNN predicts boxes only")
        self.roi_head = roi_head

    @staticmethod
    def proposals(batch: dict) -> list[torch.Tensor]:
        """The batch's per-image (k_i, 4) proposals, on the images' device."""
        proposals = batch.get("proposals")
        if proposals is None:
            raise ValueError("FastRCNN needs precomputed proposals: set the dataset's proposal_file (a file written "
                             "by `raydet test <rpn pipeline> <checkpoint> --out-proposals PATH`)")
        if len(proposals) != len(batch["img_metas"]):
            raise ValueError(f"FastRCNN: the batch has {len(batch['img_metas'])} images but {len(proposals)} "
                             f"proposal tensors")
        device = batch["images"].device
        return [p.to(device)[:, :4].float() for p in proposals]

    def loss(self, batch):
        return self.roi_head.loss(self.extract_feat(batch["images"]), self.proposals(batch), batch)

    @torch.no_grad()
    def predict(self, batch):
        feats = self.extract_feat(batch["images"])
        return self.roi_head.predict(feats, self.proposals(batch), batch["img_metas"])
