"""MMDetection checkpoints -> raydet model state dicts, and back.

Covers the R-50-FPN family of MMDetection 3.x (and 2.x, which uses the same names): Faster R-CNN, Mask R-CNN,
RetinaNet and RPN (``faster-rcnn_r50_fpn_1x_coco`` etc.; any depth, class count or norm of the same layout), whose
raydet pipelines (``pipelines/faster_rcnn_r50_fpn_1x_coco.yaml`` etc.) mirror MMDetection's configs. A checkpoint
file is MMDetection's ``{"meta": {...}, "state_dict": {...}}``; :func:`raydet.interop.convert_checkpoint` reads the
class names from ``meta['dataset_meta']['classes']`` (3.x) or ``meta['CLASSES']`` (2.x).

The class slots already agree (softmax heads: C classes then the background at index C; class-specific regressors
and mask logits: C slots; sigmoid heads: anchor-major A x C channels), as do the ResNet backbone's names. What
differs is the nesting of layers:

=====================================================  ===================================================
MMDetection                                            raydet
=====================================================  ===================================================
``neck.lateral_convs.i.conv`` / ``.bn`` / ``.gn``      ``neck.lateral_convs.i.0`` / ``.1``
``neck.fpn_convs.i.conv`` (i < L lateral convs)        ``neck.fpn_convs.i.0``
``neck.fpn_convs.i.conv`` (i >= L: extra levels)       ``neck.extra_convs.(i - L).0``
``bbox_head.rpn_*`` (3.x RPN), ``rpn_head.rpn_*``      ``rpn_head.rpn_*``
``rpn_head.rpn_conv.i.conv`` (``num_convs`` > 1)       ``rpn_head.rpn_conv.(2 i)`` (conv, ReLU pairs)
``roi_head.bbox_head.shared_fcs.i``                    ``roi_head.bbox_head.shared_fcs.(2 i)`` (Linear, ReLU)
``*.shared_convs.i`` / ``mask_head.convs.i`` /         the same tower, entry ``s i`` (conv) and ``s i + 1``
``bbox_head.cls_convs.i`` / ``reg_convs.i``            (norm), ``s`` = 3 with a norm (conv, norm, ReLU),
``.conv`` / ``.bn`` / ``.gn`` (mmcv ``ConvModule``)    2 without (conv, ReLU)
=====================================================  ===================================================

BatchNorm step counters (``num_batches_tracked``) are dropped when the pipeline's norm layer (FrozenBN) has none.
Every other tensor is passed on unchanged; one that has no place fails the conversion (see
:func:`~raydet.interop.report.check_complete`). :func:`to_mmdet` is the inverse: raydet names -> MMDetection's.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from raydet.interop.report import ConversionError, ConversionReport, check_complete

__all__ = ["convert_mmdet", "to_mmdet"]

Tensor = torch.Tensor

_TOWERS = r"(roi_head\.bbox_head\.shared_convs|roi_head\.mask_head\.convs|bbox_head\.cls_convs|bbox_head\.reg_convs)"
_PART = {"conv": 0, "bn": 1, "gn": 1}  # mmcv ConvModule's layer names (norm: "bn" for BN / SyncBN, "gn" for GN)


def _stride(state: dict, prefix: str) -> int:
    """Entries per block of a raydet conv tower in ``state``: 3 when its blocks have a norm (1-D ``.1.weight``)."""
    weight = state.get(f"{prefix}.1.weight")
    return 3 if weight is not None and weight.dim() == 1 else 2


def _num_laterals(keys, prefix: str) -> int:
    return len({m[1] for k in keys for m in [re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k)] if m})


def _forward_rules(source: dict) -> list[tuple[str, Callable]]:
    """(MMDetection key pattern, raydet key of (match, target state))."""
    laterals = _num_laterals(source, "neck.lateral_convs")

    def fpn(m, t):
        i, part = int(m[1]), _PART[m[2]]
        if i < laterals:
            return f"neck.fpn_convs.{i}.{part}.{m[3]}"
        return f"neck.extra_convs.{i - laterals}.{part}.{m[3]}"

    def tower(prefix, block, part, param, t):
        return f"{prefix}.{_stride(t, prefix) * block + _PART[part]}.{param}"

    return [
        (r"^backbone\.(.+)$", lambda m, t: f"backbone.{m[1]}"),
        (r"^neck\.lateral_convs\.(\d+)\.(conv|bn|gn)\.(.+)$",
         lambda m, t: f"neck.lateral_convs.{m[1]}.{_PART[m[2]]}.{m[3]}"),
        (r"^neck\.fpn_convs\.(\d+)\.(conv|bn|gn)\.(.+)$", fpn),
        (r"^(?:rpn_head|bbox_head)\.rpn_conv\.(\d+)\.conv\.(.+)$",
         lambda m, t: tower("rpn_head.rpn_conv", int(m[1]), "conv", m[2], t)),
        (r"^(?:rpn_head|bbox_head)\.(rpn_(?:conv|cls|reg))\.(weight|bias)$", lambda m, t: f"rpn_head.{m[1]}.{m[2]}"),
        (r"^roi_head\.bbox_head\.shared_fcs\.(\d+)\.(.+)$",
         lambda m, t: f"roi_head.bbox_head.shared_fcs.{2 * int(m[1])}.{m[2]}"),
        (rf"^{_TOWERS}\.(\d+)\.(conv|bn|gn)\.(.+)$", lambda m, t: tower(m[1], int(m[2]), m[3], m[4], t)),
        (r"^(roi_head\.bbox_head\.(?:fc_cls|fc_reg)|roi_head\.mask_head\.(?:upsample|conv_logits)"
         r"|bbox_head\.(?:retina_cls|retina_reg))\.(.+)$", lambda m, t: f"{m[1]}.{m[2]}"),
    ]


def _num_classes(model: nn.Module) -> int | None:
    """The classes a raydet detector predicts; None for an RPN (class-agnostic proposals)."""
    head = getattr(getattr(model, "roi_head", None), "bbox_head", None) or getattr(model, "bbox_head", None)
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
        category ids when the names are COCO's 80 classes; ``class_<i>`` and 1..C without names).

    Raises:
        ConversionError: another architecture (a source tensor with no place, a model tensor with no source, a
            shape mismatch: the first few are named), or class names that do not fit the model's classes.
    """
    target = model.state_dict()
    report = ConversionReport("mmdet")
    mapped: dict[str, Tensor] = {}
    unplaced: list[tuple[str, tuple[int, ...]]] = []
    rules = [(re.compile(p), f) for p, f in _forward_rules(state)]
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor "
                                  "(is this an MMDetection state_dict?)")
        dest = next((f(m, target) for p, f in rules for m in [p.match(key)] if m), None)
        if dest is None or dest not in target:
            if key.endswith("num_batches_tracked"):
                report.drop(key, value, "BatchNorm step counter; the model's norm layer (FrozenBN) has none")
            else:
                unplaced.append((key, tuple(value.shape)))
            continue
        mapped[dest] = value.detach().to(target[dest].dtype)  # the same tensor when the dtype agrees
        report.place(key, value, dest)
    check_complete(mapped, target, unplaced, source)
    report.classes, report.cat_ids = _classes(model, class_names, source)
    return {k: mapped[k] for k in target}, report


