"""MoE block: loop dispatch against a naive per-token reference, counters, backend choice."""

import pytest
import torch
import torch.nn.functional as F

from moe_core import ModelConfig
from moe_core.moe import MoEBlock, RoutedExperts, loop_dispatch
from moe_core.router import TopKRouter

CFG = ModelConfig(
    pattern="E",
    d_model=16,
    n_heads=2,
    ffn_hidden=24,
    expert_hidden=12,
    num_experts=5,
    top_k=2,
    seq_len=8,
)


def _block(seed=0):
    torch.manual_seed(seed)
    block = MoEBlock(CFG)
    block.init_weights(0.3, 0.3)  # larger than nanoGPT init so differences are not tiny
    return block


def naive_routed(x_TD, router, experts):
    """Per-token, per-choice Python loop: the definition the dispatch must reproduce."""
    routing = router(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        y_D = torch.zeros_like(x_TD[t])
        for j in range(routing.expert_ids.shape[1]):
            e = int(routing.expert_ids[t, j])
            h = F.silu(x_TD[t] @ experts.w1[e]) * (x_TD[t] @ experts.w3[e])
            y_D = y_D + routing.weights[t, j] * (h @ experts.w2[e])
        rows.append(y_D)
    return torch.stack(rows)


def _grads(tensors):
    return [t.grad.clone() for t in tensors]


def test_loop_dispatch_matches_naive_per_token_output_and_gradients():
    torch.manual_seed(1)
    router = TopKRouter(16, 5, 2)
    torch.nn.init.normal_(router.weight)
    experts = RoutedExperts(5, 16, 12)
    params = [router.weight, experts.w1, experts.w2, experts.w3]
    x_TD = torch.randn(23, 16, requires_grad=True)
    upstream_TD = torch.randn(23, 16)

    fast = loop_dispatch(x_TD, router(x_TD), experts)
    (fast * upstream_TD).sum().backward()
    fast_grads = _grads([x_TD, *params])
    for t in [x_TD, *params]:
        t.grad = None
    slow = naive_routed(x_TD, router, experts)
    (slow * upstream_TD).sum().backward()

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, _grads([x_TD, *params]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fast_grads[1].abs().sum() > 0  # the router learns through the combine weights


def test_loop_dispatch_handles_experts_that_receive_no_tokens():
    torch.manual_seed(2)
    router = TopKRouter(16, 5, 1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[3, 0] = 10.0  # positive first channel -> every token picks expert 3
    experts = RoutedExperts(5, 16, 12)
    x_TD = torch.randn(6, 16)
    x_TD[:, 0] = x_TD[:, 0].abs() + 1.0
    routing = router(x_TD)
    assert routing.tokens_per_expert.tolist() == [0, 0, 0, 6, 0]
    expected = experts.forward_expert(3, x_TD)  # top-1 weight renormalizes to exactly 1
    torch.testing.assert_close(loop_dispatch(x_TD, routing, experts), expected)


def test_moe_block_is_residual_plus_shared_plus_routed():
    block = _block()
    x_BSD = torch.randn(2, 7, 16)
    out_BSD, aux_loss = block(x_BSD)
    h_TD = block.norm(x_BSD).reshape(14, 16)
    expected = x_BSD + (
        block.shared_expert(h_TD) + naive_routed(h_TD, block.router, block.experts)
    ).view(2, 7, 16)
    torch.testing.assert_close(out_BSD, expected, rtol=1e-5, atol=1e-6)
    assert aux_loss.shape == () and aux_loss > 0


def test_counters_accumulate_over_training_forwards_and_reset_on_read():
    block = _block().train()
    x_BSD = torch.randn(3, 8, 16)
    _, aux1 = block(x_BSD)
    _, aux2 = block(x_BSD * 2)
    counters = block.read_and_reset_counters()
    assert set(counters) == {"tokens_per_expert", "aux_loss"}
    assert counters["tokens_per_expert"].shape == (5,)
    assert int(counters["tokens_per_expert"].sum()) == 2 * 24 * 2
    assert counters["aux_loss"].item() == pytest.approx((aux1.item() + aux2.item()) / 2)
    assert not counters["aux_loss"].requires_grad
    assert int(block.tokens_per_expert_E.sum()) == 0
    again = block.read_and_reset_counters()
    assert int(again["tokens_per_expert"].sum()) == 0 and again["aux_loss"].item() == 0.0
    assert int(counters["tokens_per_expert"].sum()) == 96  # the read copy survives the reset


def test_counters_do_not_accumulate_in_eval_mode_and_stay_out_of_state_dict():
    block = _block().eval()
    block(torch.randn(2, 8, 16))
    assert int(block.read_and_reset_counters()["tokens_per_expert"].sum()) == 0
    assert not any("tokens_per_expert" in key for key in block.state_dict())


def test_unknown_dispatch_backend_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="dispatch_backend.*'grouped_mm'"):
        MoEBlock(CFG, dispatch_backend="grouped_mm")
    block = _block()
    assert block.dispatch_backend == "loop"
    with pytest.raises(ValueError, match="dispatch_backend"):
        block.dispatch_backend = "nope"
