"""Small helpers shared by the ops modules."""
from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in: float32 for half / bfloat16 (box areas overflow float16 above 65504 px^2 and
    several torchvision CPU kernels have no half version), the input dtype otherwise."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in its compute dtype (a no-op for float32 / float64)."""
    return t.to(compute_dtype(t.dtype)) if t.is_floating_point() else t


def pair(v, name: str) -> tuple[int, int]:
    """An int or a length-2 sequence as an ``(a, b)`` tuple of ints."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
