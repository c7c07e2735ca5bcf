"""The fused (Triton) selective scan against the step-by-step reference, forward and every
gradient. Runs on CUDA with Triton, or on the CPU through Triton's interpreter
(TRITON_INTERPRET=1 set before Triton is imported); skipped where neither is there (CI's CPU
wheels ship no Triton)."""

from __future__ import annotations

import pytest
import torch

from moe_core import scan_fused
from moe_core.ssm import MambaBlock
from tests.moe_core.scan_reference import selective_scan_naive
from tests.moe_core.test_scan_equivalence import _selective_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not scan_fused.available(torch.empty(0, device=DEVICE)),
    reason="needs Triton on CUDA, or TRITON_INTERPRET=1 with Triton on the CPU",
)
# fp32 throughout; relative to the output's scale (the reference adds in fp64 order).
TOL = 2e-5


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.cpu().double(), expected.double(), rtol=TOL, atol=TOL * scale)


# (batch, length, width, d_state, chunk, block_w): T a multiple of the chunk and not, a chunk
# longer than T, T = 1, W across several channel blocks with a partial last one, d_state not
# a power of two (padded in the kernel).
CASES = [
    (2, 64, 5, 3, 16, 32),
    (2, 70, 40, 16, 16, 16),
    (1, 37, 33, 4, 8, 16),
    (3, 5, 5, 3, 64, 32),
    (2, 1, 7, 2, 4, 32),
]


def _outputs_and_grads(scan, inputs, weights):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = scan(*leaves)
    (out * weights.to(out)).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@needs_triton
@pytest.mark.parametrize(("batch", "length", "width", "d_state", "chunk", "block_w"), CASES)
def test_fused_scan_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
    length: int,
    width: int,
    d_state: int,
    chunk: int,
    block_w: int,
) -> None:
    monkeypatch.setattr(scan_fused, "CHUNK", chunk)
    monkeypatch.setattr(scan_fused, "BLOCK_W", block_w)
    inputs = _selective_inputs(batch, length, torch.float64, width=width, d_state=d_state)
    # One projection of the output for both (drawn in fp64, then cast), whose gradients
    # w.r.t. every input are compared.
    weights = torch.randn(batch, length, width, dtype=torch.float64)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_naive, inputs, weights)
    fp32 = [t.float().to(DEVICE) for t in inputs]
    y, grads = _outputs_and_grads(scan_fused.selective_scan_fused, fp32, weights)
    assert y.dtype == torch.float32
    _close(y, y_ref)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert grad.dtype == torch.float32
        _close(grad, grad_ref)


@needs_triton
def test_the_m_block_runs_the_fused_scan_and_equals_the_chunked_one() -> None:
    torch.manual_seed(0)
    block = MambaBlock(16, chunk_size=8).to(DEVICE)
    x = torch.randn(2, 30, 16, device=DEVICE)
    outs = []
    for fused in (True, False):
        block.fused_scan = fused
        block.zero_grad()
        xx = x.clone().requires_grad_()
        out = block(xx)[0]
        out.square().mean().backward()
        grads = [xx.grad] + [p.grad for p in block.parameters()]
        outs.append((out.detach(), grads))
    (y_fused, g_fused), (y_chunked, g_chunked) = outs
    torch.testing.assert_close(y_fused, y_chunked, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_fused, g_chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sizes_whose_offsets_overflow_int32_keep_the_chunked_scan() -> None:
    assert scan_fused.fits(8, 2048, 2048, 16)  # the model: 8 x 2048 x (2 x 1024)
    assert not scan_fused.fits(64, 8192, 8192, 16)  # x alone has 2^32 elements
    assert not scan_fused.fits(4, 2**16, 2**12, 64)  # the per-block sums overflow, x does not
    assert scan_fused.fits(4, 2**16, 2**12, 1)
