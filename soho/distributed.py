"""The few collective operations soho needs; each is the identity without ``torch.distributed``."""
from __future__ import annotations

from typing import List, Union

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


def all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (equal shapes) from all ranks along dim 0, without gradient."""
    if not is_distributed():
        return tensor
    gathered: List[Tensor] = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the gradient that *every* rank's loss sends
    to its slice: the gathered gradients are summed over ranks, then this rank's slice is kept.

    Summing matters because each rank computes its loss over its own rows against everyone's
    columns: rank r's columns receive gradient from all ranks' rows, not only from rank r's.
    (An all-reduce rather than a reduce-scatter, so the gloo backend works too.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = all_reduce_sum(grad.contiguous().clone())
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` (equal shapes) from all ranks along dim 0, differentiably.

    With each rank's loss summed over its local rows against the gathered tensor and DDP
    averaging the gradients, every gradient equals that of one process holding the whole
    batch (see :func:`rank_share` for the mean's denominator).
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def rank_share(count: Union[int, Tensor], device: torch.device) -> Tensor:
    """``world_size * count / (count summed over ranks)``: the factor that turns a mean over this rank's
    ``count`` items into its share of the mean over all ranks' items.

    DDP averages the per-rank gradients, so a loss that is a mean over local items (masked tokens,
    pairs) only matches one process on the whole batch when every rank holds as many items;
    scaled by this factor it always does. 0 when no rank has any item. A collective: every rank
    must call it together.
    """
    count = torch.as_tensor(count, dtype=torch.float32, device=device)
    if not is_distributed():
        return (count > 0).float()
    total = all_reduce_sum(count.clone())
    return torch.where(total > 0, count * dist.get_world_size() / total.clamp(min=1.0), torch.zeros_like(total))
