"""MMDetection checkpoints convert onto raydet's pipelines exactly, and back (``raydet convert --from mmdet``).

The reference is MMDetection's own model definitions: ``tests/fixtures/interop/mmdet/<config>.json`` lists the
``[key, shape]`` of ``model.state_dict()`` and the parameter count of each model as MMDetection 3.3.0 builds it from
its config (written once by ``tests/fixtures/interop/make_mmdet_fixtures.py``; MMDetection is not needed here). Each
test fills those keys with random tensors (fixed seed) and checks where they land against the correspondences
written by hand below (MMDetection's mmcv ``ConvModule`` nesting, FPN extra levels, the box head's FCs, an RPN's
``bbox_head``, SSD's prior order), that nothing is left over or missing, that the result loads strictly, that the
parameter count is MMDetection's, and that :func:`~raydet.interop.mmdet.to_mmdet` gives back exactly the same tensors.
No network.
"""
from __future__ import annotations

import functools
import json
import math
import pickle
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import raydet.models  # noqa: F401  (registers the components)
from raydet.config import load_config
from raydet.engine.checkpoint import load_checkpoint, load_model_weights
from raydet.interop import ConversionError, convert_checkpoint, convert_state_dict
from raydet.interop.convert import load_source, source_class_names
from raydet.interop.mmdet import convert_mmdet, ssd_prior_order, to_mmdet
from raydet.interop.torchvision import coco_slots

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "interop" / "mmdet"
# MMDetection config -> raydet pipeline
PIPELINES = {
    "faster-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_1x_coco.yaml",
    "mask-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_1x_coco.yaml",
    "retinanet_r50_fpn_1x_coco": ROOT / "pipelines" / "retinanet_r50_fpn_1x_coco.yaml",
    "rpn_r50_fpn_1x_coco": ROOT / "pipelines" / "rpn_r50_fpn_1x_coco.yaml",
    "ssd300_coco": ROOT / "pipelines" / "ssd300_coco.yaml",
    "ssd512_coco": ROOT / "pipelines" / "ssd512_coco.yaml",
    "fsaf_r50_fpn_1x_coco": ROOT / "pipelines" / "fsaf_r50_fpn_1x_coco.yaml",
    "fcos_r50-caffe_fpn_gn-head_1x_coco": ROOT / "pipelines" / "fcos_r50_caffe_fpn_gn-head_1x_coco.yaml",
    "retinanet_r50_fpn_ghm-1x_coco": ROOT / "pipelines" / "retinanet_ghm_r50_fpn_1x_coco.yaml",
    "ga-retinanet_r50-caffe_fpn_1x_coco": ROOT / "pipelines" / "ga_retinanet_r50_caffe_fpn_1x_coco.yaml",
    "ga-rpn_r50-caffe_fpn_1x_coco": ROOT / "pipelines" / "ga_rpn_r50_caffe_fpn_1x_coco.yaml",
    "ga-faster-rcnn_r50-caffe_fpn_1x_coco": ROOT / "pipelines" / "ga_faster_r50_caffe_fpn_1x_coco.yaml",
    "libra-faster-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "libra_faster_rcnn_r50_fpn_1x_coco.yaml",
    "libra-retinanet_r50_fpn_1x_coco": ROOT / "pipelines" / "libra_retinanet_r50_fpn_1x_coco.yaml",
    "faster-rcnn_r50_fpn_ohem_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_ohem_1x_coco.yaml",
    "fast-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "fast_rcnn_r50_fpn_1x_coco.yaml",
    "dh-faster-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "dh_faster_rcnn_r50_fpn_1x_coco.yaml",
    "grid-rcnn_r50_fpn_gn-head_2x_coco": ROOT / "pipelines" / "grid_rcnn_r50_fpn_gn-head_2x_coco.yaml",
    "ms-rcnn_r50-caffe_fpn_1x_coco": ROOT / "pipelines" / "ms_rcnn_r50_caffe_fpn_1x_coco.yaml",
    "cascade-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "cascade_rcnn_r50_fpn_1x_coco.yaml",
    "cascade-rcnn_r50_fpn_20e_coco": ROOT / "pipelines" / "cascade_rcnn_r50_fpn_20e_coco.yaml",
    "cascade-mask-rcnn_r50_fpn_1x_coco": ROOT / "pipelines" / "cascade_mask_rcnn_r50_fpn_1x_coco.yaml",
    "htc_r50_fpn_1x_coco": ROOT / "pipelines" / "htc_r50_fpn_1x_coco.yaml",
    "htc-without-semantic_r50_fpn_1x_coco": ROOT / "pipelines" / "htc_without_semantic_r50_fpn_1x_coco.yaml",
    "mask-rcnn_r50-gcb-r4-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_gcb_r4_c3-c5_1x_coco.yaml",
    "mask-rcnn_r50-gcb-r16-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_gcb_r16_c3-c5_1x_coco.yaml",
    "faster-rcnn_r50-attn1111_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_attention_1111_1x_coco.yaml",
    "faster-rcnn_r50-attn0010_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_attention_0010_1x_coco.yaml",
    "faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_dconv_c3-c5_1x_coco.yaml",
    "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_mdconv_c3-c5_1x_coco.yaml",
    "mask-rcnn_r50_fpn_gn-ws-all_2x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_gn_ws-all_2x_coco.yaml",
    "faster-rcnn_hrnetv2p-w18-1x_coco": ROOT / "pipelines" / "faster_rcnn_hrnetv2p_w18_1x_coco.yaml",
    "mask-rcnn_hrnetv2p-w18-1x_coco": ROOT / "pipelines" / "mask_rcnn_hrnetv2p_w18_1x_coco.yaml",
    "faster-rcnn_hrnetv2p-w32-1x_coco": ROOT / "pipelines" / "faster_rcnn_hrnetv2p_w32_1x_coco.yaml",
    "faster-rcnn_hrnetv2p-w40-1x_coco": ROOT / "pipelines" / "faster_rcnn_hrnetv2p_w40_1x_coco.yaml",
    "mask-rcnn_hrnetv2p-w32-1x_coco": ROOT / "pipelines" / "mask_rcnn_hrnetv2p_w32_1x_coco.yaml",
    "cascade-rcnn_hrnetv2p-w32-20e_coco": ROOT / "pipelines" / "cascade_rcnn_hrnetv2p_w32_20e_coco.yaml",
    "cascade-mask-rcnn_hrnetv2p-w32_20e_coco": ROOT / "pipelines" / "cascade_mask_rcnn_hrnetv2p_w32_20e_coco.yaml",
    "faster-rcnn_r50_fpn_gn-ws-all_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_gn_ws-all_1x_coco.yaml",
    "mask-rcnn_x101-32x4d_fpn_gn-ws-all_2x_coco":
        ROOT / "pipelines" / "mask_rcnn_x101_32x4d_fpn_gn_ws-all_2x_coco.yaml",
    "faster-rcnn_r50-scratch_fpn_gn-all_6x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_gn_scratch_6x_coco.yaml",
    "mask-rcnn_r50-scratch_fpn_gn-all_6x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_gn_scratch_6x_coco.yaml",
    "faster-rcnn_r50-attn1111-dcn_fpn_1x_coco":
        ROOT / "pipelines" / "faster_rcnn_r50_fpn_attention_1111_dcn_1x_coco.yaml",
    "faster-rcnn_r50-attn0010-dcn_fpn_1x_coco":
        ROOT / "pipelines" / "faster_rcnn_r50_fpn_attention_0010_dcn_1x_coco.yaml",
    "mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "mask_rcnn_r50_fpn_dconv_c3-c5_1x_coco.yaml",
    "cascade-rcnn_r50-dconv-c3-c5_fpn_1x_coco": ROOT / "pipelines" / "cascade_rcnn_r50_fpn_dconv_c3-c5_1x_coco.yaml",
    "faster-rcnn_r50_fpn_dpool_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_dpool_1x_coco.yaml",
    "faster-rcnn_r50_fpn_mdpool_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_fpn_mdpool_1x_coco.yaml",
    "faster-rcnn_r50-caffe_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r50_caffe_fpn_1x_coco.yaml",
    "faster-rcnn_r101_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_r101_fpn_1x_coco.yaml",
    "faster-rcnn_x101-32x4d_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_x101_32x4d_fpn_1x_coco.yaml",
    "faster-rcnn_x101-64x4d_fpn_1x_coco": ROOT / "pipelines" / "faster_rcnn_x101_64x4d_fpn_1x_coco.yaml",
    "cascade-mask-rcnn_x101-64x4d_fpn_1x_coco": ROOT / "pipelines" / "cascade_mask_rcnn_x101_64x4d_fpn_1x_coco.yaml",
}
_, COCO_NAMES, _ = coco_slots()

