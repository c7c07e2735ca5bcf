"""Expert parallelism: the routed experts split evenly over the ranks of a process group.

Each of the P ranks holds E / P experts (a ``RoutedExperts`` shard): global expert e lives on
rank ``e // L`` at local index ``e % L``. The router, norm and shared expert are replicated (the
same weights on every rank). Per forward, on the rank's own tokens:

1. route: capacity and drops are decided per rank, over its own tokens
2. sort the choices that run an expert by global expert, so rows bound for a rank are contiguous
3. exchange the per-(rank, local expert) row counts: one small ``all_to_all_single``
4. exchange the rows: an autograd-aware all-to-all whose backward is the reverse exchange
5. group the received rows by local expert and run them (``loop`` or ``grouped``)
6. send the outputs back (the reverse exchange) and combine with the routing weights

Null-slot and dropped choices never leave the rank: they run no expert, as with ep_size=1.
Gradients of the replicated parameters must be summed over the group by the caller (as data
parallel does); ``sharded_parameter_names`` says which parameters are not replicated.

Shape legend:
    T  tokens of this rank
    D  model width (d_model)
    E  routed experts, all ranks together
    P  ranks in the expert-parallel group (ep_size)
    L  local experts per rank (E / P)
    A  rows this rank sends: its choices that run an expert, sorted by global expert
    R  rows this rank receives, sender-major then local expert (as the exchange delivers them)
    N  rows of any exchange
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_core.dispatch import (
    Dispatcher,
    combine,
    expert_widths,
    grouped_experts,
    loop_experts,
    sort_assignments,
)
from moe_core.experts import RoutedExperts
from moe_core.grouped_mm import compute_dtype, grouped_mm_unavailable_reason
from moe_core.router import Routing

EP_LOOP = "ep_all_to_all+loop"
EP_GROUPED = "ep_all_to_all+grouped"


def group_rank_and_size(group: Any) -> tuple[int, int]:
    """(rank, size) within ``group``; (0, 1) for None, i.e. no expert parallelism."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with the reverse exchange as its backward.

    Written here rather than taken from ``torch.distributed.nn.functional``, whose version is
    deprecated in torch 2.13 (a FutureWarning on every call). Every rank must run both the
    forward and the backward: autograd materializes a zero gradient when the output is unused.
    """

    @staticmethod
    def forward(
        ctx: Any, x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: Any
    ) -> Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x_ND, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad_ND: Tensor) -> tuple[Tensor, None, None, None]:
        grad_x_ND = _exchange(grad_ND, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_x_ND, None, None, None


def all_to_all(
    x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: Any
) -> Tensor:
    """Differentiable variable-size all-to-all over dim 0: send ``input_splits[p]`` rows to p."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)


def _exchange(
    x_ND: Tensor, output_splits: list[int], input_splits: list[int], group: Any
) -> Tensor:
    y_ND = x_ND.new_empty((sum(output_splits), *x_ND.shape[1:]))
    dist.all_to_all_single(y_ND, x_ND.contiguous(), output_splits, input_splits, group=group)
    return y_ND


@dataclass
class ExchangePlan:
    """Row counts of one forward's exchange: host ints for the collectives, device for offsets."""

    send_per_rank: list[int]  # [P] rows this rank sends to each rank
    recv_per_rank: list[int]  # [P] rows this rank receives from each rank
    recv_per_local: list[int]  # [L] received rows per local expert
    recv_counts_PL: Tensor  # [P, L] long on the device: rows from rank p for local expert l


def exchange_counts(rows_per_expert_E: Tensor, ep_size: int, group: Any) -> ExchangePlan:
    """Tell every rank how many rows it will receive from us, per local expert."""
    send_PL = rows_per_expert_E.reshape(ep_size, -1).contiguous()  # e = p * L + l
    recv_PL = torch.empty_like(send_PL)
    dist.all_to_all_single(recv_PL, send_PL, group=group)  # equal splits: L counts per rank
    # The variable-size all_to_all_single takes its split sizes as Python ints, so they come to
    # the host here: a device sync, unavoidable for the exchange. One per forward (one .tolist
    # for all three lists); the backward reuses these sizes.
    sizes = torch.cat([send_PL.sum(1), recv_PL.sum(1), recv_PL.sum(0)]).tolist()
    return ExchangePlan(
        send_per_rank=sizes[:ep_size],
        recv_per_rank=sizes[ep_size : 2 * ep_size],
        recv_per_local=sizes[2 * ep_size :],
        recv_counts_PL=recv_PL,
    )


def local_expert_order(recv_counts_PL: Tensor, num_rows: int) -> Tensor:
    """Permutation that sorts the received rows by local expert, sender order kept within."""
    num_ranks, num_local = recv_counts_PL.shape
    local_ids_PL = torch.arange(num_local, device=recv_counts_PL.device).expand(num_ranks, -1)
    # output_size is known on the host already, so repeat_interleave needs no sync of its own.
    local_R = torch.repeat_interleave(
        local_ids_PL.reshape(-1), recv_counts_PL.reshape(-1), output_size=num_rows
    )
    return torch.argsort(local_R, stable=True)


