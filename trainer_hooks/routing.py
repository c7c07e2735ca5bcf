"""Routing records from any module that exposes MoE counters (moe_core's E blocks do).

Two protocols, so trainer_hooks never imports moe_core; `top_k`, `null_slot` and `capacity`
(int or None) are read from the module or its `router`; slots are the routed experts, then
the null slot if any.

- Snapshot (preferred, one copy per layer): `routing_snapshot()` returns a copy of a
  cumulative fp64 vector `[tokens per slot (S), dropped per slot (S), shared-only tokens,
  aux-loss sum, z-loss sum, forwards]` and `num_slots` gives S. The sink thread differences
  consecutive snapshots, so nothing is reset on the device.
- Read-and-reset: `read_and_reset_counters() -> dict` of device tensors `tokens_per_expert`,
  `dropped_per_expert`, 0-dim `aux_loss`, `z_loss`, optional `shared_only_tokens`.

Either way the read is a few kernel launches and no synchronization; the values reach the host
through pinned copies (see device.py).
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


class _LayerState:
    """The previous snapshot of one layer, held for the sink thread's differences."""

    __slots__ = ("prev",)

    def __init__(self, prev: Any) -> None:
        self.prev = prev


SNAPSHOT = "_snapshot"
STATE = "_layer_state"


class RoutingCollector:
    """Every `every` steps, reads each source's counters into routing record fields."""

    def __init__(self, sources: list[tuple[str, Any]], every: int) -> None:
        if every < 1:
            raise ValueError(f"routing_every must be >= 1, got {every}")
        self.every = every
        self._steps = 0
        self._states: list[_LayerState | None] = []
        self.sources = sources

    @property
    def sources(self) -> list[tuple[str, Any]]:
        return self._sources

    @sources.setter
    def sources(self, sources: list[tuple[str, Any]]) -> None:
        """Snapshot sources get a baseline now, so forwards before watching are not counted;
        the fields that never change are worked out once, off the step path."""
        self._sources = sources
        self._states = [
            _LayerState(m.routing_snapshot().cpu()) if hasattr(m, "routing_snapshot") else None
            for _name, m in sources
        ]
        self._static = [
            {
                "layer": layer,
                "top_k": int(_attr(m, "top_k", 1)),
                "null_slot": bool(_attr(m, "null_slot", False)),
            }
            for layer, (_name, m) in enumerate(sources)
        ]

    def due(self) -> bool:
        """Counts a step; True when this step's end should collect (every `every` steps)."""
        if not self._sources:
            return False
        self._steps += 1
        return self._steps >= self.every

    def collect(self, step: int, to_host: Callable[[Any], Any]) -> list[dict[str, Any]]:
        """Called at the end of a step for which `due()` said so: record fields, with
        tensors possibly still in flight."""
        num_steps, self._steps = self._steps, 0
        out = []
        for (_name, module), state, static in zip(
            self._sources, self._states, self._static, strict=True
        ):
            fields: dict[str, Any] = dict(static)
            fields["step"] = step
            fields["num_steps"] = num_steps
            fields["capacity"] = _attr(module, "capacity", None)
            if state is not None:
                fields[SNAPSHOT] = to_host(module.routing_snapshot())
                fields[STATE] = state
            else:
                _read_and_reset(module, fields, to_host)
            out.append(fields)
        return out


def _read_and_reset(module: Any, fields: dict[str, Any], to_host: Callable[[Any], Any]) -> None:
    c = module.read_and_reset_counters()
    for key in (
        "tokens_per_expert",
        "dropped_per_expert",
        "shared_only_tokens",
        "aux_loss",
        "z_loss",
    ):
        fields[key] = to_host(c.get(key))
    if "capacity" in c:
        fields["capacity"] = c["capacity"]


def _from_snapshot(fields: dict[str, Any]) -> None:
    """Difference this snapshot with the layer's previous one (a negative difference means
    someone reset the counters: then the snapshot is the window)."""
    state: _LayerState = fields.pop(STATE)
    cur = fields.pop(SNAPSHOT)
    cur_v = cur.tolist()
    prev_v = state.prev.tolist()
    state.prev = cur
    delta = [c - p for c, p in zip(cur_v, prev_v, strict=True)]
    if min(delta) < 0:
        delta = cur_v
    s = (len(delta) - 4) // 2
    shared, aux, z, forwards = delta[2 * s :]
    fields["tokens_per_expert"] = [round(v) for v in delta[:s]]
    fields["dropped_per_expert"] = [round(v) for v in delta[s : 2 * s]]
    fields["shared_only_tokens"] = round(shared)
    fields["aux_loss"] = aux / max(forwards, 1.0)
    fields["z_loss"] = z / max(forwards, 1.0)


def finish_routing_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """On the sink thread, once the copies landed: lists of ints and the token count (every
    token makes exactly top_k choices, the null slot's included)."""
    if STATE in fields:
        _from_snapshot(fields)
    for key in ("tokens_per_expert", "dropped_per_expert"):
        value = fields[key]
        fields[key] = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    fields["num_tokens"] = sum(fields["tokens_per_expert"]) // max(1, fields["top_k"])
    return fields
