"""Compile time from torch.compile's own callbacks.

Dynamo runs start and end callbacks around every compilation (the first one of a frame and
each recompile; lazily compiled backward graphs too). Each pair becomes a blocking `compile`
span. A compile id "F/N" with N > 0 is a recompile of frame F; its reason is the newest guard
failure dynamo recorded for that frame. `torch._dynamo.reset()` clears every callback, so
`ensure_installed` (called at each step) puts ours back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

SpanSink = Callable[[float, float], None]
RecompileSink = Callable[[str, str], None]


def _handler() -> Any | None:
    try:
        from torch._dynamo.callback import callback_handler
    except Exception:  # torch without dynamo: nothing to watch
        return None
    return callback_handler


def _is_recompile(compile_id: str) -> bool:
    _, _, attempt = compile_id.partition("/")
    head = attempt.split("_")[0]
    return head.isdigit() and int(head) > 0


def _latest_guard_failure(compile_id: str) -> str:
    try:
        from torch._dynamo.utils import guard_failures
    except Exception:
        return "unknown"
    frame = compile_id.split("/")[0]
    found = [r for reasons in guard_failures.values() for r in reasons if r.startswith(frame)]
    return found[-1].split(": ", 1)[-1] if found else "unknown"


class CompileWatch:
    """Turns dynamo's compile callbacks into `compile` spans and recompile observations."""

    def __init__(
        self, clock: Callable[[], float], on_span: SpanSink, on_recompile: RecompileSink
    ) -> None:
        self._clock = clock
        self._on_span = on_span
        self._on_recompile = on_recompile
        self._lock = threading.Lock()
        self._open: dict[str, float] = {}
        self.compiles = 0
        self.recompiles = 0
        self.seconds = 0.0
        self._handler = _handler()
        self._start_cb = self._start  # one bound method each, so membership tests are exact
        self._end_cb = self._end

    def ensure_installed(self) -> None:
        """Cheap enough for every step: two list scans for objects held since __init__."""
        handler = self._handler
        if handler is None:
            return
        if self._start_cb not in handler.start_callbacks:
            handler.register_start_callback(self._start_cb)
        if self._end_cb not in handler.end_callbacks:
            handler.register_end_callback(self._end_cb)

    def installed(self) -> bool:
        """Whether the start callback is still registered (a list scan that finds ours first
        in the usual case): the per-step check; `ensure_installed` repairs."""
        handler = self._handler
        return handler is None or self._start_cb in handler.start_callbacks

    def uninstall(self) -> None:
        handler = self._handler
        if handler is None:
            return
        for lst, cb in (
            (handler.start_callbacks, self._start_cb),
            (handler.end_callbacks, self._end_cb),
        ):
            if cb in lst:
                lst.remove(cb)

    def _start(self, args: Any) -> None:
        with self._lock:
            self._open[str(getattr(args, "compile_id", ""))] = self._clock()

    def _end(self, args: Any) -> None:
        end = self._clock()
        cid = str(getattr(args, "compile_id", ""))
        with self._lock:
            start = self._open.pop(cid, None)
        if start is None:
            return
        self.compiles += 1
        self.seconds += end - start
        self._on_span(start, end)
        if _is_recompile(cid):
            self.recompiles += 1
            self._on_recompile(cid, _latest_guard_failure(cid))
