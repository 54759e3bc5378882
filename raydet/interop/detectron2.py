"""Detectron2 checkpoints -> raydet model state dicts, and back.

Covers Detectron2's R-FPN detectors of the model zoo (``COCO-Detection/faster_rcnn_R_50_FPN_1x``,
``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x``, ``COCO-Detection/retinanet_R_50_FPN_1x``,
``COCO-Detection/rpn_R_50_FPN_1x`` and any depth or class count of the same layout) onto the pipelines of
``pipelines/zoo/detectron2/``, which reproduce Detectron2's test-time behaviour.

Files: the model zoo's ``model_final_*.pkl`` (a pickled dict whose ``model`` entry maps names to numpy arrays, with
``__author__`` and ``matching_heuristics`` beside it) are read by :func:`load_detectron2` with an unpickler that
admits only numpy's array reconstruction (no other pickle global is ever imported or called); a training
checkpoint ``model_final.pth`` (``{"model": state_dict, ...}``) is read by ``torch.load(weights_only=True)``.

What differs besides the names:

* **ResNet.** Detectron2's ``bottom_up.stem`` / ``res2``..``res5`` blocks with a ``norm`` inside each conv and a
  ``shortcut`` projection become torchvision-style ``conv1`` / ``layer1``..``layer4`` with ``bn*`` and
  ``downsample``; the MSRA (caffe) stride-in-the-first-1x1 is the pipeline's ``style: caffe``.
* **Anchor order.** Detectron2 orders a location's anchors size-major (for each size, every aspect ratio); raydet
  ratio-major. RetinaNet's class logits and deltas (3 sizes x 3 ratios per location) are permuted accordingly (the
  RPN's one size per level needs no change).
* **Class slots.** Detectron2's softmax classifier has ``K + 1`` outputs with the background last and its box
  regressor ``4 K`` class-specific rows, as raydet's; its COCO models' ``K = 80`` classes are COCO's category ids
  in increasing order, as raydet's COCO datasets number them. Nothing is reordered.
* **Dropped buffers** (reported): ``pixel_mean`` / ``pixel_std`` (the input normalisation, which the pipeline's
  ``Normalize`` applies; :func:`check_normalization` compares them), the anchor generator's ``cell_anchors`` (the
  pipeline's ``anchor_generator`` recomputes them; those of a head the model lacks, or with another count per
  location, have no place) and BatchNorm step counters.
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from raydet.interop.report import ConversionError, ConversionReport, check_complete

__all__ = ["convert_detectron2", "to_detectron2", "load_detectron2", "check_normalization", "pipeline_normalization"]

Tensor = torch.Tensor

# The pickle globals a Detectron2 .pkl needs: numpy's array and scalar reconstruction (numpy 1.x and 2.x module
# names), protocol-2 bytes (``_codecs.encode``) and ordered dicts. Nothing else is imported or called.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}
_OTHER_GLOBALS = {("_codecs", "encode"), ("collections", "OrderedDict")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; any other global fails before it is imported."""

    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            try:  # numpy 2 keeps numpy.core as an alias that warns; read both names from the module that exists
                real = importlib.import_module(module.replace("numpy.core", "numpy._core"))
            except ImportError:
                real = importlib.import_module(module.replace("numpy._core", "numpy.core"))
            return getattr(real, name)
        if (module, name) in _OTHER_GLOBALS:
            return super().find_class(module, name)
        raise ConversionError(f"{self.source}: refusing to unpickle {module}.{name}: a Detectron2 .pkl holds only "
                              "numpy arrays (is this file a Detectron2 model-zoo checkpoint?)")


