"""The recorder a training loop holds: steps, badput spans, and the run's start and end.

    rec = Recorder(run_name="ablation-a", sink=SpoolSink("spool/", "http://127.0.0.1:8787"))
    with rec.span("startup"):
        model = build()
    for step in range(n):
        with rec.span("data_stall"):
            batch = next(loader)
        with rec.step(step, tokens=batch.numel()) as s:
            s.loss = train_step(batch)      # a tensor: read later, off the training thread
    rec.close(status="completed")

Every call is cheap and cannot raise into training: the recorder's own failures are counted
(`rec.errors`) and reported in the attempt's end record. An exception raised by the training
code inside `step` or `span` propagates unchanged and that step is not recorded.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from types import TracebackType
from typing import Any, Protocol

from trainer_hooks.environment import collect_environment

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


class _Timed:
    """Base of the step and span context managers: stamps wall time at enter and exit."""

    __slots__ = ("rec", "t0")

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.t0 = 0.0

    def __enter__(self) -> _Timed:
        self.t0 = self.rec.now()
        return self


class StepHandle(_Timed):
    __slots__ = ("step", "tokens", "loss")

    def __init__(self, rec: Recorder, step: int, tokens: int) -> None:
        super().__init__(rec)
        self.step = step
        self.tokens = tokens
        self.loss: Any = None

    def __enter__(self) -> StepHandle:
        self.t0 = self.rec.now()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.rec._emit_step(self, self.rec.now())


class SpanHandle(_Timed):
    __slots__ = ("category", "overlapped", "step")

    def __init__(self, rec: Recorder, category: str, overlapped: bool, step: int | None) -> None:
        super().__init__(rec)
        self.category = category
        self.overlapped = overlapped
        self.step = step

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.rec._emit_span(self, self.rec.now())


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
    ) -> None:
        self.sink = sink
        self.errors = 0
        self.closed = False
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

    def now(self) -> float:
        return self._wall0 + (time.perf_counter() - self._mono0)

    def step(self, step: int, tokens: int = 0) -> StepHandle:
        """Context manager around one optimizer step; set `.loss` (a tensor is fine)."""
        return StepHandle(self, step, tokens)

    def span(
        self, category: str, *, overlapped: bool = False, step: int | None = None
    ) -> SpanHandle:
        """Context manager around time lost to `category` (see records.BADPUT_CATEGORIES)."""
        return SpanHandle(self, category, overlapped, step)

    def close(
        self, status: str = "completed", cause: str | None = None, flush_timeout_s: float = 10.0
    ) -> Any:
        """End the attempt and close the sink; returns the sink's stats. Idempotent."""
        if self.closed:
            return None
        self.closed = True
        self._safe_emit(
            "attempt_end",
            {
                **self._key,
                "end": self.now(),
                "status": status,
                "cause": cause,
                "hook_errors": self.errors,
            },
        )
        try:
            return self.sink.close(timeout_s=flush_timeout_s)
        except Exception:
            self.errors += 1
            log.warning("goodput sink failed to close", exc_info=True)
            return None

    def _emit_step(self, h: StepHandle, end: float) -> None:
        self._safe_emit(
            "step",
            {
                **self._key,
                "step": h.step,
                "start": h.t0,
                "end": end,
                "tokens": h.tokens,
                "loss": h.loss,
            },
        )

    def _emit_span(self, h: SpanHandle, end: float) -> None:
        self._safe_emit(
            "span",
            {
                **self._key,
                "category": h.category,
                "start": h.t0,
                "end": end,
                "overlapped": h.overlapped,
                "step": h.step,
            },
        )

    def _safe_emit(self, kind: str, fields: dict[str, Any]) -> None:
        try:
            self.sink.emit(kind, fields)
        except Exception:
            self.errors += 1
