"""Dispatch backends: send each kept choice to its routed expert and combine the outputs.

Every backend maps ``(x_TD, routing, w13_EDF, w2_EHD) -> routed_TD``, the experts given as their
stacked weights (``RoutedExperts.w13`` and ``.w2``, ``moe_core.experts``), and computes one
function:
``routed[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` over the choices that run an
expert (kept by capacity and not on the null slot). Dropped and null-slot choices add nothing,
and their weights are not renormalized away (Switch/Megatron semantics).

- ``loop``: per-expert matmuls over the sorted segments. The reference; it reads the segment
  sizes on the host, a device sync.
- ``grouped``: ``torch._grouped_mm`` over the expert-sorted rows (gate and up in one GEMM
  through ``w13``, then down), int32 group offsets kept on the device. Rows are gathered
  and combined by permutations whose backwards gather too (``moe_core.row_ops``): nothing
  scatters into [T, D], so no atomics. Used where the op really runs for this device and compute
  dtype (``grouped_mm_unavailable_reason``); elsewhere it falls back to ``loop`` and says why.
- ``padded``: rows scattered into a static ``[E, C_pad, D]`` buffer, one ``bmm`` per weight.
  No host sync anywhere; the cost is compute and memory for the padding (``padded_capacity``).
- ``auto``: grouped where it really runs, else padded when a capacity is set, else loop.

Shape legend:
    T  tokens
    D  model width (d_model)
    H  expert hidden width
    E  routed experts
    G  sort groups: the E experts, then one group (index E) for rows that run no expert
    F  gate and up widths together (2H): ``w13`` is [gate | up]
    K  choices per token (top_k)
    A  assignments (T * K), sorted by group unless named ``_TK``
    C  padded rows per expert (C_pad)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_core.grouped_mm import compute_dtype, grouped_mm_unavailable_reason
from moe_core.router import Routing, rank_in_group
from moe_core.row_ops import CombineRows, GatherTokenRows, swiglu

DISPATCH_BACKENDS = ("grouped", "padded", "loop", "auto")


@dataclass
class SortedAssignments:
    """The T*K choices sorted by group: each expert's rows in token order, then the rest."""

    token_ids_A: Tensor  # token of each row
    weights_A: Tensor  # combine weight of each row; 0 where the row runs no expert
    groups_A: Tensor  # expert of each row, or E where it runs none (sorted ascending)
    runs_A: Tensor  # bool, the row runs an expert: groups_A < E
    rows_per_group_G: Tensor  # [E + 1] long, on the device
    order_A: Tensor  # choice (flat t * K + j) of each sorted row: the sort permutation
    row_of_choice_A: Tensor  # sorted row of each choice t * K + j: the inverse permutation

    def head(self, num_rows: int) -> SortedAssignments:
        """The first ``num_rows`` rows (the running ones when it is their count)."""
        return SortedAssignments(
            self.token_ids_A[:num_rows],
            self.weights_A[:num_rows],
            self.groups_A[:num_rows],
            self.runs_A[:num_rows],
            self.rows_per_group_G,
            self.order_A[:num_rows],
            self.row_of_choice_A,
        )


def sort_assignments(routing: Routing) -> SortedAssignments:
    """Stable sort of the choices by expert; dropped and null-slot choices go last."""
    num_experts, top_k = routing.num_experts, routing.expert_ids.shape[1]
    groups_TK = torch.where(routing.runs_expert, routing.expert_ids, num_experts)
    order_A = torch.argsort(groups_TK.reshape(-1), stable=True)
    groups_A = groups_TK.reshape(-1).index_select(0, order_A)
    runs_A = groups_A < num_experts
    weights_A = routing.weights.reshape(-1).index_select(0, order_A)
    rows_A = torch.arange(order_A.numel(), device=order_A.device)
    # Group boundaries by binary search on the sorted groups: no atomics, no host sync.
    ends_G = torch.searchsorted(groups_A, torch.arange(1, num_experts + 2, device=rows_A.device))
    return SortedAssignments(
        token_ids_A=torch.div(order_A, top_k, rounding_mode="floor"),  # a = t * K + j
        weights_A=torch.where(runs_A, weights_A, torch.zeros_like(weights_A)),
        groups_A=groups_A,
        runs_A=runs_A,
        rows_per_group_G=torch.diff(ends_G, prepend=ends_G.new_zeros(1)),
        order_A=order_A,
        row_of_choice_A=torch.empty_like(order_A).scatter_(0, order_A, rows_A),
    )


def combine(y_AD: Tensor, sorted_: SortedAssignments, num_tokens: int) -> Tensor:
    """Weighted scatter-add of the rows' expert outputs back to their tokens."""
    weighted_AD = y_AD * sorted_.weights_A.to(y_AD.dtype).unsqueeze(-1)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, sorted_.token_ids_A, weighted_AD)


