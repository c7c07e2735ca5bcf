"""Rotary embeddings and the causal attention block."""

import pytest
import torch

from moe_core import ModelConfig
from moe_core.attention import AttentionBlock, RotaryEmbedding

CFG = ModelConfig(pattern="A", d_model=32, n_heads=4, seq_len=16)


def test_rope_leaves_position_zero_unchanged_and_preserves_norms():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    x_BHTC = torch.randn(2, 3, 16, 8)
    rotated = rope(x_BHTC)
    torch.testing.assert_close(rotated[:, :, 0], x_BHTC[:, :, 0])
    torch.testing.assert_close(rotated.norm(dim=-1), x_BHTC.norm(dim=-1))
    assert not torch.allclose(rotated[:, :, 1:], x_BHTC[:, :, 1:])


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=16)
    q_C, k_C = torch.randn(8), torch.randn(8)
    # The same q and k placed at every position; score(m, n) must depend on m - n only.
    q_rot = rope(q_C.expand(1, 1, 16, 8))[0, 0]
    k_rot = rope(k_C.expand(1, 1, 16, 8))[0, 0]
    scores_TT = q_rot @ k_rot.T
    torch.testing.assert_close(scores_TT[5, 2], scores_TT[12, 9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores_TT[3, 3], q_C @ k_C, rtol=1e-5, atol=1e-5)


def test_rope_refuses_sequences_longer_than_its_table():
    with pytest.raises(ValueError, match="seq_len"):
        RotaryEmbedding(head_dim=8, max_seq_len=4)(torch.randn(1, 1, 5, 8))


def test_attention_block_is_causal_and_returns_zero_aux_loss():
    torch.manual_seed(0)
    block = AttentionBlock(CFG)
    x_BTD = torch.randn(2, 10, 32)
    changed = x_BTD.clone()
    changed[:, 6] += 1.0
    out, aux_loss = block(x_BTD)
    out_changed, _ = block(changed)
    torch.testing.assert_close(out[:, :6], out_changed[:, :6])
    assert not torch.allclose(out[:, 6:], out_changed[:, 6:])
    assert aux_loss.shape == () and aux_loss.item() == 0.0


def test_attention_block_sees_token_order_through_rope():
    # Without positions, causal attention at the last step sees earlier tokens as a set.
    torch.manual_seed(0)
    block = AttentionBlock(CFG)
    block.init_weights(0.3, 0.3)
    x_BTD = torch.randn(1, 5, 32)
    swapped = x_BTD[:, [1, 0, 2, 3, 4]]
    last, _ = block(x_BTD)
    last_swapped, _ = block(swapped)
    assert not torch.allclose(last[:, -1], last_swapped[:, -1], atol=1e-4)