# MMDetection key -> raydet key, by hand from the two layouts (mmcv ConvModule .conv/.bn; raydet Sequentials with
# ReLUs between: FC i -> 2 i, tower conv i -> 2 i; FPN levels past the L lateral convs -> extra_convs).
BACKBONE = {"backbone.layer4.2.bn3.running_var": "backbone.layer4.2.bn3.running_var",
            "backbone.layer1.0.downsample.1.num_batches_tracked": "backbone.layer1.0.downsample.1.num_batches_tracked"}
NECK = {"neck.lateral_convs.0.conv.weight": "neck.lateral_convs.0.0.weight",
        "neck.fpn_convs.2.conv.bias": "neck.fpn_convs.2.0.bias"}
# Cascades: one box (and mask) head per stage, ``bbox_head.<t>.`` / ``mask_head.<t>.``; HTC's conv_res (stages 1, 2)
CASCADE = {**BACKBONE, **NECK,
           "roi_head.bbox_head.0.shared_fcs.1.weight": "roi_head.bbox_head.0.shared_fcs.2.weight",
           "roi_head.bbox_head.2.shared_fcs.0.bias": "roi_head.bbox_head.2.shared_fcs.0.bias",
           "roi_head.bbox_head.1.fc_cls.weight": "roi_head.bbox_head.1.fc_cls.weight",
           "roi_head.bbox_head.2.fc_reg.bias": "roi_head.bbox_head.2.fc_reg.bias"}
CASCADE_MASK = {"roi_head.mask_head.0.convs.0.conv.weight": "roi_head.mask_head.0.convs.0.weight",
                "roi_head.mask_head.2.convs.3.conv.bias": "roi_head.mask_head.2.convs.6.bias",
                "roi_head.mask_head.1.upsample.weight": "roi_head.mask_head.1.upsample.weight",
                "roi_head.mask_head.2.conv_logits.bias": "roi_head.mask_head.2.conv_logits.bias"}
HTC_FLOW = {"roi_head.mask_head.1.conv_res.conv.weight": "roi_head.mask_head.1.conv_res.0.weight",
            "roi_head.mask_head.2.conv_res.conv.bias": "roi_head.mask_head.2.conv_res.0.bias"}
# HRNet keeps MMDetection's names (fuse layers, transitions); HRFPN's ConvModules: reduction_conv and one fpn_conv
# per level (no laterals, so no level is an extra conv)
HRNET = {"backbone.transition1.1.0.0.weight": "backbone.transition1.1.0.0.weight",
         "backbone.stage4.2.fuse_layers.3.0.2.1.running_var": "backbone.stage4.2.fuse_layers.3.0.2.1.running_var",
         "backbone.stage3.3.branches.2.3.bn2.num_batches_tracked":
             "backbone.stage3.3.branches.2.3.bn2.num_batches_tracked",
         "neck.reduction_conv.conv.weight": "neck.reduction_conv.0.weight",
         "neck.fpn_convs.0.conv.bias": "neck.fpn_convs.0.0.bias",
         "neck.fpn_convs.4.conv.weight": "neck.fpn_convs.4.0.weight",
         "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"}
# GN everywhere (GN+WS, from scratch): a GN ResNet's norms gn1..gn3 -> bn1..bn3; ConvModule towers with GN (FPN
# lateral / output convs: conv, GN; the box head's 4 shared convs and the mask head's: conv i -> 3 i, its GN -> 3 i + 1)
GN_ALL = {"backbone.conv1.weight": "backbone.conv1.weight",
          "backbone.gn1.bias": "backbone.bn1.bias",
          "backbone.layer1.0.gn3.weight": "backbone.layer1.0.bn3.weight",
          "backbone.layer4.2.gn2.bias": "backbone.layer4.2.bn2.bias",
          "backbone.layer2.0.downsample.1.weight": "backbone.layer2.0.downsample.1.weight",
          "neck.lateral_convs.1.gn.weight": "neck.lateral_convs.1.1.weight",
          "neck.fpn_convs.0.gn.bias": "neck.fpn_convs.0.1.bias",
          "roi_head.bbox_head.shared_convs.1.conv.weight": "roi_head.bbox_head.shared_convs.3.weight",
          "roi_head.bbox_head.shared_convs.3.gn.bias": "roi_head.bbox_head.shared_convs.10.bias",
          "roi_head.bbox_head.fc_cls.weight": "roi_head.bbox_head.fc_cls.weight"}
GN_ALL_MASK = {"roi_head.mask_head.convs.3.conv.weight": "roi_head.mask_head.convs.9.weight",
               "roi_head.mask_head.convs.0.gn.weight": "roi_head.mask_head.convs.1.weight",
               "roi_head.mask_head.conv_logits.bias": "roi_head.mask_head.conv_logits.bias"}
