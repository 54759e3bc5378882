"""MMDetection checkpoints -> raydet model state dicts, and back.

Covers MMDetection 3.x (and 2.x, which uses the same names) configs whose raydet pipelines mirror them (any depth,
class count or norm of the same layout): Faster R-CNN, Mask R-CNN, RetinaNet and RPN R50-FPN
(``faster-rcnn_r50_fpn_1x_coco`` -> ``pipelines/faster_rcnn_r50_fpn_1x_coco.yaml`` etc.), SSD300 / SSD512
(``ssd300_coco``), FSAF, FCOS (``fcos_r50-caffe_fpn_gn-head_1x_coco``), RetinaNet with GHM losses
(``retinanet_r50_fpn_ghm-1x_coco``) and Guided Anchoring (``ga-retinanet`` / ``ga-rpn`` / ``ga-faster-rcnn``
``_r50-caffe_fpn_1x_coco``), Libra R-CNN (``libra-faster-rcnn`` / ``libra-retinanet`` ``_r50_fpn_1x_coco``)
and OHEM (``faster-rcnn_r50_fpn_ohem_1x_coco``), Cascade (Mask) R-CNN (``cascade-rcnn`` /
``cascade-mask-rcnn`` ``_r50_fpn_1x_coco``) and HTC (``htc`` / ``htc-without-semantic`` ``_r50_fpn_1x_coco``),
Double-Head R-CNN (``dh-faster-rcnn_r50_fpn_1x_coco``) and Grid R-CNN (``grid-rcnn_r50_fpn_gn-head_2x_coco``;
raydet keeps the names of both heads' layers: ``res_block``, ``conv_branch``, ``fc_branch``, ``grid_head.*``),
Mask Scoring R-CNN (``ms-rcnn_r50-caffe_fpn_1x_coco``; the MaskIoU head's plain ``convs.i`` / ``fcs.i`` /
``fc_mask_iou`` keep their names), HRNet (``faster-rcnn`` / ``mask-rcnn`` ``_hrnetv2p-w18-1x_coco`` and the W32 / W40
and cascade pipelines; the HRNet backbone keeps MMDetection's names, HRFPN's ConvModules as below), Mask R-CNN
with GN + Weight Standardization (``mask-rcnn_r50_fpn_gn-ws-all_2x_coco``: ConvWS keeps ``nn.Conv2d``'s names; a
GN ResNet's ``gnK`` norms are ``bnK`` here), GCNet (``mask-rcnn_r50-gcb-r4-c3-c5_fpn_1x_coco`` and r16) and
generalized attention (``faster-rcnn_r50-attn1111_fpn_1x_coco`` / ``attn0010``): a ResNet's plugins keep
MMDetection's names (``layerI.J.context_block.*``, ``layerI.J.gen_attention_block.*`` with mmcv's layers).
A checkpoint file is MMDetection's
``{"meta": {...}, "state_dict": {...}}``;
:func:`raydet.interop.convert_checkpoint` reads the class names from ``meta['dataset_meta']['classes']`` (3.x) or
``meta['CLASSES']`` (2.x).

The class slots already agree (softmax heads, SSD's included: C classes then the background at index C;
class-specific regressors and mask logits: C slots; sigmoid heads: anchor-major A x C channels), as do the names of
the backbones (ResNet, SSD's VGG), of SSD's neck, of the head layers that are single convs (``retina_cls``,
``conv_cls`` / ``conv_reg`` / ``conv_centerness`` of FCOS and GA-RPN, GA's ``conv_loc`` / ``conv_shape`` /
``feature_adaption*``, SSD's ``cls_convs.l.0``), of FCOS's per-level ``scales.l.scale`` and of the GHM losses'
buffers (``loss_cls.edges`` / ``acc_sum``: raydet's GHM-C / GHM-R keep the same bins and running counts). What
differs is the nesting of layers:

=====================================================  ===================================================
MMDetection                                            raydet
=====================================================  ===================================================
``backbone.[layerS.B.]gnK`` (a GN ResNet, K = 1..3)     ``backbone.[layerS.B.]bnK`` (every norm type)
``neck.lateral_convs.i.conv`` / ``.bn`` / ``.gn``      ``neck.lateral_convs.i.0`` / ``.1``
``neck.fpn_convs.i.conv`` (i < L lateral convs)        ``neck.fpn_convs.i.0``
``neck.fpn_convs.i.conv`` (i >= L: extra levels)       ``neck.extra_convs.(i - L).0``
``neck.reduction_conv.conv``, ``.fpn_convs.l.conv``     ``neck.reduction_conv.0``, ``neck.fpn_convs.l.0``
(HRFPN: no lateral convs, one fpn_conv per level)
``neck.j.*`` (neck lists: Libra's ``[FPN, BFP]``)      ``neck.j.*``, the same rules; BFP's non-local block
``neck.j.refine.{g,theta,phi,conv_out}.conv``          ``neck.j.refine.{g,theta,phi,conv_out}`` (plain convs)
``bbox_head.*`` (3.x RPN detector) or ``rpn_head.*``    ``rpn_head.*`` (RPN, GA-RPN, two-stage detectors)
``rpn_head.rpn_conv.i.conv`` (``num_convs`` > 1)       ``rpn_head.rpn_conv.(2 i)`` (conv, ReLU pairs)
``roi_head.bbox_head.shared_fcs.i``                    ``roi_head.bbox_head.shared_fcs.(2 i)`` (Linear, ReLU)
``*.shared_convs.i`` / ``mask_head.convs.i`` /         the same tower, entry ``s i`` (conv) and ``s i + 1``
``bbox_head.cls_convs.i`` / ``reg_convs.i``            (norm), ``s`` = 3 with a norm (conv, norm, ReLU),
``.conv`` / ``.bn`` / ``.gn`` (mmcv ``ConvModule``)    2 without (conv, ReLU): RetinaNet, GHM, FSAF, FCOS
                                                       (GN), GA-RetinaNet
``roi_head.bbox_head.t.*`` / ``mask_head.t.*``        the same, per stage t (Cascade R-CNN, HTC)
``mask_head.t.conv_res.conv`` (HTC), ``semantic_head``  ``.0`` of a (conv, ReLU) Sequential; the semantic
``.lateral_convs.i.conv`` / ``.conv_embedding.conv``   head's ``convs.i.conv`` -> ``convs.(2 i)``
=====================================================  ===================================================

and one layout: **SSD's prior order.** MMDetection's ``SSDAnchorGenerator`` (3.x and 2.x, with the
``scale_major=False`` of its SSD configs) orders the priors of a location ``[min, sqrt(min max), 1/r1, r1, 1/r2,
r2]`` (squares of side ``min`` and ``sqrt(min max)``, then side-``min`` boxes of each ratio ``r = h / w``), raydet's
``[min, 1/r1, r1, 1/r2, r2, sqrt(min max)]``; SSD's classifier (A x (C + 1) channels) and regressor (A x 4) of each
level are prior-major, so their output channels (weight rows and bias) move prior by prior
(:func:`ssd_prior_order`).

BatchNorm step counters (``num_batches_tracked``) are dropped when the pipeline's norm layer (FrozenBN) has none.
Every other tensor is passed on (SSD's reordered); one that has no place fails the conversion (see
:func:`~raydet.interop.report.check_complete`), as does a model tensor without a source, except the GHM losses'
buffers, which MMDetection's early GHM losses did not save (the model zoo's 2020 GHM checkpoint): they keep their
initial values (the config's bins, zero running counts; reported in ``report.filled``). :func:`to_mmdet` is the
inverse: raydet names and layouts -> MMDetection's.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from raydet.interop.report import ConversionError, ConversionReport, check_complete

__all__ = ["convert_mmdet", "ssd_prior_order", "to_mmdet"]

Tensor = torch.Tensor

# (a cascade's per-stage heads: ``roi_head.bbox_head.<t>.`` / ``roi_head.mask_head.<t>.``)
_TOWERS = (r"(roi_head\.bbox_head\.(?:\d+\.)?shared_convs|roi_head\.mask_head\.(?:\d+\.)?convs|bbox_head\.cls_convs"
           r"|bbox_head\.reg_convs|roi_head\.semantic_head\.convs)")
# mmcv ConvModules (conv, ReLU) that raydet keeps as Sequentials (conv, ReLU): ``.conv.`` <-> ``.0.`` (HTC's mask
# information flow ``conv_res`` and its FusedSemanticHead's lateral and embedding convs)
_CONV_RELU = r"roi_head\.(mask_head\.\d+\.conv_res|semantic_head\.conv_embedding|semantic_head\.lateral_convs\.\d+)"
# Libra's BFP (the j-th of a neck list): its non-local block's ConvModules ``refine.<g|theta|phi|conv_out>.conv``
# are plain convs here; a ``conv`` refine's ``refine.conv`` is entry 0 of a (conv, ReLU) Sequential
_BFP_REFINE = r"neck\.(\d+)\.refine(?:\.(g|theta|phi|conv_out))?"
_PART = {"conv": 0, "bn": 1, "gn": 1}  # mmcv ConvModule's layer names (norm: "bn" for BN / SyncBN, "gn" for GN)
# MMDetection's ResNet names its stem and block norms by the norm type (``gn1``..``gn3`` with GN, e.g.
# ``mask-rcnn_r50_fpn_gn-ws-all_2x_coco``); raydet's are ``bn1``..``bn3`` whatever the type (torchvision's names)
_BACKBONE_GN = r"^backbone\.((?:layer\d+\.\d+\.)?)gn([123])\.(weight|bias)$"
_BACKBONE_NORM = r"^backbone\.((?:layer\d+\.\d+\.)?)bn([123])\.(weight|bias)$"

# Layers whose keys are the same on both sides, by the detectors that have them (the backbone's keys, ResNet's and
# SSD's VGG's, pass unchanged too). An RPN detector's head is ``rpn_head`` here (see ``_rpn_only``).
_SAME_NAMES = [
    r"roi_head\.bbox_head\.(?:\d+\.)?(?:fc_cls|fc_reg)\.(?:weight|bias)",          # R-CNN box heads' logits
    r"roi_head\.mask_head\.(?:\d+\.)?(?:upsample|conv_logits)\.(?:weight|bias)",   # Mask R-CNN, cascades
    r"roi_head\.semantic_head\.conv_logits\.(?:weight|bias)",                      # HTC's FusedSemanticHead
    r"rpn_head\.rpn_(?:conv|cls|reg)\.(?:weight|bias)",                            # RPN; GA-RPN's rpn_conv
    r"bbox_head\.retina_(?:cls|reg)\.(?:weight|bias)",                             # RetinaNet, GHM, FSAF, GA-RetinaNet
    r"(?:bbox|rpn)_head\.conv_(?:cls|reg)\.(?:weight|bias)",                       # FCOS, GA-RPN
    r"bbox_head\.conv_centerness\.(?:weight|bias)|bbox_head\.scales\.\d+\.scale",   # FCOS (mmcv Scale per level)
    r"(?:bbox|rpn)_head\.conv_(?:loc|shape)\.(?:weight|bias)",                     # Guided Anchoring
    r"(?:bbox|rpn)_head\.feature_adaption(?:_cls|_reg)?\.conv_(?:offset|adaption)\.weight",  # GA's DCN adaption
    r"bbox_head\.loss_(?:cls|bbox)\.(?:edges|acc_sum)",                            # GHM-C / GHM-R bins and counts
    r"neck\.l2_norm\.weight|neck\.extra_layers\.\d+\.\d+\.conv\.(?:weight|bias)",    # SSDNeck
    r"roi_head\.bbox_head\.(?:res_block|conv_branch|fc_branch)\..+",                 # Double-Head R-CNN
    r"roi_head\.grid_head\..+",                                                    # Grid R-CNN
    r"roi_head\.mask_iou_head\.(?:convs\.\d+|fcs\.\d+|fc_mask_iou)\.(?:weight|bias)",  # Mask Scoring R-CNN
    r"roi_head\.bbox_roi_extractor\.roi_layers\.\d+\.(?:offset|mask)_fc\.\d+\.(?:weight|bias)",  # (M)DPool
]
_SAME = re.compile(r"^(?:backbone\..+|" + "|".join(_SAME_NAMES) + r")$")
# SSDHead's per-level classifier and regressor: the same names, another prior order (see ``_LAYOUTS``)
_SSD_HEAD = re.compile(r"^bbox_head\.(?:cls|reg)_convs\.(\d+)\.0\.(?:weight|bias)$")


def ssd_prior_order(num_priors: int) -> list[int]:
    """MMDetection's index of each of raydet's ``num_priors`` SSD priors at a location (see the module docstring):
    ``[0, 2, 3, ..., A - 1, 1]``, e.g. ``[0, 2, 3, 1]`` for SSD's 4 priors and ``[0, 2, 3, 4, 5, 1]`` for its 6."""
    if num_priors < 2:
        raise ConversionError(f"an SSD location has at least 2 priors (the two squares), got {num_priors}")
    return [0, *range(2, num_priors), 1]


