"""Top-k softmax router with a Switch-style load-balancing loss.

Shape legend:
    T  tokens (batch and sequence flattened)
    D  model width (d_model)
    E  routed experts (num_experts)
    K  experts chosen per token (top_k)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """What the router decided for a batch of tokens."""

    expert_ids: Tensor  # [T, K] long, chosen experts per token, best first
    weights: Tensor  # [T, K] chosen probabilities renormalized to sum to 1, input's dtype
    tokens_per_expert: Tensor  # [E] long, assignments per expert; sums to T * K
    aux_loss: Tensor  # 0-dim fp32, already multiplied by the coefficient


class TopKRouter(nn.Module):
    """Linear gate -> softmax -> top-k, renormalized over the chosen experts."""

    def __init__(
        self, d_model: int, num_experts: int, top_k: int, *, aux_loss_coeff: float = 0.01
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: {top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coeff = aux_loss_coeff
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: Tensor) -> Routing:
        # Gate math in fp32: bf16 softmax over close logits flips top-k choices and biases the loss.
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        top_probs_TK, expert_ids_TK = probs_TE.topk(self.top_k, dim=-1)
        weights_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        tokens_per_expert_E = self.count_tokens(expert_ids_TK)
        aux_loss = self.load_balancing_loss(probs_TE, tokens_per_expert_E)
        return Routing(
            expert_ids=expert_ids_TK,
            weights=weights_TK.to(x_TD.dtype),
            tokens_per_expert=tokens_per_expert_E,
            aux_loss=aux_loss,
        )

    def count_tokens(self, expert_ids_TK: Tensor) -> Tensor:
        """Histogram of assignments, built on the device (no bincount: it syncs on CUDA)."""
        flat_ids = expert_ids_TK.reshape(-1)
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=flat_ids.device)
        return counts_E.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))

    def load_balancing_loss(self, probs_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """Switch loss ``coeff * E * sum_i f_i * P_i``; gradient flows through P only.

        f_i is the fraction of assignments sent to expert i and P_i its mean router
        probability. It equals ``coeff`` when routing is perfectly uniform.
        """
        num_tokens = probs_TE.shape[0]
        fraction_E = tokens_per_expert_E.float() / (num_tokens * self.top_k)
        mean_prob_E = probs_TE.mean(dim=0)
        return self.aux_loss_coeff * self.num_experts * (fraction_E * mean_prob_E).sum()
