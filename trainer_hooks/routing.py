"""Routing records from any module that exposes MoE counters (moe_core's E blocks do).

The protocol, so trainer_hooks never imports moe_core: a module with
`read_and_reset_counters() -> dict` giving device tensors `tokens_per_expert` [S] and
`dropped_per_expert` [S] (slots: routed experts, then the null slot if any), 0-dim `aux_loss`
and `z_loss`, optionally `shared_only_tokens`, and `capacity` (int or None); and `top_k` and
`null_slot` on the module or on its `router`. Counters accumulate on the device between reads;
reading clones and zeroes them on the device, so a read costs a few kernel launches and no
synchronization; the values reach the host through pinned copies (see device.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _attr(module: Any, name: str, default: Any) -> Any:
    if hasattr(module, name):
        return getattr(module, name)
    return getattr(getattr(module, "router", None), name, default)


def find_sources(model: Any) -> list[tuple[str, Any]]:
    """Every submodule that speaks the counters protocol, in model order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if callable(getattr(m, "read_and_reset_counters", None))
    ]


class RoutingCollector:
    """Every `every` steps, reads each source's counters into routing record fields."""

    def __init__(self, sources: list[tuple[str, Any]], every: int) -> None:
        if every < 1:
            raise ValueError(f"routing_every must be >= 1, got {every}")
        self.sources = sources
        self.every = every
        self._steps = 0

    def collect(self, step: int, to_host: Callable[[Any], Any]) -> list[dict[str, Any]]:
        """Called at a step's end; returns record fields (tensors still in flight) or []."""
        self._steps += 1
        if not self.sources or self._steps < self.every:
            return []
        num_steps, self._steps = self._steps, 0
        out = []
        for layer, (_name, module) in enumerate(self.sources):
            c = module.read_and_reset_counters()
            top_k = int(_attr(module, "top_k", 1))
            out.append(
                {
                    "step": step,
                    "layer": layer,
                    "num_steps": num_steps,
                    "top_k": top_k,
                    "null_slot": bool(_attr(module, "null_slot", False)),
                    "tokens_per_expert": to_host(c["tokens_per_expert"]),
                    "dropped_per_expert": to_host(c["dropped_per_expert"]),
                    "capacity": c.get("capacity"),
                    "shared_only_tokens": to_host(c.get("shared_only_tokens")),
                    "aux_loss": to_host(c.get("aux_loss")),
                    "z_loss": to_host(c.get("z_loss")),
                }
            )
        return out


def finish_routing_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """On the sink thread, once the copies landed: lists of ints and the token count (every
    token makes exactly top_k choices, the null slot's included)."""
    for key in ("tokens_per_expert", "dropped_per_expert"):
        value = fields[key]
        fields[key] = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    fields["num_tokens"] = sum(fields["tokens_per_expert"]) // max(1, fields["top_k"])
    return fields
