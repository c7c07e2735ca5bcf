"""Host cost of each CUDA operation the hooks make per step, timed alone with an empty launch
queue (a synchronize before each timed batch), median of batches of 50 calls, in microseconds.
It says which of the recorder's per-step operations dominate its host time on a GPU: the
ones it made per E layer before (a counters clone and a pinned copy each), and the ones it
makes per step now (one concatenation of every layer's counters with the loss in front, one
pinned copy, events from a pool).

    python bench/hooks_host_ops.py            # needs CUDA
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def per_call_us(fn: Callable[[], object], calls: int = 50, batches: int = 20) -> float:
    out = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(out)


def main() -> None:
    dev = torch.device("cuda")
    counters = torch.zeros(2 * 17 + 4, dtype=torch.float64, device=dev)
    layers = [torch.zeros(2 * 128 + 4, dtype=torch.float64, device=dev) for _ in range(12)]
    loss = torch.ones((), device=dev)
    pooled = torch.cuda.Event(enable_timing=True)
    raw = getattr(torch._C, "_cuda_memoryStats", None)

    def pinned_copy() -> None:
        host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
        host.copy_(counters, non_blocking=True)

    def pinned_of(flat: torch.Tensor) -> None:
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)

    ops: dict[str, Callable[[], object]] = {
        "event create+record": lambda: torch.cuda.Event(enable_timing=True).record(),
        "reset_peak_memory_stats": torch.cuda.reset_peak_memory_stats,
        "max_memory_allocated (public)": torch.cuda.max_memory_allocated,
        "_cuda_memoryStats (nested)": lambda: raw(0) if raw else None,
        "counters clone": counters.clone,
        "pinned empty+copy (38 fp64)": pinned_copy,
        "loss pinned empty+copy": lambda: torch.empty((), pin_memory=True).copy_(
            loss, non_blocking=True
        ),
        "event query": torch.cuda.Event().query,
        "event record (pooled)": pooled.record,
        "cat fp32 loss + 12 x 260 fp64": lambda: torch.cat([loss.reshape(1), *layers]),
        "loss to fp64 + cat (same dtype)": lambda: torch.cat([loss.reshape(1).double(), *layers]),
        "cat 12 x 260 fp64": lambda: torch.cat(layers),
        "fp64 cat + pinned empty+copy": lambda: pinned_of(
            torch.cat([loss.reshape(1).double(), *layers])
        ),
    }
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, fn in ops.items():
        print(f"{name:32s} {per_call_us(fn):8.1f} us")


if __name__ == "__main__":
    main()
