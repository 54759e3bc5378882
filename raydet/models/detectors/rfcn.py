"""R-FCN (Dai et al. 2016): region-based, fully convolutional detection on ResNet C4 / C5 (no neck)."""
from __future__ import annotations

import torch

from raydet.models.detectors.detectors import TwoStageDetector
from raydet.registry import current_path, error, register

__all__ = ["RFCN"]


@register
class RFCN(TwoStageDetector):
    """The backbone gives two maps: C4 (stride 16) for the RPN and C5 (conv5 with stride 1 and dilation 2, so also
    stride 16) for the position-sensitive RoI head (:class:`~raydet.models.roi_heads.RFCNRoIHead`), as in the
    paper's Sec. 3 ("Backbone architecture") and its released code.

    Raises:
        ConfigError: a backbone whose ``out_indices`` are not two stages, or a neck.
    """

    def __init__(self, backbone, rpn_head, roi_head, neck=None):
        base = current_path()
        if neck is not None:
            raise error(f"{base}.neck" if base else "neck", "RFCN takes the backbone's C4 / C5 maps directly; "
                        "set neck: null")
        indices = tuple(getattr(backbone, "out_indices", ()))
        if len(indices) != 2:
            raise error(f"{base}.backbone.out_indices" if base else "backbone.out_indices",
                        f"RFCN needs two backbone outputs (C4 for the RPN, C5 for the RoI head, e.g. [2, 3]), "
                        f"got {list(indices)}")
        super().__init__(backbone, None, rpn_head, roi_head)
        if roi_head.with_mask:
            raise ValueError("RFCN has no mask branch")

    @staticmethod
    def rpn_head_inputs(feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The RPN's maps of the backbone's (C4, C5): (C4,)."""
        return feats[:1]

    @staticmethod
    def roi_head_inputs(feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The RoI head's maps of the backbone's (C4, C5): (C5,)."""
        return feats[1:]

    def _split(self, images: torch.Tensor):
        feats = self.extract_feat(images)
        return self.rpn_head_inputs(feats), self.roi_head_inputs(feats)

    def loss(self, batch):
        rpn_feats, roi_feats = self._split(batch["images"])
        losses, proposals = self.rpn_head.loss_and_proposals(rpn_feats, batch)
        losses.update(self.roi_head.loss(roi_feats, proposals, batch))
        return losses

    @torch.no_grad()
    def predict(self, batch):
        rpn_feats, roi_feats = self._split(batch["images"])
        proposals = self.rpn_head.predict(rpn_feats, batch["img_metas"])
        return self.roi_head.predict(roi_feats, [p[:, :4] for p in proposals], batch["img_metas"])
