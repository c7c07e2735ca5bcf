"""Top-k router: scores, null slot, capacity dropping, losses, balancing bias, config fields."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core import ModelConfig, model_plan
from moe_core.router import (
    TopKRouter,
    count_per_slot,
    expert_capacity,
    keep_within_capacity,
    rank_in_group,
)


def _router(d_model=8, num_experts=5, top_k=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    router = TopKRouter(d_model, num_experts, top_k, **kwargs)
    torch.nn.init.normal_(router.weight)  # large logits, so choices are far from ties
    return router


def test_router_outputs_have_documented_shapes_and_dtypes():
    routing = _router(null_slot=True, capacity_factor=1.0)(torch.randn(11, 8))
    assert routing.expert_ids.shape == (11, 2) and routing.expert_ids.dtype == torch.long
    assert routing.weights.shape == (11, 2) and routing.weights.dtype == torch.float32
    assert routing.kept.shape == (11, 2) and routing.kept.dtype == torch.bool
    assert routing.scores.shape == (11, 6)
    assert routing.tokens_per_expert.shape == (6,) and routing.dropped_per_expert.shape == (6,)
    assert routing.capacity == math.ceil(11 * 2 / 5 * 1.0)
    assert routing.aux_loss.shape == () and routing.aux_loss.dtype == torch.float32
    assert routing.z_loss.shape == () and routing.num_experts == 5


def test_router_weight_has_one_row_per_slot():
    assert _router().weight.shape == (5, 8)
    assert _router(null_slot=True).weight.shape == (6, 8)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_weights_are_renormalized_chosen_scores_times_route_scale(score):
    router = _router(score=score, route_scale=2.5)
    x_TD = torch.randn(32, 8)
    routing = router(x_TD)
    logits = x_TD @ router.weight.T
    scores = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    torch.testing.assert_close(routing.scores, scores)
    chosen = scores.gather(1, routing.expert_ids)
    torch.testing.assert_close(routing.weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    assert bool((routing.weights[:, 0] >= routing.weights[:, 1]).all())  # best first


def test_router_chooses_distinct_experts_with_the_highest_logits():
    router = _router()
    x_TD = torch.randn(32, 8)
    expected = (x_TD @ router.weight.T).topk(2, dim=-1).indices
    torch.testing.assert_close(router(x_TD).expert_ids, expected)


def test_tokens_per_expert_counts_every_choice_including_the_null_slot():
    routing = _router(top_k=3, null_slot=True)(torch.randn(40, 8))
    assert int(routing.tokens_per_expert.sum()) == 40 * 3
    for slot in range(6):
        assert int(routing.tokens_per_expert[slot]) == int((routing.expert_ids == slot).sum())
    assert int(routing.tokens_per_expert[5]) > 0  # the null slot is a real choice


def test_weights_follow_input_dtype_but_gate_math_is_fp32():
    router = _router().to(torch.bfloat16)
    routing = router(torch.randn(16, 8, dtype=torch.bfloat16))
    assert routing.weights.dtype == torch.bfloat16
    assert routing.aux_loss.dtype == torch.float32 and routing.scores.dtype == torch.float32


def test_aux_loss_matches_hand_computed_switch_loss():
    # Logits (ln 3, 0), (0, ln 3), (ln 3, 0): probs (3/4, 1/4), (1/4, 3/4), (3/4, 1/4).
    # Top-1 picks experts 0, 1, 0: f = (2/3, 1/3); mean probs P = (7/12, 5/12).
    # loss = coeff * S * sum f_i P_i = 1 * 2 * (14/36 + 5/36) = 19/18.
    router = TopKRouter(2, 2, 1, aux_loss_coeff=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    ln3 = math.log(3.0)
    routing = router(torch.tensor([[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]))
    assert routing.expert_ids.flatten().tolist() == [0, 1, 0]
    assert routing.tokens_per_expert.tolist() == [2, 1]
    assert routing.aux_loss.item() == pytest.approx(19 / 18, rel=1e-6)


def test_sigmoid_aux_loss_normalizes_scores_over_slots():
    # Logits (0, 0) -> sigmoid (1/2, 1/2), normalized (1/2, 1/2); top-1 ties pick slot 0.
    # f = (1, 0), P = (1/2, 1/2): loss = coeff * 2 * 1/2 = coeff.
    router = TopKRouter(2, 2, 1, score="sigmoid", aux_loss_coeff=0.3)
    with torch.no_grad():
        router.weight.zero_()
    routing = router(torch.randn(4, 2))
    assert routing.aux_loss.item() == pytest.approx(0.3 * 2 * 0.5)


def test_aux_loss_counts_the_null_slot_among_the_slots():
    router = TopKRouter(4, 3, 2, null_slot=True, aux_loss_coeff=0.5)
    with torch.no_grad():
        router.weight.zero_()  # every score is 1/4, so S * sum f_i * P_i = sum f_i = 1
    assert router(torch.randn(8, 4)).aux_loss.item() == pytest.approx(0.5)


def test_aux_loss_gradient_pushes_probability_away_from_the_overloaded_expert():
    router = TopKRouter(2, 2, 1, aux_loss_coeff=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    router(torch.tensor([[2.0, 0.0]] * 4)).aux_loss.backward()  # all tokens go to expert 0
    assert router.weight.grad[0, 0] > 0 and router.weight.grad[1, 0] < 0


def test_z_loss_is_coeff_times_mean_squared_logsumexp():
    router = TopKRouter(2, 2, 1, z_loss_coeff=0.1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x_TD = torch.tensor([[1.0, 2.0], [0.0, -3.0]])
    expected = 0.1 * x_TD.logsumexp(-1).square().mean()
    assert router(x_TD).z_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert _router()(x_TD.repeat(1, 4)).z_loss.item() == 0.0  # off by default


def test_expert_capacity_formula():
    assert expert_capacity(64, 2, 8, None) is None
    assert expert_capacity(64, 2, 8, 1.0) == 16
    assert expert_capacity(10, 2, 4, 1.25) == math.ceil(10 * 2 / 4 * 1.25) == 7
    assert expert_capacity(3, 1, 8, 0.1) == 1


def test_keep_within_capacity_by_probs_keeps_each_experts_best_scores():
    ids_TK = torch.tensor([[0], [0], [1], [0], [2]])
    scores_TK = torch.tensor([[0.5], [0.9], [0.4], [0.7], [0.8]])
    kept = keep_within_capacity(ids_TK, scores_TK, num_experts=2, capacity=2, policy="probs")
    # Expert 0 keeps 0.9 and 0.7; id 2 is the null slot here, never dropped.
    assert kept.flatten().tolist() == [False, True, True, True, True]


def test_keep_within_capacity_by_position_keeps_the_first_tokens():
    ids_TK = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    scores_TK = torch.rand(4, 2)
    kept = keep_within_capacity(ids_TK, scores_TK, num_experts=2, capacity=2, policy="position")
    assert kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]
    unlimited = keep_within_capacity(ids_TK, scores_TK, num_experts=2, capacity=None)
    assert bool(unlimited.all())


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 30),
    num_experts=st.integers(1, 5),
    data=st.data(),
)
def test_keep_within_capacity_matches_a_per_expert_python_reference(num_tokens, num_experts, data):
    top_k = data.draw(st.integers(1, num_experts))
    capacity = data.draw(st.integers(1, num_tokens + 1))
    policy = data.draw(st.sampled_from(["probs", "position"]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    ids_TK = torch.rand(num_tokens, num_experts + 1, generator=gen).topk(top_k).indices
    scores_TK = torch.rand(num_tokens, top_k, generator=gen)
    kept = keep_within_capacity(
        ids_TK, scores_TK, num_experts=num_experts, capacity=capacity, policy=policy
    )
    expected = torch.ones_like(kept)
    for e in range(num_experts):
        rows = (ids_TK == e).nonzero().tolist()  # token order
        if policy == "probs":
            rows.sort(key=lambda tj: -scores_TK[tj[0], tj[1]].item())
        for t, j in rows[capacity:]:
            expected[t, j] = False
    assert torch.equal(kept, expected)


def test_rank_in_group_numbers_each_groups_rows_in_sorted_order():
    groups_A = torch.tensor([2, 0, 2, 1, 0, 2])
    order_A = torch.argsort(groups_A, stable=True)
    assert rank_in_group(groups_A, order_A, 3).tolist() == [0, 0, 1, 0, 1, 2]


def test_count_per_slot_counts_only_masked_in_ids():
    ids_A = torch.tensor([0, 2, 2, 1, 2])
    assert count_per_slot(ids_A, 4).tolist() == [1, 1, 3, 0]
    mask_A = torch.tensor([True, False, True, True, False])
    assert count_per_slot(ids_A, 4, mask_A).tolist() == [1, 1, 1, 0]


def test_router_reports_dropped_choices_and_never_drops_the_null_slot():
    router = _router(num_experts=3, top_k=2, null_slot=True, capacity_factor=0.5)
    routing = router(torch.randn(40, 8))
    chosen_dropped = routing.expert_ids[~routing.kept]
    assert routing.capacity == math.ceil(40 * 2 / 3 * 0.5)
    assert bool((chosen_dropped < 3).all())
    for slot in range(4):
        assert int(routing.dropped_per_expert[slot]) == int((chosen_dropped == slot).sum())
        kept_here = int(((routing.expert_ids == slot) & routing.kept).sum())
        assert slot == 3 or kept_here <= routing.capacity
    assert int(routing.dropped_per_expert.sum()) > 0 and int(routing.dropped_per_expert[3]) == 0


def test_expert_bias_changes_choices_but_not_weights():
    router = _router()
    x_TD = torch.randn(64, 8)
    before = router(x_TD)
    with torch.no_grad():
        router.expert_bias[3] = 10.0  # every token now picks expert 3
    after = router(x_TD)
    assert bool((after.expert_ids == 3).any(-1).all())
    chosen = after.scores.gather(1, after.expert_ids)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(after.scores, before.scores)


def test_update_bias_moves_towards_balance_recentres_and_resets_counts():
    router = _router(num_experts=4, null_slot=True, bias_update_rate=0.1).train()
    with torch.no_grad():
        router.weight[1] += 5.0 * router.weight[0].sign()  # a skewed gate, so counts differ
    x_TD = torch.randn(50, 8)
    counts = router(x_TD).tokens_per_expert + router(x_TD).tokens_per_expert
    torch.testing.assert_close(router.bias_counts, counts)
    router.update_bias()
    n = counts[:4].float()
    step = 0.1 * torch.sign(n.mean() - n)
    torch.testing.assert_close(router.expert_bias[:4], step - step.mean())
    assert router.expert_bias[4].item() == 0.0  # the null slot's bias stays zero
    assert router.expert_bias[:4].sum().abs().item() < 1e-6
    assert int(router.bias_counts.sum()) == 0
    assert "expert_bias" in router.state_dict() and "bias_counts" not in router.state_dict()


def test_bias_counts_accumulate_only_in_training_with_a_rate():
    router = _router(bias_update_rate=0.1).eval()
    router(torch.randn(10, 8))
    assert int(router.bias_counts.sum()) == 0
    idle = _router().train()
    idle(torch.randn(10, 8))
    idle.update_bias()
    assert int(idle.bias_counts.sum()) == 0 and idle.expert_bias.abs().sum().item() == 0.0


def test_jitter_applies_in_training_only():
    router = _router(jitter_eps=0.5)
    x_TD = torch.randn(64, 8)
    router.eval()
    torch.testing.assert_close(router(x_TD).scores, router(x_TD).scores, rtol=0, atol=0)
    router.train()
    assert not torch.allclose(router(x_TD).scores, router(x_TD).scores)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 6}, "top_k"),
        ({"score": "tanh"}, "score"),
        ({"drop_policy": "random"}, "drop_policy"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"jitter_eps": 1.0}, "jitter_eps"),
    ],
)
def test_router_rejects_bad_arguments_naming_the_field(kwargs, field):
    args = {"d_model": 8, "num_experts": 5, "top_k": 2} | kwargs
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        TopKRouter(args.pop("d_model"), args.pop("num_experts"), args.pop("top_k"), **args)


# ModelConfig's router fields (kept here, next to the router they configure).
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"score": "relu"}, "score"),
        ({"null_slot": 1}, "null_slot"),
        ({"capacity_factor": 0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"capacity_factor": float("inf")}, "capacity_factor"),
        ({"drop_policy": "tokens"}, "drop_policy"),
        ({"z_loss_coeff": -1e-3}, "z_loss_coeff"),
        ({"jitter_eps": 1.5}, "jitter_eps"),
        ({"jitter_eps": -0.1}, "jitter_eps"),
        ({"bias_update_rate": float("nan")}, "bias_update_rate"),
        ({"route_scale": 0.0}, "route_scale"),
    ],
)
def test_config_router_field_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}\b.*{overrides[field]!r}"):
        ModelConfig(**overrides)


def test_model_plan_records_every_router_field():
    cfg = ModelConfig(
        score="sigmoid",
        null_slot=True,
        capacity_factor=1.25,
        drop_policy="position",
        z_loss_coeff=1e-3,
        jitter_eps=0.01,
        bias_update_rate=1e-3,
        route_scale=2.0,
    )
    plan = model_plan(cfg)
    for field in (
        "score",
        "null_slot",
        "capacity_factor",
        "drop_policy",
        "aux_loss_coeff",
        "z_loss_coeff",
        "jitter_eps",
        "bias_update_rate",
        "route_scale",
    ):
        assert plan[field] == getattr(cfg, field), field
    assert plan["num_slots"] == cfg.num_experts + 1
