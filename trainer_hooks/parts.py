"""The recorder's optional parts, each cheap on the step path: device timing and memory,
compile time, FLOPs, routing counters, dispatch and SDPA receipts, the profiler window."""

from __future__ import annotations

import contextlib
from typing import Any

from trainer_hooks.compile_watch import CompileWatch
from trainer_hooks.device import DEVICE_EVERY, READY, DeviceProbe
from trainer_hooks.emitter import Emitter, StepState
from trainer_hooks.flops import FlopCounter
from trainer_hooks.profiling import ProfileWindow
from trainer_hooks.receipts import DispatchWatch, dispatch_seams, is_compiled, sdpa_probe
from trainer_hooks.routing import BATCH_KIND, ROUTING, RoutingCollector, find_sources

_OOM_NAMES = ("OutOfMemoryError",)
POLL_EVERY = 8  # steps between looks at the dispatchers: a change is reported within 8 steps


class Parts:
    """The parts, and when a step's end must look at them. Most steps' ends need nothing
    from them (on CPU: no routing read, no dispatcher poll, no probe, no profiler): the
    recorder counts the step (`steps`) and calls `step_exit` only once `steps` reaches
    `next_look`, so a quiet step costs a comparison."""

    def __init__(
        self,
        rec: Emitter,
        device: Any,
        routing_every: int,
        watch_compile: bool,
        device_every: int = DEVICE_EVERY,
    ) -> None:
        self.rec = rec
        self.device = DeviceProbe(device, device_every)
        self.flops = FlopCounter()
        self.flops_by_key = self.flops.by_key  # read by the recorder at every step's end
        # A sink that expands routing batches itself (SpoolSink) gets one per window in the
        # step record; any other gets the per-layer records (trainer_hooks.routing).
        expands = getattr(getattr(rec, "sink", None), "expands_routing", False) is True
        self.routing = RoutingCollector([], routing_every, batch=expands)
        self.dispatch = DispatchWatch([])
        self.profile: ProfileWindow | None = None
        self._sdpa_armed = False
        self.steps = 0  # steps ended (the recorder counts them)
        self.next_look = 1  # `steps` at which step_exit must run: the first step's does
        self.last_step: int | None = None  # the latest step ended (the recorder sets it)
        self._counted = 0  # steps handed to the routing collector
        self._next_poll = 1  # `steps` at which the dispatchers are looked at next
        self.compile: CompileWatch | None = None
        # perf_counter where a span the hooks emit began or ended inside the current hook
        # call (the profiling window's): the recorder charges the call's time on the span's
        # side to the span alone, so no second is charged twice.
        self.span_began_pc: float | None = None
        self.span_ended_pc: float | None = None
        self.in_profile = False  # inside the window, the hooks' time is the span's
        self.enter_look = False
        # CUDA: `steps` at which a step is a device step by count (device_every, a routing
        # read), and whether the step under way is one (enter_due said so)
        self.device_at = 1
        self._device_step = False
        self._set_enter_look()
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
        self._set_enter_look()
        self._counted = self.steps  # steps before watching are in no window
        self.next_look = self.steps + 1

    def arm_profile(self, first_step: int, num_steps: int, trace_dir: str | None) -> None:
        self.profile = ProfileWindow(first_step, num_steps, trace_dir, self.device.cuda)
        self.next_look = self.steps + 1
        self._set_enter_look()

    # -- per step --

    def _set_enter_look(self) -> None:
        """Whether every step's start needs `step_enter` (a profiler window, the SDPA probe);
        else only a device step, a new FLOPs key or lost compile callbacks do."""
        self.enter_look = self.profile is not None or self._sdpa_armed

    def enter_due(self, flops_key: Any, now_pc: float) -> bool:
        """Whether a step starting at perf_counter time `now_pc` has work here
        (`step_enter`): a device step (CUDA: its start event), a profile window, a new FLOPs
        shape or a compile callback that torch._dynamo.reset() removed; most steps have
        none."""
        device = self.device
        self._device_step = device.cuda and (
            self.steps + 1 >= self.device_at or now_pc >= device.flush_by
        )
        watch = self.compile
        return (
            self._device_step
            or self.enter_look
            or (flops_key is not None and flops_key not in self.flops_by_key)
            or (watch is not None and not watch.installed())
        )

    def step_enter(self, h: StepState) -> None:
        watch = self.compile
        if watch is not None and not watch.installed():
            watch.ensure_installed()  # torch._dynamo.reset() clears callbacks
        if self.profile is not None:
            self.span_began_pc = self.profile.maybe_start(h.step, self.rec.now)
            if self.span_began_pc is not None:
                self.in_profile = True
        if self._sdpa_armed:
            self._sdpa_armed = False
            h._probe = sdpa_probe(self.rec.observe, h.step)
            h._probe.__enter__()
            self.next_look = self.steps + 1
            self._set_enter_look()
        if h.flops_key is not None and h.flops_key not in self.flops_by_key:
            self.flops.enter(h.flops_key)
            self.next_look = self.steps + 1
        if self._device_step:
            h._start_event = self.device.begin()

    def step_exit(self, h: StepState, fields: dict[str, Any]) -> None:
        """A step's end that has something to do (`next_look`; on CUDA every step's: its
        loss is held, and a device step's copies and events are made). `fields` already
        holds the step's loss as given and its FLOPs as known before this step."""
        if h._probe is not None:
            self._close_probe(h)
        if self.flops.counting:
            self.flops.exit(ok=True)
            fields["flops"] = self.flops_by_key.get(h.flops_key)
        steps = self.steps
        routing, device = self.routing, self.device
        routing.count(steps - self._counted)
        self._counted = steps
        due = routing.is_due()
        singles = self._read_routing(h.step, fields) if due else ()
        if device.cuda:
            device.hold_loss(h.loss, fields)
            start = h._start_event
            if start is not None or due:  # a device step (or a routing read to mark)
                h._start_event = None
                device.flush(start, fields)  # after the copies: its event covers them
            for single in singles:
                single[READY] = fields[READY]
        for single in singles:
            self._emit_routing(single)
        if steps >= self._next_poll:
            self._next_poll = steps + POLL_EVERY
            self.dispatch.poll(self.rec.observe, h.step)
        ended = None if self.profile is None else self.profile.maybe_stop(h.step, self.rec)
        if ended is not None:
            self.span_ended_pc = ended
            self.in_profile = False
            self.profile = None
            self._set_enter_look()
        self.next_look = self._next_look(steps)

    def _next_look(self, steps: int) -> int:
        """The next step whose end needs `step_exit` (a device step's end needs it too: the
        recorder also calls it where the step has a start event), and on CUDA the next
        device step by count."""
        device = self.device
        routing_at = steps + self.routing.steps_to_due() if self.routing.sources else None
        if device.cuda:
            at = steps + max(1, device.every - device.since)
            self.device_at = at if routing_at is None else min(at, routing_at)
        if self.profile is not None:
            return steps + 1
        look = self._next_poll
        return look if routing_at is None else min(look, routing_at)

    def _read_routing(self, step: int, fields: dict[str, Any]) -> list[dict[str, Any]]:
        """Take the routing window that ends at `step`: the batched layers' counters become
        one host copy and one batch in `fields`; the other layers' record fields are
        returned, to be emitted once the step's end event is recorded (it covers their
        copies too)."""
        routing, device = self.routing, self.device
        num_steps = routing.take_window()
        if routing.batched_counters():
            counters, live = routing.live_counters()
            fields[ROUTING] = routing.make_batch(step, device.snapshot(counters, live), 0)
        if not routing.reads_singles:
            return []
        return routing.collect(step, device.to_host, num_steps)

    def flush_routing(self) -> None:
        """Read the window still open (the steps since the last read), so that a run's last
        steps are not missing from its routing records: at close."""
        routing = self.routing
        routing.count(self.steps - self._counted)
        self._counted = self.steps
        if not routing.pending or self.last_step is None:
            return
        fields: dict[str, Any] = {}
        singles = self._read_routing(self.last_step, fields)
        if self.device.cuda:  # an event after the copies says when they landed
            fields[READY] = self.device.close_window()
            for single in singles:
                single[READY] = fields[READY]
        for single in singles:
            self._emit_routing(single)
        if ROUTING in fields:
            self.rec.emit_keyed(BATCH_KIND, fields)

    def close_window(self) -> None:
        """CUDA: read the losses held so far (one copy), so that the step records waiting
        for them can be written: before a checkpoint's commit is flushed, after a failed
        step, at close."""
        if self.device.cuda:
            self.device.close_window()

    def step_failed(self, h: StepState, exc: BaseException) -> None:
        self._close_probe(h)
        h._start_event = None  # a failed step has no device time
        self.close_window()
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
        if self.device.cuda:
            out["losses_unread"] = self.device.losses_unread
        return out

    def close(self) -> None:
        try:
            self.flush_routing()
            self.close_window()
        finally:
            self._close_rest()

    def _close_rest(self) -> None:
        if self.compile is not None:
            self.compile.uninstall()
        if self.profile is not None:
            with contextlib.suppress(Exception):
                self.profile.abandon()
