"""What the recorder's parts (``trainer_hooks.parts``) see of the recorder: a narrow emitter.

The parts import this module, never ``trainer_hooks.recorder``: the recorder builds its parts
and hands itself over as an ``Emitter`` (it satisfies the protocol structurally), so the
imports run one way, ``emitter <- parts <- recorder``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol


class Emitter(Protocol):
    """The attempt's key, a clock, receipts, spans, keyed records and the attempt's counters."""

    run_id: str
    attempt: int
    rank: int
    counters: dict[str, int]  # reported in attempt_end; the parts add to it (``ooms``)

    def now(self) -> float:
        """Wall time in seconds, monotonic within the attempt."""
        ...

    def observe(
        self,
        seam: str,
        observed: str,
        *,
        requested: str | None = None,
        reason: str | None = None,
        step: int | None = None,
    ) -> None:
        """Record what ran at a seam (a receipt)."""
        ...

    def emit_span(
        self,
        category: str,
        start: float,
        end: float,
        overlapped: bool = False,
        step: int | None = None,
    ) -> None:
        """Record a badput span of ``category``."""
        ...

    def emit_keyed(self, kind: str, fields: dict[str, Any]) -> None:
        """Add the attempt's key to ``fields`` (in place, after them) and emit the record; a
        failing sink counts a hook error rather than raising."""
        ...


class StepState(Protocol):
    """The step handle as the parts use it: the step, its FLOPs key and loss, and two slots
    that belong to the parts (the device start event and the SDPA probe)."""

    step: int
    flops_key: Any
    loss: Any
    _start_event: Any
    _probe: AbstractContextManager[None] | None
