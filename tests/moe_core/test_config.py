"""Pattern parsing, config validation and the model plan."""

import json

import pytest
import torch

from moe_core import ModelConfig, build_model, model_plan, parse_pattern


def test_parse_pattern_expands_plain_letters():
    assert parse_pattern("AEAE") == ["A", "E", "A", "E"]


def test_parse_pattern_repeats_with_star_count():
    assert parse_pattern("AE*3") == ["A", "E"] * 3


def test_parse_pattern_joins_segments_with_plus():
    assert "".join(parse_pattern("AEME*2+AEMR")) == "AEMEAEMEAEMR"


def test_parse_pattern_rejects_empty():
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern("")


@pytest.mark.parametrize(
    ("pattern", "position", "letter"),
    [("AEX", 2, "X"), ("aE", 0, "a"), ("AE*2+AQ", 6, "Q"), ("A E", 1, " ")],
)
def test_parse_pattern_unknown_letter_names_position_and_letter(pattern, position, letter):
    with pytest.raises(ValueError, match=rf"unknown letter {letter!r} at position {position}\b"):
        parse_pattern(pattern)


@pytest.mark.parametrize("pattern", ["AE*0", "+AE", "AE+", "*2"])
def test_parse_pattern_rejects_zero_repeats_and_empty_segments(pattern):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(pattern)


def test_every_family_letter_builds_a_model_with_its_blocks():
    from moe_core.recurrent import RecurrentBlock
    from moe_core.ssm import MambaBlock

    model = build_model(ModelConfig(pattern="AEMEAEMEAEMR", d_model=32, n_heads=2), seed=0)
    kinds = [type(b).__name__ for b in model.blocks]
    assert kinds.count(MambaBlock.__name__) == 3 and kinds.count(RecurrentBlock.__name__) == 1
    logits, aux = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, 256) and aux.ndim == 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"d_model": 12, "n_heads": 4}, "d_model"),  # head width 3 is odd: RoPE needs pairs
        ({"top_k": 5, "num_experts": 4}, "top_k"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_experts": -1}, "num_experts"),
        ({"expert_hidden": 2.5}, "expert_hidden"),
        ({"seq_len": True}, "seq_len"),
        ({"aux_loss_coeff": -0.1}, "aux_loss_coeff"),
        ({"rope_base": 0.0}, "rope_base"),
        ({"rope_base": float("nan")}, "rope_base"),
        ({"pattern": "AEZ"}, "pattern"),
    ],
)
def test_config_validation_error_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        ModelConfig(**overrides)


def test_config_accepts_defaults_and_is_keyword_only():
    assert ModelConfig().layers == ["A", "E"]
    with pytest.raises(TypeError):
        ModelConfig("AE")  # type: ignore[misc]


def test_model_plan_is_json_serializable_and_describes_layers():
    cfg = ModelConfig(pattern="AE*2+A", num_experts=4, top_k=2)
    plan = json.loads(json.dumps(model_plan(cfg)))
    assert plan["layers"] == "AEAEA"
    assert plan["family_counts"] == {"A": 3, "E": 2, "M": 0, "R": 0}
    assert plan["e_positions"] == [1, 3]
    assert plan["null_slot"] is False and plan["capacity_factor"] is None
    assert plan["shared_hidden"] == cfg.ffn_hidden
    assert (plan["num_experts"], plan["top_k"]) == (4, 2)


@pytest.mark.parametrize("pattern", ["AE", "AE*2+A", "A", "EE", "AEMEAEMEAEMR", "MR"])
def test_model_plan_total_params_match_the_built_model(pattern):
    cfg = ModelConfig(pattern=pattern, num_experts=6, top_k=2, expert_hidden=16)
    model = build_model(cfg, seed=0)
    assert model_plan(cfg)["num_params"] == sum(p.numel() for p in model.parameters())


def test_model_plan_active_params_count_only_top_k_routed_experts():
    cfg = ModelConfig(pattern="AEE", num_experts=6, top_k=2, expert_hidden=16)
    experts = build_model(cfg, seed=0).moe_blocks[0].experts
    per_expert = sum(p[0].numel() for p in experts.parameters())
    plan = model_plan(cfg)
    assert plan["num_active_params"] == plan["num_params"] - 2 * (6 - 2) * per_expert
