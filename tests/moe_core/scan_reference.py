"""Step-by-step references for the chunked scans: one Python step per position, read straight
off the recurrences in moe_core/recurrent.py and moe_core/ssm.py. Tests only (T sequential
steps is what the model's scans exist to avoid). Each computes in fp32 for fp32-and-narrower
inputs and in fp64 for fp64 ones, like the scans, and returns the input's dtype."""

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def linear_recurrence_naive(log_a_BTX: Tensor, b_BTX: Tensor) -> Tensor:
    """h_t = exp(log_a_t) * h_{t-1} + b_t from h_{-1} = 0, one step at a time: h [B, T, X]."""
    dtype = _compute_dtype(b_BTX.dtype)
    log_a, b = log_a_BTX.to(dtype), b_BTX.to(dtype)
    h_BX = torch.zeros_like(b[:, 0])
    states = []
    for t in range(b.shape[1]):
        h_BX = log_a[:, t].exp() * h_BX + b[:, t]
        states.append(h_BX)
    return torch.stack(states, dim=1).to(b_BTX.dtype)


def selective_scan_naive(
    x_BTW: Tensor, dt_BTW: Tensor, A_WN: Tensor, B_BTN: Tensor, C_BTN: Tensor, D_W: Tensor
) -> Tensor:
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t, a loop over time."""
    dtype = _compute_dtype(x_BTW.dtype)
    x, dt, A, Bm, Cm, D = (t.to(dtype) for t in (x_BTW, dt_BTW, A_WN, B_BTN, C_BTN, D_W))
    h_BWN = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        decay_BWN = torch.exp(dt[:, t, :, None] * A)
        h_BWN = decay_BWN * h_BWN + (dt[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
        outputs.append((h_BWN * Cm[:, t, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(outputs, dim=1).to(x_BTW.dtype)
