"""Knobs: the names users type (`dispatch`, `capacity_factor`, `compile`, ...) and the receipt
fields each covers, in one table. Keep/drop comparisons, ablations and the feature ledger
all read a knob's value from a run's receipt through it.

A knob's value is its first field's value, except where the run observed what ran: the
dispatch a run asked for (`auto`, say) is not the lane it ran in, so `dispatch` reads the
backend its E layers observed (`moe_dispatch.layer<j>`) when they agree, and the request
when nothing was observed. Fields that differ between replicates of one lane (the seed, the
host, how the process was started) are `REPLICATE_ONLY`: never a lane mismatch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Knob:
    name: str
    fields: tuple[str, ...]  # receipt fields (part.key[.key]) it covers; the first is its value
    help: str
    observed_seam: str | None = None  # seam prefix whose observed backend is its value


# Fields every model-plan knob may move (they are computed from the plan).
_PLAN_DERIVED = ("model_plan.num_params", "model_plan.num_active_params")

KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob(
            "dispatch",
            ("runtime_policy.dispatch_requested",),
            "how E layers run their experts: grouped, padded, loop (auto: the fastest here)",
            observed_seam="moe_dispatch.layer",
        ),
        Knob("compile", ("runtime_policy.compile",), "torch.compile: eager or a compile mode"),
        Knob(
            "capacity_factor",
            ("model_plan.capacity_factor",),
            "expert capacity as a multiple of the even share (tokens over it are dropped)",
        ),
        Knob(
            "null_slot",
            ("model_plan.null_slot", "model_plan.num_slots", *_PLAN_DERIVED),
            "a router choice that runs no routed expert",
        ),
        Knob(
            "top_k",
            ("model_plan.top_k", *_PLAN_DERIVED),
            "experts each token is routed to",
        ),
        Knob(
            "num_experts",
            ("model_plan.num_experts", "model_plan.num_slots", *_PLAN_DERIVED),
            "routed experts per E layer",
        ),
        Knob("lr", ("runtime_policy.lr",), "peak learning rate"),
        Knob(
            "batch_size",
            ("runtime_policy.batch_size", "runtime_policy.tokens_per_step"),
            "sequences per step and rank",
        ),
        Knob(
            "seq_len",
            ("runtime_policy.seq_len", "model_plan.seq_len", "runtime_policy.tokens_per_step"),
            "tokens per sequence",
        ),
        Knob(
            "d_model",
            (
                "model_plan.d_model",
                "model_plan.expert_hidden",
                "model_plan.shared_hidden",
                *_PLAN_DERIVED,
            ),
            "model width",
        ),
        Knob(
            "pattern",
            (
                "model_plan.pattern",
                "model_plan.layers",
                "model_plan.family_counts",
                "model_plan.e_positions",
                *_PLAN_DERIVED,
            ),
            "the layer plan of A/M/E/R letters",
        ),
        Knob("dtype", ("runtime_policy.dtype",), "the compute dtype"),
        Knob(
            "ep_size",
            ("runtime_policy.ep_size", "runtime_policy.expert_dp_size"),
            "ranks the routed experts are split over",
        ),
        Knob(
            "slowdown",
            ("runtime_policy.slowdown",),
            "an injected delay per step, a fraction of its compute (calibration)",
        ),
    )
}

REPLICATE_ONLY = (
    "runtime_policy.seed",
    "environment.host",
    "environment.argv0",
    "environment.pid",
)
"""Receipt fields in which replicates of one lane differ: never a lane mismatch."""


class UnknownKnob(ValueError):
    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(
            f"unknown knob(s) {', '.join(names)}; known: {', '.join(KNOBS)} (or a receipt "
            "field such as runtime_policy.lr)"
        )
        self.names = list(names)


_PARTS = ("model_plan.", "runtime_policy.", "environment.")


def covered_fields(knobs: Iterable[str]) -> list[str]:
    """The receipt fields the named knobs cover. A name with a part prefix
    (`runtime_policy.lr`) is a field itself; any other name must be in KNOBS."""
    names = list(dict.fromkeys(knobs))
    unknown = [n for n in names if n not in KNOBS and not n.startswith(_PARTS)]
    if unknown:
        raise UnknownKnob(unknown)
    out: list[str] = []
    for n in names:
        out += KNOBS[n].fields if n in KNOBS else (n,)
    return list(dict.fromkeys(out))


def field_value(parts: Mapping[str, Mapping[str, Any]], field: str) -> Any:
    """The value at `part.key[.key...]` of a receipt's parts; None when absent."""
    part, _, path = field.partition(".")
    value: Any = parts.get(part)
    for key in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def observed_backend(observed: Mapping[str, str], seam_prefix: str) -> str | None:
    """The one backend every seam of the prefix observed; "mixed" when they differ; None
    when none was observed."""
    seen = {v for seam, v in observed.items() if seam.startswith(seam_prefix)}
    if not seen:
        return None
    return seen.pop() if len(seen) == 1 else "mixed"


def knob_value(
    knob: str, parts: Mapping[str, Mapping[str, Any]], observed: Mapping[str, str]
) -> Any:
    """A run's value of a knob: the observed backend where the knob has one and the run
    observed it, else its first field's value."""
    spec = KNOBS.get(knob)
    if spec is None:
        return field_value(parts, knob)
    if spec.observed_seam is not None:
        seen = observed_backend(observed, spec.observed_seam)
        if seen is not None:
            return seen
    return field_value(parts, spec.fields[0])


def lane_parts(
    parts: Mapping[str, Mapping[str, Any]], observed: Mapping[str, str]
) -> dict[str, Any]:
    """A receipt's parts as its lane: with each observed knob's field replaced by what was
    observed (`auto` that ran grouped is the grouped lane)."""
    out = {k: dict(v) for k, v in parts.items()}
    for spec in KNOBS.values():
        if spec.observed_seam is None:
            continue
        seen = observed_backend(observed, spec.observed_seam)
        part, _, key = spec.fields[0].partition(".")
        if seen is not None and part in out and "." not in key:
            out[part][key] = seen
    return out
