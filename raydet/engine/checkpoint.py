"""Checkpoint files: written to a temporary name then renamed, so an interrupted write never leaves a file that
fails to load; loaded with clear errors for a missing file or a checkpoint of another model. A checkpoint may be
read from object storage (``s3://...``, :mod:`raydet.fileio`): it is fetched into memory and loaded from there."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from raydet import fileio
from raydet.errors import RaydetError

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_weights", "CHECKPOINT_FILE", "resolve_checkpoint",
           "CheckpointError"]

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RaydetError, ValueError):
    """A checkpoint file cannot be read, is not a raydet checkpoint, or does not fit the model."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Atomically write ``state`` with torch.save (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path | str:
    """A checkpoint file, or a folder holding ``checkpoint.pt`` (a Ray Train checkpoint directory); for a URI, the
    file's URI (a str). A missing one is a FileNotFoundError naming it (for a URI, whether the bucket exists)."""
    if fileio.is_uri(os.fspath(path)):
        uri = os.fspath(path).rstrip("/")
        for candidate in (uri, fileio.join(uri, CHECKPOINT_FILE)):
            if fileio.isfile(candidate):
                return candidate
        raise fileio.StorageNotFoundError(f"checkpoint not found: {path} ({fileio.not_found_error(uri).reason})")
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return p


def load_checkpoint(path: str | os.PathLike, map_location="cpu", mmap: bool = False) -> dict:
    """A raydet checkpoint's state dict from a file or a Ray checkpoint folder; ``mmap`` maps the tensors instead of
    reading them (cheap when only the metadata is needed).

    Raises:
        FileNotFoundError: no such file (or no ``checkpoint.pt`` in the folder).
        CheckpointError: not a torch file, cut short, or not a raydet checkpoint; the message names the file.
    """
    p = resolve_checkpoint(path)
    source = io.BytesIO(fileio.read_bytes(p)) if isinstance(p, str) else p  # an object: fetched whole, no mmap
    try:
        state = torch.load(source, map_location=map_location, weights_only=False, mmap=mmap and source is p)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {p}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{p} is not a raydet checkpoint (no 'model' entry)")
    return state


def load_model_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load a full model state dict, naming the checkpoint and the first mismatching keys on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit this model (was it trained with another pipeline?)"]
        if shapes:
            lines.append(f"  {len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:3]))
        if missing:
            lines.append(f"  {len(missing)} model keys missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} checkpoint keys the model lacks, e.g. {unexpected[:3]}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict)
