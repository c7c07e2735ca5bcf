"""The recorder a training loop holds: steps, badput spans, receipts, routing, and the run's
start and end.

    rec = Recorder(run_name="ablation-a", sink=SpoolSink("spool/", "http://127.0.0.1:8787"),
                   device="cuda")
    with rec.span("startup"):
        model = build()
    rec.watch(model)                         # routing counters, dispatch and SDPA receipts
    for step in range(n):
        with rec.span("data_stall", step=step):
            batch = next(loader)
        with rec.step(step, tokens=batch.numel(), flops_key=batch.shape) as s:
            s.loss = train_step(batch)      # a tensor: read later, off the training thread
        if saved:
            rec.checkpoint_committed(step)
    rec.close(status="completed")

Every call is cheap and never synchronizes the device; none can raise into training: the
recorder's own failures are counted and reported in the attempt's end record. An exception
raised by the training code inside `step` or `span` propagates unchanged and that step is not
recorded (an out-of-memory error is recorded first).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol

from trainer_hooks.environment import collect_environment
from trainer_hooks.parts import Parts

log = logging.getLogger("trainer_hooks.recorder")


class Sink(Protocol):
    def emit(self, kind: str, fields: dict[str, Any]) -> None: ...

    def close(self, timeout_s: float = ...) -> Any: ...


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _dist_rank_world() -> tuple[int, int] | None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:
        pass
    return None


class StepHandle:
    __slots__ = ("rec", "step", "tokens", "loss", "t0", "flops_key", "_start_event", "_probe")

    def __init__(self, rec: Recorder, step: int, tokens: int, flops_key: Any) -> None:
        self.rec = rec
        self.step = step
        self.tokens = tokens
        self.flops_key = flops_key
        self.loss: Any = None
        self.t0 = 0.0
        self._start_event: Any = None
        self._probe: AbstractContextManager[None] | None = None

    def __enter__(self) -> StepHandle:
        self.rec._step_enter(self)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rec._step_exit(self, ev)


class SpanHandle:
    __slots__ = ("rec", "category", "overlapped", "step", "t0")

    def __init__(self, rec: Recorder, category: str, overlapped: bool, step: int | None) -> None:
        self.rec = rec
        self.category = category
        self.overlapped = overlapped
        self.step = step
        self.t0 = 0.0

    def __enter__(self) -> SpanHandle:
        self.t0 = self.rec.now()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Inlined (no emit_span call): this runs every step with the caches cold.
        t = time.perf_counter()
        rec = self.rec
        fields = rec._key.copy()
        fields["category"] = self.category
        fields["start"] = self.t0
        fields["end"] = rec._wall0 + (t - rec._mono0)
        fields["overlapped"] = self.overlapped
        fields["step"] = self.step
        try:
            rec.sink.emit("span", fields)
        except Exception:
            rec.errors += 1
        rec.overhead_s += time.perf_counter() - t


class Recorder:
    """Records one rank of one attempt of a run. Rank, world size and attempt default to
    torch.distributed, then `RANK`/`WORLD_SIZE`/`TORCHELASTIC_RESTART_COUNT`."""

    def __init__(
        self,
        *,
        run_name: str,
        sink: Sink,
        project: str = "default",
        model_plan: dict[str, Any] | None = None,
        runtime_policy: dict[str, Any] | None = None,
        environment: dict[str, Any] | None = None,
        run_id: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        attempt: int | None = None,
        device: Any = None,
        routing_every: int = 1,
        heartbeat_s: float = 10.0,
        watch_compile: bool = True,
    ) -> None:
        self.sink = sink
        self.errors = 0
        self.closed = False
        self.overhead_s = 0.0
        self.counters: dict[str, int] = {"ooms": 0}
        # One anchor: wall time = anchor + monotonic elapsed, so steps never go backwards
        # when NTP adjusts the clock mid-run.
        self._wall0 = time.time()
        self._mono0 = time.perf_counter()
        found = _dist_rank_world() or (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1))
        self.rank = rank if rank is not None else found[0]
        self.world_size = world_size if world_size is not None else found[1]
        self.attempt = attempt if attempt is not None else _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        self.run_id = run_id or os.environ.get("GOODPUT_RUN_ID") or uuid.uuid4().hex
        self._key = {"run_id": self.run_id, "attempt": self.attempt, "rank": self.rank}
        self._parts = Parts(self, device, routing_every, watch_compile)
        env = collect_environment() if environment is None else environment
        self._safe_emit(
            "run",
            {
                "run_id": self.run_id,
                "name": run_name,
                "project": project,
                "created_at": self._wall0,
                "model_plan": model_plan or {},
                "runtime_policy": runtime_policy or {},
                "environment": env,
            },
        )
        self._safe_emit(
            "attempt_start", {**self._key, "world_size": self.world_size, "start": self._wall0}
        )
        self._heartbeat = _Heartbeat(self, heartbeat_s) if heartbeat_s > 0 else None

    def now(self) -> float:
        return self._wall0 + (time.perf_counter() - self._mono0)

    # -- the public API --

    def step(self, step: int, tokens: int = 0, flops_key: Any = None) -> StepHandle:
        """Context manager around one optimizer step; set `.loss` (a tensor is fine).
        `flops_key` (e.g. the batch shape): the first step of each key is FLOP-counted."""
        return StepHandle(self, step, tokens, flops_key)

    def span(
        self, category: str, *, overlapped: bool = False, step: int | None = None
    ) -> SpanHandle:
        """Context manager around time lost to `category` (see records.BADPUT_CATEGORIES)."""
        return SpanHandle(self, category, overlapped, step)

    def watch(self, model: Any) -> None:
        """Find the model's MoE counters and dispatchers; probe SDPA on the next eager step."""
        self._guard(self._parts.watch, model)

    def checkpoint_committed(self, step: int, ok: bool = True) -> None:
        """A checkpoint holding every step up to `step` is durable (or failed to be). The
        record is flushed to the spool before this returns (bounded wait): a crash right
        after a checkpoint must not lose the commit that tells which steps it saved."""
        self._safe_emit("checkpoint", {**self._key, "step": step, "time": self.now(), "ok": ok})
        flush = getattr(self.sink, "flush", None)
        if flush is not None:
            self._guard(flush)

    def observe(
        self,
        seam: str,
        observed: str,
        *,
        requested: str | None = None,
        reason: str | None = None,
        step: int | None = None,
    ) -> None:
        """Record what ran at a seam (receipts); the same observation twice is stored once."""
        self._safe_emit(
            "observation",
            {
                **self._key,
                "seam": seam,
                "observed": observed,
                "requested": requested,
                "reason": reason,
                "time": self.now(),
                "step": step,
            },
        )

    def profile(self, first_step: int, num_steps: int, trace_dir: str | None = None) -> None:
        """Capture a torch.profiler window over these steps (counted as `profiling`)."""
        self._guard(self._parts.arm_profile, first_step, num_steps, trace_dir)

    def emit_span(
        self,
        category: str,
        start: float,
        end: float,
        overlapped: bool = False,
        step: int | None = None,
    ) -> None:
        self._safe_emit(
            "span",
            {
                **self._key,
                "category": category,
                "start": start,
                "end": end,
                "overlapped": overlapped,
                "step": step,
            },
        )

    def close(
        self, status: str = "completed", cause: str | None = None, flush_timeout_s: float = 10.0
    ) -> Any:
        """End the attempt and close the sink; returns the sink's stats. Idempotent."""
        if self.closed:
            return None
        self.closed = True
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._guard(self._parts.close)
        counters = {**self.counters, **self._parts.counters()}
        sink_stats = getattr(self.sink, "stats", None)
        if sink_stats is not None:
            counters["records_dropped"] = int(getattr(sink_stats, "records_dropped", 0))
        self._safe_emit(
            "attempt_end",
            {
                **self._key,
                "end": self.now(),
                "status": status,
                "cause": cause,
                "hook_errors": self.errors,
                "counters": counters,
            },
        )
        try:
            return self.sink.close(timeout_s=flush_timeout_s)
        except Exception:
            self.errors += 1
            log.warning("goodput sink failed to close", exc_info=True)
            return None

    # -- internals --

    def _step_enter(self, h: StepHandle) -> None:
        t = time.perf_counter()
        self._guard(self._parts.step_enter, h)
        self.overhead_s += time.perf_counter() - t
        h.t0 = self.now()

    def _step_exit(self, h: StepHandle, exc: BaseException | None) -> None:
        end = self.now()
        t = time.perf_counter()
        if exc is not None:
            self._guard(self._parts.step_failed, h, exc)
            return
        fields = self._key.copy()
        fields["step"] = h.step
        fields["start"] = h.t0
        fields["end"] = end
        fields["tokens"] = h.tokens
        fields["hook_overhead_s"] = self.overhead_s
        try:
            self._parts.step_exit(h, fields)
            self.sink.emit("step", fields)
        except Exception:
            self.errors += 1
        self.overhead_s = time.perf_counter() - t

    def _safe_emit(self, kind: str, fields: dict[str, Any]) -> None:
        try:
            self.sink.emit(kind, fields)
        except Exception:
            self.errors += 1

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.errors += 1
            log.debug("goodput hook error", exc_info=True)


class _Heartbeat:
    """A daemon thread that says every `period_s` that this rank is alive."""

    def __init__(self, rec: Recorder, period_s: float) -> None:
        self._rec = rec
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, name="goodput-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._rec._safe_emit("heartbeat", {**self._rec._key, "time": self._rec.now()})

    def stop(self) -> None:
        self._stop.set()
