"""Recurrent tail block (R): a Griffin/Hawk-style gated linear recurrence (RG-LRU).

Also home of the chunked linear-recurrence scan h_t = a_t * h_{t-1} + b_t, which the M block
(ssm.py) reuses for its selective scan, and of the causal depthwise conv both blocks share.

Shape legend:
    B  batch
    T  sequence position (time)
    D  model width (d_model)
    W  recurrence width (expand * d_model)
    K  chunks along time (ceil(T / chunk_size))
    L  positions per chunk
    X  any trailing state dims, scanned independently (the M block scans [W, N] states)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DEFAULT_STD = 0.02
# Keeps the gradient of sqrt(1 - a^2) bounded (<= 500) as a -> 1, where the exact one blows up.
_MIN_ONE_MINUS_A2 = 1e-6


def require_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; True as a size is almost certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def linear_recurrence_naive(log_a_BTX: Tensor, b_BTX: Tensor) -> Tensor:
    """Reference: h_t = exp(log_a_t) * h_{t-1} + b_t from h_{-1} = 0, one step at a time.

    The decay is passed as its log (<= 0) because callers build it in log space; exp(log_a) is
    the a of the recurrence. Computes in fp32, returns h [B, T, X] in b's dtype.
    """
    log_a_BTX, out_dtype, b_BTX = log_a_BTX.float(), b_BTX.dtype, b_BTX.float()
    h_BX = torch.zeros_like(b_BTX[:, 0])
    states = []
    for t in range(b_BTX.shape[1]):
        h_BX = log_a_BTX[:, t].exp() * h_BX + b_BTX[:, t]
        states.append(h_BX)
    return torch.stack(states, dim=1).to(out_dtype)


def linear_recurrence_scan(log_a_BTX: Tensor, b_BTX: Tensor, chunk_size: int) -> Tensor:
    """Chunked parallel form of ``linear_recurrence_naive``: same values, no loop over time.

    Within each chunk, a log-space prefix scan; then the same scan over the chunk summaries
    (total log decay, final local state) gives the state entering each chunk, which is carried
    in. Decays only ever combine as sums of logs <= 0, so exp() never sees a positive number:
    nothing overflows, and strong decay underflows harmlessly to 0.
    """
    require_positive_int("chunk_size", chunk_size)
    if log_a_BTX.shape != b_BTX.shape:
        raise ValueError(f"log_a: shape {tuple(log_a_BTX.shape)} != b {tuple(b_BTX.shape)}")
    out_dtype = b_BTX.dtype
    B, T, *X = b_BTX.shape
    L = min(chunk_size, T)
    K = math.ceil(T / L)
    # Pad the end with identity steps (decay 1, input 0): they follow every real position.
    log_a_BKLX = _pad_time(log_a_BTX.float(), K * L - T).reshape(B, K, L, *X)
    b_BKLX = _pad_time(b_BTX.float(), K * L - T).reshape(B, K, L, *X)
    cum_log_a_BKLX, h_local_BKLX = _prefix_scan(log_a_BKLX, b_BKLX, dim=2)
    _, h_end_BKX = _prefix_scan(cum_log_a_BKLX[:, :, -1], h_local_BKLX[:, :, -1], dim=1)
    h_start_BKX = _shift(h_end_BKX, 1, dim=1)  # chunk k starts from the end of chunk k-1
    h_BKLX = h_local_BKLX + cum_log_a_BKLX.exp() * h_start_BKX.unsqueeze(2)
    return h_BKLX.reshape(B, K * L, *X)[:, :T].to(out_dtype)


def _prefix_scan(log_a: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Inclusive Hillis-Steele scan of the maps h -> exp(log_a) * h + b along ``dim``.

    After the pass with offset k, position t holds the composition of steps (t-2k, t]; the
    log decays are running sums, so the first output is the cumulative log decay.
    ceil(log2(n)) passes, each out of place, so autograd sees plain elementwise ops.
    """
    offset = 1
    while offset < b.shape[dim]:
        b = b + log_a.exp() * _shift(b, offset, dim)  # uses log_a before this pass: order matters
        log_a = log_a + _shift(log_a, offset, dim)
        offset *= 2
    return log_a, b


def _shift(x: Tensor, offset: int, dim: int) -> Tensor:
    """``x`` moved ``offset`` steps later along ``dim``, filled with 0 (the identity step)."""
    kept = x.narrow(dim, 0, x.shape[dim] - offset)
    fill = x.new_zeros(*x.shape[:dim], offset, *x.shape[dim + 1 :])
    return torch.cat([fill, kept], dim=dim)


