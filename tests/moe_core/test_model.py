"""The assembled model: shapes, causality, determinism, and that it actually learns."""

import pytest
import torch
import torch.nn.functional as F

from moe_core import ByteCorpus, ModelConfig, MoEModel, build_model

TINY = ModelConfig(
    pattern="AE*2",
    d_model=32,
    n_heads=4,
    ffn_hidden=64,
    expert_hidden=32,
    num_experts=4,
    top_k=2,
    seq_len=32,
)


def test_forward_returns_logits_per_position_and_scalar_aux_loss():
    model = build_model(TINY, seed=0)
    logits_BTV, aux_loss = model(torch.randint(0, 256, (3, 17)))
    assert logits_BTV.shape == (3, 17, 256)
    assert aux_loss.shape == () and aux_loss.dtype == torch.float32
    assert aux_loss.item() > 0


def test_aux_loss_sums_over_the_e_blocks():
    model = build_model(TINY, seed=0)
    tokens = torch.randint(0, 256, (2, 16))
    _, aux_loss = model(tokens)
    per_block = [float(block.read_and_reset_counters()["aux_loss"]) for block in model.moe_blocks]
    assert len(per_block) == 2
    assert aux_loss.item() == pytest.approx(sum(per_block), rel=1e-6)


def test_model_without_e_blocks_has_zero_aux_loss():
    model = build_model(ModelConfig(pattern="AA", d_model=32, seq_len=16), seed=0)
    _, aux_loss = model(torch.randint(0, 256, (1, 16)))
    assert aux_loss.shape == () and aux_loss.item() == 0.0
    assert model.moe_blocks == []


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = build_model(TINY, seed=0).eval()
    tokens = torch.randint(0, 256, (2, 24))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 256
    logits, _ = model(tokens)
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits[:, :15], logits_changed[:, :15], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 15:], logits_changed[:, 15:])


def test_same_seed_builds_identical_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(TINY, seed=7)
    after = torch.rand(1)
    b = build_model(TINY, seed=7)
    c = build_model(TINY, seed=8)
    assert torch.equal(before, after)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_residual_projections_get_scaled_init():
    model = build_model(ModelConfig(pattern="AE*8", d_model=64, expert_hidden=256), seed=0)
    attention, moe = model.blocks[0], model.blocks[1]
    assert attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert attention.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)  # 16 blocks
    assert moe.experts.w2.std().item() == pytest.approx(0.02 / 4, rel=0.1)


def test_lm_head_is_tied_to_the_embedding():
    model = build_model(TINY, seed=0)
    assert not any("head" in name for name, _ in model.named_parameters())
    tokens = torch.randint(0, 256, (1, 8))
    logits, _ = model(tokens)
    logits.sum().backward()
    assert model.embed.weight.grad is not None


def test_forward_rejects_bad_token_shapes():
    model = MoEModel(TINY)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(33, dtype=torch.long))


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus.from_stdlib(max_bytes=300_000)


def _eval_loss(model, batches, steps=4):
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
            for x, y in (next(batches) for _ in range(steps))
        ]
    model.train()
    return torch.stack(losses).mean().item()


def test_training_on_the_stdlib_corpus_lowers_validation_loss(corpus):
    model = build_model(TINY, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    before = _eval_loss(model, corpus.batches("val", 16, 32, seed=1))
    train = corpus.batches("train", 16, 32, seed=0)
    for _ in range(40):
        x, y = next(train)
        logits, aux_loss = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = _eval_loss(model, corpus.batches("val", 16, 32, seed=1))
    assert after < before - 1.0, (before, after)
    assert after < 4.0  # uniform over 256 bytes is ln(256) ~ 5.55
    counters = model.moe_blocks[0].read_and_reset_counters()
    assert int(counters["tokens_per_expert"].sum()) == 40 * 16 * 32 * 2
