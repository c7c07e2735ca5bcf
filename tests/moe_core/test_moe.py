"""MoE block: loop dispatch against a naive per-token reference, counters, backend choice,
and the model-level dispatch argument and router-bias step."""

import pytest
import torch
import torch.nn.functional as F

from moe_core import DISPATCH_BACKENDS, ModelConfig, MoEModel, build_model, model_plan
from moe_core.dispatch import loop_dispatch
from moe_core.experts import RoutedExperts
from moe_core.grouped_mm import grouped_mm_unavailable_reason
from moe_core.moe import MoEBlock
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


def _block(seed=0, cfg=CFG, **kwargs):
    torch.manual_seed(seed)
    block = MoEBlock(cfg, **kwargs)
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
            if e == experts.num_experts or not bool(routing.kept[t, j]):
                continue  # null slot or dropped by capacity: no routed compute
            h = F.silu(x_TD[t] @ experts.w1[e]) * (x_TD[t] @ experts.w3[e])
            y_D = y_D + routing.weights[t, j] * (h @ experts.w2[e])
        rows.append(y_D)
    return torch.stack(rows)


def _grads(tensors):
    return [t.grad.clone() for t in tensors]


@pytest.mark.parametrize(
    "router_kwargs",
    [{}, {"null_slot": True, "capacity_factor": 0.6}, {"score": "sigmoid", "capacity_factor": 1.0}],
)
def test_loop_dispatch_matches_naive_per_token_output_and_gradients(router_kwargs):
    torch.manual_seed(1)
    router = TopKRouter(16, 5, 2, **router_kwargs)
    torch.nn.init.normal_(router.weight)
    experts = RoutedExperts(5, 16, 12)
    params = [router.weight, experts.w13, experts.w2]
    x_TD = torch.randn(23, 16, requires_grad=True)
    upstream_TD = torch.randn(23, 16)

    fast = loop_dispatch(x_TD, router(x_TD), experts.w13, experts.w2)
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
    torch.testing.assert_close(loop_dispatch(x_TD, routing, experts.w13, experts.w2), expected)


@pytest.mark.parametrize("backend", ["loop", "grouped", "padded"])
def test_moe_block_is_residual_plus_shared_plus_routed(backend):
    cfg = ModelConfig(**{**vars(CFG), "null_slot": True, "capacity_factor": 1.0})
    block = _block(cfg=cfg, dispatch_backend=backend)
    x_BLD = torch.randn(2, 7, 16)
    out_BLD, aux_loss = block(x_BLD)
    h_TD = block.norm(x_BLD).reshape(14, 16)
    expected = x_BLD + (
        block.shared_expert(h_TD) + naive_routed(h_TD, block.router, block.experts)
    ).view(2, 7, 16)
    torch.testing.assert_close(out_BLD, expected, rtol=1e-5, atol=1e-5)
    assert aux_loss.shape == () and aux_loss > 0
    assert block.dispatcher.observed == backend


def test_block_loss_is_aux_plus_z_loss():
    block = _block(cfg=ModelConfig(**{**vars(CFG), "z_loss_coeff": 0.01})).train()
    _, loss = block(torch.randn(2, 8, 16))
    counters = block.read_and_reset_counters()
    assert counters["z_loss"].item() > 0
    assert loss.item() == pytest.approx((counters["aux_loss"] + counters["z_loss"]).item())


def test_counters_accumulate_over_training_forwards_and_reset_on_read():
    block = _block().train()
    x_BLD = torch.randn(3, 8, 16)
    _, aux1 = block(x_BLD)
    _, aux2 = block(x_BLD * 2)
    counters = block.read_and_reset_counters()
    assert set(counters) == {
        "tokens_per_expert",
        "dropped_per_expert",
        "shared_only_tokens",
        "aux_loss",
        "z_loss",
        "capacity",
    }
    assert counters["tokens_per_expert"].shape == (5,)
    assert int(counters["tokens_per_expert"].sum()) == 2 * 24 * 2
    assert int(counters["dropped_per_expert"].sum()) == 0 and counters["capacity"] is None
    assert counters["aux_loss"].item() == pytest.approx((aux1.item() + aux2.item()) / 2)
    assert not counters["aux_loss"].requires_grad
    again = block.read_and_reset_counters()
    assert int(again["tokens_per_expert"].sum()) == 0 and again["aux_loss"].item() == 0.0
    assert int(counters["tokens_per_expert"].sum()) == 96  # the read copy survives the reset


def test_snapshots_are_cumulative_and_differences_give_the_window():
    from moe_core.moe import unpack_counters

    block = _block().train()
    x = torch.randn(2, 12, CFG.d_model)
    before = block.routing_snapshot()
    block(x)
    block(x)
    delta = unpack_counters(block.routing_snapshot() - before, block.num_slots)
    assert int(delta["tokens_per_expert"].sum()) == 2 * 24 * CFG.top_k
    block.read_and_reset_counters()  # another reader does not disturb snapshot readers
    assert (
        int(
            unpack_counters(block.routing_snapshot() - before, block.num_slots)[
                "tokens_per_expert"
            ].sum()
        )
        == 2 * 24 * CFG.top_k
    )


