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
from collections.abc import Callable, Sequence
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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a scan computes in: fp32 for fp32 and narrower, fp64 for fp64.

    Decays compound over the whole sequence, so bf16/fp16 inputs are scanned in fp32; fp64
    inputs stay fp64 (the equivalence tests compare forms at fp64 precision).
    """
    return torch.promote_types(dtype, torch.float32)


def linear_recurrence_scan(log_a_BTX: Tensor, b_BTX: Tensor, chunk_size: int) -> Tensor:
    """h_t = exp(log_a_t) * h_{t-1} + b_t from h_{-1} = 0, for every t: returns h [B, T, X].

    The decay is passed as its log (<= 0) because callers build it in log space. Computes in
    ``compute_dtype`` and returns b's dtype. Chunked (``chunked_scan``): chunk_size sequential
    steps, each over all ceil(T / chunk_size) chunks at once, instead of T steps.
    """
    require_positive_int("chunk_size", chunk_size)
    if log_a_BTX.shape != b_BTX.shape:
        raise ValueError(f"log_a: shape {tuple(log_a_BTX.shape)} != b {tuple(b_BTX.shape)}")
    dtype, T = compute_dtype(b_BTX.dtype), b_BTX.shape[1]
    L = min(chunk_size, T)
    log_a_LBKX = to_chunk_steps(log_a_BTX.to(dtype), L)
    b_LBKX = to_chunk_steps(b_BTX.to(dtype), L)
    h_LBKX = chunked_scan(log_a_LBKX.exp(), b_LBKX, log_a_LBKX.sum(0), _identity)
    return from_chunk_steps(h_LBKX, T).to(b_BTX.dtype)


def chunked_scan(
    a_LBKX: Tensor,
    b_LBKX: Tensor,
    log_decay_BKX: Tensor,
    readout: Callable[[Tensor, int], Tensor],
) -> Tensor:
    """The chunked form of h_t = a_t * h_{t-1} + b_t, from h = 0 before the first chunk.

    Inputs are laid out by ``to_chunk_steps``: step l of every chunk k at [l, :, k].
    ``log_decay_BKX`` is each chunk's total log decay (the sum of its log a), which the caller
    forms from its own factors (cheaper than summing, and never an exp of a positive number).
    Three phases, none a loop over T:
      1. every chunk's end state from a zero start, all chunks at once (L steps);
      2. the state entering each chunk: an exclusive log-space prefix scan over the chunks'
         (total decay, end state) pairs (ceil(log2 K) parallel passes over 1/L of the data);
      3. the L steps again from those true starts, handing each state to ``readout(h, l)``,
         whose results are stacked on a new first dim (the M block contracts its [W, N]
         states with C there, so its full states are never stacked).
    Phase 3 reruns phase 1's steps rather than correcting local states by exp(cumsum) * start:
    that would write three more full-size tensors, where the rerun reads the same ones again.
    Nothing overflows: the steps multiply by decays <= 1, and phase 2 exponentiates only sums
    of log decays <= 0 (strong decay underflows harmlessly to 0).
    """
    a_steps, b_steps = a_LBKX.unbind(0), b_LBKX.unbind(0)  # one stack in backward, not L
    h_end_BKX = _steps(a_steps, b_steps, None)[-1]
    _, h_end_BKX = _prefix_scan(log_decay_BKX, h_end_BKX, dim=1)  # true end states
    h_start_BKX = _shift(h_end_BKX, 1, dim=1)  # chunk k starts where chunk k-1 ended
    states = _steps(a_steps, b_steps, h_start_BKX)
    return torch.stack([readout(h, step) for step, h in enumerate(states)])


def _steps(a_steps: Sequence[Tensor], b_steps: Sequence[Tensor], h: Tensor | None) -> list[Tensor]:
    """h = a_l * h + b_l for each step l in turn, all chunks at once (None: start from 0)."""
    states = []
    for a_BKX, b_BKX in zip(a_steps, b_steps, strict=True):
        h = b_BKX if h is None else torch.addcmul(b_BKX, a_BKX, h)
        states.append(h)
    return states


def _identity(h: Tensor, step: int) -> Tensor:
    return h


def to_chunk_steps(x_BTX: Tensor, L: int) -> Tensor:
    """[B, T, *X] -> [L, B, K, *X], contiguous: position k * L + l at [l, :, k].

    The end is padded with zeros to K * L positions. Zero is the identity step for everything a
    scan takes (log decay 0 keeps the state, input 0 adds nothing, dt 0 does both), and padded
    steps come after every real one, so they change nothing that is returned.
    """
    B, T, *X = x_BTX.shape
    K = math.ceil(T / L)
    return _pad_time(x_BTX, K * L - T).reshape(B, K, L, *X).movedim(2, 0).contiguous()


def from_chunk_steps(y_LBKX: Tensor, T: int) -> Tensor:
    """Inverse of ``to_chunk_steps``: [L, B, K, *X] -> [B, T, *X], padding dropped."""
    L, B, K, *X = y_LBKX.shape
    return y_LBKX.movedim(0, 2).reshape(B, K * L, *X)[:, :T]


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
