"""Check a whole pipeline on the driver, before Ray starts: :func:`validate_pipeline`.

Every command (``train``, ``test``, ``infer``, ``tune``, ``benchmark``, ``config``) calls it first, so a typo in any
section fails within seconds with the file that set the key, the dotted key and a "did you mean", instead of inside
a Ray worker. What is checked, section by section:

* top-level keys: by :func:`raydet.config.load_config` (an unknown one is a typo or an unused variable);
* ``train``, ``evaluation`` (metric names), ``scaling``, ``checkpoint``, ``runtime`` (its ``imports`` are
  imported), ``data`` settings, ``seed``, ``work_dir``: :func:`~raydet.commands.sections.parse_sections`;
* ``optimizer``, ``lr_schedule``: :func:`~raydet.engine.optim.parse_optimizer` / ``parse_lr_schedule``;
* ``model``: built on PyTorch's meta device (no memory, no initialisation cost; the detectors refuse a missing
  head); ``evaluation.metric: [segm]`` needs a mask branch;
* ``hooks``: each entry built with :func:`~raydet.engine.hooks.build_hook`;
* ``data.train`` / ``val`` / ``test``: each dataset's type and arguments checked and its transforms built, without
  reading annotations (a command reads the splits it uses with ``build_datasets``, which validates the records).

Plain Python and PyTorch: no Ray.
"""
from __future__ import annotations

import torch

import raydet.models  # noqa: F401  (registers the model components; raydet.data below the datasets and transforms)
from raydet.commands.sections import Sections, parse_sections
from raydet.config import Config
from raydet.data.pipeline import build_transforms
from raydet.engine.hooks import build_hook
from raydet.engine.optim import parse_lr_schedule, parse_optimizer
from raydet.registry import ConfigError, build_context, check, error

__all__ = ["validate_pipeline", "DATA_SPLITS"]

DATA_SPLITS = ("train", "val", "test")


def validate_pipeline(cfg: Config, *, model: bool = True) -> Sections:
    """Check every section of ``cfg``; returns its :class:`~raydet.commands.sections.Sections`.

    Args:
        model: build the model (on the meta device); ``raydet tune`` passes False and builds the models itself.

    Raises:
        ConfigError: ``<file>: <dotted key>: <problem>[; did you mean '<name>'?]``, the file being the one that set
            the key (``--set`` for a command-line override, a ``_base_`` file for an inherited key).
    """
    sections = parse_sections(cfg)
    with build_context(file=cfg.path, origins=cfg.origins):
        parse_optimizer(cfg.get("optimizer"))
        parse_lr_schedule(cfg.get("lr_schedule"))
        if model:
            _check_model(cfg, sections)
        hooks = cfg.get("hooks")
        if hooks is not None and not isinstance(hooks, list):
            raise error("hooks", f"expected a list of {{type: HookName, ...}} entries, got {type(hooks).__name__}")
        for i, spec in enumerate(hooks or []):
            build_hook(spec, f"hooks[{i}]")
        for split in DATA_SPLITS:
            _check_dataset(cfg, sections, split)
    return sections


def _check_model(cfg: Config, sections: Sections) -> None:
    spec = cfg.get("model")
    if not isinstance(spec, dict):
        raise error("model", "the pipeline has no model section" if spec is None
                    else f"expected a mapping {{type: Detector, ...}}, got {type(spec).__name__}")
    try:
        with torch.device("meta"):  # parameters without storage: a ResNet-50 detector builds in ~40 ms
            detector = cfg.build("model")
    except Exception:  # noqa: BLE001  (the CPU build below says what is wrong, or succeeds: a meta-only problem)
        try:
            detector = cfg.build("model")
        except FileNotFoundError as exc:  # e.g. a Pretrained init_cfg checkpoint
            raise error("model", str(exc)) from None
    else:
        _check_shapes(detector)
    if "segm" in sections.evaluation.metric and not getattr(getattr(detector, "roi_head", None), "with_mask", False):
        raise error("evaluation.metric", f"'segm' (mask AP) needs a model with a mask branch; "
                                         f"{type(detector).__name__} has none (use bbox, or a MaskRCNN model)")


