"""Top-k router: softmax or sigmoid scores, optional null slot, capacity dropping, balancing.

Slots are the router's outputs: the E routed experts, then (when ``null_slot`` is on) one null
slot at index E. A choice that lands on the null slot runs no routed expert; the block's shared
expert still serves the token. Null-slot choices are never dropped (the slot has no capacity),
so ``kept`` is True for them; dispatch skips them by their id, not by ``kept``.

Nothing here syncs the host with the device: counts use ``scatter_add_``, positions within an
expert come from a stable ``argsort``, and the capacity is computed from shapes alone.

Shape legend:
    T  tokens (batch and sequence flattened)
    D  model width (d_model)
    E  routed experts (num_experts)
    S  router slots (E, plus 1 with the null slot)
    K  choices per token (top_k)
    A  assignments (T * K), flat index a = t * K + j
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


@dataclass
class Routing:
    """What the router decided for a batch of tokens."""

    expert_ids: Tensor  # [T, K] long slot ids, best first; E is the null slot
    weights: Tensor  # [T, K] combine weights (renormalized chosen scores), input's dtype
    kept: Tensor  # [T, K] bool, False where capacity dropped the choice; True on the null slot
    scores: Tensor  # [T, S] fp32 scores before the balancing bias
    tokens_per_expert: Tensor  # [S] long, choices per slot before dropping; sums to T * K
    dropped_per_expert: Tensor  # [S] long, choices dropped by capacity (null slot: always 0)
    capacity: int | None  # per routed expert; None = no dropping
    aux_loss: Tensor  # 0-dim fp32, already multiplied by its coefficient
    z_loss: Tensor  # 0-dim fp32, already multiplied by its coefficient
    num_experts: int  # routed experts E, so the null slot id is known downstream

    @property
    def runs_expert(self) -> Tensor:
        """[T, K] bool: the choice runs a routed expert (kept and not the null slot)."""
        return self.kept & (self.expert_ids < self.num_experts)


def expert_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None
) -> int | None:
    """Assignments each routed expert may take, ``ceil(T * K / E * factor)``; None = unlimited."""
    if capacity_factor is None:
        return None
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def count_per_slot(ids_A: Tensor, num_slots: int, mask_A: Tensor | None = None) -> Tensor:
    """Histogram of ids on the device (``bincount`` would sync on CUDA). Masked-out ids count 0."""
    ones_A = torch.ones_like(ids_A) if mask_A is None else mask_A.to(ids_A.dtype)
    counts_S = torch.zeros(num_slots, dtype=torch.long, device=ids_A.device)
    return counts_S.scatter_add_(0, ids_A, ones_A)


def rank_in_group(groups_A: Tensor, order_A: Tensor, num_groups: int) -> Tensor:
    """Position of each assignment within its group, in the order ``order_A`` lists them.

    ``order_A`` must sort ``groups_A`` (stably, after any tie-break pre-sort). The position is
    the sorted index minus the group's start, so no ``one_hot(...).cumsum`` [A, G] is built.
    """
    sorted_groups_A = groups_A.index_select(0, order_A)
    rows_G = count_per_slot(groups_A, num_groups)
    starts_G = rows_G.cumsum(0) - rows_G
    rank_sorted_A = torch.arange(groups_A.numel(), device=groups_A.device)
    rank_sorted_A = rank_sorted_A - starts_G.index_select(0, sorted_groups_A)
    return torch.empty_like(rank_sorted_A).scatter_(0, order_A, rank_sorted_A)


def keep_within_capacity(
    expert_ids_TK: Tensor,
    scores_TK: Tensor,
    *,
    num_experts: int,
    capacity: int | None,
    policy: str = "probs",
) -> Tensor:
    """Which choices survive the per-expert capacity: a pure function, so dropped = ~kept.

    ``"probs"`` keeps each expert's ``capacity`` highest-scoring choices, ``"position"`` its
    first ones in token order. Null-slot choices (id ``num_experts``) are always kept.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy: must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
    if capacity is None:
        return torch.ones_like(expert_ids_TK, dtype=torch.bool)
    ids_A = expert_ids_TK.reshape(-1)
    if policy == "probs":
        # Sort by score first, then stably by expert: each expert's rows end up best first.
        by_score_A = torch.argsort(scores_TK.reshape(-1), descending=True, stable=True)
        order_A = by_score_A.index_select(
            0, torch.argsort(ids_A.index_select(0, by_score_A), stable=True)
        )
    else:
        order_A = torch.argsort(ids_A, stable=True)  # flat index is token-major: token order
    rank_A = rank_in_group(ids_A, order_A, num_experts + 1)
    kept_A = (rank_A < capacity) | (ids_A == num_experts)
    return kept_A.view_as(expert_ids_TK)


