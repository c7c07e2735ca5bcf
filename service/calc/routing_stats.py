"""Derived routing figures of one histogram, a pure function (ARCHITECTURE.md):

MaxVio              max / mean - 1 of the routed experts' assignments (before dropping)
drop rate           dropped assignments / (tokens * top_k)
null fraction       assignments to the null slot / (tokens * top_k)
shared-only         tokens no routed expert computed / tokens
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingFigures:
    max_vio: float | None
    drop_rate: float | None
    null_fraction: float | None
    shared_only_fraction: float | None


def routing_figures(
    tokens_per_slot: list[int],
    dropped_per_slot: list[int],
    num_tokens: int,
    top_k: int,
    null_slot: bool,
    shared_only_tokens: int | None = None,
) -> RoutingFigures:
    routed = tokens_per_slot[:-1] if null_slot else tokens_per_slot
    mean = sum(routed) / len(routed) if routed else 0.0
    max_vio = max(routed) / mean - 1.0 if mean > 0 else None
    assignments = num_tokens * top_k
    if assignments <= 0:
        return RoutingFigures(max_vio, None, None, None)
    drop_rate = min(1.0, sum(dropped_per_slot) / assignments)
    null_fraction = min(1.0, tokens_per_slot[-1] / assignments) if null_slot else 0.0
    shared_only = (
        min(1.0, shared_only_tokens / num_tokens) if shared_only_tokens is not None else None
    )
    return RoutingFigures(max_vio, drop_rate, null_fraction, shared_only)
