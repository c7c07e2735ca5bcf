"""Mixture-of-experts block: a shared SwiGLU expert plus top-k routed SwiGLU experts.

Flow (Megatron's naming): route (``moe_core.router``) -> dispatch, experts and combine
(``moe_core.dispatch``, whose ``Dispatcher`` records which backend really ran).

Shape legend:
    B  batch
    L  sequence position
    T  tokens (B * L, flattened)
    D  model width (d_model)
    H  expert hidden width
    E  routed experts
    S  router slots (E, plus 1 with the null slot)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.config import ModelConfig
from moe_core.dispatch import Dispatcher
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
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
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


def router_from_config(cfg: ModelConfig) -> TopKRouter:
    """The E block's router, every knob taken from the config."""
    return TopKRouter(
        cfg.d_model,
        cfg.num_experts,
        cfg.top_k,
        score=cfg.score,
        null_slot=cfg.null_slot,
        capacity_factor=cfg.capacity_factor,
        drop_policy=cfg.drop_policy,
        aux_loss_coeff=cfg.aux_loss_coeff,
        z_loss_coeff=cfg.z_loss_coeff,
        jitter_eps=cfg.jitter_eps,
        bias_update_rate=cfg.bias_update_rate,
        route_scale=cfg.route_scale,
    )


class MoEBlock(nn.Module):
    """Pre-norm residual block: x + shared(norm(x)) + routed(norm(x)).

    Routing counters live in non-persistent buffers (not in checkpoints), accumulate on the
    device during training forwards, and are read and zeroed by ``read_and_reset_counters``
    at the optimizer step, so the forward signature stays clean and nothing syncs.
    """

    def __init__(self, cfg: ModelConfig, *, dispatch_backend: str = "loop") -> None:
        super().__init__()
        self.dispatcher = Dispatcher(dispatch_backend)
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.router = router_from_config(cfg)
        self.shared_expert = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.experts = RoutedExperts(cfg.num_experts, cfg.d_model, cfg.expert_hidden)
        zeros_S = torch.zeros(cfg.num_slots, dtype=torch.long)
        self.register_buffer("tokens_per_expert_S", zeros_S, persistent=False)
        self.register_buffer("dropped_per_expert_S", zeros_S.clone(), persistent=False)
        zero = torch.zeros((), dtype=torch.long)
        self.register_buffer("shared_only_tokens", zero, persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("z_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("num_forwards", torch.zeros((), dtype=torch.long), persistent=False)
        self.capacity: int | None = None  # of the latest training forward; from shapes only

    @property
    def dispatch_backend(self) -> str:
        """The requested backend name; ``dispatcher.observed`` says which one ran."""
        return self.dispatcher.requested

    @dispatch_backend.setter
    def dispatch_backend(self, name: str) -> None:
        self.dispatcher = Dispatcher(name)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and this block's aux + z loss (0-dim fp32)."""
        B, L, D = x_BLD.shape
        h_TD = self.norm(x_BLD).reshape(B * L, D)
        routing = self.router(h_TD)
        routed_TD = self.dispatcher(h_TD, routing, self.experts)
        out_TD = self.shared_expert(h_TD) + routed_TD
        if self.training:
            self._accumulate(routing)
        return x_BLD + out_TD.view(B, L, D), routing.aux_loss + routing.z_loss

    @torch.no_grad()
    def _accumulate(self, routing: Routing) -> None:
        self.tokens_per_expert_S.add_(routing.tokens_per_expert)
        self.dropped_per_expert_S.add_(routing.dropped_per_expert)
        # Tokens none of whose choices runs a routed expert (null slot or dropped).
        self.shared_only_tokens.add_((~routing.runs_expert.any(dim=-1)).sum())
        self.aux_loss_sum.add_(routing.aux_loss.detach())
        self.z_loss_sum.add_(routing.z_loss.detach())
        self.num_forwards.add_(1)
        self.capacity = routing.capacity

    @torch.no_grad()
    def read_and_reset_counters(self) -> dict[str, Any]:
        """Device tensors since the last reset, then zero them. No host sync happens here.

        ``tokens_per_expert`` [S] long: choices per slot (null slot last), before dropping.
        ``dropped_per_expert`` [S] long: choices dropped by capacity (null slot: 0).
        ``shared_only_tokens`` 0-dim long: tokens served by the shared expert alone.
        ``aux_loss``, ``z_loss`` 0-dim: means over those forwards (0 when there were none).
        ``capacity``: int per routed expert in the latest training forward, or None.
        """
        num_forwards = self.num_forwards.clamp(min=1)
        counters = {
            "tokens_per_expert": self.tokens_per_expert_S.clone(),
            "dropped_per_expert": self.dropped_per_expert_S.clone(),
            "shared_only_tokens": self.shared_only_tokens.clone(),
            "aux_loss": self.aux_loss_sum / num_forwards,
            "z_loss": self.z_loss_sum / num_forwards,
            "capacity": self.capacity,
        }
        for buffer in self._counter_buffers():
            buffer.zero_()
        return counters

    def _counter_buffers(self) -> tuple[Tensor, ...]:
        return (
            self.tokens_per_expert_S,
            self.dropped_per_expert_S,
            self.shared_only_tokens,
            self.aux_loss_sum,
            self.z_loss_sum,
            self.num_forwards,
        )

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.router.weight, std=std)
        self.shared_expert.init_weights(std, residual_std)
        self.experts.init_weights(std, residual_std)
