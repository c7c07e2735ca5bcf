"""How a torchrun job lays the model out over its ranks, and the gradient exchange of a step.

With ``ep_size`` P = 1 every rank holds the whole model and the loop wraps it in
DistributedDataParallel. With P > 1 the W ranks form W / P expert-parallel groups of P
consecutive ranks (``moe_core.expert_parallel``): each rank holds E / P routed experts and a
replica of everything else, and runs on its own batch. Ranks at the same position of every
group hold the same expert shard: the expert data-parallel group, of W / P ranks.

The loss the job minimizes is the mean of the ranks' losses, as under data parallel, so a step
is the same step whatever P is (up to float order):

- replicated parameters: their gradients are averaged over all W ranks;
- expert shards: the backward of the token exchange already sums, on the shard's rank, the
  gradients from every rank of its group; summing that over the expert data-parallel group
  covers all W ranks, and dividing by W gives the mean;
- clipping: the norm counts every shard once (the shards' squared norms summed over the
  expert-parallel group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_core.expert_parallel import sharded_parameter_names


@dataclass(frozen=True)
class Layout:
    """Where this rank stands: its rank in a world of ``world``, and its groups."""

    world: int
    rank: int
    ep_size: int
    ep_group: Any = None  # this rank's expert-parallel group; None when ep_size == 1
    expert_dp_group: Any = None  # the ranks holding this rank's expert shard

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def saves_checkpoints(self) -> bool:
        """The first group's ranks write the checkpoint: one file per expert shard."""
        return self.rank < self.ep_size

    @property
    def expert_dp_size(self) -> int:
        return self.world // self.ep_size


SINGLE = Layout(world=1, rank=0, ep_size=1)  # one process, the whole model


def make_layout(ep_size: int) -> Layout:
    """The layout of this process in the default process group (or alone). Every rank must
    call it, in the same order as the other collectives: it creates the groups."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive integer, got {ep_size!r}")
    on = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
    if world % ep_size != 0:
        raise ValueError(f"ep_size: {ep_size} must divide the world size {world}")
    if ep_size == 1:
        return Layout(world, rank, 1)
    ep_group = expert_dp_group = None
    for first in range(0, world, ep_size):  # every rank creates every group, in one order
        group = dist.new_group(list(range(first, first + ep_size)))
        if first <= rank < first + ep_size:
            ep_group = group
    for position in range(ep_size):
        group = dist.new_group(list(range(position, world, ep_size)))
        if rank % ep_size == position:
            expert_dp_group = group
    return Layout(world, rank, ep_size, ep_group, expert_dp_group)


def _grads(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients of (replicated, expert shard) parameters, each in a fixed order; a
    parameter without one this step gets zeros, so every rank exchanges the same buffers."""
    sharded = sharded_parameter_names(model)
    replicated: list[Tensor] = []
    shards: list[Tensor] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (shards if name in sharded else replicated).append(p.grad)
    return replicated, shards


def _all_reduce_mean(grads: list[Tensor], group: Any, divide_by: int) -> None:
    """Sum the gradients over ``group`` (None: no exchange) in one flat buffer per dtype, then
    divide by ``divide_by``."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(divide_by)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same), strict=True):
            g.copy_(reduced)


def sync_and_clip(model: nn.Module, layout: Layout, max_norm: float) -> Tensor:
    """The expert-parallel step's gradient exchange and clipping (see the module docstring);
    returns the total norm before clipping, as ``clip_grad_norm_`` does. No host sync."""
    dense, expert = _grads(model)
    _all_reduce_mean(dense, dist.group.WORLD if layout.world > 1 else None, layout.world)
    _all_reduce_mean(
        expert, layout.expert_dp_group if layout.expert_dp_size > 1 else None, layout.world
    )
    device = (dense or expert)[0].device
    dense_sq = sum((g.float().pow(2).sum() for g in dense), torch.zeros((), device=device))
    expert_sq = sum((g.float().pow(2).sum() for g in expert), torch.zeros((), device=device))
    if layout.ep_group is not None:
        dist.all_reduce(expert_sq, group=layout.ep_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(dense + expert, coef)
    return total
