"""The few collective operations soho needs; each is the identity without ``torch.distributed``."""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """In-place sum over ranks; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (equal shapes) from all ranks along dim 0.

    The local slice keeps its autograd history; the others are constants. With every
    rank computing the loss over the same gathered batch, the summed gradients match
    a single process holding the whole batch (up to the usual mean over ranks).
    """
    if not is_distributed():
        return tensor
    gathered: List[Tensor] = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[dist.get_rank()] = tensor
    return torch.cat(gathered, dim=0)
