"""A torch.profiler window over chosen steps, for when a receipt cannot explain a result.

The window's wall time is reported as a blocking `profiling` span (the steps inside it run
slower under the profiler, so they are not counted as goodput). The chrome trace stays on the
trainer's disk; its path and the top kernels by device time (CPU ops when there is no GPU) go
to the service in a `profile` record, so a receipt can show which kernels really ran.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from trainer_hooks.emitter import Emitter

TOP_KERNELS = 30


class ProfileWindow:
    def __init__(self, first_step: int, num_steps: int, trace_dir: str | None, cuda: bool) -> None:
        if first_step < 0 or num_steps < 1:
            raise ValueError(
                f"profile window needs first_step >= 0 and num_steps >= 1, got "
                f"{first_step}:{num_steps}"
            )
        self.first = first_step
        self.last = first_step + num_steps - 1
        self.trace_dir = trace_dir or tempfile.gettempdir()
        self.cuda = cuda
        self._prof: Any = None
        self._t0 = 0.0

    def maybe_start(self, step: int, clock: Callable[[], float]) -> float | None:
        """At the window's first step: start. Returns perf_counter at the span's start (the
        hooks' time after it is the span's, not their overhead), else None."""
        if step != self.first or self._prof is not None:
            return None
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        began = time.perf_counter()
        self._t0 = clock()
        self._prof = profile(activities=acts, record_shapes=False)
        self._prof.__enter__()
        return began

    def maybe_stop(self, step: int, rec: Emitter) -> float | None:
        """At the end of the window's last step: stop, export, summarise. Returns
        perf_counter at the span's end once done (the hooks' time before it is the span's),
        else None."""
        if self._prof is None or step < self.last:
            return None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)  # waits for the device: this is profiling time
        os.makedirs(self.trace_dir, exist_ok=True)
        path = os.path.join(
            self.trace_dir, f"trace-{rec.run_id}-a{rec.attempt}-r{rec.rank}-s{self.first}.json"
        )
        prof.export_chrome_trace(path)
        rec.emit_keyed(
            "profile",
            {
                "first_step": self.first,
                "num_steps": self.last - self.first + 1,
                "trace_path": path,
                "top_kernels": top_kernels(prof, self.cuda),
            },
        )
        end = rec.now()
        ended = time.perf_counter()
        rec.emit_span("profiling", self._t0, end, step=self.first)
        return ended

    def abandon(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None


def top_kernels(prof: Any, cuda: bool, n: int = TOP_KERNELS) -> list[dict[str, Any]]:
    """The n events with the most self device time (self CPU time without a GPU)."""
    rows = []
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        us = float(us or 0.0)
        if us > 0:
            rows.append({"name": e.key[:1000], "device_time_s": us / 1e6, "count": e.count})
    rows.sort(key=lambda r: -r["device_time_s"])
    return rows[:n]