class TopKRouter(nn.Module):
    """Linear gate -> scores -> top-k on (scores + balancing bias) -> renormalized weights.

    ``expert_bias`` (a persistent buffer: it is training state) only changes which slots are
    chosen, never the weights. ``update_bias()``, called after the optimizer step, moves it
    towards balance from the counts the training forwards accumulated (DeepSeek-V3 style).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        score: str = "softmax",
        null_slot: bool = False,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        aux_loss_coeff: float = 0.0,
        z_loss_coeff: float = 0.0,
        jitter_eps: float = 0.0,
        bias_update_rate: float = 0.0,
        route_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_router_args(num_experts, top_k, score, drop_policy, capacity_factor, jitter_eps)
        self.num_experts, self.top_k, self.score = num_experts, top_k, score
        self.num_slots = num_experts + int(null_slot)
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.jitter_eps, self.bias_update_rate = jitter_eps, bias_update_rate
        self.route_scale = route_scale
        self.weight = nn.Parameter(torch.empty(self.num_slots, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(self.num_slots))
        zeros_S = torch.zeros(self.num_slots, dtype=torch.long)
        self.register_buffer("bias_counts", zeros_S, persistent=False)

    @property
    def null_slot(self) -> bool:
        return self.num_slots > self.num_experts

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TS = self.gate_logits(x_TD)
        scores_TS = logits_TS.sigmoid() if self.score == "sigmoid" else logits_TS.softmax(-1)
        expert_ids_TK, weights_TK = self.select(scores_TS)
        num_tokens = x_TD.shape[0]
        capacity = expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)
        kept_TK = keep_within_capacity(
            expert_ids_TK,
            scores_TS.gather(1, expert_ids_TK),
            num_experts=self.num_experts,
            capacity=capacity,
            policy=self.drop_policy,
        )
        ids_A = expert_ids_TK.reshape(-1)
        tokens_per_expert_S = count_per_slot(ids_A, self.num_slots)
        if self.training and self.bias_update_rate > 0:
            self.bias_counts.add_(tokens_per_expert_S)
        return Routing(
            expert_ids=expert_ids_TK,
            weights=weights_TK.to(x_TD.dtype),
            kept=kept_TK,
            scores=scores_TS,
            tokens_per_expert=tokens_per_expert_S,
            dropped_per_expert=(
                torch.zeros_like(tokens_per_expert_S)
                if capacity is None
                else count_per_slot(ids_A, self.num_slots, ~kept_TK.reshape(-1))
            ),
            capacity=capacity,
            aux_loss=self.load_balancing_loss(scores_TS, tokens_per_expert_S),
            z_loss=self.z_loss(logits_TS),
            num_experts=self.num_experts,
        )

    def gate_logits(self, x_TD: Tensor) -> Tensor:
        """``x W^T`` in fp32: bf16 scores over close logits flip top-k choices."""
        x_TD = x_TD.float()
        if self.training and self.jitter_eps > 0:
            noise_TD = torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            x_TD = x_TD * noise_TD
        return x_TD @ self.weight.float().t()

    def select(self, scores_TS: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k slots on the biased scores; weights from the unbiased ones, summing to scale."""
        _, expert_ids_TK = (scores_TS + self.expert_bias).topk(self.top_k, dim=-1)
        chosen_TK = scores_TS.gather(1, expert_ids_TK)
        weights_TK = chosen_TK / chosen_TK.sum(dim=-1, keepdim=True) * self.route_scale
        return expert_ids_TK, weights_TK

    def load_balancing_loss(self, scores_TS: Tensor, tokens_per_expert_S: Tensor) -> Tensor:
        """Switch loss ``coeff * S * sum_i f_i * P_i``; gradient flows through P only.

        f_i is the fraction of choices sent to slot i and P_i its mean score, normalized over
        slots (sigmoid scores do not sum to 1). It equals ``coeff`` under uniform routing.
        """
        if self.aux_loss_coeff == 0:  # a Python float: no kernels for a loss that is off
            return scores_TS.new_zeros(())
        num_tokens = scores_TS.shape[0]
        fraction_S = tokens_per_expert_S.float() / (num_tokens * self.top_k)
        probs_TS = scores_TS
        if self.score == "sigmoid":
            probs_TS = scores_TS / scores_TS.sum(dim=-1, keepdim=True)
        mean_prob_S = probs_TS.mean(dim=0)
        return self.aux_loss_coeff * self.num_slots * (fraction_S * mean_prob_S).sum()

    def z_loss(self, logits_TS: Tensor) -> Tensor:
        """ST-MoE router z-loss ``coeff * mean_t(logsumexp(logits_t) ** 2)``: keeps logits small."""
        if self.z_loss_coeff == 0:
            return logits_TS.new_zeros(())
        return self.z_loss_coeff * logits_TS.logsumexp(dim=-1).square().mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step: ``bias_i += rate * sign(mean(n) - n_i)``, then re-centre.

        Over routed experts only (the null slot's bias stays 0), from the choices counted since
        the last call; the counts are then reset. All on the device: no ``.item()``.
        """
        if self.bias_update_rate > 0:
            counts_E = self.bias_counts[: self.num_experts].float()
            bias_E = self.expert_bias[: self.num_experts]
            bias_E.add_(self.bias_update_rate * torch.sign(counts_E.mean() - counts_E))
            bias_E.sub_(bias_E.mean())
        self.bias_counts.zero_()


def _check_router_args(
    num_experts: int,
    top_k: int,
    score: str,
    drop_policy: str,
    capacity_factor: float | None,
    jitter_eps: float,
) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: {top_k} must be in [1, num_experts={num_experts}]")
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"score: must be one of {', '.join(SCORE_FUNCTIONS)}, got {score!r}")
    if drop_policy not in DROP_POLICIES:
        choices = ", ".join(DROP_POLICIES)
        raise ValueError(f"drop_policy: must be one of {choices}, got {drop_policy!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor: must be > 0 or None, got {capacity_factor!r}")
    if not 0 <= jitter_eps < 1:
        raise ValueError(f"jitter_eps: must be in [0, 1), got {jitter_eps!r}")