def _check_shapes(detector) -> None:
    """Run a 1 x 3 x 128 x 128 image through the backbone, the neck and the dense heads on the meta device (shapes
    only, ~50 ms): channel counts that do not fit each other (``model.backbone.depth: 50`` under a neck built for
    ResNet-18's ``in_channels``) fail here, not in the first training step. Part by part, to name the one that does
    not take its input. Best effort: a component that cannot run on the meta device (it reads values, calls
    NumPy), or fails for any reason other than a shape, is left to its first real step."""
    if not callable(getattr(detector, "backbone", None)):
        return
    parts = [("model.backbone", "does not run on a 3-channel image", detector.backbone)]
    neck = getattr(detector, "neck", None)
    if isinstance(neck, torch.nn.Module):
        parts.append(("model.neck.in_channels", "the neck does not take the backbone's outputs", neck))
    for name in ("rpn_head", "bbox_head"):
        head = getattr(detector, name, None)
        # a detector that feeds a head only some of the maps says which (R-FCN's RPN: C4 of C4 / C5)
        select = getattr(detector, f"{name}_inputs", tuple)
        if isinstance(head, torch.nn.Module):
            parts.append((f"model.{name}.in_channels", "the head does not take the neck's outputs",
                          lambda feats, head=head, select=select: head(tuple(select(tuple(feats))))))
    image, feats = torch.empty(1, 3, 128, 128, device="meta"), None
    with torch.no_grad():
        for key, what, part in parts:
            try:
                out = part(image if feats is None else feats)
            except Exception as exc:  # noqa: BLE001  (see the docstring: only a shape mismatch is reported)
                if not _is_shape_error(exc):
                    return
                channels = "" if feats is None else f" (channels {sorted({int(f.shape[1]) for f in feats})})"
                raise error(key, f"{what}{channels}: {_first_line(exc)}") from None
            if not key.endswith("_head.in_channels"):  # the backbone's and the neck's outputs feed the next part
                feats = out


# PyTorch's complaints that a map is spatially too small for a kernel: about the probe's arbitrary 128 x 128 size
# (SSD300's last 3x3 convs without padding need a 300-pixel input), not about the pipeline
_SPATIAL = ("can't be greater than actual input size", "Output size is too small")


def _is_shape_error(exc: BaseException) -> bool:
    """PyTorch's complaint about tensor shapes (not about the meta device itself, nor the probe's spatial size)."""
    text = str(exc)
    return (isinstance(exc, RuntimeError) and "meta" not in text and not any(s in text for s in _SPATIAL)
            and any(word in text for word in ("channel", "shape", "size", "dimension")))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_dataset(cfg: Config, sections: Sections, split: str) -> None:
    """The dataset of ``data.<split>``: its type and arguments, and its transforms built (no file is read)."""
    spec = getattr(sections.data, split)
    if spec is None:
        return
    key = f"data.{split}"
    if not isinstance(spec, dict):
        raise error(key, f"expected a dataset mapping {{type: CocoDataset, ...}}, got {type(spec).__name__}")
    defaults = {} if sections.data.num_classes is None else {"num_classes": sections.data.num_classes}
    transforms = spec.get("pipeline")
    if transforms is not None and not isinstance(transforms, list):
        raise error(f"{key}.pipeline", f"expected a list of transforms, got {type(transforms).__name__}")
    with build_context(key):
        try:
            build_transforms(transforms)  # transforms first: their errors name the transform's key
        except ConfigError:
            raise
        except ValueError as exc:  # an order problem, "data.train.pipeline[3]: Normalize appears twice ..."
            path, _, problem = str(exc).partition(": ")
            raise error(path, problem) from None
        check(spec, key, **defaults)