# deformable RoI pooling: one DeformRoIPoolPack / ModulatedDeformRoIPoolPack per level, keeping mmcv's names (the
# offset FCs 0, 2, 4 with ReLUs between; the modulation's mask FCs 0, 2)
DPOOL = {**BACKBONE, **NECK,
         "roi_head.bbox_roi_extractor.roi_layers.0.offset_fc.0.weight":
             "roi_head.bbox_roi_extractor.roi_layers.0.offset_fc.0.weight",
         "roi_head.bbox_roi_extractor.roi_layers.3.offset_fc.4.bias":
             "roi_head.bbox_roi_extractor.roi_layers.3.offset_fc.4.bias",
         "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"}
# the deeper ResNets / ResNeXts keep the bottleneck names (ResNet-101's third stage: 23 blocks; grouped conv2)
DEEP = {**BACKBONE, **NECK,
        "backbone.layer3.22.conv2.weight": "backbone.layer3.22.conv2.weight",
        "backbone.layer3.22.bn3.running_mean": "backbone.layer3.22.bn3.running_mean"}
EXPECTED = {
    "faster-rcnn_r50_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "neck.lateral_convs.3.conv.weight": "neck.lateral_convs.3.0.weight",
        "rpn_head.rpn_conv.weight": "rpn_head.rpn_conv.weight",
        "roi_head.bbox_head.shared_fcs.0.weight": "roi_head.bbox_head.shared_fcs.0.weight",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight",
        "roi_head.bbox_head.fc_cls.weight": "roi_head.bbox_head.fc_cls.weight"},
    "mask-rcnn_r50_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "roi_head.bbox_head.shared_fcs.1.bias": "roi_head.bbox_head.shared_fcs.2.bias",
        "roi_head.mask_head.convs.0.conv.weight": "roi_head.mask_head.convs.0.weight",
        "roi_head.mask_head.convs.3.conv.bias": "roi_head.mask_head.convs.6.bias",
        "roi_head.mask_head.upsample.weight": "roi_head.mask_head.upsample.weight",
        "roi_head.mask_head.conv_logits.bias": "roi_head.mask_head.conv_logits.bias"},
    "retinanet_r50_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "neck.fpn_convs.3.conv.weight": "neck.extra_convs.0.0.weight",  # P6 from C5 (on_input), 3 lateral convs
        "neck.fpn_convs.4.conv.bias": "neck.extra_convs.1.0.bias",
        "bbox_head.cls_convs.1.conv.weight": "bbox_head.cls_convs.2.weight",
        "bbox_head.reg_convs.3.conv.bias": "bbox_head.reg_convs.6.bias",
        "bbox_head.retina_cls.weight": "bbox_head.retina_cls.weight"},
    "rpn_r50_fpn_1x_coco": {  # MMDetection 3.x names an RPN detector's head bbox_head
        **BACKBONE, **NECK,
        "bbox_head.rpn_conv.weight": "rpn_head.rpn_conv.weight",
        "bbox_head.rpn_reg.bias": "rpn_head.rpn_reg.bias"},
    # SSD: VGG and SSDNeck keep their names; the head convs change their prior order (test_ssd_prior_order_...)
    "ssd300_coco": {"backbone.features.0.weight": "backbone.features.0.weight",
                    "backbone.features.33.bias": "backbone.features.33.bias",  # fc7
                    "neck.l2_norm.weight": "neck.l2_norm.weight",
                    "neck.extra_layers.3.1.conv.bias": "neck.extra_layers.3.1.conv.bias"},
    "ssd512_coco": {"neck.extra_layers.4.1.conv.weight": "neck.extra_layers.4.1.conv.weight"},  # the 4x4 conv
    "fsaf_r50_fpn_1x_coco": {  # RetinaNet's towers and FPN, one prior per location
        **BACKBONE, **NECK,
        "neck.fpn_convs.3.conv.weight": "neck.extra_convs.0.0.weight",
        "bbox_head.cls_convs.3.conv.weight": "bbox_head.cls_convs.6.weight",
        "bbox_head.retina_reg.bias": "bbox_head.retina_reg.bias"},
    "fcos_r50-caffe_fpn_gn-head_1x_coco": {  # GN towers: conv i -> 3 i, its GN -> 3 i + 1 (conv, GN, ReLU)
        **BACKBONE, **NECK,
        "neck.fpn_convs.4.conv.weight": "neck.extra_convs.1.0.weight",  # P7 from P6 (P6 from P5's output)
        "bbox_head.cls_convs.0.conv.weight": "bbox_head.cls_convs.0.weight",
        "bbox_head.cls_convs.1.gn.weight": "bbox_head.cls_convs.4.weight",
        "bbox_head.reg_convs.3.conv.weight": "bbox_head.reg_convs.9.weight",
        "bbox_head.reg_convs.3.gn.bias": "bbox_head.reg_convs.10.bias",
        "bbox_head.conv_centerness.bias": "bbox_head.conv_centerness.bias",
        "bbox_head.scales.4.scale": "bbox_head.scales.4.scale"},
    "retinanet_r50_fpn_ghm-1x_coco": {  # the GHM losses' bins and running counts are buffers on both sides
        **BACKBONE, **NECK,
        "bbox_head.loss_cls.edges": "bbox_head.loss_cls.edges",
        "bbox_head.loss_cls.acc_sum": "bbox_head.loss_cls.acc_sum",
        "bbox_head.loss_bbox.acc_sum": "bbox_head.loss_bbox.acc_sum",
        "bbox_head.reg_convs.2.conv.bias": "bbox_head.reg_convs.4.bias"},
    "ga-retinanet_r50-caffe_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "bbox_head.cls_convs.2.conv.weight": "bbox_head.cls_convs.4.weight",
        "bbox_head.conv_shape.bias": "bbox_head.conv_shape.bias",
        "bbox_head.feature_adaption_cls.conv_offset.weight": "bbox_head.feature_adaption_cls.conv_offset.weight",
        "bbox_head.feature_adaption_reg.conv_adaption.weight": "bbox_head.feature_adaption_reg.conv_adaption.weight",
        "bbox_head.retina_cls.bias": "bbox_head.retina_cls.bias"},
    "ga-rpn_r50-caffe_fpn_1x_coco": {  # an RPN detector: MMDetection 3.x's bbox_head
        **BACKBONE, **NECK,
        "bbox_head.rpn_conv.bias": "rpn_head.rpn_conv.bias",
        "bbox_head.conv_loc.weight": "rpn_head.conv_loc.weight",
        "bbox_head.feature_adaption.conv_adaption.weight": "rpn_head.feature_adaption.conv_adaption.weight",
        "bbox_head.conv_reg.weight": "rpn_head.conv_reg.weight"},
    "ga-faster-rcnn_r50-caffe_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "rpn_head.conv_shape.weight": "rpn_head.conv_shape.weight",
        "rpn_head.conv_cls.bias": "rpn_head.conv_cls.bias",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight",
        "roi_head.bbox_head.fc_reg.bias": "roi_head.bbox_head.fc_reg.bias"},
    "dh-faster-rcnn_r50_fpn_1x_coco": {  # Double-Head's layers keep MMDetection's names (mmcv ConvModule included)
        **BACKBONE, **NECK,
        "roi_head.bbox_head.res_block.conv1.conv.weight": "roi_head.bbox_head.res_block.conv1.conv.weight",
        "roi_head.bbox_head.res_block.conv_identity.bn.running_var":
            "roi_head.bbox_head.res_block.conv_identity.bn.running_var",
        "roi_head.bbox_head.conv_branch.3.bn3.bias": "roi_head.bbox_head.conv_branch.3.bn3.bias",
        "roi_head.bbox_head.fc_branch.1.weight": "roi_head.bbox_head.fc_branch.1.weight",
        "roi_head.bbox_head.fc_reg.weight": "roi_head.bbox_head.fc_reg.weight"},
    "grid-rcnn_r50_fpn_gn-head_2x_coco": {  # the grid head keeps MMDetection's names; no fc_reg
        **BACKBONE, **NECK,
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight",
        "roi_head.grid_head.convs.7.gn.weight": "roi_head.grid_head.convs.7.gn.weight",
        "roi_head.grid_head.deconv2.weight": "roi_head.grid_head.deconv2.weight",
        "roi_head.grid_head.forder_trans.4.3.0.weight": "roi_head.grid_head.forder_trans.4.3.0.weight",
        "roi_head.grid_head.sorder_trans.8.1.1.bias": "roi_head.grid_head.sorder_trans.8.1.1.bias"},
    "libra-faster-rcnn_r50_fpn_1x_coco": {  # neck = [FPN, BFP]: neck.0 the FPN's rules, neck.1 the BFP
        **BACKBONE,
        "neck.0.lateral_convs.0.conv.weight": "neck.0.lateral_convs.0.0.weight",
        "neck.0.fpn_convs.3.conv.bias": "neck.0.fpn_convs.3.0.bias",
        "neck.1.refine.g.conv.weight": "neck.1.refine.g.weight",
        "neck.1.refine.theta.conv.bias": "neck.1.refine.theta.bias",
        "neck.1.refine.phi.conv.weight": "neck.1.refine.phi.weight",
        "neck.1.refine.conv_out.conv.weight": "neck.1.refine.conv_out.weight",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"},
    "libra-retinanet_r50_fpn_1x_coco": {
        **BACKBONE,
        "neck.0.lateral_convs.2.conv.weight": "neck.0.lateral_convs.2.0.weight",
        "neck.0.fpn_convs.3.conv.weight": "neck.0.extra_convs.0.0.weight",  # P6 from C5 (on_input), 3 laterals
        "neck.0.fpn_convs.4.conv.bias": "neck.0.extra_convs.1.0.bias",
        "neck.1.refine.conv_out.conv.bias": "neck.1.refine.conv_out.bias",
        "bbox_head.cls_convs.1.conv.weight": "bbox_head.cls_convs.2.weight"},
    "faster-rcnn_r50_fpn_ohem_1x_coco": {  # the sampler has no parameters: Faster R-CNN's tensors
        **BACKBONE, **NECK,
        "roi_head.bbox_head.shared_fcs.1.bias": "roi_head.bbox_head.shared_fcs.2.bias",
        "roi_head.bbox_head.fc_cls.weight": "roi_head.bbox_head.fc_cls.weight"},
    "fast-rcnn_r50_fpn_1x_coco": {  # Faster R-CNN's layout without rpn_head
        **BACKBONE, **NECK,
        "roi_head.bbox_head.shared_fcs.0.bias": "roi_head.bbox_head.shared_fcs.0.bias",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight",
        "roi_head.bbox_head.fc_reg.weight": "roi_head.bbox_head.fc_reg.weight"},
    "ms-rcnn_r50-caffe_fpn_1x_coco": {  # Mask R-CNN's layout plus the MaskIoU head (plain convs and linears)
        **BACKBONE, **NECK,
        "roi_head.mask_head.convs.2.conv.weight": "roi_head.mask_head.convs.4.weight",
        "roi_head.mask_iou_head.convs.0.weight": "roi_head.mask_iou_head.convs.0.weight",
        "roi_head.mask_iou_head.convs.3.bias": "roi_head.mask_iou_head.convs.3.bias",
        "roi_head.mask_iou_head.fcs.1.weight": "roi_head.mask_iou_head.fcs.1.weight",
        "roi_head.mask_iou_head.fc_mask_iou.bias": "roi_head.mask_iou_head.fc_mask_iou.bias"},
    "cascade-rcnn_r50_fpn_1x_coco": CASCADE,
    "cascade-rcnn_r50_fpn_20e_coco": CASCADE,
    "cascade-mask-rcnn_r50_fpn_1x_coco": {**CASCADE, **CASCADE_MASK},
    "htc-without-semantic_r50_fpn_1x_coco": {**CASCADE, **CASCADE_MASK, **HTC_FLOW},
    # DCN / DCNv2 in c3-c5: mmcv's DeformConv2dPack / ModulatedDeformConv2dPack keep the bottleneck's ``conv2``
    # name, with their ``conv_offset`` inside (offsets; DCNv2: offsets and masks), as raydet's
    "faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer2.0.conv2.weight": "backbone.layer2.0.conv2.weight",
        "backbone.layer2.0.conv2.conv_offset.weight": "backbone.layer2.0.conv2.conv_offset.weight",
        "backbone.layer4.2.conv2.conv_offset.bias": "backbone.layer4.2.conv2.conv_offset.bias",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"},
    "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.5.conv2.weight": "backbone.layer3.5.conv2.weight",
        "backbone.layer3.5.conv2.conv_offset.weight": "backbone.layer3.5.conv2.conv_offset.weight",
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"},
    "htc_r50_fpn_1x_coco": {  # the semantic head's ConvModules (1x1 + ReLU) and its 3x3 tower
        **CASCADE, **CASCADE_MASK, **HTC_FLOW,
        "roi_head.semantic_head.lateral_convs.4.conv.weight": "roi_head.semantic_head.lateral_convs.4.0.weight",
        "roi_head.semantic_head.convs.3.conv.bias": "roi_head.semantic_head.convs.6.bias",
        "roi_head.semantic_head.conv_embedding.conv.weight": "roi_head.semantic_head.conv_embedding.0.weight",
        "roi_head.semantic_head.conv_logits.bias": "roi_head.semantic_head.conv_logits.bias"},
    "mask-rcnn_r50_fpn_gn-ws-all_2x_coco": {  # ConvWS keeps nn.Conv2d's names; a GN ResNet's norms are gn1..gn3
        "backbone.conv1.weight": "backbone.conv1.weight",
        "backbone.gn1.bias": "backbone.bn1.bias",
        "backbone.layer1.0.gn3.weight": "backbone.layer1.0.bn3.weight",
        "backbone.layer4.2.gn2.bias": "backbone.layer4.2.bn2.bias",
        "backbone.layer2.0.downsample.1.weight": "backbone.layer2.0.downsample.1.weight",  # its GN
        "neck.lateral_convs.2.gn.weight": "neck.lateral_convs.2.1.weight",
        "neck.fpn_convs.3.conv.weight": "neck.fpn_convs.3.0.weight",
        "rpn_head.rpn_conv.bias": "rpn_head.rpn_conv.bias",  # MMDetection's RPN conv stays plain (with a bias)
        "roi_head.bbox_head.shared_convs.0.conv.weight": "roi_head.bbox_head.shared_convs.0.weight",  # conv, GN, ReLU
        "roi_head.bbox_head.shared_convs.3.gn.bias": "roi_head.bbox_head.shared_convs.10.bias",
        "roi_head.bbox_head.shared_fcs.0.weight": "roi_head.bbox_head.shared_fcs.0.weight",
        "roi_head.mask_head.convs.1.conv.weight": "roi_head.mask_head.convs.3.weight",
        "roi_head.mask_head.convs.3.gn.weight": "roi_head.mask_head.convs.10.weight"},
    # backbone plugins keep MMDetection's names: <block>.context_block / <block>.gen_attention_block (mmcv's layers)
    "mask-rcnn_r50-gcb-r4-c3-c5_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer2.0.context_block.conv_mask.weight": "backbone.layer2.0.context_block.conv_mask.weight",
        "backbone.layer3.5.context_block.channel_add_conv.1.weight":  # its LayerNorm
            "backbone.layer3.5.context_block.channel_add_conv.1.weight",
        "backbone.layer4.2.context_block.channel_add_conv.3.bias":
            "backbone.layer4.2.context_block.channel_add_conv.3.bias",
        "roi_head.mask_head.conv_logits.bias": "roi_head.mask_head.conv_logits.bias"},
    "mask-rcnn_r50-gcb-r16-c3-c5_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.0.context_block.channel_add_conv.0.weight":
            "backbone.layer3.0.context_block.channel_add_conv.0.weight"},
    "faster-rcnn_r50-attn1111_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.0.gen_attention_block.query_conv.weight":
            "backbone.layer3.0.gen_attention_block.query_conv.weight",
        "backbone.layer4.2.gen_attention_block.appr_geom_fc_y.weight":
            "backbone.layer4.2.gen_attention_block.appr_geom_fc_y.weight",
        "backbone.layer4.1.gen_attention_block.geom_bias": "backbone.layer4.1.gen_attention_block.geom_bias",
        "backbone.layer3.4.gen_attention_block.gamma": "backbone.layer3.4.gen_attention_block.gamma"},
    "faster-rcnn_r50-attn0010_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.2.gen_attention_block.appr_bias": "backbone.layer3.2.gen_attention_block.appr_bias",
        "backbone.layer4.0.gen_attention_block.proj_conv.bias": "backbone.layer4.0.gen_attention_block.proj_conv.bias"},
    "faster-rcnn_hrnetv2p-w18-1x_coco": HRNET,
    "mask-rcnn_hrnetv2p-w18-1x_coco": {
        **HRNET,
        "roi_head.mask_head.convs.3.conv.bias": "roi_head.mask_head.convs.6.bias",
        "roi_head.mask_head.conv_logits.weight": "roi_head.mask_head.conv_logits.weight"},
    "faster-rcnn_hrnetv2p-w32-1x_coco": HRNET,
    "faster-rcnn_hrnetv2p-w40-1x_coco": HRNET,
    "mask-rcnn_hrnetv2p-w32-1x_coco": {
        **HRNET,
        "roi_head.mask_head.convs.1.conv.weight": "roi_head.mask_head.convs.2.weight",
        "roi_head.mask_head.upsample.bias": "roi_head.mask_head.upsample.bias"},
    "cascade-rcnn_hrnetv2p-w32-20e_coco": {
        **{k: v for k, v in HRNET.items() if not k.startswith("roi_head.")},
        "roi_head.bbox_head.0.shared_fcs.1.weight": "roi_head.bbox_head.0.shared_fcs.2.weight",
        "roi_head.bbox_head.2.fc_reg.bias": "roi_head.bbox_head.2.fc_reg.bias"},
    "cascade-mask-rcnn_hrnetv2p-w32_20e_coco": {
        **{k: v for k, v in HRNET.items() if not k.startswith("roi_head.")}, **CASCADE_MASK,
        "roi_head.bbox_head.1.shared_fcs.1.bias": "roi_head.bbox_head.1.shared_fcs.2.bias"},
    "faster-rcnn_r50_fpn_gn-ws-all_1x_coco": GN_ALL,
    "mask-rcnn_x101-32x4d_fpn_gn-ws-all_2x_coco": {
        **GN_ALL, **GN_ALL_MASK,
        "backbone.layer3.22.conv2.weight": "backbone.layer3.22.conv2.weight",  # grouped (32 x 4d)
        "backbone.layer3.22.gn2.weight": "backbone.layer3.22.bn2.weight"},
    "faster-rcnn_r50-scratch_fpn_gn-all_6x_coco": GN_ALL,
    "mask-rcnn_r50-scratch_fpn_gn-all_6x_coco": {**GN_ALL, **GN_ALL_MASK},
    # attention plugins and DCN in c3-c5 together: both keep MMDetection's names inside a bottleneck
    "faster-rcnn_r50-attn1111-dcn_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.0.gen_attention_block.query_conv.weight":
            "backbone.layer3.0.gen_attention_block.query_conv.weight",
        "backbone.layer3.0.conv2.conv_offset.weight": "backbone.layer3.0.conv2.conv_offset.weight",
        "backbone.layer4.2.conv2.weight": "backbone.layer4.2.conv2.weight",
        "backbone.layer4.2.conv2.conv_offset.bias": "backbone.layer4.2.conv2.conv_offset.bias"},
    "faster-rcnn_r50-attn0010-dcn_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer4.0.gen_attention_block.key_conv.weight":
            "backbone.layer4.0.gen_attention_block.key_conv.weight",
        "backbone.layer2.0.conv2.conv_offset.weight": "backbone.layer2.0.conv2.conv_offset.weight"},
    "mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco": {
        **BACKBONE, **NECK,
        "backbone.layer3.0.conv2.conv_offset.weight": "backbone.layer3.0.conv2.conv_offset.weight",
        "roi_head.mask_head.convs.3.conv.bias": "roi_head.mask_head.convs.6.bias"},
    "cascade-rcnn_r50-dconv-c3-c5_fpn_1x_coco": {
        **CASCADE,
        "backbone.layer4.1.conv2.conv_offset.bias": "backbone.layer4.1.conv2.conv_offset.bias"},
    "faster-rcnn_r50_fpn_dpool_1x_coco": DPOOL,
    "faster-rcnn_r50_fpn_mdpool_1x_coco": {
        **DPOOL,
        "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.2.weight":
            "roi_head.bbox_roi_extractor.roi_layers.2.mask_fc.2.weight"},
    "faster-rcnn_r50-caffe_fpn_1x_coco": {  # the caffe style moves the stride to conv1: the same tensors
        **BACKBONE, **NECK,
        "roi_head.bbox_head.shared_fcs.1.weight": "roi_head.bbox_head.shared_fcs.2.weight"},
    "faster-rcnn_r101_fpn_1x_coco": DEEP,
    "faster-rcnn_x101-32x4d_fpn_1x_coco": DEEP,
    "faster-rcnn_x101-64x4d_fpn_1x_coco": DEEP,
    "cascade-mask-rcnn_x101-64x4d_fpn_1x_coco": {**DEEP, **CASCADE, **CASCADE_MASK},
}


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@functools.lru_cache(maxsize=None)
def _random_values() -> torch.Tensor:
    """Random values (fixed seed) for the largest fixture; each state dict takes views of consecutive slices, so every
    tensor of a state dict has its own values, at the cost of one draw."""
    size = max(sum(torch.Size(s).numel() for _, s in _fixture(name)["state_dict"]) for name in PIPELINES)
    return torch.randn(size, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _random_state(name: str) -> dict[str, torch.Tensor]:
    """The fixture's keys and shapes filled with random values (BatchNorm counters: distinct integers); views, not
    to be modified."""
    values, offset, state = _random_values(), 0, {}
    for i, (key, shape) in enumerate(_fixture(name)["state_dict"]):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + i)
            continue
        n = torch.Size(shape).numel()
        state[key] = values[offset:offset + n].view(shape)
        offset += n
    return state


