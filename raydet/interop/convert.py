"""``raydet convert SRC OUT --from FORMAT --pipeline PIPELINE``: another toolbox's checkpoint as a raydet checkpoint.

The pipeline's model is built (on the CPU, random weights), the source's tensors are mapped onto it by the
format's converter (see :mod:`raydet.interop.torchvision`), and the result is written as a raydet checkpoint
(``{"model": state_dict, "meta": {...}}``) that ``raydet test`` / ``raydet infer`` load with that pipeline. The meta
holds the class names and category ids of the model's labels, the pipeline (merged YAML) and the conversion record.
The class names are those the source checkpoint's ``meta`` records (MMDetection's layout), else the pipeline's
``data.*.classes``.
"""
from __future__ import annotations

import os
import pickle
import types
from typing import TYPE_CHECKING, Callable, Iterable

from raydet.interop.report import ConversionError, ConversionReport

__all__ = ["SOURCE_FORMATS", "convert_checkpoint", "convert_state_dict", "load_source", "load_source_state",
           "source_class_names"]

if TYPE_CHECKING:
    import torch


def _torchvision(state, model, source, class_names):
    from raydet.interop.torchvision import convert_torchvision

    return convert_torchvision(state, model, source=source, class_names=class_names)


def _mmdet(state, model, source, class_names):
    from raydet.interop.mmdet import convert_mmdet

    return convert_mmdet(state, model, source=source, class_names=class_names)


def _detectron2(state, model, source, class_names):
    from raydet.interop.detectron2 import convert_detectron2

    return convert_detectron2(state, model, source=source, class_names=class_names)


def _read_detectron2(path, cfg):
    """Detectron2's .pkl (numpy arrays only) or .pth, its pixel_mean / pixel_std checked against the pipeline."""
    from raydet.interop.detectron2 import check_normalization, load_detectron2, pipeline_normalization

    state = load_detectron2(path)
    check_normalization(state, pipeline_normalization(cfg), os.fspath(path))
    return state, {}


# format -> converter(state, model, source name, class names) -> (state dict, report)
SOURCE_FORMATS: dict[str, Callable] = {"torchvision": _torchvision, "mmdet": _mmdet, "detectron2": _detectron2}
# format -> reader(path, pipeline config) -> (state dict, meta), for formats with their own file layout; the
# others are read by load_source
SOURCE_READERS: dict[str, Callable] = {"detectron2": _read_detectron2}


def load_source_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a plain state dict, or the ``model`` / ``state_dict`` entry of a training
    checkpoint. Tensors are read with ``weights_only`` when the file allows it (a plain state dict always does).

    Raises:
        FileNotFoundError: no such file. ConversionError: not a torch file, or no state dict in it.
    """
    return load_source(path)[0]


def source_class_names(meta: dict) -> list[str] | None:
    """The class names a checkpoint's ``meta`` records (MMDetection 3.x ``meta['dataset_meta']['classes']``, 2.x
    ``meta['CLASSES']``), or None."""
    dataset_meta = meta.get("dataset_meta") if isinstance(meta, dict) else None
    classes = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    if not classes and isinstance(meta, dict):
        classes = meta.get("CLASSES")
    return [str(c) for c in classes] if classes and not isinstance(classes, str) else None


def load_source(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(the tensors, as :func:`load_source_state`, and the checkpoint's ``meta`` dict, {} when it has none).

    A checkpoint that pickles objects of packages not installed here (e.g. MMEngine's ``message_hub`` in an
    MMDetection 3.x training checkpoint) is read with those objects as inert placeholders.
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickled extras (e.g. argparse.Namespace in a training checkpoint)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except ImportError:  # a class of a package not installed here
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_placeholder_pickle)
            except Exception as exc:
                raise ConversionError(f"cannot read {path}: {exc}") from None
        except Exception as exc:
            raise ConversionError(f"cannot read {path}: {exc}") from None
    meta = obj.get("meta") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ConversionError(f"{path}: no state dict of tensors (a plain state dict, or one under 'model' / "
                              "'state_dict')")
    return obj, meta


class _Placeholder:
    """Stands for a pickled object whose class cannot be imported here; keeps its arguments and state."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _PlaceholderUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


# the pickle module torch.load is given for files with classes that are not installed here
_placeholder_pickle = types.ModuleType("raydet_placeholder_pickle")
_placeholder_pickle.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("_")})
_placeholder_pickle.Unpickler = _PlaceholderUnpickler


def convert_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, source_format: str,
                       source: str = "checkpoint", class_names: list[str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map ``state`` (a ``source_format`` state dict) onto ``model``; see :data:`SOURCE_FORMATS`."""
    if source_format not in SOURCE_FORMATS:
        raise ConversionError(f"unknown source format {source_format!r}; one of {', '.join(SOURCE_FORMATS)}")
    return SOURCE_FORMATS[source_format](state, model, source, class_names)


def _pipeline_class_names(cfg) -> list[str] | None:
    for split in ("test", "val", "train"):
        classes = cfg.get(f"data.{split}.classes")
        if classes:
            return [str(c) for c in classes]
    return None


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, source_format: str, pipeline,
                       overrides: Iterable[str] = ()) -> ConversionReport:
    """Convert the checkpoint file ``src`` for the model of ``pipeline`` and write it to ``out``.

    Args:
        src: the source checkpoint (e.g. torchvision's ``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth``).
        out: the raydet checkpoint to write (its folder is created).
        source_format: a key of :data:`SOURCE_FORMATS` (``torchvision``, ``mmdet``, ``detectron2``).
        pipeline: a pipeline file or a loaded :class:`~raydet.config.Config`; ``overrides`` as ``--set``.

    Returns:
        The report: every source tensor placed or dropped with a reason, and the labels' class names.

    Raises:
        ConversionError: the source does not fit the model (first mismatching keys and shapes); nothing is written.
        ConfigError: the pipeline is invalid.
    """
    import raydet.models  # noqa: F401  (registers the components)
    from raydet.config import Config, load_config
    from raydet.engine.checkpoint import save_checkpoint

    import torch

    cfg = pipeline.with_overrides(overrides) if isinstance(pipeline, Config) else load_config(pipeline, overrides)
    try:
        with torch.device("meta"):  # only the keys, shapes and dtypes are needed: no storage, no initialisation
            model = cfg.build("model")
    except Exception:  # noqa: BLE001  (a component that cannot live on the meta device)
        model = cfg.build("model")
    reader = SOURCE_READERS.get(source_format)
    state, source_meta = reader(src, cfg) if reader else load_source(src)
    mapped, report = convert_state_dict(state, model, source_format, source=os.fspath(src),
                                        class_names=source_class_names(source_meta) or _pipeline_class_names(cfg))
    meta = {"pipeline": cfg.to_yaml(), "classes": report.classes or None, "cat_ids": report.cat_ids or None,
            "converted_from": {"file": os.path.abspath(os.fspath(src)), **report.to_dict()}}
    save_checkpoint({"model": mapped, "meta": meta}, out)
    return report