def to_mmdet(state: dict[str, Tensor], mmdet_version: int = 3) -> dict[str, Tensor]:
    """The inverse of :func:`convert_mmdet`: a raydet detector's state dict with MMDetection's names.

    Args:
        state: a raydet model's ``state_dict()`` (or a raydet checkpoint's ``model``) of a pipeline that
            :func:`convert_mmdet` covers.
        mmdet_version: 3 names an RPN detector's head ``bbox_head`` (MMDetection 3.x), 2 ``rpn_head`` (2.x).

    Returns:
        MMDetection key -> the same tensor (not copied), in raydet's order: MMDetection's ``load_state_dict``
        reads it. A FrozenBN pipeline has no ``num_batches_tracked`` counters to give.

    Raises:
        ConversionError: a key no rule covers (a model of another architecture).
    """
    if mmdet_version not in (2, 3):
        raise ConversionError(f"mmdet_version must be 2 or 3, got {mmdet_version}")
    laterals = _num_laterals(state, "neck.lateral_convs")
    rpn_only = not any(k.startswith("roi_head.") for k in state)
    rpn_prefix = "bbox_head" if rpn_only and mmdet_version == 3 else "rpn_head"

    def part(prefix: str, index: int, stride: int) -> str:
        """mmcv ConvModule's name of tower entry ``index``: its conv, or its norm ("bn" or "gn")."""
        if index % stride == 0:
            return "conv"
        return "bn" if f"{prefix}.{index}.running_mean" in state else "gn"

    def tower(m) -> str:
        prefix, index = m[1], int(m[2])
        stride = _stride(state, prefix)
        return f"{prefix}.{index // stride}.{part(prefix, index, stride)}.{m[3]}"

    rules: list[tuple[str, Callable]] = [
        (r"^backbone\.(.+)$", lambda m: f"backbone.{m[1]}"),
        (r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.(\d+)\.(.+)$",
         lambda m: f"neck.{m[1]}.{m[2]}.{part(f'neck.{m[1]}.{m[2]}', int(m[3]), 2)}.{m[4]}"),
        (r"^neck\.extra_convs\.(\d+)\.(\d+)\.(.+)$",
         lambda m: f"neck.fpn_convs.{laterals + int(m[1])}.{part(f'neck.extra_convs.{m[1]}', int(m[2]), 2)}.{m[3]}"),
        (r"^rpn_head\.rpn_conv\.(\d+)\.(weight|bias)$",
         lambda m: f"{rpn_prefix}.rpn_conv.{int(m[1]) // 2}.conv.{m[2]}"),
        (r"^rpn_head\.(rpn_(?:conv|cls|reg))\.(weight|bias)$", lambda m: f"{rpn_prefix}.{m[1]}.{m[2]}"),
        (r"^roi_head\.bbox_head\.shared_fcs\.(\d+)\.(.+)$",
         lambda m: f"roi_head.bbox_head.shared_fcs.{int(m[1]) // 2}.{m[2]}"),
        (rf"^{_TOWERS}\.(\d+)\.(.+)$", tower),
        (r"^(roi_head\.bbox_head\.(?:fc_cls|fc_reg)|roi_head\.mask_head\.(?:upsample|conv_logits)"
         r"|bbox_head\.(?:retina_cls|retina_reg))\.(.+)$", lambda m: f"{m[1]}.{m[2]}"),
    ]
    compiled = [(re.compile(p), f) for p, f in rules]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = next((f(m) for p, f in compiled for m in [p.match(key)] if m), None)
        if new is None:
            raise ConversionError(f"no MMDetection name for {key} {list(value.shape)} (a model of another "
                                  "architecture?)")
        out[new] = value
    return out