def _model(name: str, overrides=(), materialize: bool = False) -> torch.nn.Module:
    """The raydet pipeline's model on the meta device (keys and shapes, no storage: the R-50 models build in a
    fraction of a second); ``materialize`` gives it uninitialised CPU storage to load a checkpoint into."""
    with torch.device("meta"):
        model = load_config(PIPELINES[name], list(overrides)).build("model")
    return model.to_empty(device="cpu") if materialize else model


@functools.lru_cache(maxsize=None)
def _pipeline_model(name: str) -> torch.nn.Module:
    """``_model(name)``, each pipeline built once for this module (the round-trip test loads its converted tensors
    into it; names, shapes and parameter counts stay)."""
    return _model(name)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly the same tensor: the same memory seen the same way (a tensor passed on unchanged; no need to compare
    its values), or equal values of the same dtype."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride()) or torch.equal(a, b)


@pytest.fixture(scope="module", autouse=True)
def _free_random_states():
    yield
    _random_state.cache_clear()
    _random_values.cache_clear()
    _pipeline_model.cache_clear()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_mmdet_state_dict_converts_exactly_and_round_trips(name):
    model = _pipeline_model(name)
    src = _random_state(name)
    assert _fixture(name)["mmdet_version"] == "3.3.0"
    assert _num_params(model) == _fixture(name)["num_params"]
    mapped, report = convert_mmdet(src, model, f"{name}.pth")
    assert len(report.placed) == len(src) and not report.dropped  # zero unplaced (else ConversionError)
    assert not report.filled  # every model tensor from the source
    assert list(mapped) == list(model.state_dict())  # zero missing, in the model's order
    for theirs, ours in EXPECTED[name].items():
        assert _identical(mapped[ours], src[theirs]), theirs
    model.load_state_dict(mapped, strict=True, assign=True)  # the model now holds the converted tensors
    back = to_mmdet(model.state_dict())
    assert sorted(back) == sorted(src)
    assert all(_identical(back[k], src[k]) for k in src)