def test_counters_have_a_null_slot_entry_and_count_drops():
    cfg = ModelConfig(**{**vars(CFG), "null_slot": True, "capacity_factor": 0.5})
    block = _block(cfg=cfg).train()
    torch.nn.init.normal_(block.router.weight)  # decisive, uneven choices
    x_BLD = torch.randn(4, 8, 16)
    block(x_BLD)
    counters = block.read_and_reset_counters()
    assert counters["tokens_per_expert"].shape == (6,) == counters["dropped_per_expert"].shape
    assert int(counters["tokens_per_expert"].sum()) == 32 * 2
    assert int(counters["dropped_per_expert"].sum()) > 0
    assert int(counters["dropped_per_expert"][5]) == 0  # the null slot is never dropped
    assert counters["capacity"] == 7  # ceil(32 * 2 / 5 * 0.5)
    h_TD = block.norm(x_BLD).reshape(32, 16)
    routing = block.router(h_TD)
    shared_only = int((~routing.runs_expert.any(-1)).sum())
    assert 0 < shared_only == int(counters["shared_only_tokens"])


def test_counters_do_not_accumulate_in_eval_mode_and_stay_out_of_state_dict():
    block = _block().eval()
    block(torch.randn(2, 8, 16))
    assert int(block.read_and_reset_counters()["tokens_per_expert"].sum()) == 0
    state = block.state_dict()
    assert not any("per_expert" in key or "bias_counts" in key for key in state)
    assert "router.expert_bias" in state  # balancing state is model state: it is saved


def test_unknown_dispatch_backend_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="dispatch_backend.*'grouped_mm'"):
        MoEBlock(CFG, dispatch_backend="grouped_mm")
    block = _block()
    assert block.dispatch_backend == "loop"
    block.dispatch_backend = "padded"
    assert block.dispatcher.requested == "padded"
    with pytest.raises(ValueError, match="dispatch_backend"):
        block.dispatch_backend = "nope"


TINY = ModelConfig(
    pattern="AE*2",
    d_model=32,
    n_heads=4,
    ffn_hidden=64,
    expert_hidden=32,
    num_experts=4,
    top_k=2,
    seq_len=16,
    null_slot=True,
    capacity_factor=1.0,
    bias_update_rate=0.01,
)


@pytest.mark.parametrize("name", DISPATCH_BACKENDS)
def test_build_model_takes_every_dispatch_backend_and_reports_what_ran(name):
    model = build_model(TINY, seed=0, dispatch_backend=name)
    reference = build_model(TINY, seed=0, dispatch_backend="loop")
    tokens = torch.randint(0, 256, (2, 16))
    logits, aux = model(tokens)
    want_logits, want_aux = reference(tokens)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux, want_aux)
    observations = model.dispatch_observations()
    assert [o["requested"] for o in observations] == [name, name]
    grouped = grouped_mm_unavailable_reason(torch.device("cpu"), torch.float32, 32, 32) is None
    # torch 2.13 runs _grouped_mm on CPU in fp32; elsewhere grouped falls back to loop and
    # auto (capacity set) to padded.
    fallback = {
        "grouped": "grouped" if grouped else "loop",
        "auto": "grouped" if grouped else "padded",
    }
    expected = fallback.get(name, name)
    assert [block.dispatcher.observed for block in model.moe_blocks] == [expected] * 2


def test_model_refuses_an_unknown_dispatch_backend_even_without_e_blocks():
    with pytest.raises(ValueError, match="dispatch_backend.*'fast'"):
        build_model(TINY, seed=0, dispatch_backend="fast")
    with pytest.raises(ValueError, match="dispatch_backend.*'fast'"):
        MoEModel(ModelConfig(pattern="A"), dispatch_backend="fast")


def test_update_router_biases_steps_every_e_block_after_training_forwards():
    model = build_model(TINY, seed=0).train()
    model(torch.randint(0, 256, (4, 16)))
    counts = [block.router.bias_counts.clone() for block in model.moe_blocks]
    assert all(int(c.sum()) == 4 * 16 * 2 for c in counts)
    model.update_router_biases()
    for block, count in zip(model.moe_blocks, counts, strict=True):
        n = count[:4].float()
        step = 0.01 * torch.sign(n.mean() - n)
        torch.testing.assert_close(block.router.expert_bias[:4], step - step.mean())
        assert int(block.router.bias_counts.sum()) == 0


def test_plan_param_count_includes_the_null_slot_gate_row():
    model = build_model(TINY, seed=0)
    assert model_plan(TINY)["num_params"] == sum(p.numel() for p in model.parameters())
    assert model.moe_blocks[0].router.weight.shape == (5, 32)
