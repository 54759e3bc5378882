"""torch.distributed helpers that degrade to single-process no-ops."""
from __future__ import annotations

import torch.distributed as torch_dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "all_gather_object", "broadcast_object", "barrier",
           "any_rank"]


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device=None) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce of one number on ``device``: a CUDA device under NCCL);
    ``flag`` itself without distributed."""
    if not is_distributed() or get_world_size() == 1:
        return bool(flag)
    import torch

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()