def test_mmdet2_rpn_names_and_frozen_bn_counters():
    """MMDetection 2.x names an RPN's head ``rpn_head``; a FrozenBN pipeline drops the 53 BatchNorm counters of the
    ResNet-50 (1 stem + 3/4/6/3 blocks x 3 + 4 downsample BNs = 53) and reports them."""
    src3 = _random_state("rpn_r50_fpn_1x_coco")
    src2 = {k.replace("bbox_head.", "rpn_head.", 1): v for k, v in src3.items()}
    model = _model("rpn_r50_fpn_1x_coco", ["model.backbone.norm_cfg={type: FrozenBN}"])
    mapped, report = convert_mmdet(src2, model, "rpn_2x.pth")
    assert len(report.dropped) == 1 + 3 * (3 + 4 + 6 + 3) + 4 == 53
    assert all(p.source.endswith("num_batches_tracked") for p in report.dropped)
    assert torch.equal(mapped["rpn_head.rpn_cls.weight"], src3["bbox_head.rpn_cls.weight"])
    back = to_mmdet(mapped, mmdet_version=2)
    assert sorted(back) == sorted(k for k in src2 if not k.endswith("num_batches_tracked"))
    assert "rpn_head.rpn_cls.weight" in back and "bbox_head.rpn_cls.weight" in to_mmdet(mapped)


