"""Mamba-style selective state-space block (M), in plain PyTorch.

Per channel w and state n, with input-dependent step dt_t and projections B_t, C_t:
    h_t[w, n] = exp(dt_t[w] * A[w, n]) * h_{t-1}[w, n] + dt_t[w] * B_t[n] * x_t[w]
    y_t[w]    = sum_n C_t[n] * h_t[w, n] + D[w] * x_t[w]
(Mamba-1's zero-order hold for A, Euler step for B.) The block scans in chunks with
recurrent.py's ``chunked_scan``; tests/moe_core/scan_reference.py holds the step-by-step
reference it must match.

Shape legend:
    B  batch (B_BTN, with a shape suffix, is the SSM input matrix, not the batch size)
    T  sequence position (time)
    D  model width (d_model; D_W, with a suffix, is the skip weight)
    W  inner width (expand * d_model), one SSM channel each
    N  state size per channel (d_state)
    R  rank of the dt projection (ceil(d_model / 16))
    K  chunks along time (ceil(T / chunk_size)), L positions per chunk
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_core import scan_fused
from moe_core.recurrent import (
    causal_conv1d,
    chunked_scan,
    compute_dtype,
    from_chunk_steps,
    require_positive_int,
    to_chunk_steps,
)

_DEFAULT_STD = 0.02


def selective_scan_chunked(
    x_BTW: Tensor,
    dt_BTW: Tensor,
    A_WN: Tensor,
    B_BTN: Tensor,
    C_BTN: Tensor,
    D_W: Tensor,
    chunk_size: int,
) -> Tensor:
    """The selective scan, chunk_size sequential steps over all chunks at once. Returns y_BTW.

    Expects dt >= 0 and A <= 0 (so every decay is <= 1). Computes in ``compute_dtype`` (fp32
    for bf16 inputs), returns x's dtype. Elementwise ops and sums only, no matmul, so neither
    bf16 autocast nor TF32 can lower the scan's precision; and under torch.compile the readout
    fuses with the steps. Materialises the decays and inputs [B, T, W, N] once each, where the
    parallel prefix scan it replaced wrote 2 log2(chunk_size) such intermediates.
    """
    require_positive_int("chunk_size", chunk_size)
    dtype, T = compute_dtype(x_BTW.dtype), x_BTW.shape[1]
    L = min(chunk_size, T)
    x, dt, A, Bm, Cm, D = (t.to(dtype) for t in (x_BTW, dt_BTW, A_WN, B_BTN, C_BTN, D_W))
    dt_LBKW = to_chunk_steps(dt, L)
    # exp(dt * A), computed in place of its argument (mul's backward keeps dt and A only).
    a_LBKWN = torch.mul(dt_LBKW.unsqueeze(-1), A).exp_()
    b_LBKWN = to_chunk_steps(dt * x, L).unsqueeze(-1) * to_chunk_steps(Bm, L).unsqueeze(-2)
    # A chunk's total log decay is A * (its dt summed): no [.., W, N] sum over steps needed.
    log_decay_BKWN = dt_LBKW.sum(0).unsqueeze(-1) * A
    C_steps = to_chunk_steps(Cm, L).unsqueeze(-2).unbind(0)  # [B, K, 1, N] per step

    def readout(h_BKWN: Tensor, step: int) -> Tensor:
        return (h_BKWN * C_steps[step]).sum(-1)  # y_t[w] = sum_n C_t[n] * h_t[w, n]

    y_LBKW = chunked_scan(a_LBKWN, b_LBKWN, log_decay_BKWN, readout)
    return (from_chunk_steps(y_LBKW, T) + D * x).to(x_BTW.dtype)


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + out(SSM(silu(conv(x_branch))) * silu(z_branch))."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        checkpoint_scan: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_state", d_state),
            ("expand", expand),
            ("d_conv", d_conv),
            ("chunk_size", chunk_size),
        ):
            require_positive_int(name, value)
        _check_dt_range(dt_min, dt_max)
        if not isinstance(checkpoint_scan, bool):
            raise ValueError(f"checkpoint_scan: must be a bool, got {checkpoint_scan!r}")
        width = expand * d_model
        self.d_state, self.chunk_size = d_state, chunk_size
        self.dt_min, self.dt_max = dt_min, dt_max
        self.checkpoint_scan = checkpoint_scan
        # On CUDA with Triton the scan runs fused (scan_fused.py): states stay on chip, and
        # the backward recomputes them from a few saved ones, so no checkpoint is needed.
        self.fused_scan = True
        self.dt_rank = math.ceil(d_model / 16)  # Mamba's default low rank for dt
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.in_proj = nn.Linear(d_model, 2 * width, bias=False)  # x branch and gate z
        self.conv = nn.Conv1d(width, width, d_conv, groups=width)
        self.x_proj = nn.Linear(width, self.dt_rank + 2 * d_state, bias=False)  # dt, B, C
        self.dt_proj = nn.Linear(self.dt_rank, width, bias=False)
        # The dt bias is separate so it is added in fp32: in bf16 a small dt would be off by ~2%.
        self.dt_bias = nn.Parameter(torch.empty(width))
        self.A_log = nn.Parameter(torch.empty(width, d_state))
        self.D = nn.Parameter(torch.empty(width))
        for param in (self.dt_bias, self.A_log, self.D):
            param._no_weight_decay = True  # structured values, not weights to shrink (Mamba)
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.init_weights(_DEFAULT_STD, _DEFAULT_STD)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and a zero aux loss (blocks share one contract)."""
        x_BTW, z_BTW = self.in_proj(self.norm(x_BTD)).chunk(2, dim=-1)
        x_BTW = F.silu(causal_conv1d(x_BTW, self.conv))
        dt_BTW, B_BTN, C_BTN = self._select(x_BTW)
        A_WN = -torch.exp(self.A_log.float())
        y_BTW = self._scan(x_BTW, dt_BTW, A_WN, B_BTN, C_BTN) * F.silu(z_BTW)
        aux_loss = torch.zeros((), dtype=torch.float32, device=x_BTD.device)
        return x_BTD + self.out_proj(y_BTW), aux_loss

    def _select(self, x_BTW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input-dependent step dt (fp32, > 0) and SSM matrices B, C: the 'selective' part."""
        dt_low_BTR, B_BTN, C_BTN = self.x_proj(x_BTW).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt_BTW = F.softplus(self.dt_proj(dt_low_BTR).float() + self.dt_bias.float())
        return dt_BTW, B_BTN, C_BTN

    def _scan(
        self, x_BTW: Tensor, dt_BTW: Tensor, A_WN: Tensor, B_BTN: Tensor, C_BTN: Tensor
    ) -> Tensor:
        """The fused scan where it can run (CUDA with Triton, ``fused_scan``), else the chunked
        scan, recomputed in backward when training (``checkpoint_scan``).

        The scan saves three fp32 [B, T, W, N] tensors for backward (the decays, the chunks'
        local states, the states), each 32x a [B, T, W] bf16 activation at d_state 16: several
        times the rest of the block's activations. Keeping only its small inputs and
        recomputing costs a forward of the scan (``bench/scan_speed.py`` times both ways).
        """
        if self.fused_scan and scan_fused.available(x_BTW, self.d_state):
            return scan_fused.selective_scan_fused(x_BTW, dt_BTW, A_WN, B_BTN, C_BTN, self.D)
        args = (x_BTW, dt_BTW, A_WN, B_BTN, C_BTN, self.D, self.chunk_size)
        if self.checkpoint_scan and torch.is_grad_enabled():
            return checkpoint(selective_scan_chunked, *args, use_reentrant=False)
        return selective_scan_chunked(*args)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Projections from ``std``; dt, A and D get Mamba's structured init, whatever std is."""
        self.norm.reset_parameters()
        nn.init.normal_(self.in_proj.weight, std=std)
        self.conv.reset_parameters()
        nn.init.normal_(self.x_proj.weight, std=std)
        # Mamba scales the dt projection by its rank so dt really depends on the input.
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        with torch.no_grad():
            self.dt_bias.copy_(dt_bias_init(self.dt_bias.numel(), self.dt_min, self.dt_max))
            # S4D-real: A[w, n] = -(n + 1), a spread of time scales in every channel.
            A_N = torch.arange(1, self.d_state + 1, dtype=torch.float32)
            self.A_log.copy_(A_N.log().expand_as(self.A_log))
            self.D.fill_(1.0)
        nn.init.normal_(self.out_proj.weight, std=residual_std)


def dt_bias_init(width: int, dt_min: float, dt_max: float) -> Tensor:
    """Bias with softplus(bias) log-uniform in [dt_min, dt_max] (Mamba's dt init)."""
    log_dt_W = torch.empty(width).uniform_(math.log(dt_min), math.log(dt_max))
    dt_W = log_dt_W.exp()
    return dt_W + torch.log(-torch.expm1(-dt_W))  # inverse softplus, stable for small dt


def _check_dt_range(dt_min: Any, dt_max: Any) -> None:
    for name, value in (("dt_min", dt_min), ("dt_max", dt_max)):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    if dt_min > dt_max:
        raise ValueError(f"dt_min: {dt_min!r} must be <= dt_max={dt_max!r}")
