"""Device facts per step without synchronizing the device.

On CUDA a step is bracketed by two events; tensors the record needs (loss, routing counters)
are copied into pinned host memory with `non_blocking=True` before the end event, so the sink
thread can read them, and the events' elapsed time, once `end.query()` says the step is done:
no `.item()`, no `synchronize()`, ever, on the training thread. Pinned buffers come from
PyTorch's caching host allocator, which reuses a block only after its copy completed.
Off CUDA the tensors are handed over as they are.

What each step costs the training thread is kept small (every CUDA call also gives the GIL
away, and the sink thread may hold it when the call returns): the two events come from a
pool that the sink thread refills once it has read them (`settle`); so do the loss's pinned
one-element buffers, so that the loss costs one copy a step (`loss_to_host`); the routing
counters, read every few steps, are one pinned copy (`snapshot`); and the allocator's
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
LOSS_POOL = "_loss_pool"  # where settle returns the loss's pinned buffer, once read
MEMORY_EVERY = 8  # steps between reads of the allocator's statistics


class DeviceProbe:
    def __init__(self, device: Any) -> None:
        import torch  # here, not at module level: the sink imports this module without torch

        self.torch = torch
        dev = torch.device(device) if device is not None else None
        self.cuda = bool(dev is not None and dev.type == "cuda" and torch.cuda.is_available())
        self._events: deque[Any] = deque()  # settled events, to record again
        self._losses: deque[Any] = deque()  # read pinned loss buffers, to copy into again
        self._memory_left = 1  # steps until the next memory read: the first step reads
        self._fresh = True  # the first step resets the peaks (set-up is not a step)
        self._streams: dict[Any, Any] = {}  # (stream id, device, type) -> its Stream
        self._fast = _fast_record(torch) if self.cuda else None

    def begin(self) -> Any:
        """At step start: the start event (CUDA) or None."""
        if not self.cuda:
            return None
        if self._fresh:
            self._fresh = False
            self.torch.cuda.reset_peak_memory_stats()
        ev = self._event()
        self._record(ev)
        return ev

    def _record(self, ev: Any) -> None:
        """`ev.record()` on the current stream, without what `torch.cuda.current_stream()`
        does in Python each call (lazy-init check, device index parsing, a new `Stream`
        object): the current stream's id is asked of the C API every time (a `with
        torch.cuda.stream(s)` is honoured), and the `Stream` for that id is built once."""
        fast = self._fast
        if fast is None:
            ev.record()
            return
        get_device, get_stream, raw_record = fast
        try:
            key = get_stream(get_device())
            stream = self._streams.get(key)
            if stream is None:
                stream = self.torch.cuda.Stream(
                    stream_id=key[0], device_index=key[1], device_type=key[2]
                )
                self._streams[key] = stream
            raw_record(ev, stream)
        except Exception:  # private entry points that differ in this torch: the public call
            self._fast = None
            ev.record()

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

    def loss_to_host(self, loss: Any, fields: dict[str, Any]) -> None:
        """The step's loss into `fields`: on CUDA a 0-dim device tensor is copied (in flight)
        into a pinned buffer from the pool, which `settle` reads and gives back; anything
        else as `to_host` hands it over."""
        torch = self.torch
        if not self.cuda or not isinstance(loss, torch.Tensor) or loss.dim() or not loss.is_cuda:
            fields["loss"] = self.to_host(loss)
            return
        try:
            host = self._losses.pop()
        except IndexError:
            host = None
        if host is None or host.dtype != loss.dtype:
            host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach() if loss.requires_grad else loss, non_blocking=True)
        fields["loss"] = host
        fields[LOSS_POOL] = self._losses

    def snapshot(self, counters: Any, live: bool) -> Any:
        """A host copy of `counters` as they are now in stream order: on CUDA one pinned copy
        in flight (read it once the step's end event is done), on CPU a clone where
        `counters` is `live` (the next forward adds to it), else `counters` itself."""
        if not self.cuda:
            return counters.clone() if live else counters
        host = self.torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
        host.copy_(counters.detach(), non_blocking=True)
        return host

    def mark(self, fields: dict[str, Any]) -> None:
        """A record that is no step (routing read at close): an event that says when the
        copies enqueued so far landed (CUDA), and no device time."""
        if self.cuda:
            ev = self._event()
            self._record(ev)
            fields[READY] = ev

    def end(self, start: Any, fields: dict[str, Any]) -> None:
        """At step end: add the events, and every MEMORY_EVERY steps the memory peaks since
        the previous read, to a record's fields."""
        if not self.cuda:
            return
        ev = self._event()
        self._record(ev)
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


def _fast_record(torch: Any) -> tuple[Any, Any, Any] | None:
    """The C entry points behind `torch.cuda.Event.record()`, or None where this torch
    lacks one of them (then `record()` itself is called)."""
    C = getattr(torch, "_C", None)
    base = getattr(C, "_CudaEventBase", None)
    found = (
        getattr(C, "_cuda_getDevice", None),
        getattr(C, "_cuda_getCurrentStream", None),
        getattr(base, "record", None),
    )
    return found if all(callable(f) for f in found) else None


def is_ready(fields: dict[str, Any]) -> bool:
    ev = fields.get(READY)
    return ev is None or bool(ev.query())


def settle(fields: dict[str, Any]) -> dict[str, Any]:
    """Once ready: turn the events into `device_time_s` (only called after `is_ready`), read
    the loss's pinned buffer, and give both back to their probe's pools."""
    end = fields.pop(READY, None)
    start = fields.pop(START, None)
    pool = fields.pop(POOL, None)
    if end is not None and start is not None:
        fields["device_time_s"] = start.elapsed_time(end) / 1000.0
        if pool is not None:
            pool.append(start)
            pool.append(end)
    losses = fields.pop(LOSS_POOL, None)
    if losses is not None:  # the loss's pinned buffer: read it, then it may be reused
        host = fields["loss"]
        fields["loss"] = host.item()
        losses.append(host)
    return fields
