"""The recorder's optional parts, each cheap on the step path: device timing and memory,
compile time, FLOPs, routing counters, dispatch and SDPA receipts, the profiler window."""

from __future__ import annotations

import contextlib
from typing import Any

from trainer_hooks.compile_watch import CompileWatch
from trainer_hooks.device import READY, DeviceProbe
from trainer_hooks.emitter import Emitter, StepState
from trainer_hooks.flops import FlopCounter
from trainer_hooks.profiling import ProfileWindow
from trainer_hooks.receipts import DispatchWatch, dispatch_seams, is_compiled, sdpa_probe
from trainer_hooks.routing import ROUTING, RoutingCollector, find_sources

_OOM_NAMES = ("OutOfMemoryError",)
POLL_EVERY = 8  # steps between looks at the dispatchers: a change is reported within 8 steps


class Parts:
    def __init__(self, rec: Emitter, device: Any, routing_every: int, watch_compile: bool) -> None:
        self.rec = rec
        self.device = DeviceProbe(device)
        self.flops = FlopCounter()
        # A sink that expands routing batches itself (SpoolSink) gets one per step in the
        # step record; any other gets the per-layer records (trainer_hooks.routing).
        expands = getattr(getattr(rec, "sink", None), "expands_routing", False) is True
        self.routing = RoutingCollector([], routing_every, batch=expands)
        self.dispatch = DispatchWatch([])
        self.profile: ProfileWindow | None = None
        self._sdpa_armed = False
        self._poll_left = 1  # the first step's dispatch is reported at once
        self.compile: CompileWatch | None = None
        if watch_compile:
            self.compile = CompileWatch(rec.now, self._compile_span, self._recompile)
            self.compile.ensure_installed()

    # -- set-up --

    def watch(self, model: Any) -> None:
        self.routing.sources = find_sources(model)
        self.dispatch.seams = dispatch_seams(model)
        compiled = is_compiled(model)
        self.rec.observe("compile", "compiled" if compiled else "eager")
        self._sdpa_armed = not compiled  # the probe patches a Python function: eager only

    def arm_profile(self, first_step: int, num_steps: int, trace_dir: str | None) -> None:
        self.profile = ProfileWindow(first_step, num_steps, trace_dir, self.device.cuda)

    # -- per step --

    def step_enter(self, h: StepState) -> None:
        if self.compile is not None:
            self.compile.ensure_installed()  # torch._dynamo.reset() clears callbacks
        if self.profile is not None:
            self.profile.maybe_start(h.step, self.rec.now)
        if self._sdpa_armed:
            self._sdpa_armed = False
            h._probe = sdpa_probe(self.rec.observe, h.step)
            h._probe.__enter__()
        if h.flops_key is not None and h.flops_key not in self.flops.by_key:
            self.flops.enter(h.flops_key)
        if self.device.cuda:
            h._start_event = self.device.begin()

    def step_exit(self, h: StepState, fields: dict[str, Any]) -> None:
        """Kept to a few branches: it runs every step, with caches cold from the step."""
        if h._probe is not None:
            self._close_probe(h)
        if h.flops_key is not None:
            if self.flops.counting:
                self.flops.exit(ok=True)
            fields["flops"] = self.flops.by_key.get(h.flops_key)
        if self.routing.due():
            self._step_exit_routing(h, fields)
        else:
            fields["loss"] = self.device.to_host(h.loss)
            self.device.end(h._start_event, fields)
        self._poll_left -= 1
        if self._poll_left <= 0:
            self._poll_left = POLL_EVERY
            self.dispatch.poll(self.rec.observe, h.step)
        if self.profile is not None and self.profile.maybe_stop(h.step, self.rec):
            self.profile = None

    def _step_exit_routing(self, h: StepState, fields: dict[str, Any]) -> None:
        """A step whose end reads the routing counters. The batched layers' counters (the
        loss in front of them, when it can ride along) become one host tensor and one batch
        in the step's fields; other layers' records are emitted one by one, after the step's
        end event is recorded, which covers their copies too."""
        routing, device = self.routing, self.device
        num_steps = routing.take_window()
        counters = routing.batched_counters()
        loss = h.loss
        if counters:
            lead = device.riding_loss(loss, counters[0]) if device.cuda else None
            if lead is None:
                fields["loss"] = device.to_host(loss)
                flat = device.gather(counters)
            else:  # the sink thread sets the loss from the batch
                flat = device.gather([lead, *counters])
            fields[ROUTING] = routing.make_batch(h.step, flat, int(lead is not None))
        else:
            fields["loss"] = device.to_host(loss)
        singles = (
            routing.collect(h.step, device.to_host, num_steps) if routing.reads_singles else ()
        )
        device.end(h._start_event, fields)  # after the copies: its event covers them
        for single in singles:
            if device.cuda:
                single[READY] = fields[READY]
            self._emit_routing(single)

    def step_failed(self, h: StepState, exc: BaseException) -> None:
        self._close_probe(h)
        self.flops.exit(ok=False)
        if type(exc).__name__ in _OOM_NAMES:
            self.rec.counters["ooms"] += 1
            self.rec.observe("oom", "out of memory", reason=str(exc)[:2000], step=h.step)

    def _close_probe(self, h: StepState) -> None:
        if h._probe is not None:
            probe, h._probe = h._probe, None
            probe.__exit__(None, None, None)

    def _emit_routing(self, fields: dict[str, Any]) -> None:
        self.rec.emit_keyed("routing", fields)

    # -- compile callbacks (run on the training thread, inside the step that compiles) --

    def _compile_span(self, start: float, end: float) -> None:
        self.rec.emit_span("compile", start, end)

    def _recompile(self, compile_id: str, reason: str) -> None:
        self.rec.observe("recompile", f"recompile {compile_id}", reason=reason)

    # -- end --

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.compile is not None:
            out["compiles"] = self.compile.compiles
            out["recompiles"] = self.compile.recompiles
        retries = self.device.alloc_retries()
        if retries is not None:
            out["alloc_retries"] = retries
        return out

    def close(self) -> None:
        if self.compile is not None:
            self.compile.uninstall()
        if self.profile is not None:
            with contextlib.suppress(Exception):
                self.profile.abandon()