def run_local_experts(
    x_RD: Tensor, plan: ExchangePlan, w13_LDF: Tensor, w2_LHD: Tensor, *, grouped: bool
) -> Tensor:
    """The local experts on the received rows; outputs come back in the received order."""
    num_rows = sum(plan.recv_per_rank)
    order_R = local_expert_order(plan.recv_counts_PL, num_rows)
    x_sorted_RD = x_RD.index_select(0, order_R)
    if grouped and num_rows > 0:  # the grouped op's backward fails on zero rows
        offsets_L = plan.recv_counts_PL.sum(0).cumsum(0).to(torch.int32)
        y_sorted_RD = grouped_experts(x_sorted_RD, offsets_L, w13_LDF, w2_LHD)
    else:
        y_sorted_RD = loop_experts(x_sorted_RD, plan.recv_per_local, w13_LDF, w2_LHD)
    return torch.empty_like(y_sorted_RD).index_copy(0, order_R, y_sorted_RD)


def ep_dispatch(
    x_TD: Tensor,
    routing: Routing,
    w13_LDF: Tensor,
    w2_LHD: Tensor,
    group: Any,
    *,
    grouped: bool,
) -> Tensor:
    """Routed output of this rank's tokens, the experts spread over ``group``.

    Computes what ``loop_dispatch`` computes with every expert local: ``w13_LDF`` and
    ``w2_LHD`` are this rank's shard of the stacked weights (its L local experts) and
    ``routing`` this rank's routing over all E global experts.
    """
    sorted_ = sort_assignments(routing)
    ep_size = dist.get_world_size(group)
    plan = exchange_counts(sorted_.rows_per_group_G[:-1], ep_size, group)
    running = sorted_.head(sum(plan.send_per_rank))  # rows past these run no expert
    # Sent in the compute dtype: under bf16 autocast this halves the bytes on the wire.
    x_AD = x_TD.index_select(0, running.token_ids_A).to(compute_dtype(x_TD))
    x_RD = all_to_all(x_AD, plan.recv_per_rank, plan.send_per_rank, group)
    y_RD = run_local_experts(x_RD, plan, w13_LDF, w2_LHD, grouped=grouped)
    y_AD = all_to_all(y_RD, plan.send_per_rank, plan.recv_per_rank, group)
    return combine(y_AD, running, num_tokens=x_TD.shape[0])


class ExpertParallelDispatcher(Dispatcher):
    """The dispatcher of an expert-parallel block: all-to-all, then loop or grouped locally.

    ``observed`` reads ``ep_all_to_all+grouped`` or ``ep_all_to_all+loop``, so receipts show
    the exchange and the local compute. There is no padded form: the variable-size exchange
    already syncs, and the received rows are exactly the ones to run, so ``padded`` runs the
    loop and says so; ``auto`` is grouped where the op really runs, else the loop.
    """

    def __init__(self, requested: str, group: Any) -> None:
        super().__init__(requested)
        self.group = group

    def __call__(self, x_TD: Tensor, routing: Routing, w13_LDF: Tensor, w2_LHD: Tensor) -> Tensor:
        self.observed, self.fallback_reason = self.resolve(x_TD, routing, w13_LDF, w2_LHD)
        grouped = self.observed == EP_GROUPED
        return ep_dispatch(x_TD, routing, w13_LDF, w2_LHD, self.group, grouped=grouped)

    def resolve(
        self, x_TD: Tensor, routing: Routing, w13_LDF: Tensor, w2_LHD: Tensor
    ) -> tuple[str, str | None]:
        if self.requested == "loop":
            return EP_LOOP, None
        if self.requested == "padded":
            return EP_LOOP, "padded has no expert-parallel form; the loop ran on received rows"
        reason = grouped_mm_unavailable_reason(
            x_TD.device, compute_dtype(x_TD), *expert_widths(w13_LDF, w2_LHD)
        )
        if reason is None:
            return EP_GROUPED, None
        if self.requested == "grouped":
            return EP_LOOP, f"grouped fell back to loop: {reason}"
        return EP_LOOP, f"auto chose loop: {reason}"


def expert_parameter_names(model: nn.Module, *, shards_only: bool = False) -> set[str]:
    """Names of the parameters stacked by routed expert on dim 0 (``RoutedExperts``), whole
    or shards; with ``shards_only`` those of expert-parallel shards alone."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, RoutedExperts) and (module.is_shard or not shards_only)
        for name, _ in module.named_parameters()
    }


def sharded_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that are expert shards; every other one is replicated.

    Replicated gradients must be summed over the expert-parallel group (data parallel does
    this); shard gradients already hold every rank's tokens of the group and must not be
    reduced over it (only over the ranks holding the same shard in other groups, as
    ``moe_core.parallel`` does).
    """
    return expert_parameter_names(model, shards_only=True)
