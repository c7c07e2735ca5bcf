"""Row permutations, sums over the K choices and SwiGLU, with backwards made for MoE dispatch.

The grouped backend gathers each token's row K times and brings the expert outputs back to
token order. Written with ``index_select`` and ``index_add``, both backwards would scatter
into [T, D] with atomics (K-way collisions, nondeterministic in bf16). Here the inverse
permutation of the sort is kept, so every backward is a gather followed by a sum over K.

Some forms depend on ``torch.compile``: there a sum over K is written as K adds, which
inductor fuses with the gather that feeds it into one pointwise pass; eagerly it is one
reduction or one batched matmul. Both compute the same function.

Shape legend:
    T  tokens
    D  model width (d_model)
    K  choices per token (top_k)
    A  rows, T * K: the choices sorted by expert
    N  rows of a SwiGLU input (any leading dims)
    H  expert hidden width; X = 2H, [gate | up]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _compiling() -> bool:
    """Whether to use the forms written for inductor (tests force them in eager)."""
    return torch.compiler.is_compiling()


def _sum_over_k(x_TKD: Tensor) -> Tensor:
    """Sum over the K choices, accumulated and returned in fp32. Under compile as K adds
    (inductor fuses them, and the gather that made ``x_TKD``, into one pointwise pass);
    eagerly as one reduction."""
    if not _compiling():
        return x_TKD.sum(1, dtype=torch.float32)
    total_TD = x_TKD[:, 0].float()
    for j in range(1, x_TKD.shape[1]):
        total_TD = total_TD + x_TKD[:, j].float()
    return total_TD


class GatherTokenRows(torch.autograd.Function):
    """``x_TD[token_ids_A]`` cast to ``dtype``, whose backward sums each token's K rows through
    the inverse permutation (a gather and an fp32 sum over K, then x's dtype) instead of an
    atomic ``index_add`` into [T, D]. With ``runs_TK`` given, rows that run no expert get no
    gradient (theirs is garbage)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: Tensor,
        token_ids_A: Tensor,
        row_of_choice_A: Tensor,
        runs_TK: Tensor | None,
        top_k: int,
        dtype: torch.dtype,
    ) -> Tensor:
        ctx.save_for_backward(row_of_choice_A, runs_TK)
        ctx.top_k, ctx.x_dtype = top_k, x_TD.dtype
        return x_TD.to(dtype).index_select(0, token_ids_A)

    @staticmethod
    def backward(ctx: Any, grad_AD: Tensor) -> tuple[Tensor | None, ...]:
        row_of_choice_A, runs_TK = ctx.saved_tensors
        grad_TKD = grad_AD.index_select(0, row_of_choice_A).view(-1, ctx.top_k, grad_AD.shape[1])
        if runs_TK is not None:
            grad_TKD = torch.where(runs_TK.unsqueeze(-1), grad_TKD, 0)
        return _sum_over_k(grad_TKD).to(ctx.x_dtype), None, None, None, None, None


class CombineRows(torch.autograd.Function):
    """``out[t] = sum_j w[t, j] * y[row_of_choice[t * K + j]]``: a gather by the inverse
    permutation and a weighted sum over K. The backward gathers too (by the sort order), so
    nothing scatters or uses atomics. Masking is the caller's: ``y_AD`` must be finite on
    every row whose weight is nonzero, and is read only through ``row_of_choice_A``."""

    @staticmethod
    def forward(
        ctx: Any, y_AD: Tensor, weights_TK: Tensor, row_of_choice_A: Tensor, order_A: Tensor
    ) -> Tensor:
        ctx.save_for_backward(y_AD, weights_TK, row_of_choice_A, order_A)
        y_TKD = _rows_by_token(y_AD, row_of_choice_A, weights_TK.shape[1])
        if not _compiling():
            return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)
        return _sum_over_k(y_TKD.float() * weights_TK.float().unsqueeze(-1)).to(y_AD.dtype)

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor | None, ...]:
        y_AD, weights_TK, row_of_choice_A, order_A = ctx.saved_tensors
        grad_weights_TK = grad_AD = None
        if ctx.needs_input_grad[1]:  # recomputing the gather is cheaper than saving [T, K, D]
            y_TKD = _rows_by_token(y_AD, row_of_choice_A, weights_TK.shape[1])
            if _compiling():
                products_TKD = y_TKD.float() * grad_TD.float().unsqueeze(1)
                grad_weights_TK = products_TKD.sum(-1).to(weights_TK.dtype)
            else:
                grad_weights_TK = torch.bmm(y_TKD, grad_TD.unsqueeze(-1)).squeeze(-1)
        if ctx.needs_input_grad[0]:
            grad_TKD = weights_TK.unsqueeze(-1) * grad_TD.unsqueeze(1)
            grad_AD = grad_TKD.view(-1, grad_TD.shape[1]).index_select(0, order_A)
        return grad_AD, grad_weights_TK, None, None


def _rows_by_token(y_AD: Tensor, row_of_choice_A: Tensor, top_k: int) -> Tensor:
    """``[T, K, D]``: the sorted rows brought back to token order."""
    return y_AD.index_select(0, row_of_choice_A).view(-1, top_k, y_AD.shape[1])


def swiglu(gate_up_NX: Tensor) -> Tensor:
    """``silu(gate) * up`` of a ``[..., 2H]`` tensor holding [gate | up].

    Eagerly through ``_SwiGLU``, whose backward writes both halves of one gradient buffer
    instead of concatenating two; under compile as plain ops, which inductor fuses.
    """
    if not _compiling():
        return _SwiGLU.apply(gate_up_NX)
    gate_NH, up_NH = gate_up_NX.chunk(2, dim=-1)
    return F.silu(gate_NH) * up_NH


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up_NX: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up_NX)
        gate_NH, up_NH = gate_up_NX.chunk(2, dim=-1)
        return F.silu(gate_NH) * up_NH

    @staticmethod
    def backward(ctx: Any, grad_NH: Tensor) -> Tensor:
        (gate_up_NX,) = ctx.saved_tensors
        gate_NH, up_NH = gate_up_NX.chunk(2, dim=-1)
        grad_NX = torch.empty_like(gate_up_NX)
        grad_gate_NH, grad_up_NH = grad_NX.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad_NH * up_NH, gate_NH, grad_input=grad_gate_NH)
        torch.mul(grad_NH, F.silu(gate_NH), out=grad_up_NH)
        return grad_NX
