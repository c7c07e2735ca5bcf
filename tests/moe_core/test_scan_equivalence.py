"""The chunked scans (issue 16 part 2) against the step-by-step references, in fp32 and fp64,
forward and gradients; that the blocks really take the chunked path; that the scans trace
whole under torch.compile; and that the blocks' checkpoints are the same as before."""

import math
from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe_core import recurrent, ssm
from moe_core.recurrent import RecurrentBlock, linear_recurrence_scan
from moe_core.ssm import MambaBlock, selective_scan_chunked
from tests.moe_core.scan_reference import linear_recurrence_naive, selective_scan_naive

# Relative to the output's scale: the forms add in different orders, nothing more. fp64 is
# held to 1e-11, so a real difference in the math cannot hide behind fp32 rounding.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}
# (batch, length, chunk): T a multiple of the chunk, not a multiple, one chunk, a chunk longer
# than T, chunk 1, and T = 1.
SHAPES = [(2, 64, 16), (2, 70, 16), (1, 37, 8), (2, 12, 12), (3, 5, 64), (2, 9, 1), (2, 1, 4)]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only spin-wait in OpenMP when other runs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype == dtype
    scale = expected.abs().max().item() + 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _selective_inputs(batch, length, dtype, width=5, d_state=3, seed=0, dt_scale=1.0):
    """(x, dt, A, B, C, D) with dt > 0 and A < 0, as the M block produces them."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    dt = dt_scale * F.softplus(randn(batch, length, width))
    A = -torch.exp(randn(width, d_state))
    return (
        randn(batch, length, width),
        dt,
        A,
        randn(batch, length, d_state),
        randn(batch, length, d_state),
        randn(width),
    )


def _recurrence_inputs(shape, dtype, seed=0, decay_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    log_a = -decay_scale * torch.rand(shape, generator=gen, dtype=torch.float64)
    return log_a.to(dtype), torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _outputs_and_grads(scan, inputs, seed=1):
    """The scan's output and the gradient of a random projection of it w.r.t. every input."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = scan(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "length", "chunk"), SHAPES)
def test_selective_scan_matches_the_reference_forward_and_backward(batch, length, chunk, dtype):
    inputs = _selective_inputs(batch, length, dtype, seed=length, dt_scale=2.0)
    chunked = partial(selective_scan_chunked, chunk_size=chunk)
    y, grads = _outputs_and_grads(chunked, inputs)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_naive, inputs)
    _assert_close(y, y_ref, dtype)
    for name, got, want in zip(["x", "dt", "A", "B", "C", "D"], grads, grads_ref, strict=True):
        assert torch.isfinite(got).all(), name
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "length", "chunk"), SHAPES)
def test_linear_recurrence_matches_the_reference_forward_and_backward(batch, length, chunk, dtype):
    inputs = _recurrence_inputs((batch, length, 2, 3), dtype, seed=length)
    chunked = partial(linear_recurrence_scan, chunk_size=chunk)
    h, grads = _outputs_and_grads(chunked, inputs)
    h_ref, grads_ref = _outputs_and_grads(linear_recurrence_naive, inputs)
    _assert_close(h, h_ref, dtype)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(got).all()
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_decay_stays_finite_and_exact_in_both_scans(dtype):
    # Log decays of tens per step sum to thousands per chunk: an exp of a cumulative sum's
    # negative would overflow; the scans only ever exponentiate sums of log decays <= 0.
    inputs = _selective_inputs(1, 300, dtype, seed=7, dt_scale=30.0)
    y, grads = _outputs_and_grads(partial(selective_scan_chunked, chunk_size=64), inputs)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_naive, inputs)
    _assert_close(y, y_ref, dtype)
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(got).all()
        _assert_close(got, want, dtype)
    log_a, b = _recurrence_inputs((2, 300, 3), dtype, seed=8, decay_scale=80.0)
    _assert_close(linear_recurrence_scan(log_a, b, 64), linear_recurrence_naive(log_a, b), dtype)


def test_bf16_inputs_are_scanned_in_fp32_and_returned_in_bf16():
    inputs = [t.bfloat16() for t in _selective_inputs(2, 30, torch.float32)]
    y = selective_scan_chunked(*inputs, chunk_size=8)
    assert y.dtype == torch.bfloat16
    # The reference computes in fp32 from the same bf16 values: only the final rounding differs.
    torch.testing.assert_close(y, selective_scan_naive(*inputs), rtol=8e-3, atol=1e-2)