def test_gn_conv_towers_take_mmcv_convmodule_names():
    """mmcv's ``ConvModule`` with GN names its layers ``.conv`` / ``.gn`` (no conv bias): MMDetection's FCOS head
    (the fixture of ``fcos_r50-caffe_fpn_gn-head_1x_coco``) has the towers of a raydet RetinaHead with GN."""
    reference = sorted((k, s) for k, s in _fixture("fcos_r50-caffe_fpn_gn-head_1x_coco")["state_dict"]
                       if re.match(r"bbox_head\.(cls|reg)_convs\.", k))
    assert len(reference) == 2 * 4 * 3
    model = _model("retinanet_r50_fpn_1x_coco", ["model.bbox_head.norm_cfg={type: GN, num_groups: 32}"])
    values, offset, state = _random_values(), 0, {}
    for key, tensor in model.state_dict().items():  # random values: views of consecutive slices
        state[key] = values[offset:offset + tensor.numel()].view(tensor.shape) if tensor.is_floating_point() \
            else torch.tensor(7)
        offset += tensor.numel()
    names = to_mmdet(state)
    assert sorted((k, list(v.shape)) for k, v in names.items() if re.match(r"bbox_head\.(cls|reg)_convs\.", k)) \
        == reference
    mapped, _ = convert_mmdet(names, model, "gn_head.pth")  # and back: conv i -> 3 i, its GN -> 3 i + 1
    assert torch.equal(mapped["bbox_head.cls_convs.3.weight"], names["bbox_head.cls_convs.1.conv.weight"])
    assert torch.equal(mapped["bbox_head.reg_convs.10.bias"], names["bbox_head.reg_convs.3.gn.bias"])
    assert all(torch.equal(mapped[k], state[k]) for k in state)