def loop_dispatch(x_TD: Tensor, routing: Routing, w13_EDF: Tensor, w2_EHD: Tensor) -> Tensor:
    """Reference backend: one matmul chain per expert over its contiguous sorted rows."""
    sorted_ = sort_assignments(routing)
    # Slicing needs the segment sizes on the host: a device sync, fine for the reference.
    rows_per_group = sorted_.rows_per_group_G.tolist()
    running = sorted_.head(sum(rows_per_group[:-1]))
    x_AD = x_TD.index_select(0, running.token_ids_A)
    y_AD = loop_experts(x_AD, rows_per_group[:-1], w13_EDF, w2_EHD)
    return combine(y_AD, running, num_tokens=x_TD.shape[0])


def loop_experts(
    x_AD: Tensor, rows_per_expert: list[int], w13_EDF: Tensor, w2_EHD: Tensor
) -> Tensor:
    """Expert e on its contiguous segment of ``rows_per_expert[e]`` rows, segments in order."""
    chunks = torch.split(x_AD, rows_per_expert, dim=0)
    return torch.cat([swiglu(chunk @ w13_EDF[e]) @ w2_EHD[e] for e, chunk in enumerate(chunks)])


def gather_sorted_rows(
    x_TD: Tensor, sorted_: SortedAssignments, routing: Routing, dtype: torch.dtype
) -> Tensor:
    """Each sorted row's token input in ``dtype``, ``[A, D]``; see ``GatherTokenRows``."""
    runs_TK = None if every_choice_runs(routing) else routing.runs_expert
    top_k = routing.expert_ids.shape[1]
    return GatherTokenRows.apply(
        x_TD, sorted_.token_ids_A, sorted_.row_of_choice_A, runs_TK, top_k, dtype
    )


def combine_by_token(y_AD: Tensor, sorted_: SortedAssignments, routing: Routing) -> Tensor:
    """``out[t] = sum_j weights[t, j] * y[row of choice (t, j)]`` over choices that run.

    No scatter, no atomics, forward or backward (``CombineRows``). Rows that run no expert
    are zeroed with ``where`` first (the grouped op leaves NaN garbage there, and a product
    would keep it), which also zeroes the gradient the op would get on them.
    """
    weights_TK = routing.weights.to(y_AD.dtype)
    if not every_choice_runs(routing):
        y_AD = torch.where(sorted_.runs_A.unsqueeze(-1), y_AD, 0)
        weights_TK = torch.where(routing.runs_expert, weights_TK, 0)
    return CombineRows.apply(y_AD, weights_TK, sorted_.row_of_choice_A, sorted_.order_A)


def grouped_dispatch(x_TD: Tensor, routing: Routing, w13_EDF: Tensor, w2_EHD: Tensor) -> Tensor:
    """``torch._grouped_mm`` over all T*K rows; offsets stay on the device (no host sync).

    Rows past the last offset (dropped, null slot) are left unwritten by the op: their
    outputs and input gradients are garbage, masked with ``where`` in ``combine_by_token``
    and ``gather_sorted_rows`` (a product would keep NaN). Gather and combine are
    permutations with gather-only backwards: nothing scatters into [T, D].
    """
    sorted_ = sort_assignments(routing)
    x_AD = gather_sorted_rows(x_TD, sorted_, routing, compute_dtype(x_TD))
    offsets_E = sorted_.rows_per_group_G[:-1].cumsum(0).to(torch.int32)
    y_AD = grouped_experts(x_AD, offsets_E, w13_EDF, w2_EHD)
    return combine_by_token(y_AD, sorted_, routing)


def every_choice_runs(routing: Routing) -> bool:
    """No capacity and no null slot: every one of the T*K choices runs an expert."""
    return routing.capacity is None and routing.scores.shape[-1] == routing.num_experts


def grouped_experts(x_AD: Tensor, offsets_E: Tensor, w13_EDF: Tensor, w2_EHD: Tensor) -> Tensor:
    """SwiGLU of every expert over its segment ending at ``offsets_E`` (int32, on the device).

    ``x_AD`` must already be in the compute dtype; rows past the last offset come back as
    garbage. The op's backward fails on zero rows (torch 2.13), so callers keep A > 0.
    """
    w13, w2 = (w.to(x_AD.dtype) for w in (w13_EDF, w2_EHD))
    h_AH = swiglu(torch._grouped_mm(x_AD, w13, offs=offsets_E))  # gate and up in one GEMM
    return torch._grouped_mm(h_AH, w2, offs=offsets_E)


