"""Model configuration, layer-pattern parsing and the model plan recorded in receipts.

A model is described by a layer pattern over the letters A/M/E/R:
A attention, M Mamba-style state space, E routed experts, R recurrent tail.
Repetition is written ``AE*3`` and segments are joined with ``+``: ``AEME*2+AEMR``.

This module is pure Python (no torch) so the plan can be computed without building a model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

KNOWN_LETTERS = {
    "A": "attention",
    "M": "Mamba-style state-space",
    "E": "routed-expert (MoE)",
    "R": "recurrent",
}
# Letters that have a block implementation today; the others parse but are refused up front.
IMPLEMENTED_LETTERS = ("A", "M", "E", "R")

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "ffn_hidden",
    "expert_hidden",
    "num_experts",
    "top_k",
    "seq_len",
)
_REPEAT_RE = re.compile(r"\*([0-9]+)$")
# Router choices; moe_core.router holds the same tuples (this module stays torch-free).
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")


def parse_pattern(pattern: str) -> list[str]:
    """Expand a layer pattern into one letter per layer.

    ``"AEAE"`` -> ``["A", "E", "A", "E"]``; ``"AE*2+M"`` -> ``["A", "E", "A", "E", "M"]``.
    Errors name the 0-based character position in ``pattern``.
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern: must be a non-empty string of A/M/E/R, got {pattern!r}")
    layers: list[str] = []
    start = 0
    for segment in pattern.split("+"):
        layers.extend(_parse_segment(pattern, segment, start))
        start += len(segment) + 1
    return layers


def _parse_segment(pattern: str, segment: str, start: int) -> list[str]:
    """Parse one ``letters[*N]`` segment that begins at ``start`` in ``pattern``."""
    repeat = 1
    match = _REPEAT_RE.search(segment)
    if match:
        repeat = int(match.group(1))
        if repeat < 1:
            pos = start + match.start() + 1
            raise ValueError(f"pattern {pattern!r}: repeat count at position {pos} must be >= 1")
        segment = segment[: match.start()]
    if not segment:
        raise ValueError(f"pattern {pattern!r}: empty segment at position {start}")
    for offset, letter in enumerate(segment):
        if letter not in KNOWN_LETTERS:
            raise ValueError(
                f"pattern {pattern!r}: unknown letter {letter!r} at position {start + offset}; "
                f"expected one of {', '.join(KNOWN_LETTERS)} (repeat with '*N', join with '+')"
            )
    return list(segment) * repeat