def test_ssd_prior_order_follows_the_priors_geometry():
    """MMDetection's ``SSDAnchorGenerator`` (``scale_major=False``, as its SSD configs) orders a location's priors
    [square of side min, square of side sqrt(min max), then side-min boxes of ratio h / w = 1/2, 2 (, 1/3, 3)];
    raydet's puts the sqrt(min max) square last. With MMDetection's priors written out by hand for SSD300 COCO's
    first two levels (min 21 / max 45, ratios [2]; min 45 / max 99, ratios [2, 3]), each raydet prior has the (w, h)
    of the MMDetection prior the conversion puts in its place, and the classifier's and regressor's output channels
    (81 class slots with the background last, 4 deltas) move with their priors."""
    r2, r3 = math.sqrt(2), math.sqrt(3)
    mmdet_wh = [[(21, 21), (math.sqrt(21 * 45),) * 2, (21 * r2, 21 / r2), (21 / r2, 21 * r2)],
                [(45, 45), (math.sqrt(45 * 99),) * 2, (45 * r2, 45 / r2), (45 / r2, 45 * r2), (45 * r3, 45 / r3),
                 (45 / r3, 45 * r3)]]
    assert ssd_prior_order(4) == [0, 2, 3, 1] and ssd_prior_order(6) == [0, 2, 3, 4, 5, 1]
    generator = load_config(PIPELINES["ssd300_coco"]).build("model.bbox_head.anchor_generator")
    for level, theirs in enumerate(mmdet_wh):
        base = generator.base_anchors[level]
        expected = torch.tensor([theirs[i] for i in ssd_prior_order(len(theirs))], dtype=torch.float32)
        torch.testing.assert_close(base[:, 2:] - base[:, :2], expected, rtol=0, atol=1e-4)
    # MMDetection's own test of its SSDAnchorGenerator (SSD300 COCO, scale_major=False) lists the first level's base
    # anchors (location (0, 0), centre (4, 4)) in this order
    mmdet_level1 = torch.tensor([[-6.5, -6.5, 14.5, 14.5], [-11.3704, -11.3704, 19.3704, 19.3704],
                                 [-10.8492, -3.4246, 18.8492, 11.4246], [-3.4246, -10.8492, 11.4246, 18.8492]])
    torch.testing.assert_close(generator.base_anchors[0], mmdet_level1[ssd_prior_order(4)], rtol=0, atol=1e-4)

    src = _random_state("ssd300_coco")
    mapped, report = convert_mmdet(src, _pipeline_model("ssd300_coco"), "ssd300.pth")
    cls, ours = src["bbox_head.cls_convs.0.0.weight"], mapped["bbox_head.cls_convs.0.0.weight"]
    assert torch.equal(ours[:81], cls[:81])  # prior 0 (the min square) stays
    assert torch.equal(ours[81:162], cls[162:243])  # raydet's prior 1 (ratio 1/2) is MMDetection's prior 2
    assert torch.equal(ours[243:324], cls[81:162])  # raydet's prior 3 (sqrt(min max) square) is MMDetection's 1
    reg, ours = src["bbox_head.reg_convs.1.0.bias"], mapped["bbox_head.reg_convs.1.0.bias"]
    assert torch.equal(ours[16:20], reg[20:24])  # level 2, raydet's prior 4 (ratio 3) is MMDetection's prior 5
    assert torch.equal(ours[20:24], reg[4:8])  # and its prior 5 (sqrt(min max) square) MMDetection's prior 1
    reordered = {p.source for p in report.placed if p.note}
    assert reordered == {f"bbox_head.{kind}_convs.{level}.0.{param}" for kind in ("cls", "reg") for level in range(6)
                         for param in ("weight", "bias")}


def test_ghm_checkpoint_without_loss_buffers_gets_their_initial_values():
    """MMDetection's early GHM-C / GHM-R kept ``edges`` / ``acc_sum`` as plain attributes, so the model zoo's 2020 GHM
    checkpoint lacks those 4 tensors: they are set to the losses' initial values and reported. The GHM config's GHM-C
    has 30 bins (edges k / 30, the last 1 + 1e-6), its GHM-R 10 (edges k / 10, the last 1e3), both zero counts."""
    name = "retinanet_r50_fpn_ghm-1x_coco"
    src = {k: v for k, v in _random_state(name).items() if ".loss_" not in k}
    assert len(src) == len(_fixture(name)["state_dict"]) - 4
    mapped, report = convert_mmdet(src, _pipeline_model(name), "retinanet_ghm_r50_fpn_1x_coco_20200130-a437fda3.pth")
    assert len(report.placed) == len(src) and list(mapped) == list(_pipeline_model(name).state_dict())
    assert [p.target for p in report.filled] == ["bbox_head.loss_cls.edges", "bbox_head.loss_cls.acc_sum",
                                                 "bbox_head.loss_bbox.edges", "bbox_head.loss_bbox.acc_sum"]
    cls_edges, reg_edges = [k / 30 for k in range(30)] + [1 + 1e-6], [k / 10 for k in range(10)] + [1e3]
    torch.testing.assert_close(mapped["bbox_head.loss_cls.edges"], torch.tensor(cls_edges))
    torch.testing.assert_close(mapped["bbox_head.loss_bbox.edges"], torch.tensor(reg_edges))
    assert torch.equal(mapped["bbox_head.loss_cls.acc_sum"], torch.zeros(30))
    assert torch.equal(mapped["bbox_head.loss_bbox.acc_sum"], torch.zeros(10))
    assert "bbox_head.loss_bbox.acc_sum [10] not in the source, set to its initial value" in report.summary()


def test_model_parameter_counts_equal_mmdetections():
    """Each pipeline's parameter count equals MMDetection's (the fixture's ``num_params``) and MODEL_ZOO.md's."""
    text = (ROOT / "MODEL_ZOO.md").read_text()
    section = text[text.index("## Parameter counts"):]
    for name, pipeline in PIPELINES.items():
        ours = _num_params(_pipeline_model(name))
        assert ours == _fixture(name)["num_params"], name
        row = f"| [`{pipeline.stem}`](pipelines/{pipeline.name}) | `{name}` | {ours:,} | {ours:,} |"
        assert row in section, row