def padded_capacity(num_tokens: int, capacity: int | None) -> int:
    """Static rows per expert for the padded backend (C_pad).

    An expert takes at most ``min(capacity, T)`` rows (top-k picks an expert at most once per
    token; no capacity means T). That bound is rounded up to a bucket: a multiple of
    ``max(8, 2 ** (floor(log2(c)) - 2))``, i.e. four buckets per doubling and under 25 %
    padding above 32 rows, then clamped to T. C_pad depends on shapes only, never on the
    routing, so the path compiles to static shapes and never drops a kept row.
    """
    bound = num_tokens if capacity is None else min(capacity, num_tokens)
    step = max(8, 1 << max(bound.bit_length() - 3, 0))
    return min(-(-bound // step) * step, num_tokens)


def padded_dispatch(x_TD: Tensor, routing: Routing, w13_EDF: Tensor, w2_EHD: Tensor) -> Tensor:
    """Scatter rows into ``[E, C_pad, D]``, one ``bmm`` per weight, gather back. No host sync.

    With no capacity C_pad = T, so the buffers are ``E * T`` rows instead of ``T * K``:
    E/K times the activation memory and expert FLOPs of the grouped path.
    """
    sorted_ = sort_assignments(routing)
    num_tokens, width = x_TD.shape
    num_experts, c_pad = w13_EDF.shape[0], padded_capacity(num_tokens, routing.capacity)
    slots_A = _padded_slots(sorted_, num_experts, c_pad)
    trash = num_experts * c_pad  # one spare slot that every non-running row points at
    # Token feeding each slot; empty slots read row T, a zero row appended to x.
    slot_tokens_C = torch.full((trash + 1,), num_tokens, device=x_TD.device, dtype=torch.long)
    slot_tokens_C = slot_tokens_C.scatter_(0, slots_A, sorted_.token_ids_A)[:trash]
    x_pad_TD = torch.cat([x_TD, x_TD.new_zeros(1, width)])
    x_ECD = x_pad_TD.index_select(0, slot_tokens_C).view(num_experts, c_pad, width)
    y_ECD = torch.bmm(swiglu(torch.bmm(x_ECD, w13_EDF)), w2_EHD)
    y_flat_CD = torch.cat([y_ECD.reshape(trash, -1), y_ECD.new_zeros(1, y_ECD.shape[-1])])
    return combine(y_flat_CD.index_select(0, slots_A), sorted_, num_tokens=num_tokens)


def _padded_slots(sorted_: SortedAssignments, num_experts: int, c_pad: int) -> Tensor:
    """Flat slot ``expert * C_pad + rank`` of each running row; the spare slot for the rest."""
    order_A = torch.arange(sorted_.groups_A.numel(), device=sorted_.groups_A.device)
    rank_A = rank_in_group(sorted_.groups_A, order_A, num_experts + 1)  # already sorted
    slots_A = sorted_.groups_A * c_pad + rank_A
    # rank < C_pad always holds for router output (kept rows <= min(capacity, T)); the check
    # keeps an inconsistent Routing from spilling rows into the next expert's slots.
    fits_A = sorted_.runs_A & (rank_A < c_pad)
    return torch.where(fits_A, slots_A, torch.full_like(slots_A, num_experts * c_pad))


def expert_widths(w13_EDF: Tensor, w2_EHD: Tensor) -> tuple[int, int]:
    """(D, H) of stacked expert weights: the model width and the expert hidden width."""
    return w13_EDF.shape[1], w2_EHD.shape[1]


_BACKENDS = {"grouped": grouped_dispatch, "padded": padded_dispatch, "loop": loop_dispatch}


class Dispatcher:
    """Runs the requested backend, or the best one that really works, and records which ran.

    ``requested`` is the name asked for; ``observed`` the backend of the latest call (None
    before the first); ``fallback_reason`` None when the request was honoured as asked, else
    why another backend ran (for ``auto``: why grouped was not chosen). Receipts read these.
    """

    def __init__(self, requested: str = "loop") -> None:
        if requested not in DISPATCH_BACKENDS:
            known = ", ".join(DISPATCH_BACKENDS)
            raise ValueError(f"dispatch_backend: unknown {requested!r}; available: {known}")
        self.requested = requested
        self.observed: str | None = None
        self.fallback_reason: str | None = None

    def __call__(self, x_TD: Tensor, routing: Routing, w13_EDF: Tensor, w2_EHD: Tensor) -> Tensor:
        self.observed, self.fallback_reason = self.resolve(x_TD, routing, w13_EDF, w2_EHD)
        return _BACKENDS[self.observed](x_TD, routing, w13_EDF, w2_EHD)

    def resolve(
        self, x_TD: Tensor, routing: Routing, w13_EDF: Tensor, w2_EHD: Tensor
    ) -> tuple[str, str | None]:
        """(backend to run, reason it differs from the request) from shapes and device only."""
        if self.requested in ("loop", "padded"):
            return self.requested, None
        reason = grouped_mm_unavailable_reason(
            x_TD.device, compute_dtype(x_TD), *expert_widths(w13_EDF, w2_EHD)
        )
        if reason is None:
            return "grouped", None
        if self.requested == "grouped":
            return "loop", f"grouped fell back to loop: {reason}"
        if routing.capacity is not None:
            return "padded", f"auto chose padded (capacity set): {reason}"
        return "loop", (
            f"auto chose loop (no capacity; padded would run E/K times the rows): {reason}"
        )

    def as_dict(self) -> dict[str, str | None]:
        """The receipt's view: requested, observed and fallback_reason."""
        return {
            "requested": self.requested,
            "observed": self.observed,
            "fallback_reason": self.fallback_reason,
        }

    def __repr__(self) -> str:
        return f"Dispatcher(requested={self.requested!r}, observed={self.observed!r})"