def test_selective_scan_is_fp32_inside_under_bf16_autocast():
    # Decays compound over T: under bf16 autocast the scan must still compute in fp32.
    inputs = _selective_inputs(2, 40, torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_chunked(*inputs, chunk_size=8)
    assert y.dtype == torch.float32
    _assert_close(y, selective_scan_naive(*inputs), torch.float32)


class _CountOps(TorchDispatchMode):
    """Counts every aten op that runs (forward and backward) while it is active."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops_of_block_step(block, length):
    x = torch.randn(2, length, block.norm.normalized_shape[0])
    with _CountOps() as counter:
        out, _ = block(x)
        out.square().mean().backward()
    return sum(counter.ops.values())


@pytest.mark.parametrize("make_block", [MambaBlock, RecurrentBlock])
def test_the_blocks_run_no_loop_over_time(make_block):
    # A step-by-step scan runs ops per position: from T = 128 to 256 the M block with the
    # reference scan runs 14052 -> 28004 ops forward and backward, the R block 2171 -> 4219.
    # The chunked scans run chunk_size steps whatever T is, plus one more pass over the
    # chunks' summaries when their number doubles (686 -> 724 and 357 -> 381).
    torch.manual_seed(0)
    block = make_block(8, chunk_size=8)
    short, long = (_ops_of_block_step(block, length) for length in (128, 256))
    assert long - short < 64, (short, long)


@pytest.mark.parametrize(("make_block", "module"), [(MambaBlock, ssm), (RecurrentBlock, recurrent)])
@pytest.mark.parametrize(("length", "chunk"), [(40, 16), (48, 16), (5, 16)])
def test_the_blocks_scan_through_chunked_scan(monkeypatch, make_block, module, length, chunk):
    # Fails if a block stops calling the chunked scan, or calls it with other chunks.
    seen = []
    real = recurrent.chunked_scan

    def spy(a_LBKX, b_LBKX, log_decay_BKX, readout):
        seen.append(tuple(a_LBKX.shape[:3]))
        return real(a_LBKX, b_LBKX, log_decay_BKX, readout)

    monkeypatch.setattr(module, "chunked_scan", spy)
    torch.manual_seed(0)
    block = make_block(8, chunk_size=chunk)
    block(torch.randn(3, length, 8))[0].sum().backward()
    L = min(chunk, length)
    # MambaBlock checkpoints its scan: recomputed in backward, so called twice.
    calls = 2 if make_block is MambaBlock else 1
    assert seen == [(L, 3, math.ceil(length / L))] * calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scans_trace_whole_under_torch_compile(dtype):
    # fullgraph: any data-dependent Python branch or .item() in a scan raises here.
    inputs = _selective_inputs(2, 45, dtype, seed=5)
    compiled = torch.compile(
        partial(selective_scan_chunked, chunk_size=16), backend="aot_eager", fullgraph=True
    )
    y, grads = _outputs_and_grads(compiled, inputs)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_naive, inputs)
    _assert_close(y, y_ref, dtype)
    for got, want in zip(grads, grads_ref, strict=True):
        _assert_close(got, want, dtype)
    log_a, b = _recurrence_inputs((2, 45, 3), dtype)
    compiled_rec = torch.compile(
        partial(linear_recurrence_scan, chunk_size=16), backend="aot_eager", fullgraph=True
    )
    _assert_close(compiled_rec(log_a, b), linear_recurrence_naive(log_a, b), dtype)


def test_checkpoints_hold_the_same_tensors_as_before():
    # The scans changed, the parameters did not: a checkpoint from before loads as it was.
    mamba = MambaBlock(16, d_state=4, expand=2, d_conv=4)
    assert {k: tuple(v.shape) for k, v in mamba.state_dict().items()} == {
        "norm.weight": (16,),
        "in_proj.weight": (64, 16),
        "conv.weight": (32, 1, 4),
        "conv.bias": (32,),
        "x_proj.weight": (9, 32),
        "dt_proj.weight": (32, 1),
        "dt_bias": (32,),
        "A_log": (32, 4),
        "D": (32,),
        "out_proj.weight": (16, 32),
    }
    rec = RecurrentBlock(16, expand=1, d_conv=4)
    assert {k: tuple(v.shape) for k, v in rec.state_dict().items()} == {
        "norm.weight": (16,),
        "in_proj.weight": (32, 16),
        "conv.weight": (16, 1, 4),
        "conv.bias": (16,),
        "gate_proj.weight": (32, 16),
        "gate_proj.bias": (32,),
        "decay_logit": (16,),
        "out_proj.weight": (16, 16),
    }
