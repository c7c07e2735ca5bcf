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
IMPLEMENTED_LETTERS = ("A", "E")

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
    aux_loss_coeff: float = 0.01
    rope_base: float = 10000.0

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
        _require_number("aux_loss_coeff", self.aux_loss_coeff, allow_zero=True)
        _require_number("rope_base", self.rope_base, allow_zero=False)
        check_implemented(self.pattern, parse_pattern(self.pattern))

    @property
    def layers(self) -> list[str]:
        """One letter per layer, the pattern expanded."""
        return parse_pattern(self.pattern)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _require_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; True as a size is almost certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


def _require_number(name: str, value: Any, *, allow_zero: bool) -> None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be a finite number {bound}, got {value!r}")


def layer_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of one block of each implemented family (must match the torch modules)."""
    d = cfg.d_model
    norm = d  # RMSNorm scale
    attention = norm + 3 * d * d + d * d  # qkv + output projection, no biases
    routed = cfg.num_experts * 3 * d * cfg.expert_hidden  # w1, w3, w2 per expert
    moe = norm + cfg.num_experts * d + 3 * d * cfg.ffn_hidden + routed  # router + shared
    return {"A": attention, "E": moe, "routed_per_expert": 3 * d * cfg.expert_hidden}


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
        "null_slot": False,
        "capacity_factor": None,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "expert_hidden": cfg.expert_hidden,
        "shared_hidden": cfg.ffn_hidden,
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len,
        "num_params": num_params,
        "num_active_params": num_active_params,
    }
