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

The attempt starts when the process started (`process_start_time`), not when the recorder is
built: everything before the recorder is ready (interpreter start, imports, torch and
torch._dynamo included, the recorder's own set-up) is sent as one blocking `startup` span, so
none of it is left unexplained. Only the first recorder of a process takes the process start;
see `Recorder` for later ones and for `attempt_start`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from trainer_hooks.device import DEVICE_EVERY
from trainer_hooks.environment import collect_environment

if TYPE_CHECKING:
    from trainer_hooks.parts import Parts

log = logging.getLogger("trainer_hooks.recorder")

# The fallback start where /proc cannot tell: when the hooks were first imported. The package
# may record it itself (`trainer_hooks.IMPORTED_AT`); else this module's import is the
# earliest the hooks know of (it runs before anything heavy: torch is imported later, by the
# recorder's parts).
_IMPORTED_AT = time.time()
_MIN_EPOCH = 946_684_800.0  # 2000-01-01, as the wire contract
# Steps per routing window by default: each read is a copy of every E layer's counters and a
# record per layer, a few times a step's other hook work; ten steps a window keeps a
# dashboard's routing curves smooth over any run long enough to judge, and the counts are
# exact whatever the window (the counters are cumulative).
ROUTING_EVERY = 10


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


# -- when the attempt started --

AttemptStart = float | Literal["now"] | None


def process_start_time(proc: str = "/proc") -> float | None:
    """Wall time this process started, from Linux's /proc: `starttime` (field 22 of
    /proc/self/stat, clock ticks since boot) after the boot time; None where it cannot be
    read (not Linux, no /proc)."""
    try:
        with open(f"{proc}/self/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        # the command name (field 2) is in parentheses and may hold spaces or ")": the
        # fields after its last ")" start at field 3, so field 22 is the 20th of them
        ticks = int(stat[stat.rindex(")") + 1 :].split()[19])
        btime: float | None = None
        with open(f"{proc}/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    btime = float(line.split()[1])
                    break
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    if btime is None or hz <= 0:
        return None
    return _boot_time(btime) + ticks / hz


def _boot_time(btime: float) -> float:
    """/proc/stat's `btime` is the boot time in whole seconds (truncated). The clocks give it
    to the microsecond (wall time less the time since boot); that is used when the two
    agree, as they do unless the /proc read is not this machine's."""
    try:
        precise = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # no CLOCK_BOOTTIME: not Linux
        return btime
    return precise if btime - 1.0 <= precise < btime + 2.0 else btime


def hooks_imported_at() -> float:
    """When the `trainer_hooks` package was first imported, as well as the hooks know."""
    import trainer_hooks

    found = getattr(trainer_hooks, "IMPORTED_AT", None)
    return float(found) if isinstance(found, int | float) else _IMPORTED_AT


def default_attempt_start(now: float, proc: str = "/proc") -> float:
    """The process's start; where /proc cannot tell (or tells nonsense: before 2000, after
    `now`), when the hooks were first imported. Never after `now`."""
    start = process_start_time(proc)
    if start is None or not _MIN_EPOCH <= start <= now:
        start = hooks_imported_at()
    return min(start, now)


class _Starts:
    """What this process's recorders have claimed: the process start (the first recorder's)
    and each attempt's start, keyed (run_id, attempt, rank)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.process_claimed = False
        self.by_key: dict[tuple[str, int, int], float] = {}

    def claim(
        self, key: tuple[str, int, int], wanted: AttemptStart, now: float
    ) -> tuple[float, bool]:
        """(the attempt's start, whether this recorder sends its startup span)."""
        with self.lock:
            if os.getpid() != self.pid:  # a forked child: a process of its own, nothing claimed
                self.pid, self.process_claimed, self.by_key = os.getpid(), False, {}
            first_here = not self.process_claimed
            self.process_claimed = True
            known = self.by_key.get(key)
            if known is not None:
                if wanted is not None and _resolve(wanted, now, first_here) != known:
                    log.warning(
                        "goodput: attempt %s of rank %s of run %s was already started in this "
                        "process at %.3f; attempt_start=%r is ignored",
                        key[1],
                        key[2],
                        key[0],
                        known,
                        wanted,
                    )
                return known, False
            start = _resolve(wanted, now, first_here)
            self.by_key[key] = start
            return start, True


def _resolve(wanted: AttemptStart, now: float, first_here: bool) -> float:
    if wanted is None:
        return default_attempt_start(now) if first_here else now
    if isinstance(wanted, str):  # "now": checked by _check_attempt_start
        return now
    return float(wanted)


def _check_attempt_start(wanted: Any, now: float) -> None:
    if wanted is None or wanted == "now":
        return
    if isinstance(wanted, bool) or not isinstance(wanted, int | float):
        raise TypeError(f"attempt_start must be None, 'now' or epoch seconds, not {wanted!r}")
    if not _MIN_EPOCH <= wanted <= now:
        raise ValueError(
            f"attempt_start ({wanted!r}) must be epoch seconds between 2000 and now ({now:.3f})"
        )


_STARTS = _Starts()


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
        rec = self.rec
        self.t0 = rec._wall0 + (time.perf_counter() - rec._mono0)  # rec.now(), inlined
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Inlined (no emit_span call), the record built in one display: this runs every
        # step with the caches cold.
        t = time.perf_counter()
        rec = self.rec
        try:
            rec.sink.emit(
                "span",
                {
                    "run_id": rec.run_id,
                    "attempt": rec.attempt,
                    "rank": rec.rank,
                    "category": self.category,
                    "start": self.t0,
                    "end": rec._wall0 + (t - rec._mono0),
                    "overlapped": self.overlapped,
                    "step": self.step,
                },
            )
        except Exception:
            rec.errors += 1
        if not rec._parts.in_profile:  # in a profiling window the span charges it
            rec.overhead_s += time.perf_counter() - t


class Recorder:
    """Records one rank of one attempt of a run. Rank, world size and attempt default to
    torch.distributed, then `RANK`/`WORLD_SIZE`/`TORCHELASTIC_RESTART_COUNT`.

    `attempt_start`: when the attempt began. By default the process's start for the first
    recorder of the process (where /proc cannot tell: when `trainer_hooks` was first
    imported), and the recorder's construction for later ones (a notebook's second run, a
    test's); `"now"` is the construction, a float an explicit epoch time (not in the future).
    The time from it until the recorder is ready (its imports and set-up included) is sent
    as a blocking `startup` span. A long-lived process (a notebook started hours ago) would
    charge all those hours to startup: pass `attempt_start="now"` (or a time) there. A second
    recorder of an attempt (same run id, attempt and rank) in the same process keeps the
    first one's start and sends no second startup span.

    `routing_every`: steps per routing window: every E layer's counters are read at the end
    of every that many steps (default `ROUTING_EVERY`, 10), each record holding the sums
    over its window (`num_steps`), and once more at `close` for the steps since the last
    read; 1 reads them at every step, which costs the training thread a copy a step.

    `device_every` (CUDA): the hooks touch the device on one step in that many (default
    `DEVICE_EVERY`, 10), at least once a second, and on the first step: those steps carry
    `device_time_s` (two CUDA events) and the allocator's peaks since the last such step, and
    read the losses of the steps since in one copy; the other steps make no CUDA call
    (`trainer_hooks.device`). 1 brackets every step with events, as a profiler would.

    `heartbeat_s`: a heartbeat every that many seconds, declaring that interval (the server
    judges a rank silent for several intervals stalled); 0 sends none.

    The receipt (what keep/drop verdicts rest on) needs the keys `trainer_hooks.records`
    lists (`PLAN_KEYS`, `POLICY_KEYS`, ...). Pass them in `model_plan` / `runtime_policy`, or
    as the typed arguments: `pattern` (A/M/E/R letters, e.g. "AEME"), `num_experts`, `top_k`
    (model plan), `dtype` (e.g. "bfloat16"), `compile` ("eager" or a torch.compile mode) and
    `dispatch` (the MoE dispatch asked for: "grouped", "padded", "loop" or "auto"), which
    fill the runtime policy; a typed argument wins over the dict. The hooks fill
    `world_size` and the environment (torch, CUDA, device, host, git sha) themselves. What is
    still missing is logged once, as a warning, at construction.

    `tags`: labels to filter runs by. `ablation` and `cell`: this run is one replicate of
    that cell (e.g. "dispatch=padded") of that ablation (`goodput ablate` sets them); both
    or neither.
    """

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
        routing_every: int = ROUTING_EVERY,
        device_every: int = DEVICE_EVERY,
        heartbeat_s: float = 10.0,
        watch_compile: bool = True,
        attempt_start: AttemptStart = None,
        tags: Sequence[str] = (),
        ablation: str | None = None,
        cell: str | None = None,
        pattern: str | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        dtype: str | None = None,
        compile: str | None = None,
        dispatch: str | None = None,
    ) -> None:
        # One anchor: wall time = anchor + monotonic elapsed, so steps never go backwards
        # when NTP adjusts the clock mid-run. Taken first: it is "now" for attempt_start.
        self._wall0 = time.time()
        self._mono0 = time.perf_counter()
        _check_attempt_start(attempt_start, self._wall0)
        self.sink = sink
        self.errors = 0
        self.closed = False
        self.overhead_s = 0.0
        self.counters: dict[str, int] = {"ooms": 0}
        found = _dist_rank_world() or (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1))
        self.rank = rank if rank is not None else found[0]
        self.world_size = world_size if world_size is not None else found[1]
        self.attempt = attempt if attempt is not None else _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        self.run_id = run_id or os.environ.get("GOODPUT_RUN_ID") or uuid.uuid4().hex
        self._key = {"run_id": self.run_id, "attempt": self.attempt, "rank": self.rank}
        key = (self.run_id, self.attempt, self.rank)
        self.attempt_start, sends_startup = _STARTS.claim(key, attempt_start, self._wall0)
        # The heavy imports (torch, torch._dynamo for the compile callbacks) run here, after
        # the attempt's start and before the recorder is ready: inside the startup span.
        from trainer_hooks.parts import Parts

        self._parts: Parts = Parts(self, device, routing_every, watch_compile, device_every)
        env = collect_environment() if environment is None else environment
        plan = {
            **(model_plan or {}),
            **_given(pattern=pattern, num_experts=num_experts, top_k=top_k),
        }
        policy = {
            "world_size": self.world_size,
            **(runtime_policy or {}),
            **_given(dtype=dtype, compile=compile, dispatch_requested=dispatch),
        }
        _warn_missing(plan, policy, env)
        run = {
            "run_id": self.run_id,
            "name": run_name,
            "project": project,
            "created_at": self.attempt_start,
            "model_plan": plan,
            "runtime_policy": policy,
            "environment": env,
            "tags": list(tags),
        }
        if ablation is not None or cell is not None:
            run["ablation_id"], run["ablation_cell"] = ablation, cell
        self._safe_emit("run", run)
        self._safe_emit(
            "attempt_start",
            {**self._key, "world_size": self.world_size, "start": self.attempt_start},
        )
        self._heartbeat = _Heartbeat(self, heartbeat_s) if heartbeat_s > 0 else None
        self.ready_at = self.now()
        if sends_startup:
            self.emit_span("startup", self.attempt_start, self.ready_at)

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
        """Find the model's MoE counters and dispatchers; probe SDPA on the next eager step.
        Pass the model the loop calls (the torch.compile'd or DDP-wrapped one): the receipt's
        `compile` seam is observed from it."""
        self._guard(self._parts.watch, model)

    def checkpoint_committed(self, step: int, ok: bool = True) -> None:
        """A checkpoint holding every step up to `step` is durable (or failed to be). The
        record is flushed to the spool before this returns (bounded wait): a crash right
        after a checkpoint must not lose the commit that tells which steps it saved."""
        self._safe_emit("checkpoint", {**self._key, "step": step, "time": self.now(), "ok": ok})
        self._guard(self._parts.close_window)  # the steps before it wait for their losses
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

    def metric(self, name: str, value: Any, step: int) -> None:
        """A value measured at `step` besides the training loss; `eval_loss` (the held-out
        loss) is what keep/drop verdicts judge quality by. A tensor is fine: it is read on
        the sink's thread, never here."""
        self._safe_emit(
            "metric",
            {**self._key, "name": name, "step": step, "value": value, "time": self.now()},
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

    def emit_keyed(self, kind: str, fields: dict[str, Any]) -> None:
        """Emit ``fields`` with this attempt's key added (in place, after them): how the parts
        (``trainer_hooks.emitter.Emitter``) send their records."""
        fields.update(self._key)
        self._safe_emit(kind, fields)

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
        parts = self._parts
        try:  # _guard inlined: every call counts, with the caches cold
            if parts.enter_due(h.flops_key, t):
                parts.step_enter(h)
        except Exception:
            self.errors += 1
            log.debug("goodput hook error", exc_info=True)
        t1 = time.perf_counter()
        began = parts.span_began_pc
        if began is not None:  # a profiling window began: the rest of this call is its
            self.overhead_s += began - t
            parts.span_began_pc = None
        elif not parts.in_profile:
            self.overhead_s += t1 - t
        h.t0 = self._wall0 + (t1 - self._mono0)

    def _step_exit(self, h: StepHandle, exc: BaseException | None) -> None:
        t = time.perf_counter()
        if exc is not None:
            self._guard(self._parts.step_failed, h, exc)
            return
        parts = self._parts
        try:
            # One dict display; the parts are looked at only on the steps that need them
            # (Parts.next_look).
            fields = {
                "run_id": self.run_id,
                "attempt": self.attempt,
                "rank": self.rank,
                "step": h.step,
                "start": h.t0,
                "end": self._wall0 + (t - self._mono0),
                "tokens": h.tokens,
                "hook_overhead_s": self.overhead_s,
                "loss": h.loss,
                "flops": parts.flops_by_key.get(h.flops_key),
            }
            parts.last_step = h.step
            parts.steps += 1
            if parts.steps >= parts.next_look or h._start_event is not None:
                parts.step_exit(h, fields)
            elif parts.device.cuda:  # a quiet step on CUDA: its loss waits on the device
                parts.device.hold_loss(h.loss, fields)
            self.sink.emit("step", fields)
        except Exception:
            self.errors += 1
        ended = parts.span_ended_pc
        if ended is not None:  # a profiling window ended: this call up to then is its
            self.overhead_s = time.perf_counter() - ended
            parts.span_ended_pc = None
        else:
            self.overhead_s = 0.0 if parts.in_profile else time.perf_counter() - t

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


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _warn_missing(plan: dict[str, Any], policy: dict[str, Any], env: dict[str, Any]) -> None:
    """Log, once per recorder, the receipt keys nobody filled (the server's rule, simplified:
    the MoE keys count only when the pattern has an E)."""
    from trainer_hooks.records import (
        ENVIRONMENT_KEYS,
        MOE_PLAN_KEYS,
        PLAN_KEYS,
        POLICY_KEYS,
    )

    moe = "E" in str(plan.get("pattern", "E"))
    wanted = [("model_plan", plan, PLAN_KEYS + (MOE_PLAN_KEYS if moe else ()))]
    wanted += [
        (
            "runtime_policy",
            policy,
            tuple(k for k in POLICY_KEYS if moe or k != "dispatch_requested"),
        )
    ]
    wanted += [("environment", env, ENVIRONMENT_KEYS)]
    missing = [f"{part}.{k}" for part, got, keys in wanted for k in keys if got.get(k) is None]
    if missing:
        log.warning(
            "goodput: this run's receipt will be incomplete (no keep/drop verdict) without: %s;"
            " pass them to Recorder (see its docstring)",
            ", ".join(missing),
        )


class _Heartbeat:
    """A daemon thread that says every `period_s` that this rank is alive, and that it says
    so every `period_s` (`interval_s`): the server judges a rank stalled after a multiple of
    it without a sign of life. Each heartbeat carries the sink's running count of dropped
    records; when that count grows, a heartbeat goes out within `LOSS_CHECK_S`, not at the
    next period, so the service hears of a loss while the run goes on."""

    LOSS_CHECK_S = 1.0

    def __init__(self, rec: Recorder, period_s: float) -> None:
        self._rec = rec
        self._stop = threading.Event()
        self._period = period_s
        # the contract takes intervals up to a day; a longer one is not declared
        self._declared = period_s if period_s <= 86_400.0 else None
        self._thread = threading.Thread(target=self._run, name="goodput-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rec = self._rec
        told = 0
        due = time.monotonic() + self._period
        while not self._stop.wait(min(self.LOSS_CHECK_S, max(0.0, due - time.monotonic()))):
            dropped = self._dropped()
            if time.monotonic() < due and dropped <= told:
                continue
            fields = {**rec._key, "time": rec.now(), "interval_s": self._declared}
            if dropped:
                fields["records_dropped"] = dropped
            rec._safe_emit("heartbeat", fields)
            told = dropped
            due = time.monotonic() + self._period

    def _dropped(self) -> int:
        stats = getattr(self._rec.sink, "stats", None)
        try:
            return int(getattr(stats, "records_dropped", 0) or 0)
        except (TypeError, ValueError):
            return 0

    def stop(self) -> None:
        self._stop.set()
