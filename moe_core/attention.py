"""Causal self-attention block with rotary position embeddings (RoPE).

Shape legend:
    B  batch
    T  sequence position (time)
    D  model width (d_model)
    H  attention heads
    C  channels per head (head_dim = D / H)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_core.config import ModelConfig


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotate-half RoPE (GPT-NeoX layout)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim: must be even for RoPE, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles_TC = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles_TC = torch.cat([angles_TC, angles_TC], dim=-1)
        # Derived from the config, so kept out of checkpoints.
        self.register_buffer("cos_TC", angles_TC.cos().float(), persistent=False)
        self.register_buffer("sin_TC", angles_TC.sin().float(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, x_BHTC: Tensor) -> Tensor:
        seq_len = x_BHTC.shape[-2]
        if seq_len > self.max_seq_len:
            raise ValueError(f"seq_len: {seq_len} exceeds the RoPE table size {self.max_seq_len}")
        cos_TC = self.cos_TC[:seq_len].to(x_BHTC.dtype)
        sin_TC = self.sin_TC[:seq_len].to(x_BHTC.dtype)
        return x_BHTC * cos_TC + rotate_half(x_BHTC) * sin_TC


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class AttentionBlock(nn.Module):
    """Pre-norm residual block: x + proj(causal_attention(rope(q), rope(k), v))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.seq_len, cfg.rope_base)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and a zero aux loss (blocks share one contract)."""
        B, T, D = x_BTD.shape
        qkv_BT3HC = self.qkv(self.norm(x_BTD)).view(B, T, 3, self.n_heads, D // self.n_heads)
        q_BHTC, k_BHTC, v_BHTC = qkv_BT3HC.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTC, k_BHTC = self.rope(q_BHTC), self.rope(k_BHTC)
        y_BHTC = F.scaled_dot_product_attention(q_BHTC, k_BHTC, v_BHTC, is_causal=True)
        y_BTD = y_BHTC.transpose(1, 2).reshape(B, T, D)
        aux_loss = torch.zeros((), device=x_BTD.device)
        return x_BTD + self.proj(y_BTD), aux_loss

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.proj.weight, std=residual_std)
