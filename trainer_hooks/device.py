"""Device facts per step without synchronizing the device.

On CUDA a step is bracketed by two events; tensors the record needs (loss, routing counters)
are copied into pinned host memory with `non_blocking=True` before the end event, so the sink
thread can read them, and the events' elapsed time, once `end.query()` says the step is done:
no `.item()`, no `synchronize()`, ever, on the training thread. Pinned buffers come from
PyTorch's caching host allocator, which reuses a block only after its copy completed.
Off CUDA the tensors are handed over as they are.
"""

from __future__ import annotations

from typing import Any

READY = "_ready"
START = "_start_event"


class DeviceProbe:
    def __init__(self, device: Any) -> None:
        import torch  # here, not at module level: the sink imports this module without torch

        self.torch = torch
        dev = torch.device(device) if device is not None else None
        self.cuda = bool(dev is not None and dev.type == "cuda" and torch.cuda.is_available())

    def begin(self) -> Any:
        """At step start: the start event (CUDA) or None; resets the peak-memory counters."""
        if not self.cuda:
            return None
        torch = self.torch
        torch.cuda.reset_peak_memory_stats()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def to_host(self, value: Any) -> Any:
        """A device tensor becomes a pinned host copy in flight; anything else passes."""
        if not self.cuda or not isinstance(value, self.torch.Tensor) or not value.is_cuda:
            return value
        src = value.detach()
        host = self.torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        return host

    def end(self, start: Any, fields: dict[str, Any]) -> None:
        """At step end: add the events and memory peaks to a record's fields."""
        if not self.cuda:
            return
        cuda = self.torch.cuda
        ev = cuda.Event(enable_timing=True)
        ev.record()
        fields[START] = start
        fields[READY] = ev
        allocated, reserved, retries = self._memory()
        fields["mem_allocated_peak"] = allocated
        fields["mem_reserved_peak"] = reserved
        fields["alloc_retries"] = retries

    def _memory(self) -> tuple[int, int, int]:
        """Peaks and allocator retries from one read of the allocator's stats. The public
        `max_memory_allocated()` flattens every statistic into a dict in Python, about half a
        millisecond a call; the nested form it starts from costs a fraction of that."""
        raw = getattr(self.torch._C, "_cuda_memoryStats", None)
        if raw is None:
            cuda = self.torch.cuda
            stats = cuda.memory_stats()
            return (
                stats.get("allocated_bytes.all.peak", 0),
                stats.get("reserved_bytes.all.peak", 0),
                stats.get("num_alloc_retries", 0),
            )
        nested = raw(self.torch.cuda.current_device())
        return (
            int(nested["allocated_bytes"]["all"]["peak"]),
            int(nested["reserved_bytes"]["all"]["peak"]),
            int(nested["num_alloc_retries"]),
        )

    def alloc_retries(self) -> int | None:
        return self._memory()[2] if self.cuda else None


def is_ready(fields: dict[str, Any]) -> bool:
    ev = fields.get(READY)
    return ev is None or bool(ev.query())


def settle(fields: dict[str, Any]) -> dict[str, Any]:
    """Once ready: turn the events into `device_time_s` (only called after `is_ready`)."""
    end = fields.pop(READY, None)
    start = fields.pop(START, None)
    if end is not None and start is not None:
        fields["device_time_s"] = start.elapsed_time(end) / 1000.0
    return fields
