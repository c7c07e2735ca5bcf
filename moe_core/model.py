"""The hybrid MoE language model: byte embedding, A/E blocks from the pattern, tied LM head.

Shape legend:
    B  batch
    T  sequence position (time)
    D  model width (d_model)
    V  vocabulary (256 bytes by default)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.attention import AttentionBlock
from moe_core.config import ModelConfig, check_ep_size, check_implemented
from moe_core.dispatch import DISPATCH_BACKENDS
from moe_core.expert_parallel import group_rank_and_size
from moe_core.moe import MoEBlock
from moe_core.recurrent import RecurrentBlock
from moe_core.ssm import MambaBlock

INIT_STD = 0.02


def _attention(cfg: ModelConfig, dispatch_backend: str, ep_group: Any) -> nn.Module:
    return AttentionBlock(cfg)


def _moe(cfg: ModelConfig, dispatch_backend: str, ep_group: Any) -> nn.Module:
    return MoEBlock(cfg, dispatch_backend=dispatch_backend, ep_group=ep_group)


def _mamba(cfg: ModelConfig, dispatch_backend: str, ep_group: Any) -> nn.Module:
    return MambaBlock(
        cfg.d_model,
        d_state=cfg.ssm_d_state,
        expand=cfg.ssm_expand,
        d_conv=cfg.ssm_d_conv,
        chunk_size=cfg.ssm_chunk_size,
        dt_min=cfg.ssm_dt_min,
        dt_max=cfg.ssm_dt_max,
    )


def _recurrent(cfg: ModelConfig, dispatch_backend: str, ep_group: Any) -> nn.Module:
    return RecurrentBlock(
        cfg.d_model, expand=cfg.rec_expand, d_conv=cfg.rec_d_conv, chunk_size=cfg.rec_chunk_size
    )


# One builder per pattern letter, called as (cfg, dispatch_backend, ep_group). Every block maps
# x_BTD -> (x_BTD, aux_loss).
BLOCK_BUILDERS: dict[str, Callable[[ModelConfig, str, Any], nn.Module]] = {
    "A": _attention,
    "M": _mamba,
    "E": _moe,
    "R": _recurrent,
}


class MoEModel(nn.Module):
    """Decoder-only LM. The LM head shares the embedding matrix (tied, as in nanoGPT)."""

    def __init__(
        self, cfg: ModelConfig, *, dispatch_backend: str = "loop", ep_group: Any = None
    ) -> None:
        super().__init__()
        if dispatch_backend not in DISPATCH_BACKENDS:
            # Checked here too, so a model without E blocks still refuses a bad name.
            known = ", ".join(DISPATCH_BACKENDS)
            raise ValueError(f"dispatch_backend: unknown {dispatch_backend!r}; available: {known}")
        check_ep_size(group_rank_and_size(ep_group)[1], cfg.num_experts)  # likewise
        layers = cfg.layers
        check_implemented(cfg.pattern, layers)  # the config checked too; cheap to be sure
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            BLOCK_BUILDERS[letter](cfg, dispatch_backend, ep_group) for letter in layers
        )
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=1e-6)

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        """The E blocks in layer order, for reading routing counters."""
        return [block for block in self.blocks if isinstance(block, MoEBlock)]

    @torch.no_grad()
    def update_router_biases(self, group: Any = None) -> None:
        """Loss-free balancing step of every E block's router; call right after ``opt.step()``.

        A no-op (beyond resetting counts) when ``bias_update_rate`` is 0. Nothing syncs.
        The router is replicated, so every rank must take the same step from the same counts,
        or the ranks' routers drift apart: the counts are first summed (an all-reduce on the
        device) over ``group``, else over an expert-parallel block's EP group. A data-parallel
        job passes its whole group, so the step follows every rank's tokens.
        """
        for block in self.moe_blocks:
            over = group if group is not None else block.ep_group
            if over is not None and block.router.bias_update_rate > 0:
                dist.all_reduce(block.router.bias_counts, group=over)
            block.router.update_bias()

    def dispatch_observations(self) -> list[dict[str, str | None]]:
        """Per E block: requested, observed backend and fallback reason, for the receipt."""
        return [block.dispatcher.as_dict() for block in self.moe_blocks]

    def forward(self, tokens_BT: Tensor) -> tuple[Tensor, Tensor]:
        """Return next-token logits [B, T, V] and the summed E-block aux loss (0-dim fp32)."""
        self._check_tokens(tokens_BT)
        x_BTD = self.embed(tokens_BT)
        aux_loss = torch.zeros((), device=tokens_BT.device)
        for block in self.blocks:
            x_BTD, block_aux = block(x_BTD)
            aux_loss = aux_loss + block_aux
        logits_BTV = F.linear(self.norm_f(x_BTD), self.embed.weight)
        return logits_BTV, aux_loss

    def _check_tokens(self, tokens_BT: Tensor) -> None:
        # Shape checks only: checking token values would need a device sync.
        if tokens_BT.dim() != 2:
            raise ValueError(f"tokens: expected shape [B, T], got {tuple(tokens_BT.shape)}")
        if tokens_BT.dtype != torch.long:
            raise ValueError(f"tokens: expected dtype torch.long, got {tokens_BT.dtype}")
        if tokens_BT.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"tokens: sequence length {tokens_BT.shape[1]} exceeds seq_len={self.cfg.seq_len}"
            )

    def init_weights(self) -> None:
        """nanoGPT init: N(0, 0.02), residual-branch output projections scaled down.

        Each block adds one branch to the residual stream, so the variance of the stream grows
        with the number of blocks; scaling by 1/sqrt(num_blocks) keeps it about constant.
        """
        residual_std = INIT_STD / math.sqrt(len(self.blocks))
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        self.norm_f.reset_parameters()
        for block in self.blocks:
            block.init_weights(INIT_STD, residual_std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(
    cfg: ModelConfig, seed: int, *, dispatch_backend: str = "loop", ep_group: Any = None
) -> MoEModel:
    """Build and initialize a model; the same (cfg, seed) always gives the same weights.

    ``dispatch_backend`` is one of ``DISPATCH_BACKENDS`` (grouped, padded, loop, auto); each
    E block's ``dispatcher`` then records which backend really ran.

    ``ep_group``: a process group of size P > 1 makes every E block expert parallel over it
    (``moe_core.expert_parallel``): each rank holds E / P routed experts, whose weights equal
    the matching slice of the model built without it, and ``observed`` reads
    ``ep_all_to_all+loop`` or ``ep_all_to_all+grouped``. P must divide ``num_experts``.

    The global RNG is forked, so building a model does not disturb the caller's random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoEModel(cfg, dispatch_backend=dispatch_backend, ep_group=ep_group)
        model.init_weights()
    return model
