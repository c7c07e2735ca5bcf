"""The routed experts of an MoE block: E SwiGLU experts with stacked weights.

A module of its own: the block (``moe_core.moe``) holds one, and the dispatchers
(``moe_core.dispatch``, ``moe_core.expert_parallel``) take its weights ``w13`` and ``w2`` as
tensors, so they need nothing of it; the imports run one way (``dispatch <- expert_parallel <-
moe``, ``experts <- moe``).

Shape legend:
    D  model width (d_model)
    H  expert hidden width
    E  routed experts (the ones stacked here, local to a shard)
    N  rows routed to one expert
    X, Y  the trailing dims of a stacked expert weight ([D, 2H] or [H, D])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_core.config import check_ep_size
from moe_core.row_ops import swiglu


class RoutedExperts(nn.Module):
    """E SwiGLU experts whose weights are stacked, so grouped-GEMM backends can use them as is.

    The gate and up projections share one weight ``w13`` = [gate | up], ``[E, D, 2H]``: one
    grouped GEMM computes both, reading the rows once, and the backward gets one input
    gradient instead of two to add. ``w1`` (gate) and ``w3`` (up) are views of its halves.

    With ``ep_size > 1`` this is rank ``ep_rank``'s shard: ``num_experts`` of the
    ``num_global_experts`` experts, global ids ``first_expert`` onwards.
    """

    def __init__(
        self, num_experts: int, d_model: int, hidden: int, *, ep_rank: int = 0, ep_size: int = 1
    ) -> None:
        super().__init__()
        check_ep_size(ep_size, num_experts)
        self.num_global_experts = num_experts
        self.num_experts = num_experts // ep_size  # stacked here, the local experts
        self.first_expert = ep_rank * self.num_experts
        self.d_model, self.hidden = d_model, hidden
        local = self.num_experts
        self.w13 = nn.Parameter(torch.empty(local, d_model, 2 * hidden))  # gate | up, [E, D, 2H]
        self.w2 = nn.Parameter(torch.empty(local, hidden, d_model))  # down, [E, H, D]
        self.init_weights(0.02, 0.02)

    @property
    def w1(self) -> Tensor:
        """The gate projection, ``[E, D, H]``: a view of ``w13``."""
        return self.w13[..., : self.hidden]

    @property
    def w3(self) -> Tensor:
        """The up projection, ``[E, D, H]``: a view of ``w13``."""
        return self.w13[..., self.hidden :]

    @property
    def is_shard(self) -> bool:
        return self.num_experts < self.num_global_experts

    def forward_expert(self, expert: int, x_ND: Tensor) -> Tensor:
        """Apply (local) expert ``expert`` to the N rows routed to it."""
        return swiglu(x_ND @ self.w13[expert]) @ self.w2[expert]

    def init_weights(self, std: float, residual_std: float) -> None:
        for weight, weight_std in ((self.w13, std), (self.w2, residual_std)):
            self._init_normal_rows(weight, weight_std)

    @torch.no_grad()
    def _init_normal_rows(self, weight_EXY: Tensor, std: float) -> None:
        """N(0, std) for this shard's experts, equal to the same rows of the unsharded weight.

        A shard draws the whole [E_global, ...] tensor and keeps its rows: the values then match
        the ep_size=1 model built with the same seed, and the RNG advances exactly as there, so
        every later layer matches too. The cost is one transient full-size weight, at init only.
        """
        if not self.is_shard:
            nn.init.normal_(weight_EXY, std=std)
            return
        full_EXY = weight_EXY.new_empty((self.num_global_experts, *weight_EXY.shape[1:]))
        nn.init.normal_(full_EXY, std=std)
        weight_EXY.copy_(full_EXY[self.first_expert : self.first_expert + self.num_experts])
