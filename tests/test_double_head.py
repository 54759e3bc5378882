"""Double-Head R-CNN (Wu et al. 2019): the enlarged regression RoIs, the two branches of the box head, its losses,
and a tiny variant overfitting a few synthetic images.

Expected values: RoI corners and pooled values computed by hand; the losses from torch's own cross-entropy and
smooth-L1 functions; AP50 from pycocotools (through raydet.evaluation). The R-50 pipeline's parameter count and
MMDetection names are checked against MMDetection's model in tests/test_interop_mmdet.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import raydet.models  # noqa: F401  (registers the components)
from raydet.data.collate import collate_samples
from raydet.models.losses import CrossEntropyLoss, SmoothL1Loss
from raydet.models.roi_heads.bbox_heads import DoubleConvFCBBoxHead
from raydet.models.roi_heads.roi_extractors import SingleRoIExtractor, rescale_rois
from raydet.models.task_modules.coders import DeltaXYWHBBoxCoder
from test_detectors import TINY, TINY_ROI, TINY_RPN, _ap, _train, build_from_pipeline, small_shapes  # noqa: F401


def test_rescale_rois_enlarges_about_the_centre():
    # centre (20, 40), 20 x 40 -> 26 x 52 at factor 1.3
    rois = torch.tensor([[0.0, 10.0, 20.0, 30.0, 60.0], [1.0, 0.0, 0.0, 10.0, 10.0]])
    expected = torch.tensor([[0.0, 7.0, 14.0, 33.0, 66.0], [1.0, -1.5, -1.5, 11.5, 11.5]])
    torch.testing.assert_close(rescale_rois(rois, 1.3), expected)


def test_regression_rois_are_pooled_enlarged_on_the_level_of_the_original_roi():
    """Features equal to the input x coordinate (level P2) and x + 1000 (P3): RoIAlign of a linear map gives each
    bin's centre x. The 100 x 100 RoI maps to P2 (sqrt(wh) < 112); enlarged 1.3x (130 px) it would map to P3, but
    is pooled on P2 as MMDetection does: [45, 175] in two bins -> centres 77.5 and 142.5."""
    def level(stride, size, offset):
        x = (torch.arange(size, dtype=torch.float32) + 0.5) * stride + offset
        return x.expand(size, size)[None, None].clone()

    feats = (level(4, 64, 0.0), level(8, 32, 1000.0))
    extractor = SingleRoIExtractor(output_size=2, featmap_strides=[4, 8], sampling_ratio=2)
    rois = torch.tensor([[0.0, 60.0, 60.0, 160.0, 160.0]])
    plain = extractor(feats, rois)[0, 0]
    enlarged = extractor(feats, rois, roi_scale_factor=1.3)[0, 0]
    torch.testing.assert_close(plain, torch.tensor([[85.0, 135.0], [85.0, 135.0]]))
    torch.testing.assert_close(enlarged, torch.tensor([[77.5, 142.5], [77.5, 142.5]]))


def _head(**kw):
    coder = DeltaXYWHBBoxCoder(target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])
    return DoubleConvFCBBoxHead(num_classes=3, bbox_coder=coder,
                                loss_cls=CrossEntropyLoss(loss_weight=2.0),
                                loss_bbox=SmoothL1Loss(beta=1.0, loss_weight=2.0), in_channels=8, roi_feat_size=7,
                                num_convs=2, num_fcs=2, conv_out_channels=16, fc_out_channels=32, **kw)


def test_classification_reads_the_fc_branch_and_regression_the_conv_branch():
    torch.manual_seed(0)
    head = _head().eval()
    x_cls, x_reg = torch.randn(5, 8, 7, 7), torch.randn(5, 8, 7, 7)
    cls_score, bbox_pred = head(x_cls, x_reg)
    assert cls_score.shape == (5, 4) and bbox_pred.shape == (5, 12)  # C + 1 logits, 4 C deltas
    assert len(head.conv_branch) == 2 and len(head.fc_branch) == 2
    assert head.fc_branch[0].in_features == 8 * 7 * 7 and head.fc_reg.in_features == 16
    cls2, reg2 = head(x_cls, torch.randn(5, 8, 7, 7))  # new regression features: scores unchanged
    assert torch.equal(cls2, cls_score) and not torch.allclose(reg2, bbox_pred)
    cls3, reg3 = head(torch.randn(5, 8, 7, 7), x_reg)  # new classification features: deltas unchanged
    assert torch.equal(reg3, bbox_pred) and not torch.allclose(cls3, cls_score)
    agnostic = _head(reg_class_agnostic=True).eval()
    assert agnostic(x_cls, x_reg)[1].shape == (5, 4)


def test_losses_carry_the_configured_weights():
    """loss_cls = 2 x mean CE over the R sampled RoIs; loss_bbox = 2 x sum of smooth-L1 over the positives' own
    class deltas / R (MMDetection's dh-faster-rcnn config: both weights 2.0)."""
    torch.manual_seed(0)
    head = _head()
    cls_score, bbox_pred = torch.randn(4, 4), torch.randn(4, 12)
    labels = torch.tensor([2, 0, 3, 3])  # two positives (classes 2 and 0), two background
    targets = torch.randn(4, 4)
    rois = torch.zeros(4, 5)
    losses = head.loss(cls_score, bbox_pred, rois, labels, targets)
    torch.testing.assert_close(losses["loss_cls"], 2.0 * F.cross_entropy(cls_score, labels))
    chosen = torch.stack([bbox_pred[0, 8:12], bbox_pred[1, 0:4]])
    expected = 2.0 * F.smooth_l1_loss(chosen, targets[:2], beta=1.0, reduction="sum") / 4
    torch.testing.assert_close(losses["loss_bbox"], expected)


TINY_DH = [
    "model.roi_head.bbox_head.conv_out_channels=64",
    "model.roi_head.bbox_head.num_convs=1",
]


def test_double_head_overfits_a_few_images(small_shapes):  # noqa: F811
    samples, records = small_shapes
    torch.manual_seed(0)
    model = build_from_pipeline("dh_faster_rcnn_r50_fpn_1x_coco.yaml", TINY + TINY_RPN + TINY_ROI + TINY_DH)
    assert type(model.roi_head).__name__ == "DoubleHeadRoIHead" and model.roi_head.reg_roi_scale_factor == 1.3
    batch = collate_samples(samples)
    first, last = _train(model, batch, 40, lr=2e-3, warmup=10, fused=True)  # AP50 1.0 for seeds 0, 1, 2
    assert sum(last.values()) < 0.5 * sum(first.values())
    metrics = _ap(model, batch, records)
    assert metrics["bbox/AP50"] > 0.9, metrics


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_a_non_positive_scale_factor_is_refused(factor):
    from raydet.models.roi_heads.double_roi_head import DoubleHeadRoIHead

    with pytest.raises(ValueError, match="reg_roi_scale_factor must be > 0"):
        DoubleHeadRoIHead(None, None, None, None, reg_roi_scale_factor=factor)
