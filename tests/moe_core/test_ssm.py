"""Chunked selective scan against the sequential reference, and the M (Mamba-style) block."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.ssm import MambaBlock, selective_scan_chunked
from tests.moe_core.scan_reference import selective_scan_naive


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only spin-wait in OpenMP, which turns 0.1 s into 10 s when
    # other test runs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scan_inputs(batch, length, width=3, d_state=4, seed=0, dt_scale=1.0):
    """(x, dt, A, B, C, D) with dt > 0 and A < 0, as the block produces them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, width, generator=gen)
    dt = dt_scale * F.softplus(torch.randn(batch, length, width, generator=gen))
    A = -torch.exp(torch.randn(width, d_state, generator=gen))
    B = torch.randn(batch, length, d_state, generator=gen)
    C = torch.randn(batch, length, d_state, generator=gen)
    D = torch.randn(width, generator=gen)
    return x, dt, A, B, C, D


def _assert_matches(actual, expected):
    # Tolerance relative to the output's scale: the two forms sum in different orders.
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("batch", "length", "chunk_size"),
    [(2, 1, 4), (2, 9, 1), (2, 37, 8), (1, 64, 64), (3, 70, 16), (2, 5, 64)],
)
def test_chunked_matches_naive_on_edge_shapes(batch, length, chunk_size):
    inputs = _scan_inputs(batch, length)
    _assert_matches(selective_scan_chunked(*inputs, chunk_size), selective_scan_naive(*inputs))


