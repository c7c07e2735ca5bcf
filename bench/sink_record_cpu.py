"""CPU time the sink's thread spends per record it spools (settle, validate, serialise, frame,
write), which a host-bound training thread can wait for, as it holds the GIL.

    .venv/bin/python bench/sink_record_cpu.py

The step and span records of 3,000 steps are queued, then one pass of the sink's thread
spools them on this thread; its CPU time (`time.thread_time`) over the record count, five
times: once as it runs, and once with the `sleep(0)` it makes between records (to hand the
GIL to the training thread; a system call, costly on a VM) replaced by nothing, which leaves
the time it holds the GIL.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from types import SimpleNamespace

from trainer_hooks import sink as sink_module
from trainer_hooks.sink import SpoolSink

STEPS = 3000


def one_round(sleeps: bool) -> float:
    sink = SpoolSink(tempfile.mkdtemp(prefix="sink-cpu-"), None, flush_interval_s=3600)
    key = {"run_id": "a" * 32, "attempt": 0, "rank": 0}
    for i in range(STEPS):
        t = 1.79e9 + i
        sink.emit(
            "span",
            {
                **key,
                "category": "data_stall",
                "start": t,
                "end": t + 1e-3,
                "overlapped": False,
                "step": i,
            },
        )
        sink.emit(
            "step",
            {
                **key,
                "step": i,
                "start": t,
                "end": t + 1e-2,
                "tokens": 512,
                "hook_overhead_s": 2e-5,
                "loss": 2.5,
                "flops": 123456789,
            },
        )
    real = sink_module.time
    if not sleeps:
        sink_module.time = SimpleNamespace(  # type: ignore[assignment]
            sleep=lambda s: None, monotonic=time.monotonic
        )
    try:
        t0 = time.thread_time()
        sink._spool_queue()
        spent = time.thread_time() - t0
    finally:
        sink_module.time = real
    sink.close()
    return spent / (2 * STEPS)


def main() -> None:
    for sleeps in (True, False):
        rounds = [one_round(sleeps) * 1e6 for _ in range(5)]
        label = "as it runs" if sleeps else "without its sleep(0)s (GIL held)"
        print(
            f"sink CPU per record, {label}: {', '.join(f'{r:.1f}' for r in rounds)} us; "
            f"median {statistics.median(rounds):.1f} us"
        )


if __name__ == "__main__":
    main()