def check_implemented(pattern: str, layers: list[str]) -> None:
    """Refuse letters that parse but have no block implementation yet."""
    for index, letter in enumerate(layers):
        if letter not in IMPLEMENTED_LETTERS:
            raise ValueError(
                f"pattern {pattern!r}: letter {letter!r} at layer position {index} "
                f"({KNOWN_LETTERS[letter]} block) is not implemented yet; "
                f"implemented letters: {', '.join(IMPLEMENTED_LETTERS)}"
            )


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the hybrid model. Validated on construction: bad values fail fast."""

    pattern: str = "AE"
    vocab_size: int = 256
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int = 128  # hidden size of the shared expert (and any dense MLP)
    expert_hidden: int = 64  # hidden size of each routed expert
    num_experts: int = 4
    top_k: int = 2
    seq_len: int = 64
    rope_base: float = 10000.0
    # Router (E blocks); moe_core.router.TopKRouter documents each knob.
    score: str = "softmax"  # "softmax" over all slots, or per-slot "sigmoid"
    null_slot: bool = False  # one extra slot that runs no routed expert (shared expert only)
    capacity_factor: float | None = None  # None: no token dropping
    drop_policy: str = "probs"  # over capacity, keep the highest scores ("probs") or first tokens
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    jitter_eps: float = 0.0  # router input multiplied by U(1 - eps, 1 + eps) in training
    bias_update_rate: float = 0.0  # loss-free balancing step size; 0 leaves the bias at zero
    route_scale: float = 1.0  # multiplies the renormalized routing weights
    # M blocks (moe_core.ssm.MambaBlock) and R blocks (moe_core.recurrent.RecurrentBlock).
    ssm_d_state: int = 16
    ssm_expand: int = 2
    ssm_d_conv: int = 4
    # 16: the chunked scan's steps are unrolled under torch.compile, so a longer chunk costs
    # compile time; eager on an H100 64 is 11% faster for M (bench/results/scan_speed_cuda.log).
    ssm_chunk_size: int = 16
    ssm_dt_min: float = 1e-3
    ssm_dt_max: float = 1e-1
    rec_expand: int = 1
    rec_d_conv: int = 4
    rec_chunk_size: int = 16  # R at 16 vs 64: 1.7x faster on an H100, 1.1x on the CPU

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            _require_positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model: {self.d_model} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2 != 0:
            # RoPE rotates pairs of channels, so each head needs an even width.
            raise ValueError(
                f"d_model: head width d_model/n_heads = {self.d_model // self.n_heads} "
                "must be even for rotary embeddings"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: {self.top_k} must be <= num_experts={self.num_experts}")
        _require_number("rope_base", self.rope_base, allow_zero=False)
        for name in _MIXER_INT_FIELDS:
            _require_positive_int(name, getattr(self, name))
        _require_number("ssm_dt_min", self.ssm_dt_min, allow_zero=False)
        if not self.ssm_dt_min < self.ssm_dt_max:
            raise ValueError(
                f"ssm_dt_max: {self.ssm_dt_max} must exceed ssm_dt_min={self.ssm_dt_min}"
            )
        self._check_router_fields()
        check_implemented(self.pattern, parse_pattern(self.pattern))

    def _check_router_fields(self) -> None:
        _require_choice("score", self.score, SCORE_FUNCTIONS)
        _require_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if not isinstance(self.null_slot, bool):
            raise ValueError(f"null_slot: must be a bool, got {self.null_slot!r}")
        if self.capacity_factor is not None:
            _require_number("capacity_factor", self.capacity_factor, allow_zero=False)
        for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
            _require_number(name, getattr(self, name), allow_zero=True)
        _require_number("route_scale", self.route_scale, allow_zero=False)
        _require_number("jitter_eps", self.jitter_eps, allow_zero=True)
        if self.jitter_eps >= 1:
            # At eps >= 1 the multiplier can reach zero or flip sign: no longer a jitter.
            raise ValueError(f"jitter_eps: must be < 1, got {self.jitter_eps!r}")

    @property
    def num_slots(self) -> int:
        """Router outputs: the routed experts, plus one when the null slot is on."""
        return self.num_experts + int(self.null_slot)

    @property
    def layers(self) -> list[str]:
        """One letter per layer, the pattern expanded."""
        return parse_pattern(self.pattern)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


_MIXER_INT_FIELDS = (
    "ssm_d_state",
    "ssm_expand",
    "ssm_d_conv",
    "ssm_chunk_size",
    "rec_expand",
    "rec_d_conv",
    "rec_chunk_size",
)


def _require_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; True as a size is almost certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _require_number(name: str, value: Any, *, allow_zero: bool) -> None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number {bound}, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")


def check_ep_size(ep_size: Any, num_experts: int) -> None:
    """Refuse an expert-parallel size that cannot split the routed experts evenly.

    ``ep_size`` is runtime policy (how the model is laid out over ranks), not model plan, so it
    is no ``ModelConfig`` field; lanes and model builders call this before building anything.
    """
    _require_positive_int("ep_size", ep_size)
    if num_experts % ep_size != 0:
        raise ValueError(
            f"ep_size: {ep_size} must divide num_experts={num_experts} "
            "(each rank holds num_experts / ep_size routed experts)"
        )


def layer_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one block of each family (must match the torch modules; tested)."""
    d = cfg.d_model
    norm = d  # RMSNorm scale
    attention = norm + 3 * d * d + d * d  # qkv + output projection, no biases
    routed = cfg.num_experts * 3 * d * cfg.expert_hidden  # w1, w3, w2 per expert
    router = cfg.num_slots * d  # one gate row per slot, the null slot included
    moe = norm + router + 3 * d * cfg.ffn_hidden + routed
    w_m, dt_rank, n = cfg.ssm_expand * d, math.ceil(d / 16), cfg.ssm_d_state
    mamba = d + 3 * d * w_m + w_m * (cfg.ssm_d_conv + 2 * dt_rank + 3 * n + 3)
    w_r = cfg.rec_expand * d
    recurrent = d + 3 * d * w_r + 2 * w_r * w_r + w_r * (cfg.rec_d_conv + 4)
    return {
        "A": attention,
        "M": mamba,
        "E": moe,
        "R": recurrent,
        "routed_per_expert": 3 * d * cfg.expert_hidden,
    }


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token). The LM head is tied to the embedding, so counted once."""
    layers = cfg.layers
    per_layer = layer_param_counts(cfg)
    total = cfg.vocab_size * cfg.d_model + cfg.d_model  # embedding + final norm
    total += sum(per_layer[letter] for letter in layers)
    unused_experts = cfg.num_experts - cfg.top_k
    active = total - layers.count("E") * unused_experts * per_layer["routed_per_expert"]
    return total, active


def model_plan(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-serializable description of the model, the receipt's ``model_plan`` part."""
    layers = cfg.layers
    num_params, num_active_params = count_params(cfg)
    return {
        "pattern": cfg.pattern,
        "layers": "".join(layers),
        "family_counts": {letter: layers.count(letter) for letter in KNOWN_LETTERS},
        "e_positions": [i for i, letter in enumerate(layers) if letter == "E"],
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "num_slots": cfg.num_slots,
        "null_slot": cfg.null_slot,
        "capacity_factor": cfg.capacity_factor,
        "score": cfg.score,
        "drop_policy": cfg.drop_policy,
        "aux_loss_coeff": cfg.aux_loss_coeff,
        "z_loss_coeff": cfg.z_loss_coeff,
        "jitter_eps": cfg.jitter_eps,
        "bias_update_rate": cfg.bias_update_rate,
        "route_scale": cfg.route_scale,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "ssm": {
            "d_state": cfg.ssm_d_state,
            "expand": cfg.ssm_expand,
            "d_conv": cfg.ssm_d_conv,
            "chunk_size": cfg.ssm_chunk_size,
        },
        "recurrent": {
            "expand": cfg.rec_expand,
            "d_conv": cfg.rec_d_conv,
            "chunk_size": cfg.rec_chunk_size,
        },
        "expert_hidden": cfg.expert_hidden,
        "shared_hidden": cfg.ffn_hidden,
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len,
        "num_params": num_params,
        "num_active_params": num_active_params,
    }