def _pad_time(x_BTX: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return x_BTX
    return torch.cat([x_BTX, x_BTX.new_zeros(x_BTX.shape[0], pad, *x_BTX.shape[2:])], dim=1)


def causal_conv1d(x_BTW: Tensor, conv: nn.Conv1d) -> Tensor:
    """Depthwise conv over time, padded on the left only, so output t sees inputs <= t."""
    x_BWT = F.pad(x_BTW.transpose(1, 2), (conv.kernel_size[0] - 1, 0))
    return conv(x_BWT).transpose(1, 2)


class RecurrentBlock(nn.Module):
    """Pre-norm residual block: x + out(RG-LRU(conv(x_branch)) * gelu(gate_branch)).

    RG-LRU: a_t = sigmoid(Λ)^(c * r_t), h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t),
    with recurrence gate r_t and input gate i_t computed from x_t. The sqrt(1 - a^2) factor keeps
    the state's scale when the gate chooses long memory (a -> 1).
    """

    GATE_POWER = 8.0  # Griffin's c: r_t in (0, 1) sweeps a_t over [sigmoid(Λ)^c, 1]

    def __init__(
        self, d_model: int, *, expand: int = 1, d_conv: int = 4, chunk_size: int = 64
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("expand", expand),
            ("d_conv", d_conv),
            ("chunk_size", chunk_size),
        ):
            require_positive_int(name, value)
        width = expand * d_model
        self.chunk_size = chunk_size
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.in_proj = nn.Linear(d_model, 2 * width, bias=False)  # recurrence branch and gate
        self.conv = nn.Conv1d(width, width, d_conv, groups=width)
        self.gate_proj = nn.Linear(width, 2 * width)  # recurrence gate r and input gate i
        self.decay_logit = nn.Parameter(torch.empty(width))  # Λ
        self.decay_logit._no_weight_decay = True  # decay toward 0 would shorten every memory
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.init_weights(_DEFAULT_STD, _DEFAULT_STD)

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Return the updated residual stream and a zero aux loss (blocks share one contract)."""
        x_BTW, gate_BTW = self.in_proj(self.norm(x_BTD)).chunk(2, dim=-1)
        h_BTW = self._rg_lru(causal_conv1d(x_BTW, self.conv))
        # Back to the branch dtype: bf16 under autocast, and out_proj must accept it without it.
        y_BTW = h_BTW.to(gate_BTW.dtype) * F.gelu(gate_BTW, approximate="tanh")
        aux_loss = torch.zeros((), dtype=torch.float32, device=x_BTD.device)
        return x_BTD + self.out_proj(y_BTW), aux_loss

    def _rg_lru(self, x_BTW: Tensor) -> Tensor:
        """The gated recurrence, in fp32 whatever the autocast dtype: decays compound over T."""
        r_BTW, i_BTW = torch.sigmoid(self.gate_proj(x_BTW).float()).chunk(2, dim=-1)
        # log a_t = c * r_t * log sigmoid(Λ): a power taken in log space, never a huge exp.
        log_a_BTW = self.GATE_POWER * r_BTW * F.logsigmoid(self.decay_logit.float())
        one_minus_a2_BTW = -torch.expm1(2.0 * log_a_BTW)  # 1 - a^2 without cancellation
        scale_BTW = one_minus_a2_BTW.clamp_min(_MIN_ONE_MINUS_A2).sqrt()
        b_BTW = scale_BTW * i_BTW * x_BTW.float()
        return linear_recurrence_scan(log_a_BTW, b_BTW, self.chunk_size)

    def init_weights(self, std: float, residual_std: float) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.in_proj.weight, std=std)
        self.conv.reset_parameters()
        nn.init.normal_(self.gate_proj.weight, std=std)
        nn.init.zeros_(self.gate_proj.bias)
        with torch.no_grad():
            self.decay_logit.copy_(decay_logit_init(self.decay_logit.numel(), self.GATE_POWER))
        nn.init.normal_(self.out_proj.weight, std=residual_std)


def decay_logit_init(width: int, gate_power: float) -> Tensor:
    """Λ such that a^c = sigmoid(Λ)^c is uniform in [0.9, 0.999] (Griffin): long memories."""
    a_pow_c_W = torch.empty(width).uniform_(0.9, 0.999)
    log_a_W = a_pow_c_W.log() / gate_power
    return log_a_W - torch.log(-torch.expm1(log_a_W))  # logit(a), computed from log a
