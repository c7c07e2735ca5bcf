"""Top-k router: shapes, weights, counts and the Switch load-balancing loss."""

import math

import pytest
import torch

from moe_core.router import TopKRouter


def _router(d_model=8, num_experts=5, top_k=2, coeff=0.01, seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(d_model, num_experts, top_k, aux_loss_coeff=coeff)
    torch.nn.init.normal_(router.weight)  # large logits, so choices are far from ties
    return router


def test_router_outputs_have_documented_shapes_and_dtypes():
    routing = _router()(torch.randn(11, 8))
    assert routing.expert_ids.shape == (11, 2) and routing.expert_ids.dtype == torch.long
    assert routing.weights.shape == (11, 2) and routing.weights.dtype == torch.float32
    assert routing.tokens_per_expert.shape == (5,)
    assert routing.aux_loss.shape == () and routing.aux_loss.dtype == torch.float32


def test_router_weights_are_renormalized_to_sum_to_one():
    routing = _router()(torch.randn(32, 8))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(32), rtol=0, atol=1e-6)
    assert bool((routing.weights[:, 0] >= routing.weights[:, 1]).all())  # best first


def test_router_chooses_distinct_experts_with_the_highest_logits():
    router = _router()
    x_TD = torch.randn(32, 8)
    routing = router(x_TD)
    expected = (x_TD @ router.weight.T).topk(2, dim=-1).indices
    torch.testing.assert_close(routing.expert_ids, expected)


def test_router_tokens_per_expert_counts_every_assignment():
    routing = _router(top_k=3)(torch.randn(40, 8))
    assert int(routing.tokens_per_expert.sum()) == 40 * 3
    for e in range(5):
        assert int(routing.tokens_per_expert[e]) == int((routing.expert_ids == e).sum())


def test_router_weights_follow_input_dtype_but_gate_math_is_fp32():
    router = _router().to(torch.bfloat16)
    routing = router(torch.randn(16, 8, dtype=torch.bfloat16))
    assert routing.weights.dtype == torch.bfloat16
    assert routing.aux_loss.dtype == torch.float32


def test_aux_loss_matches_hand_computed_switch_loss():
    # Logits (ln 3, 0), (0, ln 3), (ln 3, 0): probs (3/4, 1/4), (1/4, 3/4), (3/4, 1/4).
    # Top-1 picks experts 0, 1, 0: f = (2/3, 1/3); mean probs P = (7/12, 5/12).
    # loss = coeff * E * sum f_i P_i = 1 * 2 * (14/36 + 5/36) = 19/18.
    router = TopKRouter(2, 2, 1, aux_loss_coeff=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    ln3 = math.log(3.0)
    routing = router(torch.tensor([[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]))
    assert routing.expert_ids.flatten().tolist() == [0, 1, 0]
    assert routing.tokens_per_expert.tolist() == [2, 1]
    assert routing.aux_loss.item() == pytest.approx(19 / 18, rel=1e-6)


def test_aux_loss_equals_coeff_when_routing_is_uniform():
    router = TopKRouter(4, 4, 2, aux_loss_coeff=0.5)
    with torch.no_grad():
        router.weight.zero_()  # every prob is 1/4, so E * sum f_i * P_i = sum f_i = 1
    routing = router(torch.randn(8, 4))
    assert routing.aux_loss.item() == pytest.approx(0.5)


def test_aux_loss_gradient_pushes_probability_away_from_the_overloaded_expert():
    router = TopKRouter(2, 2, 1, aux_loss_coeff=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    routing = router(torch.tensor([[2.0, 0.0]] * 4))  # every token goes to expert 0
    routing.aux_loss.backward()
    # Gradient descent lowers expert 0's logit on these inputs: its weight grad is positive.
    assert router.weight.grad[0, 0] > 0 and router.weight.grad[1, 0] < 0


def test_router_rejects_top_k_above_num_experts():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, 2, 3)
