"""Device facts per step without synchronizing the device.

On CUDA a step is bracketed by two events; tensors the record needs (loss, routing counters)
are copied into pinned host memory with `non_blocking=True` before the end event, so the sink
thread can read them, and the events' elapsed time, once `end.query()` says the step is done:
no `.item()`, no `synchronize()`, ever, on the training thread. Pinned buffers come from
PyTorch's caching host allocator, which reuses a block only after its copy completed.
Off CUDA the tensors are handed over as they are.

What each step costs the training thread is kept small (every CUDA call also gives the GIL
away, and the sink thread may hold it when the call returns): the two events come from a
pool that the sink thread refills once it has read them (`settle`); the loss and the routing
counters travel in one concatenation and one pinned copy (`gather`); and the allocator's
statistics, whose read alone costs more than the rest of a step's hooks, are read every
`MEMORY_EVERY` steps: the peaks then cover every step since the previous read (the peak
counters are reset after each read), so the largest of them is the run's peak.
"""

from __future__ import annotations

from collections import deque
from typing import Any

READY = "_ready"
START = "_start_event"
POOL = "_event_pool"  # where settle returns the two events for reuse
MEMORY_EVERY = 8  # steps between reads of the allocator's statistics


class DeviceProbe:
    def __init__(self, device: Any) -> None:
        import torch  # here, not at module level: the sink imports this module without torch

        self.torch = torch
        dev = torch.device(device) if device is not None else None
        self.cuda = bool(dev is not None and dev.type == "cuda" and torch.cuda.is_available())
        self._events: deque[Any] = deque()  # settled events, to record again
        self._memory_left = 1  # steps until the next memory read: the first step reads
        self._fresh = True  # the first step resets the peaks (set-up is not a step)

    def begin(self) -> Any:
        """At step start: the start event (CUDA) or None."""
        if not self.cuda:
            return None
        if self._fresh:
            self._fresh = False
            self.torch.cuda.reset_peak_memory_stats()
        ev = self._event()
        ev.record()
        return ev

    def _event(self) -> Any:
        try:
            return self._events.pop()
        except IndexError:
            return self.torch.cuda.Event(enable_timing=True)

    def to_host(self, value: Any) -> Any:
        """A device tensor becomes a pinned host copy in flight; anything else passes."""
        if not self.cuda or not isinstance(value, self.torch.Tensor) or not value.is_cuda:
            return value
        src = value.detach()
        host = self.torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        return host

    def riding_loss(self, loss: Any, like: Any) -> Any:
        """The loss as a 1-element tensor of `like`'s dtype and device, to ride in `gather`
        with it, or None when it cannot (not a one-element tensor on that device). Same
        dtypes matter: CUDA's `cat` of mixed dtypes copies input by input (measured 125 us
        of host time for 13 inputs on an H100 host, against one launch)."""
        torch = self.torch
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.device != like.device:
            return None
        return loss.detach().reshape(1).to(like.dtype)

    def gather(self, tensors: list[Any]) -> Any:
        """One host tensor holding the 1-D `tensors` end to end (dtypes promoted): one
        concatenation, and on CUDA one pinned copy in flight (read it once the step's end
        event is done)."""
        torch = self.torch
        flat = torch.cat(tensors)
        if not self.cuda:
            return flat
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        return host

    def end(self, start: Any, fields: dict[str, Any]) -> None:
        """At step end: add the events, and every MEMORY_EVERY steps the memory peaks since
        the previous read, to a record's fields."""
        if not self.cuda:
            return
        ev = self._event()
        ev.record()
        fields[START] = start
        fields[READY] = ev
        fields[POOL] = self._events
        self._memory_left -= 1
        if self._memory_left > 0:
            return
        self._memory_left = MEMORY_EVERY
        allocated, reserved, retries = self._memory()
        self.torch.cuda.reset_peak_memory_stats()
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
    """Once ready: turn the events into `device_time_s` (only called after `is_ready`), and
    give them back to their probe's pool."""
    end = fields.pop(READY, None)
    start = fields.pop(START, None)
    pool = fields.pop(POOL, None)
    if end is not None and start is not None:
        fields["device_time_s"] = start.elapsed_time(end) / 1000.0
        if pool is not None:
            pool.append(start)
            pool.append(end)
    return fields
