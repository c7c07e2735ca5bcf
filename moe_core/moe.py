"""Mixture-of-experts block: a shared SwiGLU expert plus top-k routed SwiGLU experts.

Flow (Megatron's naming): route -> dispatch -> experts -> combine. A dispatch backend is any
callable ``(x_TD, routing, experts) -> routed_TD``; "loop" is the reference one, and faster
backends (grouped GEMM, all-to-all for expert parallel) plug into ``DISPATCH_BACKENDS``.

Shape legend:
    B  batch
    S  sequence position
    T  tokens (B * S, flattened)
    D  model width (d_model)
    H  expert hidden width
    E  routed experts
    K  experts chosen per token (top_k)
    A  assignments (T * K), one row per (token, chosen expert), sorted by expert
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.config import ModelConfig
from moe_core.router import Routing, TopKRouter


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP, used as the shared expert that sees every token."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down, writes into the residual

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=std)
        nn.init.normal_(self.w3.weight, std=std)
        nn.init.normal_(self.w2.weight, std=residual_std)


class RoutedExperts(nn.Module):
    """E SwiGLU experts whose weights are stacked, so grouped-GEMM backends can use them as is."""

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # gate, [E, D, H]
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden))  # up, [E, D, H]
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # down, [E, H, D]
        self.init_weights(0.02, 0.02)

    def forward_expert(self, expert: int, x_ND: Tensor) -> Tensor:
        """Apply expert ``expert`` to the N rows routed to it."""
        h_NH = F.silu(x_ND @ self.w1[expert]) * (x_ND @ self.w3[expert])
        return h_NH @ self.w2[expert]

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w3, std=std)
        nn.init.normal_(self.w2, std=residual_std)


DispatchBackend = Callable[[Tensor, Routing, RoutedExperts], Tensor]


@dataclass
class SortedAssignments:
    """Assignments grouped by expert: row a goes to token token_ids_A[a]."""

    token_ids_A: Tensor
    weights_A: Tensor
    rows_per_expert: list[int]  # host-side split sizes, sum to A


def sort_by_expert(routing: Routing) -> SortedAssignments:
    """Order the T*K assignments by expert (stable, so each expert sees tokens in order)."""
    top_k = routing.expert_ids.shape[1]
    order_A = torch.argsort(routing.expert_ids.reshape(-1), stable=True)
    # Flat assignment index a = t * K + j, so its token is a // K.
    token_ids_A = torch.div(order_A, top_k, rounding_mode="floor")
    weights_A = routing.weights.reshape(-1).index_select(0, order_A)
    # Slicing per expert needs the sizes on the host: a device sync. Acceptable for the
    # reference backend; grouped-GEMM backends take the counts as a device tensor instead.
    rows_per_expert = routing.tokens_per_expert.tolist()
    return SortedAssignments(token_ids_A, weights_A, rows_per_expert)


def run_experts_loop(experts: RoutedExperts, x_AD: Tensor, rows_per_expert: list[int]) -> Tensor:
    """Run each expert on its contiguous slice of the sorted rows."""
    chunks = torch.split(x_AD, rows_per_expert, dim=0)
    outputs = [experts.forward_expert(e, chunk) for e, chunk in enumerate(chunks)]
    return torch.cat(outputs, dim=0)


def combine(y_AD: Tensor, assignments: SortedAssignments, num_tokens: int) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens."""
    weighted_AD = y_AD * assignments.weights_A.unsqueeze(-1)
    out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, assignments.token_ids_A, weighted_AD)


def loop_dispatch(x_TD: Tensor, routing: Routing, experts: RoutedExperts) -> Tensor:
    """Reference backend: sort by expert, gather, per-expert loop, weighted combine."""
    assignments = sort_by_expert(routing)
    x_AD = x_TD.index_select(0, assignments.token_ids_A)
    y_AD = run_experts_loop(experts, x_AD, assignments.rows_per_expert)
    return combine(y_AD, assignments, num_tokens=x_TD.shape[0])


DISPATCH_BACKENDS: dict[str, DispatchBackend] = {"loop": loop_dispatch}


class MoEBlock(nn.Module):
    """Pre-norm residual block: x + shared(norm(x)) + routed(norm(x)).

    Routing counters live in non-persistent buffers (not in checkpoints), accumulate on the
    device during training forwards, and are read and zeroed by ``read_and_reset_counters``
    at the optimizer step, so the forward signature stays clean and nothing syncs.
    """

    def __init__(self, cfg: ModelConfig, *, dispatch_backend: str = "loop") -> None:
        super().__init__()
        self.dispatch_backend = dispatch_backend
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.router = TopKRouter(
            cfg.d_model, cfg.num_experts, cfg.top_k, aux_loss_coeff=cfg.aux_loss_coeff
        )
        self.shared_expert = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.experts = RoutedExperts(cfg.num_experts, cfg.d_model, cfg.expert_hidden)
        zeros_E = torch.zeros(cfg.num_experts, dtype=torch.long)
        self.register_buffer("tokens_per_expert_E", zeros_E, persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("num_forwards", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def dispatch_backend(self) -> str:
        return self._dispatch_backend

    @dispatch_backend.setter
    def dispatch_backend(self, name: str) -> None:
        if name not in DISPATCH_BACKENDS:
            known = ", ".join(sorted(DISPATCH_BACKENDS))
            raise ValueError(f"dispatch_backend: unknown {name!r}; available: {known}")
        self._dispatch_backend = name

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and this block's aux loss (0-dim fp32)."""
        B, S, D = x_BSD.shape
        h_TD = self.norm(x_BSD).reshape(B * S, D)
        routing = self.router(h_TD)
        routed_TD = DISPATCH_BACKENDS[self.dispatch_backend](h_TD, routing, self.experts)
        out_TD = self.shared_expert(h_TD) + routed_TD
        if self.training:
            self._accumulate(routing)
        return x_BSD + out_TD.view(B, S, D), routing.aux_loss

    @torch.no_grad()
    def _accumulate(self, routing: Routing) -> None:
        self.tokens_per_expert_E.add_(routing.tokens_per_expert)
        self.aux_loss_sum.add_(routing.aux_loss.detach())
        self.num_forwards.add_(1)

    @torch.no_grad()
    def read_and_reset_counters(self) -> dict[str, Tensor]:
        """Device tensors since the last reset, then zero them. No host sync happens here.

        ``tokens_per_expert`` [E] long: assignments summed over the training forwards.
        ``aux_loss`` 0-dim: mean aux loss over those forwards (0 when there were none).
        """
        counters = {
            "tokens_per_expert": self.tokens_per_expert_E.clone(),
            "aux_loss": self.aux_loss_sum / self.num_forwards.clamp(min=1),
        }
        self.tokens_per_expert_E.zero_()
        self.aux_loss_sum.zero_()
        self.num_forwards.zero_()
        return counters

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.router.weight, std=std)
        self.shared_expert.init_weights(std, residual_std)
        self.experts.init_weights(std, residual_std)
