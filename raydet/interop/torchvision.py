"""torchvision detection checkpoints -> raydet model state dicts.

Covers the ResNet-FPN detectors of ``torchvision.models.detection``: ``fasterrcnn_resnet50_fpn[_v2]``,
``maskrcnn_resnet50_fpn[_v2]``, ``retinanet_resnet50_fpn[_v2]`` and ``fcos_resnet50_fpn`` (any depth or class count of
the same layout), and ``ssd300_vgg16``, as saved by ``model.state_dict()`` (the files torchvision downloads, or a
training script's ``{"model": ...}``).

What differs besides the names:

* **Class slots.** torchvision's softmax box head has ``num_classes`` outputs with the background at index 0;
  raydet's has ``C + 1`` with the background at index ``C`` (then ``num_unused_classes`` slots, see
  :class:`~raydet.models.roi_heads.bbox_heads.ConvFCBBoxHead`). torchvision's COCO models have 91 slots indexed by
  COCO category id (0 background, 10 ids COCO never used, 80 classes); raydet's COCO models have the 80 classes in
  category-id order. Class-specific regressors and mask logits have one slot per torchvision class including the
  background; raydet has one per class. RetinaNet's sigmoid logits (A anchors x 91 slots per location) keep the
  80 class slots of each anchor. SSD's softmax logits (A priors x 91 slots per location) are reordered per prior as
  the R-CNN softmax (the 10 unused slots after the background, ``SSDHead(num_unused_classes=10)``).
* **SSD's prior order.** torchvision's ``DefaultBoxGenerator`` orders a location's priors ``[s_k, sqrt(s_k s_k+1),
  r1 wide, r1 tall, r2 wide, r2 tall]``, raydet's ``SSDAnchorGenerator`` ``[s_k, r1 wide, r1 tall, ..., sqrt(s_k
  s_k+1)]``: the class and box outputs of each prior move with it.
* **Layouts.** ``Conv2dNormActivation`` blocks (conv, norm) become raydet's flat conv towers (conv[, norm], ReLU);
  torchvision's pre-v2 names (``rpn.head.conv.weight``, ``inner_blocks.0.weight``, ``mask_fcn1``, RetinaNet's
  ``conv.2.weight``) are read as torchvision's ``_load_from_state_dict`` reads them. SSD's VGG (``features`` up
  to conv4_3, then ``extra.0``: pool4 to conv5_3 and a Sequential of pool5, fc6, fc7) is raydet's one ``features``
  Sequential at the same layer indices; ``scale_weight`` is the neck's ``l2_norm.weight``, ``extra.<k>`` (k >= 1)
  the neck's ``extra_layers.<k-1>``, ``{classification,regression}_head.module_list.<l>`` the head's
  ``{cls,reg}_convs.<l>``.
* **FCOS's level scales.** torchvision's FCOS regresses ``relu(conv)`` without MMDetection's learnable per-level
  ``Scale``: raydet's ``bbox_head.scales.<l>.scale`` are filled with 1 (reported in ``report.filled``).
* **BatchNorm step counters** (``num_batches_tracked``, written by models built with ``nn.BatchNorm2d``) are dropped
  when the pipeline uses FrozenBN, which has none.

Everything else (tensor values, the FrozenBN statistics) is copied unchanged. The pipeline decides the test-time
behaviour; ``pipelines/zoo/torchvision/`` holds the ones that reproduce torchvision's.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from raydet.interop.report import ConversionError, ConversionReport

__all__ = ["convert_torchvision", "coco_slots", "legacy_names"]

Tensor = torch.Tensor


def coco_slots() -> tuple[list[int], list[str], list[int]]:
    """torchvision's 91 COCO slots: (the 80 class slots = COCO category ids, their names, the 10 unused slots).

    From the ``categories`` of torchvision's COCO weights (``__background__`` at 0, ``N/A`` at unused ids).
    """
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    used = [i for i, n in enumerate(names) if i > 0 and n != "N/A"]
    unused = [i for i, n in enumerate(names) if n == "N/A"]
    return used, [names[i] for i in used], unused


def _is_fcos(state: dict[str, Tensor]) -> bool:
    return "head.regression_head.bbox_ctrness.weight" in state


def legacy_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename pre-v2 torchvision keys as torchvision's own ``_load_from_state_dict`` methods do (RPNHead,
    FeaturePyramidNetwork, MaskRCNNHeads, RetinaNet heads); other keys are kept in order. FCOS's towers are plain
    (conv, GroupNorm, ReLU) Sequentials whose names never changed."""
    fcos = _is_fcos(state)
    rules = [
        (r"^(rpn\.head\.conv)\.(weight|bias)$", lambda m: f"{m[1]}.0.0.{m[2]}"),
        (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", lambda m: f"{m[1]}.0.{m[2]}"),
        (r"^(roi_heads\.mask_head)\.mask_fcn(\d+)\.(weight|bias)$", lambda m: f"{m[1]}.{int(m[2]) - 1}.0.{m[3]}"),
    ]
    if not fcos:  # RetinaNet's pre-v2 towers: (conv, ReLU) pairs
        rules.append((r"^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$",
                      lambda m: f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"))
    out = {}
    for key, value in state.items():
        for pattern, new in rules:
            m = re.match(pattern, key)
            if m:
                key = new(m)
                break
        out[key] = value
    return out


def _tower(target: dict, prefix: str, block: int, part: int, param: str) -> str:
    """raydet key of part ``part`` (0 conv, 1 norm) of torchvision ``Conv2dNormActivation`` block ``block`` in a
    raydet conv tower (conv[, norm], ReLU per block: 3 entries with a norm, 2 without)."""
    stride = 3 if f"{prefix}.1.weight" in target and target[f"{prefix}.1.weight"].dim() == 1 else 2
    return f"{prefix}.{stride * block + part}.{param}"


def _dense(target: dict, retina: str, anchor_free: str, param: str) -> str:
    """RetinaNet's predictor name in a RetinaHead, the anchor-free head's (FCOS) otherwise."""
    key = f"bbox_head.{retina}.{param}"
    return key if key in target else f"bbox_head.{anchor_free}.{param}"


def _rpn_conv(target: dict, block: int, part: int, param: str) -> str:
    if "rpn_head.rpn_conv.weight" in target and block == 0 and part == 0:
        return f"rpn_head.rpn_conv.{param}"
    return _tower(target, "rpn_head.rpn_conv", block, part, param)


def _rules(source: dict) -> list[tuple[str, Callable, str]]:
    """(source key pattern, target key of (match, target state), class-slot kind) in torchvision's key order."""
    # torchvision's FastRCNNConvFCHead (v2): n Conv2dNormActivation blocks, Flatten, then (Linear, ReLU) pairs.
    convs = {int(m[1]) for k in source for m in [re.match(r"^roi_heads\.box_head\.(\d+)\.0\.weight$", k)]
             if m and source[k].dim() == 4}
    n_convs = len(convs)
    # SSD's VGG: `features` ends with conv4_3's ReLU (one past its last conv), pool4 is extra.0.0
    vgg = [int(m[1]) for k in source for m in [re.match(r"^backbone\.features\.(\d+)\.weight$", k)] if m]
    pool4 = max(vgg) + 2 if vgg else 0
    return [
        (r"^backbone\.body\.(.+)$", lambda m, t: f"backbone.{m[1]}", ""),
        (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(\d+)\.(.+)$", lambda m, t: f"neck.lateral_convs.{m[1]}.{m[2]}.{m[3]}",
         ""),
        (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(\d+)\.(.+)$", lambda m, t: f"neck.fpn_convs.{m[1]}.{m[2]}.{m[3]}", ""),
        (r"^backbone\.fpn\.extra_blocks\.p([67])\.(.+)$", lambda m, t: f"neck.extra_convs.{int(m[1]) - 6}.0.{m[2]}",
         ""),
        (r"^rpn\.head\.conv\.(\d+)\.(\d+)\.(.+)$", lambda m, t: _rpn_conv(t, int(m[1]), int(m[2]), m[3]), ""),
        (r"^rpn\.head\.cls_logits\.(.+)$", lambda m, t: f"rpn_head.rpn_cls.{m[1]}", ""),
        (r"^rpn\.head\.bbox_pred\.(.+)$", lambda m, t: f"rpn_head.rpn_reg.{m[1]}", ""),
        (r"^roi_heads\.box_head\.fc6\.(.+)$", lambda m, t: f"roi_head.bbox_head.shared_fcs.0.{m[1]}", ""),
        (r"^roi_heads\.box_head\.fc7\.(.+)$", lambda m, t: f"roi_head.bbox_head.shared_fcs.2.{m[1]}", ""),
        (r"^roi_heads\.box_head\.(\d+)\.(\d+)\.(.+)$",
         lambda m, t: _tower(t, "roi_head.bbox_head.shared_convs", int(m[1]), int(m[2]), m[3]), ""),
        (r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$",
         lambda m, t: f"roi_head.bbox_head.shared_fcs.{int(m[1]) - n_convs - 1}.{m[2]}", ""),
        (r"^roi_heads\.box_predictor\.cls_score\.(.+)$", lambda m, t: f"roi_head.bbox_head.fc_cls.{m[1]}", "softmax"),
        (r"^roi_heads\.box_predictor\.bbox_pred\.(.+)$", lambda m, t: f"roi_head.bbox_head.fc_reg.{m[1]}", "regressor"),
        (r"^roi_heads\.mask_head\.(\d+)\.(\d+)\.(.+)$",
         lambda m, t: _tower(t, "roi_head.mask_head.convs", int(m[1]), int(m[2]), m[3]), ""),
        (r"^roi_heads\.mask_predictor\.conv5_mask\.(.+)$", lambda m, t: f"roi_head.mask_head.upsample.{m[1]}", ""),
        (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.(.+)$", lambda m, t: f"roi_head.mask_head.conv_logits.{m[1]}",
         "mask"),
        (r"^head\.classification_head\.conv\.(\d+)\.(\d+)\.(.+)$",
         lambda m, t: _tower(t, "bbox_head.cls_convs", int(m[1]), int(m[2]), m[3]), ""),
        (r"^head\.classification_head\.cls_logits\.(.+)$", lambda m, t: _dense(t, "retina_cls", "conv_cls", m[1]),
         "sigmoid"),
        (r"^head\.regression_head\.conv\.(\d+)\.(\d+)\.(.+)$",
         lambda m, t: _tower(t, "bbox_head.reg_convs", int(m[1]), int(m[2]), m[3]), ""),
        (r"^head\.regression_head\.bbox_reg\.(.+)$", lambda m, t: _dense(t, "retina_reg", "conv_reg", m[1]), ""),
        # FCOS: (conv, GroupNorm, ReLU) towers at raydet's indices, centre-ness on the regression tower
        (r"^head\.classification_head\.conv\.(\d+)\.(weight|bias)$", lambda m, t: f"bbox_head.cls_convs.{m[1]}.{m[2]}",
         ""),
        (r"^head\.regression_head\.conv\.(\d+)\.(weight|bias)$", lambda m, t: f"bbox_head.reg_convs.{m[1]}.{m[2]}",
         ""),
        (r"^head\.regression_head\.bbox_ctrness\.(.+)$", lambda m, t: f"bbox_head.conv_centerness.{m[1]}", ""),
        (r"^backbone\.features\.(\d+)\.(weight|bias)$", lambda m, t: f"backbone.features.{m[1]}.{m[2]}", ""),
        (r"^backbone\.extra\.0\.(\d+)\.(weight|bias)$", lambda m, t: f"backbone.features.{pool4 + int(m[1])}.{m[2]}",
         ""),
        (r"^backbone\.extra\.0\.(\d+)\.(\d+)\.(weight|bias)$",
         lambda m, t: f"backbone.features.{pool4 + int(m[1]) + int(m[2])}.{m[3]}", ""),
        (r"^backbone\.extra\.(\d+)\.(\d+)\.(weight|bias)$",
         lambda m, t: f"neck.extra_layers.{int(m[1]) - 1}.{int(m[2]) // 2}.conv.{m[3]}", ""),
        (r"^backbone\.scale_weight$", lambda m, t: "neck.l2_norm.weight", ""),
        (r"^head\.classification_head\.module_list\.(\d+)\.(.+)$", lambda m, t: f"bbox_head.cls_convs.{m[1]}.0.{m[2]}",
         "ssd_cls"),
        (r"^head\.regression_head\.module_list\.(\d+)\.(.+)$", lambda m, t: f"bbox_head.reg_convs.{m[1]}.0.{m[2]}",
         "ssd_reg"),
    ]


class _Slots:
    """How the source's class slots map to the model's classes.

    Attributes:
        classes: source slot of each model class (length C). background: the source's background slot or None.
        unused: source slots that are neither (torchvision COCO's 10 unused ids). names, cat_ids: per model class.
    """

    def __init__(self, num_slots: int, num_classes: int, background: bool, class_names: list[str] | None,
                 where: str):
        self.num_slots = num_slots
        if num_slots == 91 and num_classes == 80:
            self.classes, self.names, self.unused = coco_slots()
            self.cat_ids = list(self.classes)  # torchvision's COCO label is the category id
            self.background = 0
        elif num_slots == num_classes + 1:
            self.classes = list(range(1, num_slots))
            self.background, self.unused = 0, []
            self.names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
            self.cat_ids = list(range(1, num_classes + 1))
        elif num_slots == num_classes and not background:
            self.classes = list(range(num_slots))
            self.background, self.unused = None, []
            self.names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
            self.cat_ids = list(range(1, num_classes + 1))
        else:
            expected = f"{num_classes + 1} (background + classes)" + (
                "" if background else f" or {num_classes}") + (" or 91 (COCO)" if num_classes == 80 else "")
            raise ConversionError(f"{where} has {num_slots} class slots but the pipeline's model has {num_classes} "
                                  f"classes: expected {expected} slots (set num_classes in the pipeline)")

    def dropped_note(self, slots: list[int]) -> str:
        parts = []
        if self.background is not None and self.background in slots:
            parts.append(f"the background slot {self.background}")
        unused = [s for s in slots if s in self.unused]
        if unused:
            parts.append(f"the {len(unused)} unused COCO id slots {unused}")
        return " and ".join(parts)


def _ssd_prior_order(a: int) -> list[int]:
    """torchvision's index of each of raydet's ``a`` SSD priors at a location (see the module docstring)."""
    return [0, *range(2, a), 1]


def _class_slots(kind: str, tensor: Tensor, target: Tensor, slots: _Slots, num_unused: int,
                 num_anchors: int) -> tuple[Tensor, str]:
    """Select / reorder the class slots of one head tensor (dim 0); returns the tensor and a note."""
    s = slots
    if kind in ("ssd_cls", "ssd_reg"):  # (A * K, ...) prior-major: priors to raydet's order, then a softmax's slots
        per = s.num_slots if kind == "ssd_cls" else 4
        if tensor.shape[0] % per:
            raise ConversionError(f"SSD head outputs have {tensor.shape[0]} channels, not priors x {per}")
        a = tensor.shape[0] // per
        out = tensor.reshape(a, per, *tensor.shape[1:])[_ssd_prior_order(a)]
        note = f"{a} priors per location reordered (torchvision's 2nd, the sqrt(s_k s_k+1) square, last)"
        if kind == "ssd_cls":
            by_slot, slot_note = _class_slots("softmax", out.transpose(0, 1), target, s, num_unused, num_anchors)
            out, note = by_slot.transpose(0, 1), f"{note}; per prior {slot_note}"
        return out.reshape(-1, *tensor.shape[1:]), note
    if kind == "softmax":  # [classes..., background, unused...]: torchvision's softmax over all its slots
        if s.background is None:
            raise ConversionError("a softmax classifier needs a background slot")
        keep_unused = s.unused if num_unused == len(s.unused) else []
        if num_unused not in (0, len(s.unused)):
            raise ConversionError(f"the box head has num_unused_classes={num_unused} but the source has "
                                  f"{len(s.unused)} unused slots: set it to {len(s.unused)} or 0")
        order = s.classes + [s.background] + keep_unused
        dropped = [i for i in range(s.num_slots) if i not in order]
        note = (f"{s.num_slots} slots -> {len(s.classes)} classes, background {s.background} -> {len(s.classes)}"
                + (f", unused slots {keep_unused} kept after it (num_unused_classes)" if keep_unused else ""))
        if dropped:
            note += f"; dropped {s.dropped_note(dropped)} (the softmax then differs from torchvision's)"
        return tensor[order], note
    if kind in ("regressor", "mask"):
        per = 4 if kind == "regressor" else 1
        if tensor.shape[0] == per and target.shape[0] == per:  # class-agnostic
            return tensor, ""
        if tensor.shape[0] == per * s.num_slots:
            src = s.classes
        elif s.background == 0 and tensor.shape[0] == per * (s.num_slots - 1):  # no background slot
            src = [c - 1 for c in s.classes]
        else:
            raise ConversionError(f"{kind} has {tensor.shape[0]} rows for {s.num_slots} class slots")
        rows = torch.tensor([per * c + k for c in src for k in range(per)])
        dropped = [i for i in range(s.num_slots) if i not in s.classes]
        note = f"class-specific {'deltas' if per == 4 else 'masks'} of {len(src)} classes"
        if tensor.shape[0] == per * s.num_slots and dropped:
            note += f"; dropped those of {s.dropped_note(dropped)}"
        return tensor[rows], note
    if kind == "sigmoid":  # (A * slots, ...) anchor-major -> (A * C, ...)
        a = num_anchors
        if tensor.shape[0] != a * s.num_slots:
            raise ConversionError(f"sigmoid class logits have {tensor.shape[0]} channels, not {a} priors x "
                                  f"{s.num_slots} slots")
        out = tensor.reshape(a, s.num_slots, *tensor.shape[1:])[:, s.classes].reshape(-1, *tensor.shape[1:])
        dropped = [i for i in range(s.num_slots) if i not in s.classes]
        note = f"{a} anchors x {s.num_slots} slots -> {a} x {len(s.classes)} classes"
        if dropped:
            note += f"; dropped {s.dropped_note(dropped)} (never a target)"
        return out, note
    raise AssertionError(kind)


def _head_info(model: nn.Module) -> tuple[str, int, int, int]:
    """(class-head kind, num_classes, num_unused_classes, anchors per location (SSD: of its first level)) of a
    raydet detector."""
    roi_head = getattr(model, "roi_head", None)
    if roi_head is not None:
        head = roi_head.bbox_head
        return "softmax", head.num_classes, int(getattr(head, "num_unused_classes", 0)), 0
    bbox_head = getattr(model, "bbox_head", None)
    if bbox_head is not None and not getattr(bbox_head, "use_sigmoid_cls", True):  # SSD: a softmax per prior
        return ("ssd", bbox_head.num_classes, int(getattr(bbox_head, "num_unused_classes", 0)),
                bbox_head.num_base_priors[0])
    if bbox_head is not None:  # RetinaNet's anchors, or the one point of an anchor-free head (FCOS)
        num_priors = getattr(bbox_head, "num_anchors", None) or bbox_head.prior_generator.num_base_priors
        return "sigmoid", bbox_head.num_classes, 0, num_priors
    return "", 0, 0, 0


def convert_torchvision(state: dict[str, Tensor], model: nn.Module, source: str = "checkpoint",
                        class_names: list[str] | None = None) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a torchvision detector's state dict onto ``model`` (a raydet detector built from a pipeline).

    Args:
        state: torchvision ``model.state_dict()`` (current or pre-v2 key names).
        model: the target; its ``state_dict()`` gives the keys and shapes to fill, its heads the class counts.
        source: the source's name for messages (the file).
        class_names: names of the model's classes when the source is not a 91-slot COCO model.

    Returns:
        (the model's full state dict, the report). The report's ``classes`` / ``cat_ids`` give each label's name
        and category id (COCO ids for torchvision's COCO models).

    Raises:
        ConversionError: another architecture (a source tensor with no place, a model tensor with no source, a
            shape mismatch), or class slots that do not fit the model's classes; nothing is returned then.
    """
    from raydet.interop.report import check_complete

    state = legacy_names(state)
    target = model.state_dict()
    kind, num_classes, num_unused, num_anchors = _head_info(model)
    slots = None
    cls_key = {"softmax": "roi_heads.box_predictor.cls_score.weight",
               "sigmoid": "head.classification_head.cls_logits.weight",
               "ssd": "head.classification_head.module_list.0.weight"}.get(kind)
    if cls_key in state:
        rows = state[cls_key].shape[0]
        num_slots = rows if kind == "softmax" else rows // max(num_anchors, 1)
        slots = _Slots(num_slots, num_classes, background=kind in ("softmax", "ssd"), class_names=class_names,
                       where=f"{source} ({cls_key} {list(state[cls_key].shape)})")

    report = ConversionReport("torchvision")
    mapped: dict[str, Tensor] = {}
    unplaced: list[tuple[str, tuple[int, ...]]] = []
    rules = _rules(state)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor "
                                  "(is this a torchvision state dict?)")
        dest, slot_kind = None, ""
        for pattern, new, k in rules:
            m = re.match(pattern, key)
            if m:
                dest, slot_kind = new(m, target), k
                break
        if dest is None or dest not in target:
            if key.endswith("num_batches_tracked"):
                report.drop(key, value, "BatchNorm step counter; the model's norm layer (FrozenBN) has none")
            else:
                unplaced.append((key, tuple(value.shape)))
            continue
        note, original = "", value
        if slot_kind and slots is not None:
            value, note = _class_slots(slot_kind, value, target[dest], slots, num_unused, num_anchors)
        mapped[dest] = value.detach().clone().to(target[dest].dtype)
        report.place(key, original, dest, note)
    if _is_fcos(state):
        for key in (k for k in target if re.match(r"^bbox_head\.scales\.\d+\.scale$", k) and k not in mapped):
            mapped[key] = torch.ones_like(target[key])
            report.fill(key, mapped[key], "torchvision's FCOS has no per-level Scale: 1 (the identity)")
    check_complete(mapped, target, unplaced, source)
    if slots is not None:
        report.classes, report.cat_ids = list(slots.names), list(slots.cat_ids)
    return {k: mapped[k] for k in target}, report
