"""The M block's selective scan fused into Triton kernels, for CUDA.

The chunked scan (``ssm.selective_scan_chunked``) is plain PyTorch: it writes fp32
[B, T, W, N] decays, inputs and states to memory (about 2 GiB each at 8 x 2048 x 2048 x 16),
which is where an M block's time goes on a GPU. Here each program owns one batch row and
BW channels, keeps their [BW, N] state in registers and walks the sequence: the states never
leave the chip. Forward reads x, dt [B, T, W] and B, C [B, T, N] once and writes y, plus the
state entering every CH-th step (``hs``, [B, ceil(T / CH), W, N], 1/CH of the states) for
the backward, which walks each chunk backwards after recomputing its CH states into a
scratch buffer from that saved start. Sums over W (the gradients of B and C) are written per
channel block and summed after; those over the batch (A, D) per batch row.

The recurrence is the M block's (ssm.py): h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = C_t . h_t + D x_t, computed in fp32 whatever the inputs' dtype. It is exposed as two
``torch.library`` custom ops with an autograd formula, so ``torch.compile`` treats it as one
opaque call. Without Triton or CUDA, ``available`` is False and the M block keeps the chunked
scan; tests/moe_core/test_scan_fused.py checks both against the step-by-step reference
(on the CPU through Triton's interpreter, TRITON_INTERPRET=1, where Triton is installed).
The number of chunks is a compile-time constant of the kernels (the interpreter needs loop
bounds it can read): each new sequence length compiles them once more.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels ship no Triton: the chunked scan serves
    triton = None
    tl = None

CHUNK = 64  # steps between saved states: the backward's scratch holds CHUNK states
BLOCK_W = 32  # channels per program
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("GOODPUT_FUSED_SCAN") != "0"  # "0": the chunked scan everywhere


def fits(batch: int, length: int, width: int, d_state: int) -> bool:
    """Whether every flat offset the kernels compute fits in int32 (they index with it)."""
    chunks = -(-length // CHUNK)
    largest = max(
        batch * length * width,  # x, dt, y and their gradients
        batch * length * -(-width // BLOCK_W) * d_state,  # the per-block sums for dB, dC
        batch * (chunks + CHUNK) * width * d_state,  # saved states, the backward's scratch
    )
    return largest < 2**31


def available(x: Tensor, d_state: int = 16) -> bool:
    """Whether the fused scan can run on x's device (CUDA with Triton, or the interpreter)
    at x's size, [B, T, W] with `d_state` states a channel."""
    if triton is None or x.dtype == torch.float64:  # fp64 stays fp64 in the chunked scan
        return False
    if x.dim() == 3 and not fits(*x.shape, d_state):
        return False
    if not ENABLED:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _row(ptr, row, mask, live):
        """One step's row of a [B, T, ...] input at flat offsets `row`, in fp32; 0 past the
        sequence's end (`live` false) or outside the block (`mask`)."""
        return tl.load(ptr + row, mask=mask & live, other=0.0).to(tl.float32)

    @triton.jit
    def _advance(h, A, x, dt, Bt):
        """The state after one step: h_t = exp(dt A) h_{t-1} + dt x B_t (dt = x = 0 leaves h)."""
        return tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]

    @triton.jit
    def _scan_fwd(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, hs_ptr,
        T, W,
        n_chunks: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, CH: tl.constexpr,
        BW: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        offs_w = tl.program_id(1) * BW + tl.arange(0, BW)
        offs_n = tl.arange(0, NP)  # N padded to a power of two; the padding's A, B, C are 0
        mask_n = offs_n < N
        mask_w = offs_w < W
        mask_wn = mask_w[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_wn, other=0.0)
        D = tl.load(D_ptr + offs_w, mask=mask_w, other=0.0)
        h = tl.zeros([BW, NP], dtype=tl.float32)
        for c in range(0, n_chunks):
            state = ((b * n_chunks + c) * W + offs_w[:, None]) * N + offs_n[None, :]
            tl.store(hs_ptr + state, h, mask=mask_wn)
            for i in range(0, CH):
                t = c * CH + i
                live = t < T  # past the end: dt = x = 0 loaded, so h stays as it is
                row_w = (b * T + t) * W + offs_w
                row_n = (b * T + t) * N + offs_n
                x = _row(x_ptr, row_w, mask_w, live)
                dt = _row(dt_ptr, row_w, mask_w, live)
                Bt = _row(B_ptr, row_n, mask_n, live)
                Ct = _row(C_ptr, row_n, mask_n, live)
                h = _advance(h, A, x, dt, Bt)
                y = tl.sum(h * Ct[None, :], axis=1) + D * x
                tl.store(y_ptr + row_w, y, mask=mask_w & live)

    @triton.jit
    def _scan_bwd(
        x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dy_ptr, hs_ptr, scratch_ptr,
        dx_ptr, ddt_ptr, dA_ptr, dBp_ptr, dCp_ptr, dD_ptr,
        T, W, n_wblocks,
        n_chunks: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, CH: tl.constexpr,
        BW: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        wb = tl.program_id(1)
        offs_w = wb * BW + tl.arange(0, BW)
        offs_n = tl.arange(0, NP)  # N padded to a power of two; the padding's A, B, C are 0
        mask_n = offs_n < N
        mask_w = offs_w < W
        mask_wn = mask_w[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_wn, other=0.0)
        D = tl.load(D_ptr + offs_w, mask=mask_w, other=0.0)
        g = tl.zeros([BW, NP], dtype=tl.float32)  # dL/dh_t from the steps after t
        dA = tl.zeros([BW, NP], dtype=tl.float32)
        dD = tl.zeros([BW], dtype=tl.float32)
        # this program's scratch: CH states of [BW, N], at [b, i, w, n] of a [B, CH, W, N]
        for cc in range(0, n_chunks):
            c = n_chunks - 1 - cc
            state = ((b * n_chunks + c) * W + offs_w[:, None]) * N + offs_n[None, :]
            h = tl.load(hs_ptr + state, mask=mask_wn, other=0.0)
            for i in range(0, CH):  # the chunk's states again, from its saved start
                t = c * CH + i
                live = t < T
                row_w = (b * T + t) * W + offs_w
                row_n = (b * T + t) * N + offs_n
                x = _row(x_ptr, row_w, mask_w, live)
                dt = _row(dt_ptr, row_w, mask_w, live)
                Bt = _row(B_ptr, row_n, mask_n, live)
                h = _advance(h, A, x, dt, Bt)
                slot = ((b * CH + i) * W + offs_w[:, None]) * N + offs_n[None, :]
                tl.store(scratch_ptr + slot, h, mask=mask_wn)
            for ii in range(0, CH):  # then backwards through it
                i = CH - 1 - ii
                t = c * CH + i
                live = t < T
                row_w = (b * T + t) * W + offs_w
                row_n = (b * T + t) * N + offs_n
                x = _row(x_ptr, row_w, mask_w, live)
                dt = _row(dt_ptr, row_w, mask_w, live)
                dy = _row(dy_ptr, row_w, mask_w, live)
                Bt = _row(B_ptr, row_n, mask_n, live)
                Ct = _row(C_ptr, row_n, mask_n, live)
                slot = ((b * CH + i) * W + offs_w[:, None]) * N + offs_n[None, :]
                h_t = tl.load(scratch_ptr + slot, mask=mask_wn, other=0.0)
                if i > 0:
                    before = ((b * CH + i - 1) * W + offs_w[:, None]) * N + offs_n[None, :]
                    h_prev = tl.load(scratch_ptr + before, mask=mask_wn, other=0.0)
                else:
                    h_prev = tl.load(hs_ptr + state, mask=mask_wn, other=0.0)
                g += dy[:, None] * Ct[None, :]  # now dL/dh_t in full
                a = tl.exp(dt[:, None] * A)
                g_u = g * h_prev * a  # dL/d(dt A), elementwise
                gB = tl.sum(g * Bt[None, :], axis=1)
                tl.store(ddt_ptr + row_w, tl.sum(g_u * A, axis=1) + gB * x, mask=mask_w & live)
                tl.store(dx_ptr + row_w, gB * dt + D * dy, mask=mask_w & live)
                part = ((b * T + t) * n_wblocks + wb) * N + offs_n
                tl.store(dBp_ptr + part, tl.sum(g * (dt * x)[:, None], axis=0), mask=mask_n & live)
                tl.store(dCp_ptr + part, tl.sum(h_t * dy[:, None], axis=0), mask=mask_n & live)
                dA += g_u * dt[:, None]
                dD += x * dy
                g = g * a  # what h_{t-1} gets from step t
        tl.store(dA_ptr + (b * W + offs_w[:, None]) * N + offs_n[None, :], dA, mask=mask_wn)
        tl.store(dD_ptr + b * W + offs_w, dD, mask=mask_w)


def _grid(x: Tensor, block_w: int) -> tuple[int, int]:
    return (x.shape[0], -(-x.shape[2] // block_w))


@torch.library.custom_op("moe_core::selective_scan_fwd", mutates_args=())
def _fwd(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor
) -> tuple[Tensor, Tensor]:
    batch, T, W = x.shape
    N = A.shape[1]
    n_chunks = -(-T // CHUNK)
    y = torch.empty(batch, T, W, device=x.device, dtype=torch.float32)
    hs = torch.empty(batch, n_chunks, W, N, device=x.device, dtype=torch.float32)
    _scan_fwd[_grid(x, BLOCK_W)](
        x,
        dt,
        A,
        Bm,
        Cm,
        D,
        y,
        hs,
        T,
        W,
        n_chunks=n_chunks,
        N=N,
        NP=triton.next_power_of_2(N),
        CH=CHUNK,
        BW=BLOCK_W,
    )
    return y, hs


@_fwd.register_fake
def _fwd_fake(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor
) -> tuple[Tensor, Tensor]:
    batch, T, W = x.shape
    n_chunks = -(-T // CHUNK)
    y = x.new_empty(batch, T, W, dtype=torch.float32)
    return y, x.new_empty(batch, n_chunks, W, A.shape[1], dtype=torch.float32)


@torch.library.custom_op("moe_core::selective_scan_bwd", mutates_args=())
def _bwd(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor, hs: Tensor, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    batch, T, W = x.shape
    N = A.shape[1]
    n_chunks = hs.shape[1]
    n_wblocks = -(-W // BLOCK_W)
    f32 = {"device": x.device, "dtype": torch.float32}
    scratch = torch.empty(batch, CHUNK, W, N, **f32)
    dx, ddt = torch.empty(batch, T, W, **f32), torch.empty(batch, T, W, **f32)
    dA, dD = torch.empty(batch, W, N, **f32), torch.empty(batch, W, **f32)
    dBp, dCp = (
        torch.empty(batch, T, n_wblocks, N, **f32),
        torch.empty(batch, T, n_wblocks, N, **f32),
    )
    _scan_bwd[_grid(x, BLOCK_W)](
        x, dt, A, Bm, Cm, D, dy, hs, scratch, dx, ddt, dA, dBp, dCp, dD,
        T, W, n_wblocks,
        n_chunks=n_chunks, N=N, NP=triton.next_power_of_2(N), CH=CHUNK, BW=BLOCK_W,
    )  # fmt: skip
    return dx, ddt, dA.sum(0), dBp.sum(2), dCp.sum(2), dD.sum(0)


@_bwd.register_fake
def _bwd_fake(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor, hs: Tensor, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    f32 = torch.float32
    shapes = (x, x, A, Bm, Cm, D)
    return tuple(t.new_empty(t.shape, dtype=f32) for t in shapes)  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(*inputs, output[1])


def _backward(ctx: Any, dy: Tensor, _dhs: Tensor | None) -> tuple[Tensor, ...]:
    saved = ctx.saved_tensors
    grads = _bwd(*saved, dy.contiguous())
    return tuple(g.to(t.dtype) for g, t in zip(grads, saved[:6], strict=True))


_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_fused(
    x_BTW: Tensor, dt_BTW: Tensor, A_WN: Tensor, B_BTN: Tensor, C_BTN: Tensor, D_W: Tensor
) -> Tensor:
    """The M block's scan, fused (see the module's docstring). Returns y in x's dtype; the
    gradients come back in each input's dtype."""
    args = [t.contiguous() for t in (x_BTW, dt_BTW)]
    args += [A_WN.float().contiguous()]
    args += [t.contiguous() for t in (B_BTN, C_BTN)]
    args += [D_W.float().contiguous()]
    y, _ = _fwd(*args)
    return y.to(x_BTW.dtype)
