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

Read together (batched): a snapshot source that is an `nn.Module` holding that vector as its
buffer `routing_counters` (moe_core's E blocks) is not copied layer by layer. Every such
layer's counters are read in one operation per read (on CUDA one pinned copy), and the step
record carries the result as one `RoutingBatch`, which the sink thread turns into a routing
record per layer (`expand_batch`). That is the difference between a dozen tensor
operations, pinned buffers and records per read on the training thread and one of each.
Only a sink that says it expands batches (`expands_routing = True`, as `SpoolSink`) gets
them; any other sink gets per-layer records as before.

One buffer, no concatenation: a batched source that can keep its counters in storage it is
handed (`adopt_routing_counters(view)`, as moe_core's E blocks) gets a view of one flat
buffer shared by every such layer, so the read is one copy of that buffer. Who replaces a
layer's buffer later (`model.to(...)`) only costs a concatenation at the next read, which
packs the layers again.

Every `routing_every` steps (the recorder's setting), not every step: the counters are
cumulative, so a window of N steps holds exactly the sum of its steps, and the windows
still open when the recorder closes are read then (`RoutingCollector.pending`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BUFFER = "routing_counters"  # the batched sources' cumulative vector
SNAPSHOT = "_snapshot"
STATE = "_layer_state"
ROUTING = "_routing"  # a step record's RoutingBatch, for the sink thread to expand
BATCH_KIND = "routing_batch"  # a record that only carries a batch (read at close)
ADOPT = "adopt_routing_counters"  # a batched source that takes a view of a shared buffer
KEY_FIELDS = ("run_id", "attempt", "rank")


def _attr(module: Any, name: str, default: Any) -> Any:
    if hasattr(module, name):
        return getattr(module, name)
    return getattr(getattr(module, "router", None), name, default)


def _holder(module: Any, name: str) -> Any:
    """The object `_attr` would read `name` from (the module or its router), found once."""
    if hasattr(module, name):
        return module
    router = getattr(module, "router", None)
    return router if router is not None and hasattr(router, name) else None


def find_sources(model: Any) -> list[tuple[str, Any]]:
    """Every submodule that speaks the counters protocol, in model order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if callable(getattr(m, "read_and_reset_counters", None))
    ]


def _buffers_of(module: Any) -> dict[str, Any] | None:
    """The module's buffer dict when it is a batchable source, else None. The dict, not the
    tensor, is kept: `module.to(...)` replaces the tensor in that same dict."""
    buffers = getattr(module, "_buffers", None)
    if not callable(getattr(module, "routing_snapshot", None)) or not isinstance(buffers, dict):
        return None
    counters = buffers.get(BUFFER)
    return buffers if counters is not None and getattr(counters, "ndim", 0) == 1 else None


class _LayerState:
    """The previous snapshot of one layer, held for the sink thread's differences."""

    __slots__ = ("prev",)

    def __init__(self, prev: Any) -> None:
        self.prev = prev


class _Plan:
    """What the batched layers' records need beside the numbers, fixed when the sources are
    set: per layer its fields that never change and its slice of the concatenation; and the
    previous concatenation and how many steps had been counted then (both read and
    replaced by the sink thread only)."""

    __slots__ = ("layers", "total", "prev", "prev_seen")

    def __init__(self, layers: list[tuple[dict[str, Any], int, int]], prev: Any) -> None:
        self.layers = layers
        self.total = layers[-1][2] if layers else 0
        self.prev = prev
        self.prev_seen = 0


class RoutingBatch:
    """The batched layers' counters at the end of one step (`flat[offset:]`, possibly still
    in flight: the step record's CUDA event says when they landed), the capacities read
    at that step, and the steps counted since watching (`seen`): the window is measured
    from the previous batch expanded, so a batch lost on the way (a full queue) widens the
    next one's window instead of vanishing from the sums."""

    __slots__ = ("plan", "step", "seen", "capacities", "flat", "offset")

    def __init__(
        self,
        plan: _Plan,
        step: int,
        seen: int,
        capacities: list[Any],
        flat: Any,
        offset: int,
    ) -> None:
        self.plan = plan
        self.step = step
        self.seen = seen
        self.capacities = capacities
        self.flat = flat
        self.offset = offset

    def __len__(self) -> int:
        return len(self.plan.layers)


class RoutingCollector:
    """Every `every` steps, reads each source's counters into routing record fields. With
    `batch`, batchable sources are read together (the module's docstring)."""

    def __init__(self, sources: list[tuple[str, Any]], every: int, batch: bool = False) -> None:
        if every < 1:
            raise ValueError(f"routing_every must be >= 1, got {every}")
        self.every = every
        self.batch = batch
        self._steps = 0
        self._seen = 0  # steps counted in windows taken since the sources were set
        self._states: list[_LayerState | None] = []
        self._flat: Any = None  # the shared buffer the packed layers' counters are views of
        self._views: list[Any] = []
        self.sources = sources

    @property
    def sources(self) -> list[tuple[str, Any]]:
        return self._sources

    @sources.setter
    def sources(self, sources: list[tuple[str, Any]]) -> None:
        """Snapshot sources get a baseline now, so forwards before watching are not counted;
        the fields that never change are worked out once, off the step path."""
        self._sources = sources
        statics = [
            {
                "layer": layer,
                "top_k": int(_attr(m, "top_k", 1)),
                "null_slot": bool(_attr(m, "null_slot", False)),
            }
            for layer, (_name, m) in enumerate(sources)
        ]
        batched = [_buffers_of(m) if self.batch else None for _name, m in sources]
        # the layers read one by one: (module, its snapshot state or None, static fields)
        self._single = [
            (
                m,
                _LayerState(m.routing_snapshot().cpu()) if hasattr(m, "routing_snapshot") else None,
                statics[i],
            )
            for i, (_name, m) in enumerate(sources)
            if batched[i] is None
        ]
        self._buffer_dicts = [b for b in batched if b is not None]
        self._batched_modules = [m for (_name, m), b in zip(sources, batched, strict=True) if b]
        self._capacity_holders = [_holder(m, "capacity") for m in self._batched_modules]
        layers, end = [], 0
        for static, b in zip(statics, batched, strict=True):
            if b is not None:
                n = b[BUFFER].numel()
                layers.append((static, end, end + n))
                end += n
        self._flat, self._views = None, []
        prev = None
        if self._buffer_dicts:
            prev = self._pack()
            if prev is self._flat:
                prev = prev.clone()
            prev = prev.cpu()
        self._plan = _Plan(layers, prev)
        self._seen = 0
        self._steps = 0  # the baseline is now: steps counted before it are in no window

    def _pack(self) -> Any:
        """Move the batched layers' counters into one flat buffer, each layer a view of it,
        where every layer can adopt one and all share a device and dtype; returns that
        buffer, or else the layers' counters concatenated (a copy)."""
        import torch

        counters = [c.detach().reshape(-1) for c in self.batched_counters()]
        flat = torch.cat(counters)
        self._flat, self._views = None, []
        kinds = {(c.device, c.dtype) for c in counters}
        modules = self._batched_modules
        if len(kinds) != 1 or not all(callable(getattr(m, ADOPT, None)) for m in modules):
            return flat
        views, start = [], 0
        for m, c in zip(modules, counters, strict=True):
            view = flat[start : start + c.numel()]
            getattr(m, ADOPT)(view)
            views.append(view)
            start += c.numel()
        self._flat, self._views = flat, views
        return flat

    def live_counters(self) -> tuple[Any, bool]:
        """The batched layers' counters end to end, and whether that tensor is live (the
        shared buffer itself, which the next forward adds to: copy it before then) rather
        than a copy already. The shared buffer when every layer still holds its view
        (a dozen identity checks); else the layers are packed again (one concatenation)."""
        views = self._views
        if views and all(d[BUFFER] is v for d, v in zip(self._buffer_dicts, views, strict=True)):
            return self._flat, True
        flat = self._pack()
        return flat, flat is self._flat

    def count(self, num_steps: int) -> None:
        """Counts steps ended since the last count."""
        self._steps += num_steps

    def steps_to_due(self) -> int:
        """Steps (at least 1) until a window is due, counting the steps counted so far."""
        return max(1, self.every - self._steps)

    def is_due(self) -> bool:
        return bool(self._sources) and self._steps >= self.every

    @property
    def pending(self) -> bool:
        """Whether steps were counted since the last window was taken (a window to read at
        the end, so that its counts are not lost)."""
        return bool(self._sources) and self._steps > 0

    def due(self) -> bool:
        """Counts a step; True when this step's end should collect (every `every` steps)."""
        if not self._sources:
            return False
        self._steps += 1
        return self._steps >= self.every

    def take_window(self) -> int:
        """The steps since the last collection (call once per collection, after `due`)."""
        num_steps, self._steps = self._steps, 0
        self._seen += num_steps
        return num_steps

    @property
    def reads_singles(self) -> bool:
        """Whether some layers are read one by one (`collect`)."""
        return bool(self._single)

    def batched_counters(self) -> list[Any]:
        """The batched layers' live counter buffers, in layer order (no copy: concatenate
        them before the next forward adds to them)."""
        return [d[BUFFER] for d in self._buffer_dicts]

    def make_batch(self, step: int, flat: Any, offset: int) -> RoutingBatch:
        """The step's batch (after `take_window`), `flat[offset:]` being the concatenated
        counters."""
        capacities = [None if h is None else h.capacity for h in self._capacity_holders]
        return RoutingBatch(self._plan, step, self._seen, capacities, flat, offset)

    def collect(
        self, step: int, to_host: Callable[[Any], Any], num_steps: int | None = None
    ) -> list[dict[str, Any]]:
        """Called at the end of a step for which `due()` said so: record fields of the
        layers not batched, with tensors possibly still in flight. `num_steps`: the window
        when `take_window` was already called."""
        if num_steps is None:
            num_steps = self.take_window()
        out = []
        for module, state, static in self._single:
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


def _window_fields(fields: dict[str, Any], counts: list[int], tail: list[float]) -> None:
    """A layer's record fields from its window: `counts` the rounded [tokens per slot (S),
    dropped per slot (S), shared-only tokens] and `tail` the float [aux-loss sum, z-loss
    sum, forwards]."""
    s = (len(counts) - 1) // 2
    aux, z, forwards = tail
    fields["tokens_per_expert"] = counts[:s]
    fields["dropped_per_expert"] = counts[s : 2 * s]
    fields["shared_only_tokens"] = counts[2 * s]
    fields["aux_loss"] = aux / max(forwards, 1.0)
    fields["z_loss"] = z / max(forwards, 1.0)
    fields["num_tokens"] = sum(fields["tokens_per_expert"]) // max(1, fields["top_k"])


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
    _window_fields(fields, [round(v) for v in delta[:-3]], delta[-3:])


def finish_routing_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """On the sink thread, once the copies landed: lists of ints and the token count (every
    token makes exactly top_k choices, the null slot's included)."""
    if STATE in fields:
        _from_snapshot(fields)
        return fields
    for key in ("tokens_per_expert", "dropped_per_expert"):
        value = fields[key]
        fields[key] = [int(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    fields["num_tokens"] = sum(fields["tokens_per_expert"]) // max(1, fields["top_k"])
    return fields


def expand_batch(step_fields: dict[str, Any]) -> list[dict[str, Any]]:
    """On the sink thread, once the step's copies landed: take the step record's batch off
    it (its loss too, when the loss rode along at the front) and return one routing
    record's fields per batched layer, differenced with the previous batch as
    `_from_snapshot` does one layer (a layer whose difference is negative was reset: its
    snapshot is the window). Batches must be expanded in step order."""
    batch: RoutingBatch = step_fields.pop(ROUTING)
    plan = batch.plan
    flat = batch.flat
    if batch.offset:
        step_fields["loss"] = float(flat[0])
    cur = flat[batch.offset :]
    if cur.numel() != plan.total:
        raise ValueError(f"routing batch of {cur.numel()} counters, expected {plan.total}")
    prev, plan.prev = plan.prev, cur
    num_steps, plan.prev_seen = batch.seen - plan.prev_seen, batch.seen
    delta = cur - prev
    floats = delta.tolist()
    rounded = delta.round().long().tolist()
    reset: list[int] | None = None
    key = {k: step_fields[k] for k in KEY_FIELDS}
    out = []
    for (static, a, b), capacity in zip(plan.layers, batch.capacities, strict=True):
        tail = floats[b - 3 : b]
        counts = rounded[a : b - 3]
        if min(floats[a:b]) < 0:  # reset by someone: this snapshot is the window
            if reset is None:
                reset = cur.round().long().tolist()
            counts, tail = reset[a : b - 3], cur[b - 3 : b].tolist()
        fields = dict(static)
        fields["step"] = batch.step
        fields["num_steps"] = num_steps
        fields["capacity"] = capacity
        _window_fields(fields, counts, tail)
        fields.update(key)
        out.append(fields)
    return out


def batch_size(fields: dict[str, Any]) -> int:
    """How many routing records a step record's batch stands for (0 without one)."""
    batch = fields.get(ROUTING)
    return len(batch) if batch is not None else 0
