"""Chunked linear-recurrence scan against the step-by-step reference, and the R block."""

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.recurrent import RecurrentBlock, causal_conv1d, linear_recurrence_scan
from tests.moe_core.scan_reference import linear_recurrence_naive


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only spin-wait in OpenMP, which turns 0.1 s into 10 s when
    # other test runs share the CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape, seed=0, decay_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    log_a = -decay_scale * torch.rand(shape, generator=gen)  # decays in (exp(-scale), 1]
    return log_a, torch.randn(shape, generator=gen)


def _assert_matches(actual, expected):
    # Tolerance relative to the output's scale: the two forms sum in different orders.
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("shape", "chunk_size"),
    [
        ((2, 1, 3), 4),  # T = 1
        ((2, 7, 3), 1),  # chunk_size = 1
        ((2, 37, 5), 8),  # T not a multiple of chunk_size
        ((1, 64, 4), 64),  # exactly one chunk
        ((3, 100, 2, 3), 16),  # several trailing state dims
        ((2, 5, 3), 64),  # chunk longer than the sequence
    ],
)
def test_scan_matches_naive_on_edge_shapes(shape, chunk_size):
    log_a, b = _inputs(shape)
    _assert_matches(linear_recurrence_scan(log_a, b, chunk_size), linear_recurrence_naive(log_a, b))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 80),
    chunk_size=st.integers(1, 33),
    seed=st.integers(0, 2**16),
)
def test_scan_matches_naive_on_random_shapes(batch, length, chunk_size, seed):
    log_a, b = _inputs((batch, length, 4), seed=seed)
    _assert_matches(linear_recurrence_scan(log_a, b, chunk_size), linear_recurrence_naive(log_a, b))


def test_scan_is_stable_on_long_sequences_with_strong_and_no_decay():
    # Per-step log decays down to -60 sum to about -4000 in a chunk: exp of minus that would be
    # inf. Channel 0 has no decay at all, so its state is a plain running sum.
    log_a, b = _inputs((2, 1000, 3), seed=1, decay_scale=60.0)
    log_a[..., 0] = 0.0
    h = linear_recurrence_scan(log_a, b, chunk_size=64)
    assert torch.isfinite(h).all()
    _assert_matches(h, linear_recurrence_naive(log_a, b))
    torch.testing.assert_close(h[..., 0], b[..., 0].cumsum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("length", "chunk_size"), [(45, 8), (16, 1), (200, 64)])
def test_scan_gradients_match_naive(length, chunk_size):
    log_a, b = _inputs((2, length, 3), seed=2, decay_scale=5.0)
    grad_out = torch.randn(2, length, 3)
    grads = []
    for scan in (partial(linear_recurrence_scan, chunk_size=chunk_size), linear_recurrence_naive):
        la, bb = log_a.clone().requires_grad_(), b.clone().requires_grad_()
        (scan(la, bb) * grad_out).sum().backward()
        grads.append((la.grad, bb.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(got).all()
        _assert_matches(got, want)


def test_scan_is_causal():
    log_a, b = _inputs((2, 50, 3), seed=3)
    changed = b.clone()
    changed[:, 21] += 5.0
    h, h_changed = (linear_recurrence_scan(log_a, x, 8) for x in (b, changed))
    assert torch.equal(h[:, :21], h_changed[:, :21])
    assert not torch.allclose(h[:, 21:], h_changed[:, 21:])


def test_scan_keeps_the_input_dtype_and_refuses_bad_arguments():
    log_a, b = _inputs((1, 10, 2))
    assert linear_recurrence_scan(log_a, b.bfloat16(), 4).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="chunk_size: .* got 0"):
        linear_recurrence_scan(log_a, b, 0)
    with pytest.raises(ValueError, match="log_a: shape"):
        linear_recurrence_scan(log_a[:, :5], b, 4)


def test_causal_conv_does_not_see_the_future():
    conv = torch.nn.Conv1d(3, 3, 4, groups=3)
    x_BTW = torch.randn(2, 12, 3)
    changed = x_BTW.clone()
    changed[:, 7] += 1.0
    out, out_changed = causal_conv1d(x_BTW, conv), causal_conv1d(changed, conv)
    assert out.shape == x_BTW.shape
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])
    assert not torch.allclose(out[:, 7:11], out_changed[:, 7:11])


def _block(seed=0, **kwargs):
    torch.manual_seed(seed)
    block = RecurrentBlock(16, chunk_size=8, **kwargs)
    block.init_weights(0.3, 0.3)  # larger than nanoGPT init so differences are not tiny
    return block


def test_block_keeps_shape_and_returns_zero_fp32_aux_loss():
    out, aux_loss = _block(expand=2)(torch.randn(2, 19, 16))
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


def test_gradients_reach_every_parameter():
    block = _block()
    out, aux_loss = block(torch.randn(2, 20, 16))
    (out.square().mean() + aux_loss).backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_block_learns_to_recall_a_step_beyond_its_conv_window():
    # The branch's target is x_{t-6}: out of the 4-tap conv's reach, so the state must carry it.
    torch.manual_seed(0)
    block = RecurrentBlock(16, chunk_size=8)
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


def test_init_gives_long_memories_and_small_residual_writes():
    block = RecurrentBlock(64, expand=2)
    block.init_weights(0.02, 0.001)
    a_pow_c = torch.sigmoid(block.decay_logit) ** block.GATE_POWER
    assert a_pow_c.min() >= 0.9 - 1e-6 and a_pow_c.max() <= 0.999 + 1e-6
    assert block.out_proj.weight.std() < 0.002
    assert block.decay_logit._no_weight_decay


@pytest.mark.parametrize(("d_model", "expand", "d_conv"), [(16, 1, 4), (24, 3, 2)])
def test_param_count_formula(d_model, expand, d_conv):
    block = RecurrentBlock(d_model, expand=expand, d_conv=d_conv)
    width = expand * d_model
    expected = d_model + 3 * d_model * width + 2 * width * width + width * (d_conv + 4)
    assert sum(p.numel() for p in block.parameters()) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "d_model: .* got 0"),
        ({"expand": -1}, "expand: .* got -1"),
        ({"d_conv": 2.5}, "d_conv: .* got 2.5"),
        ({"chunk_size": True}, "chunk_size: .* got True"),
    ],
)
def test_constructor_names_the_bad_field_and_value(kwargs, message):
    args = {"d_model": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        RecurrentBlock(args.pop("d_model"), **args)


def test_gradients_stay_finite_when_the_decay_reaches_one():
    # With a -> 1 the exact d sqrt(1 - a^2) is infinite; the clamp keeps training alive.
    block = RecurrentBlock(4)
    with torch.no_grad():
        block.decay_logit.fill_(200.0)  # log sigmoid(200) == 0 in fp32: a == 1 exactly
    out, _ = block(torch.randn(1, 6, 4))
    out.sum().backward()
    for name, param in block.named_parameters():
        assert torch.isfinite(param.grad).all(), name
