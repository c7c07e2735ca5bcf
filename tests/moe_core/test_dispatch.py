"""Dispatch backends: every backend equals the loop reference, forward and backward; the
dispatcher records what it was asked for and what really ran; no host sync on the GPU paths."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.dispatch import (
    DISPATCH_BACKENDS,
    Dispatcher,
    grouped_dispatch,
    loop_dispatch,
    padded_capacity,
    padded_dispatch,
)
from moe_core.experts import RoutedExperts
from moe_core.grouped_mm import grouped_mm_unavailable_reason
from moe_core.router import TopKRouter

BACKENDS = {"grouped": grouped_dispatch, "padded": padded_dispatch, "loop": loop_dispatch}
CPU = torch.device("cpu")


def _setup(*, tokens, experts, top_k, d_model=8, hidden=8, skew=0.0, seed=0, **router_kwargs):
    """A router with skewable choices and experts with weights large enough to matter."""
    torch.manual_seed(seed)
    router = TopKRouter(d_model, experts, top_k, **router_kwargs).eval()
    torch.nn.init.normal_(router.weight)
    with torch.no_grad():
        router.expert_bias[:experts] = skew * torch.randn(experts)  # skewed loads
    routed = RoutedExperts(experts, d_model, hidden)
    routed.init_weights(0.3, 0.3)
    return router, routed, torch.randn(tokens, d_model), torch.randn(tokens, d_model)


def _run(backend, router, experts, x_TD, upstream_TD):
    """Output and gradients wrt input, router weight and expert weights."""
    x_TD = x_TD.clone().requires_grad_()
    params = [router.weight, experts.w13, experts.w2]
    for p in params:
        p.grad = None
    out_TD = backend(x_TD, router(x_TD), experts.w13, experts.w2)
    (out_TD.float() * upstream_TD).sum().backward()
    return [out_TD.detach(), x_TD.grad, *(p.grad.clone() for p in params)]


NAMES = ["output", "x.grad", "router.grad", "w13.grad", "w2.grad"]


def _assert_all_close(got, want, **tolerance):
    for name, a, b in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def _assert_close_in_bf16(got, want):
    """bf16 results of different kernels (cutlass grouped GEMM vs cuBLAS per expert) differ by
    an ulp here and there: 0.06 at magnitude 8, and more where terms cancel. The absolute
    tolerance scales with each tensor's largest value; a misrouted row is off by that much."""
    for name, a, b in zip(NAMES, got, want, strict=True):
        atol = 2e-2 * float(b.abs().max())
        torch.testing.assert_close(
            a, b, rtol=5e-2, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 6),
    data=st.data(),
    null_slot=st.booleans(),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 3.0)),
    drop_policy=st.sampled_from(["probs", "position"]),
    score=st.sampled_from(["softmax", "sigmoid"]),
    skew=st.sampled_from([0.0, 1.0, 10.0]),
    dims=st.sampled_from([(4, 4), (8, 12), (16, 8)]),
    seed=st.integers(0, 2**16),
)
def test_every_backend_matches_loop_forward_and_backward(
    tokens, experts, data, null_slot, capacity_factor, drop_policy, score, skew, dims, seed
):
    top_k = data.draw(st.integers(1, experts))
    router, routed, x_TD, upstream_TD = _setup(
        tokens=tokens,
        experts=experts,
        top_k=top_k,
        d_model=dims[0],
        hidden=dims[1],
        skew=skew,
        seed=seed,
        null_slot=null_slot,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
        score=score,
    )
    want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)
    for name in ("grouped", "padded"):
        got = _run(BACKENDS[name], router, routed, x_TD, upstream_TD)
        _assert_all_close(got, want, rtol=1e-4, atol=1e-5)
    with mock.patch("moe_core.row_ops._compiling", lambda: True):  # the form compile traces
        got = _run(grouped_dispatch, router, routed, x_TD, upstream_TD)
    _assert_all_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["grouped", "padded", "loop"])
def test_choices_that_run_no_expert_contribute_nothing(backend):
    # Capacity 1 and a bias that sends everything to expert 0 or the null slot.
    router, routed, x_TD, upstream_TD = _setup(
        tokens=12, experts=3, top_k=2, null_slot=True, capacity_factor=0.1
    )
    with torch.no_grad():
        router.expert_bias[0] = 100.0
        router.expert_bias[3] = 50.0  # direct write: a null-slot bias stays 0 in training
    routing = router(x_TD)
    assert routing.capacity == 1 and bool((routing.expert_ids == 3).any(-1).all())
    out_TD = BACKENDS[backend](x_TD, routing, routed.w13, routed.w2)
    runs = routing.runs_expert
    assert int(runs.sum()) == 1
    t, j = runs.nonzero()[0].tolist()
    expected = torch.zeros_like(out_TD)
    expected[t] = routing.weights[t, j] * routed.forward_expert(0, x_TD[t : t + 1])[0]
    torch.testing.assert_close(out_TD, expected)
    _assert_all_close(
        _run(BACKENDS[backend], router, routed, x_TD, upstream_TD),
        _run(loop_dispatch, router, routed, x_TD, upstream_TD),
    )