def _ssd_reorder(state: dict[str, Tensor], key: str, tensor: Tensor, to_raydet: bool) -> Tensor:
    """An SSD head conv's weight / bias (A x K output channels, prior-major) in the other library's prior order;
    A of its level is read from the level's regressor in ``state`` (A x 4 channels)."""
    level = _SSD_HEAD.match(key)[1]
    reg = state.get(f"bbox_head.reg_convs.{level}.0.weight")
    if reg is None or reg.shape[0] % 4 or tensor.shape[0] % (reg.shape[0] // 4):
        raise ConversionError(f"{key} {list(tensor.shape)}: an SSD head conv needs its level's regressor "
                              f"bbox_head.reg_convs.{level}.0.weight (priors x 4 channels) beside it, got "
                              f"{None if reg is None else list(reg.shape)}")
    order = ssd_prior_order(reg.shape[0] // 4)
    if not to_raydet:  # the inverse permutation
        order = sorted(range(len(order)), key=order.__getitem__)
    return tensor.reshape(len(order), -1, *tensor.shape[1:])[order].reshape(tensor.shape)


# Tensors whose layout differs beyond the name: (raydet key pattern, relayout(state, key, tensor, to_raydet), note
# for the report). ``state`` is the state dict the tensor comes from.
_LAYOUTS: list[tuple[re.Pattern, Callable, str]] = [
    (_SSD_HEAD, _ssd_reorder, ("SSD priors of a location reordered (MMDetection [min, sqrt(min max), ratios...] "
                               "-> raydet [min, ratios..., sqrt(min max)])")),
]


def _initial_loss_buffer(model: nn.Module, key: str) -> Tensor:
    """A GHM loss buffer at its initial value: that of a new loss of the same kind, ``bins`` and ``momentum`` (the
    region edges; zero running counts)."""
    name, buffer = key.rsplit(".", 1)
    loss = model.get_submodule(name)
    return getattr(type(loss)(bins=loss.bins, momentum=loss.momentum), buffer)


# Model tensors a source may lack, then set to their initial values and reported: (raydet key pattern,
# value(model, key), reason). Tensors of the model, not weights: a conversion never invents a weight.
_MAY_LACK: list[tuple[re.Pattern, Callable, str]] = [
    (re.compile(r"^bbox_head\.loss_(?:cls|bbox)\.(?:edges|acc_sum)$"), _initial_loss_buffer,
     ("GHM-C / GHM-R training state; MMDetection's early GHM losses (the model zoo's 2020 GHM checkpoint) kept "
      "it out of the state_dict, and MMDetection's own loader leaves it at its initial value too")),
]


def _stride(state: dict, prefix: str) -> int:
    """Entries per block of a raydet conv tower in ``state``: 3 when its blocks have a norm (1-D ``.1.weight``)."""
    weight = state.get(f"{prefix}.1.weight")
    return 3 if weight is not None and weight.dim() == 1 else 2


def _num_laterals(keys, prefix: str) -> int:
    return len({m[1] for k in keys for m in [re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k)] if m})


def _is_hrfpn(keys, neck: str) -> bool:
    """Whether ``keys`` hold an HRFPN at ``neck.<neck>`` ("" or "j."): its ``reduction_conv`` and ``fpn_convs.l``
    (one per level) with no lateral convs."""
    return any(k.startswith(f"neck.{neck}reduction_conv.") for k in keys)


def _rpn_only(keys) -> bool:
    """Whether raydet ``keys`` are an RPN detector's (an ``rpn_head``, no ``bbox_head`` / ``roi_head``), whose head
    MMDetection 3.x names ``bbox_head``."""
    heads = {k.split(".", 1)[0] for k in keys}
    return "rpn_head" in heads and not heads & {"bbox_head", "roi_head"}


def _forward_rules(source: dict) -> list[tuple[str, Callable]]:
    """(MMDetection key pattern, raydet key of (match, target state)); an RPN's head already named ``rpn_head``."""
    def fpn(m, t):  # m[1]: "" or "j." (the j-th of a neck list, e.g. Libra's [FPN, BFP])
        laterals = _num_laterals(source, f"neck.{m[1]}lateral_convs")
        i, part = int(m[2]), _PART[m[3]]
        if i < laterals or _is_hrfpn(source, m[1]):  # HRFPN: one fpn_conv per level, no laterals, no extra convs
            return f"neck.{m[1]}fpn_convs.{i}.{part}.{m[4]}"
        return f"neck.{m[1]}extra_convs.{i - laterals}.{part}.{m[4]}"

    def tower(prefix, block, part, param, t):
        return f"{prefix}.{_stride(t, prefix) * block + _PART[part]}.{param}"

    return [
        (_BACKBONE_GN, lambda m, t: f"backbone.{m[1]}bn{m[2]}.{m[3]}"),
        (_SAME.pattern, lambda m, t: m[0]),
        (_SSD_HEAD.pattern, lambda m, t: m[0]),
        (r"^neck\.((?:\d+\.)?)lateral_convs\.(\d+)\.(conv|bn|gn)\.(.+)$",
         lambda m, t: f"neck.{m[1]}lateral_convs.{m[2]}.{_PART[m[3]]}.{m[4]}"),
        (r"^neck\.((?:\d+\.)?)fpn_convs\.(\d+)\.(conv|bn|gn)\.(.+)$", fpn),
        (rf"^{_BFP_REFINE}\.conv\.(weight|bias)$", lambda m, t: f"neck.{m[1]}.refine.{m[2] or 0}.{m[3]}"),
        (r"^neck\.((?:\d+\.)?)reduction_conv\.(conv|bn|gn)\.(.+)$",
         lambda m, t: f"neck.{m[1]}reduction_conv.{_PART[m[2]]}.{m[3]}"),
        (r"^rpn_head\.rpn_conv\.(\d+)\.conv\.(.+)$",
         lambda m, t: tower("rpn_head.rpn_conv", int(m[1]), "conv", m[2], t)),
        (r"^roi_head\.bbox_head\.((?:\d+\.)?)shared_fcs\.(\d+)\.(.+)$",
         lambda m, t: f"roi_head.bbox_head.{m[1]}shared_fcs.{2 * int(m[2])}.{m[3]}"),
        (rf"^{_CONV_RELU}\.conv\.(.+)$", lambda m, t: f"roi_head.{m[1]}.0.{m[2]}"),
        (rf"^{_TOWERS}\.(\d+)\.(conv|bn|gn)\.(.+)$", lambda m, t: tower(m[1], int(m[2]), m[3], m[4], t)),
    ]


def _num_classes(model: nn.Module) -> int | None:
    """The classes a raydet detector predicts; None for an RPN (class-agnostic proposals)."""
    head = getattr(getattr(model, "roi_head", None), "bbox_head", None) or getattr(model, "bbox_head", None)
    if isinstance(head, nn.ModuleList):  # a cascade's per-stage box heads
        head = head[-1]
    return getattr(head, "num_classes", None) if head is not None else None


def _classes(model: nn.Module, class_names: list[str] | None, source: str) -> tuple[list[str], list[int]]:
    """(names, category ids) of the model's labels: COCO's ids when the names are COCO's 80, else 1..C."""
    from raydet.interop.torchvision import coco_slots

    num = _num_classes(model)
    if class_names:
        names = [str(c) for c in class_names]
        if num is not None and len(names) != num:
            raise ConversionError(f"{source}: its meta lists {len(names)} classes but the pipeline's model has {num} "
                                  "(set num_classes in the pipeline)")
    elif num is None:
        return [], []
    else:
        names = [f"class_{i}" for i in range(num)]
    coco_ids, coco_names, _ = coco_slots()
    return names, (list(coco_ids) if names == coco_names else list(range(1, len(names) + 1)))


def convert_mmdet(state: dict[str, Tensor], model: nn.Module, source: str = "checkpoint",
                  class_names: list[str] | None = None) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map an MMDetection detector's state dict onto ``model`` (a raydet detector built from a pipeline).

    Args:
        state: MMDetection's ``state_dict`` (3.x or 2.x names; the ``state_dict`` entry of its checkpoint file).
        model: the target; its ``state_dict()`` gives the keys and shapes to fill.
        source: the source's name for messages (the file).
        class_names: the names of the model's classes (the checkpoint's ``meta`` classes, else the pipeline's).

    Returns:
        (the model's full state dict, the report). The report's ``classes`` / ``cat_ids`` name each label (COCO
        category ids when the names are COCO's 80 classes; ``class_<i>`` and 1..C without names); its ``filled``
        lists the GHM loss buffers the source lacked, set to their initial values.

    Raises:
        ConversionError: another architecture (a source tensor with no place, a model tensor with no source, a
            shape mismatch: the first few are named), or class names that do not fit the model's classes.
    """
    target = model.state_dict()
    report = ConversionReport("mmdet")
    mapped: dict[str, Tensor] = {}
    unplaced: list[tuple[str, tuple[int, ...]]] = []
    rules = [(re.compile(p), f) for p, f in _forward_rules(state)]
    rpn = _rpn_only(target)  # MMDetection 3.x names an RPN detector's head bbox_head (2.x rpn_head, as raydet)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor "
                                  "(is this an MMDetection state_dict?)")
        name = f"rpn_head.{key[len('bbox_head.'):]}" if rpn and key.startswith("bbox_head.") else key
        dest = next((f(m, target) for p, f in rules for m in [p.match(name)] if m), None)
        if dest is None or dest not in target:
            if key.endswith("num_batches_tracked"):
                report.drop(key, value, "BatchNorm step counter; the model's norm layer (FrozenBN) has none")
            else:
                unplaced.append((key, tuple(value.shape)))
            continue
        moved, note = value, ""
        for pattern, relayout, why in _LAYOUTS:
            if pattern.match(dest):
                moved, note = relayout(state, dest, value, to_raydet=True), why
        mapped[dest] = moved.detach().to(target[dest].dtype)  # the same tensor when the dtype and layout agree
        report.place(key, value, dest, note)
    for key in (k for k in target if k not in mapped):
        for pattern, initial, why in _MAY_LACK:
            if pattern.match(key):
                mapped[key] = initial(model, key).to(target[key].dtype)
                report.fill(key, mapped[key], why)
    check_complete(mapped, target, unplaced, source)
    report.classes, report.cat_ids = _classes(model, class_names, source)
    return {k: mapped[k] for k in target}, report


def to_mmdet(state: dict[str, Tensor], mmdet_version: int = 3) -> dict[str, Tensor]:
    """The inverse of :func:`convert_mmdet`: a raydet detector's state dict with MMDetection's names and layouts.

    Args:
        state: a raydet model's ``state_dict()`` (or a raydet checkpoint's ``model``) of a pipeline that
            :func:`convert_mmdet` covers.
        mmdet_version: 3 names an RPN detector's head ``bbox_head`` (MMDetection 3.x), 2 ``rpn_head`` (2.x).

    Returns:
        MMDetection key -> the same tensor (not copied; SSD's head convs: reordered copies), in raydet's order:
        MMDetection's ``load_state_dict`` reads it. A FrozenBN pipeline has no ``num_batches_tracked`` counters to
        give.

    Raises:
        ConversionError: a key no rule covers (a model of another architecture).
    """
    if mmdet_version not in (2, 3):
        raise ConversionError(f"mmdet_version must be 2 or 3, got {mmdet_version}")
    rpn_as_bbox_head = _rpn_only(state) and mmdet_version == 3

    def part(prefix: str, index: int, stride: int) -> str:
        """mmcv ConvModule's name of tower entry ``index``: its conv, or its norm ("bn" or "gn")."""
        if index % stride == 0:
            return "conv"
        return "bn" if f"{prefix}.{index}.running_mean" in state else "gn"

    def extra(m) -> str:
        """An FPN extra level (of the neck, or of the j-th of a neck list: m[1] = "j.") -> its fpn_convs index."""
        level = _num_laterals(state, f"neck.{m[1]}lateral_convs") + int(m[2])
        return f"neck.{m[1]}fpn_convs.{level}.{part(f'neck.{m[1]}extra_convs.{m[2]}', int(m[3]), 2)}.{m[4]}"

    def tower(m) -> str:
        prefix, index = m[1], int(m[2])
        stride = _stride(state, prefix)
        return f"{prefix}.{index // stride}.{part(prefix, index, stride)}.{m[3]}"

    rules: list[tuple[str, Callable]] = [
        (_BACKBONE_NORM, lambda m: m[0] if f"backbone.{m[1]}bn{m[2]}.running_mean" in state
         else f"backbone.{m[1]}gn{m[2]}.{m[3]}"),  # no statistics: a GN (MMDetection's ``gnK``)
        (_SAME.pattern, lambda m: m[0]),
        (_SSD_HEAD.pattern, lambda m: m[0]),  # before the towers: SSD's cls_convs.<level>.0
        (r"^neck\.((?:\d+\.)?)reduction_conv\.(\d+)\.(.+)$",  # HRFPN
         lambda m: f"neck.{m[1]}reduction_conv.{part(f'neck.{m[1]}reduction_conv', int(m[2]), 2)}.{m[3]}"),
        (r"^neck\.((?:\d+\.)?)(lateral_convs|fpn_convs)\.(\d+)\.(\d+)\.(.+)$",
         lambda m: f"neck.{m[1]}{m[2]}.{m[3]}.{part(f'neck.{m[1]}{m[2]}.{m[3]}', int(m[4]), 2)}.{m[5]}"),
        (r"^neck\.((?:\d+\.)?)extra_convs\.(\d+)\.(\d+)\.(.+)$", extra),
        (r"^neck\.(\d+)\.refine\.(g|theta|phi|conv_out)\.(weight|bias)$",
         lambda m: f"neck.{m[1]}.refine.{m[2]}.conv.{m[3]}"),
        (r"^neck\.(\d+)\.refine\.0\.(weight|bias)$", lambda m: f"neck.{m[1]}.refine.conv.{m[2]}"),
        (r"^rpn_head\.rpn_conv\.(\d+)\.(weight|bias)$", lambda m: f"rpn_head.rpn_conv.{int(m[1]) // 2}.conv.{m[2]}"),
        (r"^roi_head\.bbox_head\.((?:\d+\.)?)shared_fcs\.(\d+)\.(.+)$",
         lambda m: f"roi_head.bbox_head.{m[1]}shared_fcs.{int(m[2]) // 2}.{m[3]}"),
        (rf"^{_CONV_RELU}\.0\.(.+)$", lambda m: f"roi_head.{m[1]}.conv.{m[2]}"),
        (rf"^{_TOWERS}\.(\d+)\.(.+)$", tower),
    ]
    compiled = [(re.compile(p), f) for p, f in rules]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = next((f(m) for p, f in compiled for m in [p.match(key)] if m), None)
        if new is None:
            raise ConversionError(f"no MMDetection name for {key} {list(value.shape)} (a model of another "
                                  "architecture?)")
        for pattern, relayout, _ in _LAYOUTS:
            if pattern.match(key):
                value = relayout(state, key, value, to_raydet=False)
        if rpn_as_bbox_head and new.startswith("rpn_head."):
            new = f"bbox_head.{new[len('rpn_head.'):]}"
        out[new] = value
    return out
