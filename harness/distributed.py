"""What every rank must agree on, in one place: the process group's size and rank, sums and broadcasts that are
no-ops in a single process, and a differentiable sum for statistics of the whole global batch.

The quantizers (EMA codebooks, restarts, k-means, LFQ's batch entropy) and the discriminator (its running logit
means, its batch statistics) keep identical state on every rank through these; DDP itself syncs only gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """``t`` summed (or reduced by ``op``) over ranks, in place; returned for chaining."""
    if distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, in place."""
    if distributed():
        dist.broadcast(t, src=0)
    return t


def all_reduce_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable: the backward sums the ranks' gradients too. A statistic of the whole
    global batch (LFQ's batch entropy, the discriminator's batch statistics) then gets the gradient of the global
    objective once DDP averages."""
    return dist_nn.all_reduce(t) if distributed() else t


def all_finite(t: torch.Tensor) -> bool:
    """True when every rank's tensor is finite (the same answer on every rank). Reads the device: a GPU's queue
    empties first; ``finite_on_all_ranks`` keeps the answer on the device."""
    return bool(finite_on_all_ranks(t))


def finite_on_all_ranks(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool on ``t``'s device: every rank's tensor is finite (the same on every rank), without a host read."""
    finite = torch.isfinite(t).all().float()
    return all_reduce(finite, dist.ReduceOp.MIN if distributed() else None) >= 1