@pytest.mark.parametrize("backend", ["grouped", "padded"])
def test_backends_match_loop_in_bf16(backend):
    router, routed, x_TD, upstream_TD = _setup(
        tokens=64, experts=4, top_k=2, d_model=16, hidden=16, capacity_factor=1.0
    )
    router, routed = router.to(torch.bfloat16), routed.to(torch.bfloat16)
    x_TD = x_TD.to(torch.bfloat16)
    if backend == "grouped":
        chosen = Dispatcher("grouped").resolve(x_TD, router(x_TD), routed.w13, routed.w2)
        assert chosen == ("grouped", None)
    got = _run(BACKENDS[backend], router, routed, x_TD, upstream_TD)
    want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)
    _assert_all_close(got, want, rtol=5e-2, atol=5e-2)


def test_grouped_casts_to_the_autocast_dtype_which_the_op_itself_ignores():
    router, routed, x_TD, upstream_TD = _setup(tokens=32, experts=4, top_k=2, d_model=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(grouped_dispatch, router, routed, x_TD, upstream_TD)
        want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    _assert_all_close(got, want, rtol=5e-2, atol=5e-2)


def test_padded_capacity_buckets_are_static_tight_and_never_drop():
    assert padded_capacity(100, None) == 100  # no capacity: every token may pick an expert
    assert padded_capacity(100, 500) == 100  # an expert never takes more than T rows
    assert [padded_capacity(4096, c) for c in (1, 8, 9, 33, 65, 100, 1000)] == [
        8, 8, 16, 40, 80, 112, 1024,
    ]  # fmt: skip
    buckets = set()
    for capacity in range(1, 2049):
        c_pad = padded_capacity(4096, capacity)
        assert c_pad >= capacity
        assert capacity <= 32 or (c_pad - capacity) / capacity < 0.25
        buckets.add(c_pad)
    assert len(buckets) < 40  # four per doubling, not one per capacity


def test_grouped_mm_availability_reasons_on_cpu():
    assert grouped_mm_unavailable_reason(CPU, torch.float32, 16, 12) is None
    assert grouped_mm_unavailable_reason(CPU, torch.bfloat16, 16, 16) is None
    assert "float64" in grouped_mm_unavailable_reason(CPU, torch.float64, 16, 16)
    reason = grouped_mm_unavailable_reason(CPU, torch.bfloat16, 16, 12)
    assert "expert_hidden=12" in reason and "16-byte" in reason
    assert "not verified" in grouped_mm_unavailable_reason(
        torch.device("meta"), torch.float32, 8, 8
    )


def test_dispatcher_records_requested_observed_and_fallback_reason():
    router, routed, x_TD, _ = _setup(tokens=8, experts=4, top_k=2, d_model=12, hidden=6)
    dispatcher = Dispatcher("grouped")
    assert (dispatcher.requested, dispatcher.observed, dispatcher.fallback_reason) == (
        "grouped",
        None,
        None,
    )
    # hidden 6 * 4 bytes is not 16-byte aligned
    dispatcher(x_TD, router(x_TD), routed.w13, routed.w2)
    assert dispatcher.observed == "loop"
    assert "grouped fell back to loop" in dispatcher.fallback_reason
    assert dispatcher.as_dict() == {
        "requested": "grouped",
        "observed": "loop",
        "fallback_reason": dispatcher.fallback_reason,
    }


@pytest.mark.parametrize(
    ("dims", "capacity_factor", "observed"),
    [((8, 8), None, "grouped"), ((12, 6), 1.0, "padded"), ((12, 6), None, "loop")],
)
def test_auto_picks_grouped_then_padded_then_loop(dims, capacity_factor, observed):
    router, routed, x_TD, _ = _setup(
        tokens=8, experts=4, top_k=2, d_model=dims[0], hidden=dims[1],
        capacity_factor=capacity_factor,
    )  # fmt: skip
    dispatcher = Dispatcher("auto")
    dispatcher(x_TD, router(x_TD), routed.w13, routed.w2)
    assert dispatcher.observed == observed
    assert (dispatcher.fallback_reason is None) == (observed == "grouped")


@pytest.mark.parametrize("name", ["padded", "loop"])
def test_padded_and_loop_run_as_requested(name):
    router, routed, x_TD, _ = _setup(tokens=8, experts=4, top_k=2)
    dispatcher = Dispatcher(name)
    dispatcher(x_TD, router(x_TD), routed.w13, routed.w2)
    assert (dispatcher.observed, dispatcher.fallback_reason) == (name, None)


def test_unknown_backend_is_refused_naming_it():
    assert DISPATCH_BACKENDS == ("grouped", "padded", "loop", "auto")
    with pytest.raises(ValueError, match="dispatch_backend.*'megablocks'"):
        Dispatcher("megablocks")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_case(dtype=torch.float32, **router_kwargs):
    router, routed, x_TD, upstream_TD = _setup(
        tokens=256, experts=8, top_k=2, d_model=64, hidden=32, skew=1.0, **router_kwargs
    )
    device = torch.device("cuda")
    return (
        router.to(device),
        routed.to(device, dtype),
        x_TD.to(device, dtype),
        upstream_TD.to(device),
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padded_path_and_counters_never_sync_on_cuda(capacity_factor):
    from moe_core import ModelConfig
    from moe_core.moe import MoEBlock

    router, routed, x_TD, upstream_TD = _cuda_case(null_slot=True, capacity_factor=capacity_factor)
    cfg = ModelConfig(
        pattern="E", d_model=64, n_heads=4, expert_hidden=32, num_experts=8, top_k=2,
        null_slot=True, capacity_factor=capacity_factor, bias_update_rate=1e-3,
    )  # fmt: skip
    block = MoEBlock(cfg, dispatch_backend="padded").cuda().train()
    x_BLD = torch.randn(4, 64, 64, device="cuda", requires_grad=True)
    want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)  # the loop syncs: outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _run(padded_dispatch, router, routed, x_TD, upstream_TD)
        out_BLD, loss = block(x_BLD)
        (out_BLD.sum() + loss).backward()
        counters = block.read_and_reset_counters()
        block.router.update_bias()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_all_close(got, want, rtol=1e-4, atol=1e-4)
    assert int(counters["tokens_per_expert"].sum()) == 256 * 2
    assert block.dispatcher.observed == "padded"


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() not in ((9, 0), (10, 0)),
    reason="the grouped kernel needs sm90 or sm100",
)
def test_grouped_bf16_runs_the_real_kernel_without_sync_on_sm90():
    router, routed, x_TD, upstream_TD = _cuda_case(
        torch.bfloat16, null_slot=True, capacity_factor=1.0
    )
    dispatcher = Dispatcher("auto")
    dispatcher(x_TD, router(x_TD), routed.w13, routed.w2)  # the first call probes the device once
    assert (dispatcher.observed, dispatcher.fallback_reason) == ("grouped", None)
    want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _run(dispatcher, router, routed, x_TD, upstream_TD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close_in_bf16(got, want)


@pytest.mark.gpu
@cuda
def test_backends_match_loop_on_cuda_under_bf16_autocast():
    router, routed, x_TD, upstream_TD = _cuda_case(capacity_factor=1.25)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _run(loop_dispatch, router, routed, x_TD, upstream_TD)
        for name in ("grouped", "padded"):
            dispatcher = Dispatcher(name)
            got = _run(dispatcher, router, routed, x_TD, upstream_TD)
            # Off sm90/sm100 grouped honestly reports its fallback to loop.
            assert dispatcher.observed == name or dispatcher.fallback_reason
            _assert_close_in_bf16(got, want)


def test_under_compile_grouped_needs_bf16_and_never_probes(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    reason = grouped_mm_unavailable_reason(CPU, torch.float32, 16, 16)
    assert "torch.compile" in reason and "bf16" in reason
    monkeypatch.setattr("moe_core.grouped_mm._probe", lambda *_: pytest.fail("probed"))
    monkeypatch.setattr("moe_core.grouped_mm._DEVICE_REASONS", {})
    assert grouped_mm_unavailable_reason(CPU, torch.bfloat16, 16, 16) is None


@pytest.mark.parametrize("router_kwargs", [{}, {"null_slot": True, "capacity_factor": 1.0}])
def test_grouped_compiles_to_one_graph_that_matches_eager_in_bf16(router_kwargs):
    router, routed, x_TD, upstream_TD = _setup(
        tokens=64, experts=4, top_k=2, d_model=16, hidden=16, **router_kwargs
    )
    router, routed = router.to(torch.bfloat16), routed.to(torch.bfloat16)
    x_TD = x_TD.to(torch.bfloat16)
    compiled = torch.compile(grouped_dispatch, fullgraph=True)  # no graph break anywhere
    got = _run(compiled, router, routed, x_TD, upstream_TD)
    want = _run(grouped_dispatch, router, routed, x_TD, upstream_TD)
    for name, a, b in zip(["output", "x", "router", "w13", "w2"], got, want, strict=True):
        rel = (a.float() - b.float()).norm() / b.float().norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.2e}"