def _save_mmdet_checkpoint(path: Path, state: dict, meta: dict) -> None:
    """A checkpoint file in MMDetection 3.x's layout (as ``runner.save_checkpoint`` / publish_model write it)."""
    torch.save({"meta": meta, "state_dict": state}, path)


def test_convert_checkpoint_takes_class_names_from_mmdet_meta(tmp_path):
    name = "retinanet_r50_fpn_1x_coco"
    src = _random_state(name)
    path, out = tmp_path / "retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth", tmp_path / "converted.pt"
    _save_mmdet_checkpoint(path, src, {"mmdet_version": "3.3.0", "epoch": 12,
                                       "dataset_meta": {"classes": tuple(COCO_NAMES),
                                                        "palette": [(220, 20, 60)] * 80}})
    report = convert_checkpoint(path, out, source_format="mmdet", pipeline=PIPELINES[name])
    assert report.classes == COCO_NAMES
    state = load_checkpoint(out, mmap=True)
    assert state["meta"]["classes"][:3] == ["person", "bicycle", "car"] and state["meta"]["classes"][-1] == "toothbrush"
    assert state["meta"]["cat_ids"][:3] == [1, 2, 3] and state["meta"]["cat_ids"][-1] == 90  # COCO's ids
    model = _model(name, materialize=True)
    load_model_weights(model, state["model"], str(out))  # what raydet test / infer do
    assert torch.equal(model.bbox_head.retina_reg.bias, src["bbox_head.retina_reg.bias"])
    assert torch.equal(model.neck.extra_convs[1][0].weight, src["neck.fpn_convs.4.conv.weight"])


def test_mmdet2_meta_classes_and_unimportable_pickled_objects_are_read(tmp_path):
    """2.x keeps the names in ``meta['CLASSES']``; a 3.x training checkpoint pickles MMEngine objects (its
    ``message_hub``) that load here as placeholders."""
    path = tmp_path / "latest.pth"
    torch.save({"meta": {"CLASSES": ("cat", "dog")}, "state_dict": {"w": torch.ones(2)}}, path)
    state, meta = load_source(path)
    assert source_class_names(meta) == ["cat", "dog"] and torch.equal(state["w"], torch.ones(2))

    module = types.ModuleType("fake_mmengine_logging")
    exec("class HistoryBuffer:\n    def __init__(self):\n        self.values = [1.5, 2.5]", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        hub = {"log_scalars": {"loss": module.HistoryBuffer()}}
        torch.save({"meta": {"dataset_meta": {"classes": ("a", "b", "c")}}, "state_dict": {"w": torch.zeros(3)},
                    "message_hub": hub}, path)
    finally:
        del sys.modules[module.__name__]
    with pytest.raises(ModuleNotFoundError):  # what torch.load alone does without the package
        torch.load(path, weights_only=False)
    state, meta = load_source(path)
    assert source_class_names(meta) == ["a", "b", "c"] and torch.equal(state["w"], torch.zeros(3))
    assert pickle.dumps(state)  # plain tensors, nothing of the placeholders


def test_a_checkpoint_of_another_architecture_fails_naming_keys_and_shapes():
    """RetinaNet's FPN starts at C3 (3 lateral convs, P6/P7 as fpn_convs.3/.4 from C5 and P6); Faster R-CNN's at C2
    (4 lateral convs, no extra convs). So its laterals 0-2 meet C2-C4's shapes, its fpn_convs.3/.4 (4 tensors) and
    RetinaHead (4 x 2 x 2 tower + 4 logits = 20) have no place, and Faster R-CNN's lateral/fpn conv 3 (4), RPN head (6)
    and box head (8) have no source."""
    src = _random_state("retinanet_r50_fpn_1x_coco")
    with pytest.raises(ConversionError) as exc:
        convert_state_dict(src, _model("faster-rcnn_r50_fpn_1x_coco"), "mmdet", "retinanet.pth")
    msg = str(exc.value)
    assert msg.startswith("retinanet.pth does not fit the pipeline's model")
    assert ("3 shape mismatches, e.g. neck.lateral_convs.0.0.weight: converted [256, 512, 1, 1] vs model "
            "[256, 256, 1, 1]") in msg
    assert "24 source tensors have no place in the model, e.g. neck.fpn_convs.3.conv.weight [256, 2048, 3, 3]" in msg
    assert "18 model tensors have no source, e.g. neck.lateral_convs.3.0.weight [256, 2048, 1, 1]" in msg

    src = _random_state("faster-rcnn_r50_fpn_1x_coco")
    voc = _model("faster-rcnn_r50_fpn_1x_coco", ["num_classes=20"])
    with pytest.raises(ConversionError, match=r"4 shape mismatches, e\.g\. roi_head\.bbox_head\.fc_cls\.weight: "
                                              r"converted \[81, 1024\] vs model \[21, 1024\]"):
        convert_mmdet(src, voc, "coco.pth")
    model = _model("faster-rcnn_r50_fpn_1x_coco")
    with pytest.raises(ConversionError, match="coco.pth: its meta lists 2 classes but the pipeline's model has 80"):
        convert_mmdet(src, model, "coco.pth", class_names=["cat", "dog"])


def test_raydet_convert_command_from_mmdet(tmp_path, capsys):
    from raydet.cli import main

    name = "mask-rcnn_r50_fpn_1x_coco"
    src = _random_state(name)
    path, out = tmp_path / "mask_rcnn_r50_fpn_1x_coco_20200205-d4b0c5d6.pth", tmp_path / "out" / "converted.pt"
    _save_mmdet_checkpoint(path, src, {"CLASSES": tuple(COCO_NAMES), "mmdet_version": "2.0.0"})  # a 2.x file
    pipeline = str(PIPELINES[name])
    assert main(["convert", str(path), str(out), "--from", "mmdet", "--pipeline", pipeline]) == 0
    printed = capsys.readouterr().out
    assert "360 source tensors placed, 0 dropped (mmdet)" in printed and "(80 classes)" in printed
    state = load_checkpoint(out)
    assert state["meta"]["classes"] == COCO_NAMES and state["meta"]["converted_from"]["file"] == str(path)
    model = _model(name, materialize=True)
    load_model_weights(model, state["model"], str(out))  # what raydet test / infer do
    assert torch.equal(model.roi_head.mask_head.convs[2].weight, src["roi_head.mask_head.convs.1.conv.weight"])
    assert torch.equal(model.roi_head.bbox_head.fc_cls.bias, src["roi_head.bbox_head.fc_cls.bias"])
