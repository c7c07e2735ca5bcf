"""Mixture-of-experts block: a shared SwiGLU expert plus top-k routed SwiGLU experts.

Flow (Megatron's naming): route (``moe_core.router``) -> dispatch, experts and combine
(``moe_core.dispatch``, whose ``Dispatcher`` records which backend really ran).

Shape legend:
    B  batch
    L  sequence position
    T  tokens (B * L, flattened)
    D  model width (d_model)
    H  expert hidden width
    E  routed experts (in a ``RoutedExperts``, ``moe_core.experts``: local to a shard)
    S  router slots (E, plus 1 with the null slot)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.config import ModelConfig, check_ep_size
from moe_core.dispatch import Dispatcher
from moe_core.expert_parallel import ExpertParallelDispatcher, group_rank_and_size
from moe_core.experts import RoutedExperts
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


TAIL_COUNTERS = ("shared_only_tokens", "aux_loss_sum", "z_loss_sum", "num_forwards")


def unpack_counters(delta_N: Tensor, num_slots: int) -> dict[str, Tensor]:
    """A difference of two snapshots of ``MoEBlock.routing_counters`` as named tensors."""
    s = num_slots
    shared, aux, z, forwards = delta_N[2 * s :].unbind()
    forwards = forwards.clamp(min=1)
    return {
        "tokens_per_expert": delta_N[:s].round().long(),
        "dropped_per_expert": delta_N[s : 2 * s].round().long(),
        "shared_only_tokens": shared.round().long(),
        "aux_loss": (aux / forwards).float(),
        "z_loss": (z / forwards).float(),
    }


class MoEBlock(nn.Module):
    """Pre-norm residual block: x + shared(norm(x)) + routed(norm(x)).

    With ``ep_group`` a process group of size P > 1 the block holds only its rank's E / P
    routed experts and dispatches through ``moe_core.expert_parallel`` (all-to-all); routing
    and the counters stay per rank, over its own tokens and all E global slots.

    Routing counters live in one non-persistent cumulative buffer (not in checkpoints) that
    accumulates on the device during training forwards; readers copy it (``routing_snapshot``)
    and difference copies, or call ``read_and_reset_counters``. A reader may hand the block a
    view of a larger buffer to keep them in (``adopt_routing_counters``). The forward
    signature stays clean and nothing syncs.
    """

    def __init__(
        self, cfg: ModelConfig, *, dispatch_backend: str = "loop", ep_group: Any = None
    ) -> None:
        super().__init__()
        ep_rank, ep_size = group_rank_and_size(ep_group)
        check_ep_size(ep_size, cfg.num_experts)  # before anything is built
        # A group of one is no expert parallelism: the plain dispatcher, every expert local.
        self.ep_group = ep_group if ep_size > 1 else None
        self.dispatcher = self._make_dispatcher(dispatch_backend)
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.router = router_from_config(cfg)
        self.shared_expert = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.experts = RoutedExperts(
            cfg.num_experts, cfg.d_model, cfg.expert_hidden, ep_rank=ep_rank, ep_size=ep_size
        )
        # All counters in one cumulative fp64 buffer (exact for counts below 2**53), so a
        # reader takes them with one copy: [tokens per slot (S), dropped per slot (S),
        # shared-only tokens, aux-loss sum, z-loss sum, training forwards].
        self.num_slots = cfg.num_slots
        self.top_k = cfg.top_k
        self.null_slot = cfg.null_slot
        counters_N = torch.zeros(2 * cfg.num_slots + len(TAIL_COUNTERS), dtype=torch.float64)
        self.register_buffer("routing_counters", counters_N, persistent=False)
        self._read_mark_N: Tensor | None = None  # read_and_reset_counters' last read
        self.capacity: int | None = None  # of the latest training forward; from shapes only

    @property
    def dispatch_backend(self) -> str:
        """The requested backend name; ``dispatcher.observed`` says which one ran."""
        return self.dispatcher.requested

    @dispatch_backend.setter
    def dispatch_backend(self, name: str) -> None:
        self.dispatcher = self._make_dispatcher(name)

    def _make_dispatcher(self, name: str) -> Dispatcher:
        if self.ep_group is None:
            return Dispatcher(name)
        return ExpertParallelDispatcher(name, self.ep_group)

    def forward(self, x_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and this block's aux + z loss (0-dim fp32)."""
        B, L, D = x_BLD.shape
        h_TD = self.norm(x_BLD).reshape(B * L, D)
        routing = self.router(h_TD)
        routed_TD = self.dispatcher(h_TD, routing, self.experts.w13, self.experts.w2)
        out_TD = self.shared_expert(h_TD) + routed_TD
        if self.training:
            self._accumulate(routing)
        return x_BLD + out_TD.view(B, L, D), routing.aux_loss + routing.z_loss

    @torch.no_grad()
    def _accumulate(self, routing: Routing) -> None:
        # Tokens none of whose choices runs a routed expert (null slot or dropped).
        shared_only = (~routing.runs_expert.any(dim=-1)).sum()
        tail = torch.stack(
            [
                shared_only.double(),
                routing.aux_loss.detach().double(),
                routing.z_loss.detach().double(),
                torch.ones_like(shared_only, dtype=torch.float64),
            ]
        )
        self.routing_counters.add_(
            torch.cat(
                [routing.tokens_per_expert.double(), routing.dropped_per_expert.double(), tail]
            )
        )
        self.capacity = routing.capacity

    def adopt_routing_counters(self, counters_N: Tensor) -> None:
        """Keep the counters in ``counters_N`` from now on (their current values copied in
        first): a view of one buffer that a reader shares between every E block, so that it
        takes all of them with one copy (``trainer_hooks.routing``)."""
        current_N = self.routing_counters
        if counters_N.shape != current_N.shape or counters_N.dtype != current_N.dtype:
            raise ValueError(
                f"routing counters of {tuple(current_N.shape)} {current_N.dtype} cannot move "
                f"to {tuple(counters_N.shape)} {counters_N.dtype}"
            )
        with torch.no_grad():
            counters_N.copy_(current_N)
        self.routing_counters = counters_N  # a registered buffer's name: stays a buffer

    def routing_snapshot(self) -> Tensor:
        """The cumulative counters, copied (one kernel): readers difference two snapshots."""
        return self.routing_counters.clone()

    @torch.no_grad()
    def read_and_reset_counters(self) -> dict[str, Any]:
        """Device tensors since the previous call (or the start). No host sync happens here.

        ``tokens_per_expert`` [S] long: choices per slot (null slot last), before dropping.
        ``dropped_per_expert`` [S] long: choices dropped by capacity (null slot: 0).
        ``shared_only_tokens`` 0-dim long: tokens served by the shared expert alone.
        ``aux_loss``, ``z_loss`` 0-dim: means over those forwards (0 when there were none).
        ``capacity``: int per routed expert in the latest training forward, or None.
        The cumulative buffer itself is never zeroed, so snapshot readers are unaffected.
        """
        now_N = self.routing_counters.clone()
        mark_N = self._read_mark_N if self._read_mark_N is not None else torch.zeros_like(now_N)
        self._read_mark_N = now_N
        return unpack_counters(now_N - mark_N, self.num_slots) | {"capacity": self.capacity}

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.router.weight, std=std)
        self.shared_expert.init_weights(std, residual_std)
        self.experts.init_weights(std, residual_std)