def load_detectron2(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a Detectron2 checkpoint file, by Detectron2's names.

    A ``.pkl`` file (the model zoo's ``model_final_*.pkl``): the ``model`` dict of numpy arrays, read with an
    unpickler that admits only numpy's array reconstruction. Any other file: ``torch.load(weights_only=True)``, then
    its ``model`` entry (Detectron2's own training checkpoints, ``model_final.pth``) or the file as a state dict.

    Raises:
        FileNotFoundError: no such file.
        ConversionError: a forbidden pickle global (nothing of it is run), a Caffe2 / Detectron (v1) pickle of
            ``blobs``, no ``model`` dict, or an entry that is not an array.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.lower().endswith(".pkl"):
        with open(path, "rb") as f:
            try:
                obj = _NumpyOnlyUnpickler(f, path).load()
            except ConversionError:
                raise
            except Exception as exc:  # noqa: BLE001  (a truncated or foreign file)
                raise ConversionError(f"cannot read {path} as a Detectron2 .pkl: {exc}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConversionError(f"cannot read {path} as a checkpoint of tensors (torch.load with "
                                  f"weights_only): {exc}") from None
    if isinstance(obj, dict) and "blobs" in obj and "model" not in obj:
        raise ConversionError(f"{path} is a Caffe2 / Detectron (v1) pickle ('blobs'), such as an ImageNet backbone "
                              "(R-50.pkl); raydet converts Detectron2 detectors, whose file has a 'model' dict")
    state = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: no 'model' dict of arrays (a Detectron2 checkpoint has one)")
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value):
            out[key] = value
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":  # native order, contiguous, writable
            value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("="))
            out[key] = torch.from_numpy(value if value.flags.writeable else value.copy())
        else:
            raise ConversionError(f"{path}: entry model[{key!r}] is a {type(value).__name__}, not an array of numbers")
    return out


def pipeline_normalization(cfg) -> dict | None:
    """The ``Normalize`` step (mean, std, to_rgb) of a pipeline's test (else val, else train) data pipeline."""
    for split in ("test", "val", "train"):
        for step in cfg.get(f"data.{split}.pipeline") or []:
            if isinstance(step, dict) and step.get("type") == "Normalize":
                return {"mean": [float(v) for v in step["mean"]], "std": [float(v) for v in step["std"]],
                        "to_rgb": bool(step.get("to_rgb", True))}
    return None


def check_normalization(state: dict[str, Tensor], normalize: dict | None, source: str = "checkpoint") -> None:
    """Fail unless the checkpoint's ``pixel_mean`` / ``pixel_std`` (if it has them) equal the pipeline's
    ``Normalize`` mean / std (both in the model's channel order, BGR for Detectron2's MSRA models; within 1e-3).

    Raises:
        ConversionError: they differ (the weights would see other inputs than they were trained on), or the
            checkpoint has them and the pipeline has no Normalize step.
    """
    for key, name in (("pixel_mean", "mean"), ("pixel_std", "std")):
        if key not in state:
            continue
        theirs = [round(float(v), 4) for v in state[key].reshape(-1)]  # float32 -> the config's decimals
        if normalize is None:
            raise ConversionError(f"{source} normalises its input with {key} {theirs} but the pipeline has no "
                                  "Normalize step")
        ours = normalize[name]
        if len(ours) != len(theirs) or any(abs(a - b) > 1e-3 for a, b in zip(ours, theirs)):
            raise ConversionError(
                f"{source} was trained on inputs normalised with {key} {theirs} (Detectron2's MODEL.PIXEL_"
                f"{name.upper()}, in its input channel order) but the pipeline's Normalize has {name} {ours}: use a "
                "pipeline of pipelines/zoo/detectron2/ or set the Normalize step to the checkpoint's values")


# ------------------------------------------------------------------------------------------------------------------
# Names


@dataclass
class _Layout:
    """What the names depend on besides the keys: the FPN's first backbone level, each conv tower's stride (2 entries
    per block without a norm, 3 with one), the RetinaNet anchor order."""

    fpn_start: int
    tower_stride: Callable[[str], int]
    num_ratios: int
    num_sizes: int


def _layout(model: nn.Module) -> _Layout:
    target = model.state_dict()

    def tower_stride(prefix: str) -> int:
        norm = target.get(f"{prefix}.1.weight")
        return 3 if norm is not None and norm.dim() == 1 else 2

    neck = getattr(model, "neck", None)
    head = getattr(model, "bbox_head", None)
    gen = getattr(head, "anchor_generator", None)
    ratios = len(gen.ratios) if gen is not None else 1
    sizes = gen.num_base_anchors // ratios if gen is not None else 1
    return _Layout(int(getattr(neck, "start_level", 0)), tower_stride, ratios, sizes)


def _tower_key(layout: _Layout, prefix: str, block: int, part: int, param: str) -> str:
    return f"{prefix}.{layout.tower_stride(prefix) * block + part}.{param}"


def _forward_rules(layout: _Layout) -> list[tuple[str, Callable, str]]:
    """(Detectron2 key pattern, raydet key of the match, value kind) for every tensor a raydet model holds."""
    s = layout.fpn_start
    rpn = r"^proposal_generator\.rpn_head\."
    return [
        (r"^backbone\.bottom_up\.stem\.conv1\.weight$", lambda m: "backbone.conv1.weight", ""),
        (r"^backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)$", lambda m: f"backbone.bn1.{m[1]}", ""),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight$",
         lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight", ""),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$",
         lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}", ""),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight$",
         lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight", ""),
        (r"^backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$",
         lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}", ""),
        (r"^backbone\.fpn_lateral(\d)\.(weight|bias)$", lambda m: f"neck.lateral_convs.{int(m[1]) - 2 - s}.0.{m[2]}",
         ""),
        (r"^backbone\.fpn_lateral(\d)\.norm\.(\w+)$", lambda m: f"neck.lateral_convs.{int(m[1]) - 2 - s}.1.{m[2]}", ""),
        (r"^backbone\.fpn_output(\d)\.(weight|bias)$", lambda m: f"neck.fpn_convs.{int(m[1]) - 2 - s}.0.{m[2]}", ""),
        (r"^backbone\.fpn_output(\d)\.norm\.(\w+)$", lambda m: f"neck.fpn_convs.{int(m[1]) - 2 - s}.1.{m[2]}", ""),
        (r"^backbone\.top_block\.p(\d)\.(weight|bias)$", lambda m: f"neck.extra_convs.{int(m[1]) - 6}.0.{m[2]}", ""),
        (rpn + r"conv\.(weight|bias)$", lambda m: f"rpn_head.rpn_conv.{m[1]}", ""),
        (rpn + r"objectness_logits\.(weight|bias)$", lambda m: f"rpn_head.rpn_cls.{m[1]}", ""),
        (rpn + r"anchor_deltas\.(weight|bias)$", lambda m: f"rpn_head.rpn_reg.{m[1]}", ""),
        (r"^roi_heads\.box_head\.conv(\d)\.(weight|bias)$",
         lambda m: _tower_key(layout, "roi_head.bbox_head.shared_convs", int(m[1]) - 1, 0, m[2]), ""),
        (r"^roi_heads\.box_head\.conv(\d)\.norm\.(\w+)$",
         lambda m: _tower_key(layout, "roi_head.bbox_head.shared_convs", int(m[1]) - 1, 1, m[2]), ""),
        (r"^roi_heads\.box_head\.fc(\d)\.(weight|bias)$",
         lambda m: f"roi_head.bbox_head.shared_fcs.{2 * (int(m[1]) - 1)}.{m[2]}", ""),
        (r"^roi_heads\.box_predictor\.cls_score\.(weight|bias)$", lambda m: f"roi_head.bbox_head.fc_cls.{m[1]}",
         "softmax"),
        (r"^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$", lambda m: f"roi_head.bbox_head.fc_reg.{m[1]}",
         "regressor"),
        (r"^roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$",
         lambda m: _tower_key(layout, "roi_head.mask_head.convs", int(m[1]) - 1, 0, m[2]), ""),
        (r"^roi_heads\.mask_head\.mask_fcn(\d)\.norm\.(\w+)$",
         lambda m: _tower_key(layout, "roi_head.mask_head.convs", int(m[1]) - 1, 1, m[2]), ""),
        (r"^roi_heads\.mask_head\.deconv\.(weight|bias)$", lambda m: f"roi_head.mask_head.upsample.{m[1]}", ""),
        (r"^roi_heads\.mask_head\.predictor\.(weight|bias)$", lambda m: f"roi_head.mask_head.conv_logits.{m[1]}",
         "mask"),
        (r"^head\.cls_subnet\.(\d+)\.(\w+)$", lambda m: f"bbox_head.cls_convs.{m[1]}.{m[2]}", ""),
        (r"^head\.bbox_subnet\.(\d+)\.(\w+)$", lambda m: f"bbox_head.reg_convs.{m[1]}.{m[2]}", ""),
        (r"^head\.cls_score\.(weight|bias)$", lambda m: f"bbox_head.retina_cls.{m[1]}", "anchors"),
        (r"^head\.bbox_pred\.(weight|bias)$", lambda m: f"bbox_head.retina_reg.{m[1]}", "anchors"),
    ]


def _inverse_rules(layout: _Layout) -> list[tuple[str, Callable, str]]:
    """(raydet key pattern, Detectron2 key of the match, value kind): the inverse of :func:`_forward_rules`."""
    s = layout.fpn_start

    def tower(prefix: str, d2: Callable[[int, int, str], str]) -> tuple[str, Callable, str]:
        def name(m):
            block, part = divmod(int(m[1]), layout.tower_stride(prefix))
            return d2(block + 1, part, m[2])
        return rf"^{re.escape(prefix)}\.(\d+)\.(\w+)$", name, ""

    return [
        (r"^backbone\.conv1\.weight$", lambda m: "backbone.bottom_up.stem.conv1.weight", ""),
        (r"^backbone\.bn1\.(\w+)$", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}", ""),
        (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight$",
         lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight", ""),
        (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)$",
         lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}", ""),
        (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight$",
         lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.weight", ""),
        (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)$",
         lambda m: f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}", ""),
        (r"^neck\.lateral_convs\.(\d+)\.0\.(\w+)$", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2 + s}.{m[2]}", ""),
        (r"^neck\.lateral_convs\.(\d+)\.1\.(\w+)$",
         lambda m: f"backbone.fpn_lateral{int(m[1]) + 2 + s}.norm.{m[2]}", ""),
        (r"^neck\.fpn_convs\.(\d+)\.0\.(\w+)$", lambda m: f"backbone.fpn_output{int(m[1]) + 2 + s}.{m[2]}", ""),
        (r"^neck\.fpn_convs\.(\d+)\.1\.(\w+)$", lambda m: f"backbone.fpn_output{int(m[1]) + 2 + s}.norm.{m[2]}", ""),
        (r"^neck\.extra_convs\.(\d+)\.0\.(\w+)$", lambda m: f"backbone.top_block.p{int(m[1]) + 6}.{m[2]}", ""),
        (r"^rpn_head\.rpn_conv\.(weight|bias)$", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}", ""),
        (r"^rpn_head\.rpn_cls\.(\w+)$", lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}", ""),
        (r"^rpn_head\.rpn_reg\.(\w+)$", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}", ""),
        tower("roi_head.bbox_head.shared_convs",
              lambda k, part, p: f"roi_heads.box_head.conv{k}.{'norm.' if part else ''}{p}"),
        (r"^roi_head\.bbox_head\.shared_fcs\.(\d+)\.(\w+)$",
         lambda m: f"roi_heads.box_head.fc{int(m[1]) // 2 + 1}.{m[2]}", ""),
        (r"^roi_head\.bbox_head\.fc_cls\.(\w+)$", lambda m: f"roi_heads.box_predictor.cls_score.{m[1]}", ""),
        (r"^roi_head\.bbox_head\.fc_reg\.(\w+)$", lambda m: f"roi_heads.box_predictor.bbox_pred.{m[1]}", ""),
        tower("roi_head.mask_head.convs",
              lambda k, part, p: f"roi_heads.mask_head.mask_fcn{k}.{'norm.' if part else ''}{p}"),
        (r"^roi_head\.mask_head\.upsample\.(\w+)$", lambda m: f"roi_heads.mask_head.deconv.{m[1]}", ""),
        (r"^roi_head\.mask_head\.conv_logits\.(\w+)$", lambda m: f"roi_heads.mask_head.predictor.{m[1]}", ""),
        (r"^bbox_head\.cls_convs\.(\d+)\.(\w+)$", lambda m: f"head.cls_subnet.{m[1]}.{m[2]}", ""),
        (r"^bbox_head\.reg_convs\.(\d+)\.(\w+)$", lambda m: f"head.bbox_subnet.{m[1]}.{m[2]}", ""),
        (r"^bbox_head\.retina_cls\.(\w+)$", lambda m: f"head.cls_score.{m[1]}", "anchors"),
        (r"^bbox_head\.retina_reg\.(\w+)$", lambda m: f"head.bbox_pred.{m[1]}", "anchors"),
    ]


def _match(rules, key: str) -> tuple[str | None, str]:
    for pattern, new, kind in rules:
        m = re.match(pattern, key)
        if m:
            return new(m), kind
    return None, ""


def _anchor_order(layout: _Layout, inverse: bool = False) -> list[int]:
    """raydet anchor a (ratio-major: a = r * S + s) <- Detectron2 anchor s * R + r (size-major); or the inverse."""
    r_count, s_count = layout.num_ratios, layout.num_sizes
    order = [s * r_count + r for r in range(r_count) for s in range(s_count)]
    if not inverse:
        return order
    back = [0] * len(order)
    for ours, theirs in enumerate(order):
        back[theirs] = ours
    return back


def _permute_anchors(tensor: Tensor, order: list[int]) -> Tensor:
    """(A * C, ...) anchor-major rows -> the same rows with the anchors in ``order``."""
    a = len(order)
    if tensor.shape[0] % a:
        return tensor  # a shape the completeness check reports
    return tensor.reshape(a, tensor.shape[0] // a, *tensor.shape[1:])[order].reshape(tensor.shape)


# ------------------------------------------------------------------------------------------------------------------
# Classes


def _classes(model: nn.Module, class_names: list[str] | None) -> tuple[list[str], list[int]]:
    """(names, category ids) of the model's labels: COCO's for an 80-class model (Detectron2's COCO models number the
    80 category ids in increasing order, as raydet does), else the pipeline's names with ids 1..K."""
    roi_head = getattr(model, "roi_head", None)
    head = roi_head.bbox_head if roi_head is not None else getattr(model, "bbox_head", None)
    if head is None:  # an RPN: one class-agnostic objectness
        return [], []
    num_classes = head.num_classes
    if num_classes == 80 and not class_names:
        from raydet.interop.torchvision import coco_slots

        ids, names, _ = coco_slots()
        return names, ids
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConversionError(f"the pipeline names {len(names)} classes but its model has {num_classes}")
    return names, list(range(1, num_classes + 1))


def _check_class_slots(state: dict[str, Tensor], model: nn.Module, layout: _Layout, source: str) -> None:
    """A clear message when the checkpoint's class count is not the pipeline's (before the shape listing)."""
    roi_head = getattr(model, "roi_head", None)
    cls = state.get("roi_heads.box_predictor.cls_score.weight")
    if roi_head is not None and cls is not None:
        head = roi_head.bbox_head
        if getattr(head, "num_unused_classes", 0):
            raise ConversionError(f"{source}: a Detectron2 classifier has no unused class slots; set the box head's "
                                  "num_unused_classes to 0")
        if cls.shape[0] != head.num_classes + 1:
            raise ConversionError(f"{source} has {cls.shape[0] - 1} classes (roi_heads.box_predictor.cls_score "
                                  f"{list(cls.shape)}: classes + background) but the pipeline's model has "
                                  f"{head.num_classes}: set num_classes in the pipeline")
    retina = state.get("head.cls_score.weight")
    head = getattr(model, "bbox_head", None)
    if retina is not None and head is not None and hasattr(head, "num_anchors"):
        a = layout.num_ratios * layout.num_sizes
        if retina.shape[0] % a or retina.shape[0] // a != head.num_classes:
            raise ConversionError(f"{source}: head.cls_score has {retina.shape[0]} channels, not {a} anchors x "
                                  f"{head.num_classes} classes of the pipeline's model (set num_classes, or the "
                                  "anchor sizes / ratios)")


# ------------------------------------------------------------------------------------------------------------------
# Conversion


def convert_detectron2(state: dict[str, Tensor], model: nn.Module, source: str = "checkpoint",
                       class_names: list[str] | None = None, normalize: dict | None = None
                       ) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a Detectron2 state dict onto ``model`` (a raydet detector built from a pipeline).

    Args:
        state: Detectron2's names -> tensors (:func:`load_detectron2` of a ``.pkl`` / ``.pth``).
        model: the target; its ``state_dict()`` gives the keys and shapes to fill.
        source: the source's name for messages (the file).
        class_names: names of the model's classes when it does not have COCO's 80.
        normalize: the pipeline's Normalize (:func:`pipeline_normalization`); when given, the checkpoint's
            ``pixel_mean`` / ``pixel_std`` must equal it (:func:`check_normalization`).

    Returns:
        (the model's full state dict, the report: every source tensor placed or dropped with a reason, the labels'
        class names and category ids).

    Raises:
        ConversionError: another architecture (a source tensor with no place, a model tensor with no source, a shape
            mismatch: the first keys and shapes are named), another class count, or another normalisation.
    """
    if normalize is not None:
        check_normalization(state, normalize, source)
    target = model.state_dict()
    layout = _layout(model)
    _check_class_slots(state, model, layout, source)
    rules = _forward_rules(layout)
    order = _anchor_order(layout)
    report = ConversionReport("detectron2")
    mapped: dict[str, Tensor] = {}
    unplaced: list[tuple[str, tuple[int, ...]]] = []
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise ConversionError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if key in ("pixel_mean", "pixel_std"):
            values = [round(float(v), 3) for v in value.flatten()]
            report.drop(key, value, f"Detectron2's input normalisation (MODEL.{key.upper()} {values}), which the "
                                    "pipeline's Normalize applies")
            continue
        anchors = re.match(r"^(proposal_generator\.)?anchor_generator\.cell_anchors\.\d+$", key)
        if anchors:  # the RPN's (two-stage models) or RetinaNet's: dropped where the model has as many per location
            head = getattr(model, "rpn_head" if anchors[1] else "bbox_head", None)
            if tuple(value.shape) == (getattr(head, "num_anchors", -1), 4):
                report.drop(key, value, "Detectron2's cell anchors; the pipeline's anchor_generator computes them")
            else:
                unplaced.append((key, tuple(value.shape)))
            continue
        if key.endswith("num_batches_tracked"):
            report.drop(key, value, "BatchNorm step counter; the model's norm layer (FrozenBN) has none")
            continue
        dest, kind = _match(rules, key)
        if dest is None or dest not in target:
            unplaced.append((key, tuple(value.shape)))
            continue
        note = ""
        original = value
        if kind == "anchors" and len(order) > 1:
            value = _permute_anchors(value, order)
            note = (f"{len(order)} anchors per location reordered from Detectron2's size-major to raydet's "
                    "ratio-major order")
        mapped[dest] = value.detach().clone().to(target[dest].dtype)
        report.place(key, original, dest, note)
    check_complete(mapped, target, unplaced, source)
    report.classes, report.cat_ids = _classes(model, class_names)
    return {k: mapped[k] for k in target}, report


def to_detectron2(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`convert_detectron2`: a raydet state dict of ``model``'s layout by Detectron2's names
    (RetinaNet's anchors back in Detectron2's size-major order). The dropped buffers (``pixel_mean`` /
    ``pixel_std``, ``cell_anchors``) are not recreated.

    Raises:
        ConversionError: a tensor of ``state`` has no Detectron2 name (a raydet model without a Detectron2
            counterpart).
    """
    layout = _layout(model)
    rules = _inverse_rules(layout)
    order = _anchor_order(layout, inverse=True)
    out = {}
    for key, value in state.items():
        dest, kind = _match(rules, key)
        if dest is None:
            raise ConversionError(f"{key} {list(value.shape)} has no Detectron2 counterpart")
        out[dest] = _permute_anchors(value, order) if kind == "anchors" and len(order) > 1 else value
    return out
