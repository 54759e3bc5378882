"""Load weights from a local checkpoint file into a module, with explicit reports of what did not match.

raydet never downloads weights: ``checkpoint`` is a path on disk (e.g. a torchvision ImageNet ``resnet50-*.pth``).
"""
from __future__ import annotations

import logging
import os
import pickle

import torch
from torch import nn

__all__ = ["load_pretrained", "read_state_dict"]

logger = logging.getLogger(__name__)


def read_state_dict(checkpoint: str, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as a flat ``{name: tensor}`` dict on CPU.

    Accepts a plain state dict or a dict holding one under ``state_dict`` / ``model``. ``module.`` prefixes (from
    DataParallel / DDP) are removed. With ``prefix`` (e.g. ``"backbone."``) only keys starting with it are kept,
    with the prefix stripped.
    """
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path} holds objects other than tensors and plain containers; re-save its state dict "
                         f"with torch.save(model.state_dict(), path): {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")

    state = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        key = str(key)
        while key.startswith("module."):
            key = key[len("module."):]
        state[key] = value
    if prefix:
        if not prefix.endswith("."):
            prefix += "."
        selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not selected:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise ValueError(f"no key of {path} starts with prefix '{prefix}' (top-level prefixes: "
                             f"{', '.join(heads[:10])})")
        state = selected
    return state


def load_pretrained(module: nn.Module, checkpoint: str, prefix: str | None = None,
                    strict_shapes: bool = True) -> tuple[list[str], list[str]]:
    """Copy the matching tensors of ``checkpoint`` into ``module``.

    Args:
        module: the receiving module.
        checkpoint: local path of a ``torch.save``-d state dict (see :func:`read_state_dict` for accepted layouts).
        prefix: keep only the checkpoint keys under this prefix (e.g. ``"backbone."`` of a detector checkpoint).
        strict_shapes: a key present in both with different shapes is an error (True) or skipped and reported as
            missing (False).

    Returns:
        (missing, unexpected): module keys the checkpoint does not provide, and checkpoint keys the module does not
        have (ignored; e.g. torchvision's ``fc.weight``).

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: shape mismatches (listed with both shapes), or no checkpoint key matches the module at all.
    """
    state = read_state_dict(checkpoint, prefix)
    own = module.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched and strict_shapes:
        lines = "\n".join(f"  {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                          for k in mismatched)
        raise ValueError(f"{len(mismatched)} tensors of {checkpoint} do not fit {type(module).__name__}:\n{lines}")
    matched = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not matched:
        raise ValueError(f"no key of {checkpoint} matches {type(module).__name__}; is this the right checkpoint? "
                         f"(checkpoint keys e.g. {', '.join(list(state)[:3])}; model keys e.g. "
                         f"{', '.join(list(own)[:3])})")
    missing = [k for k in own if k not in matched]
    module.load_state_dict(matched, strict=False)

    shown = f" (e.g. {', '.join(missing[:5])})" if missing else ""
    skipped = f", {len(mismatched)} skipped for shape" if mismatched else ""
    where = f"{checkpoint} (prefix '{prefix}')" if prefix else str(checkpoint)
    logger.info("%s: loaded %d/%d tensors from %s%s; %d missing%s, %d unexpected",
                type(module).__name__, len(matched), len(own), where, skipped, len(missing), shown, len(unexpected))
    return missing, unexpected