@settings(max_examples=20, deadline=None)
@given(
    length=st.integers(1, 60),
    chunk_size=st.integers(1, 24),
    d_state=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_naive_on_random_shapes(length, chunk_size, d_state, seed):
    inputs = _scan_inputs(2, length, d_state=d_state, seed=seed)
    _assert_matches(selective_scan_chunked(*inputs, chunk_size), selective_scan_naive(*inputs))


def test_chunked_is_stable_on_long_sequences_with_strong_decay():
    # dt * A reaches about -100 per step, thousands per chunk: exp(-cumsum) would be inf.
    inputs = _scan_inputs(1, 600, dt_scale=20.0, seed=1)
    y = selective_scan_chunked(*inputs, chunk_size=64)
    assert torch.isfinite(y).all()
    _assert_matches(y, selective_scan_naive(*inputs))


@pytest.mark.parametrize(("length", "chunk_size"), [(33, 8), (12, 1), (150, 64)])
def test_chunked_gradients_match_naive(length, chunk_size):
    inputs = _scan_inputs(2, length, seed=2, dt_scale=3.0)
    grad_out = torch.randn(2, length, 3)
    grads = []
    for scan in (lambda *a: selective_scan_chunked(*a, chunk_size), selective_scan_naive):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (scan(*leaves) * grad_out).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for got, want in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(got).all()
        _assert_matches(got, want)


def test_chunked_scan_is_causal():
    x, dt, A, B, C, D = _scan_inputs(2, 40, seed=3)
    x_changed, B_changed = x.clone(), B.clone()
    x_changed[:, 17] += 3.0
    B_changed[:, 17] += 3.0
    y = selective_scan_chunked(x, dt, A, B, C, D, 8)
    y_changed = selective_scan_chunked(x_changed, dt, A, B_changed, C, D, 8)
    assert torch.equal(y[:, :17], y_changed[:, :17])
    assert not torch.allclose(y[:, 17:], y_changed[:, 17:])


def test_scans_return_the_input_dtype():
    inputs = [t.bfloat16() for t in _scan_inputs(1, 10)]
    assert selective_scan_chunked(*inputs, 4).dtype == torch.bfloat16
    assert selective_scan_naive(*inputs).dtype == torch.bfloat16


def _block(seed=0, **kwargs):
    torch.manual_seed(seed)
    block = MambaBlock(16, d_state=4, chunk_size=8, **kwargs)
    block.init_weights(0.3, 0.3)  # larger than nanoGPT init so differences are not tiny
    return block


def test_block_keeps_shape_and_returns_zero_fp32_aux_loss():
    out, aux_loss = _block()(torch.randn(2, 19, 16))
    assert out.shape == (2, 19, 16) and out.dtype == torch.float32
    assert aux_loss.shape == () and aux_loss.dtype == torch.float32
    assert aux_loss.device.type == "cpu" and aux_loss.item() == 0.0


def test_block_is_causal():
    block = _block()
    x_BTD = torch.randn(2, 30, 16)
    changed = x_BTD.clone()
    changed[:, 13] += 1.0
    out, out_changed = block(x_BTD)[0], block(changed)[0]
    torch.testing.assert_close(out[:, :13], out_changed[:, :13])
    assert not torch.allclose(out[:, 13:], out_changed[:, 13:])


def test_block_chunk_size_does_not_change_the_output():
    x_BTD = torch.randn(2, 21, 16)
    out_small = _block(seed=4)(x_BTD)[0]
    big = _block(seed=4)
    big.chunk_size = 64
    torch.testing.assert_close(big(x_BTD)[0], out_small, rtol=1e-5, atol=1e-5)


def test_checkpointed_scan_gives_the_same_gradients():
    x_BTD = torch.randn(2, 21, 16)
    grads = []
    for checkpoint_scan in (True, False):
        block = _block(seed=5, checkpoint_scan=checkpoint_scan)
        block(x_BTD)[0].square().mean().backward()
        grads.append({name: p.grad for name, p in block.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradients_reach_every_parameter():
    block = _block()
    out, aux_loss = block(torch.randn(2, 20, 16))
    (out.square().mean() + aux_loss).backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_block_learns_to_recall_a_step_beyond_its_conv_window():
    # The branch's target is x_{t-6}: out of the 4-tap conv's reach, so the state must carry it.
    torch.manual_seed(0)
    block = MambaBlock(16, d_state=8, chunk_size=8)
    opt = torch.optim.Adam(block.parameters(), lr=3e-2)
    x_BTD = torch.randn(8, 24, 16)
    target_BTD = x_BTD + torch.cat([torch.zeros_like(x_BTD[:, :6]), x_BTD[:, :-6]], dim=1)
    losses = []
    for _ in range(30):
        loss = (block(x_BTD)[0] - target_BTD).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_block_runs_under_bf16_autocast_close_to_fp32():
    block = _block()
    x_BTD = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux_loss = block(x_BTD)
    out.square().mean().backward()
    assert aux_loss.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, block(x_BTD)[0], rtol=0.05, atol=0.05)


def test_init_follows_mamba():
    block = MambaBlock(32, d_state=6, dt_min=1e-3, dt_max=1e-1)
    block.init_weights(0.02, 0.001)
    dt_W = F.softplus(block.dt_bias)
    assert dt_W.min() >= 1e-3 * (1 - 1e-4) and dt_W.max() <= 1e-1 * (1 + 1e-4)
    A_WN = -torch.exp(block.A_log)
    torch.testing.assert_close(A_WN, -torch.arange(1.0, 7.0).expand(64, 6))  # S4D-real
    assert torch.equal(block.D, torch.ones(64))
    assert block.out_proj.weight.std() < 0.002
    assert all(p._no_weight_decay for p in (block.A_log, block.D, block.dt_bias))


@pytest.mark.parametrize(
    ("d_model", "d_state", "expand", "d_conv"), [(16, 16, 2, 4), (40, 3, 1, 2)]
)
def test_param_count_formula(d_model, d_state, expand, d_conv):
    block = MambaBlock(d_model, d_state=d_state, expand=expand, d_conv=d_conv)
    width, rank = expand * d_model, math.ceil(d_model / 16)
    expected = d_model + 3 * d_model * width + width * (d_conv + 2 * rank + 3 * d_state + 3)
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "d_model: .* got 0"),
        ({"d_state": -2}, "d_state: .* got -2"),
        ({"expand": 1.5}, "expand: .* got 1.5"),
        ({"d_conv": 0}, "d_conv: .* got 0"),
        ({"chunk_size": None}, "chunk_size: .* got None"),
        ({"dt_min": 0.0}, "dt_min: .* got 0.0"),
        ({"dt_max": float("inf")}, "dt_max: .* got inf"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "dt_min: 0.5 must be <= dt_max=0.1"),
        ({"checkpoint_scan": 1}, "checkpoint_scan: .* got 1"),
    ],
)
def test_constructor_names_the_bad_field_and_value(kwargs, message):
    args = {"d_model": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        MambaBlock(args.pop("d_model"), **args)
