"""Device facts per step without synchronizing the device, and without a CUDA call on most
steps.

Every CUDA call costs the training thread tens of microseconds on a busy host, the first one
after a step most (on a lent H100, 68-83 us for an event record or a one-element copy right
after a step of 12 E layers, 5-10 us in a tight loop: `bench/hooks_step_ops.py`). So the
hooks touch the device on *device steps* only: the first step, one in `every`
(`DEVICE_EVERY`, 10), each step that ends a routing window (the parts ask for it), and at
least one a second (`MAX_DEFER_S`). The steps between are *quiet*: their loss is held on
the device, as the tensor the loop returned, and nothing else is asked of the device or of
torch but the tensor's address (not even a `detach()`: with the `data_ptr()` it still makes,
17 us right after such a step, 1 us in a tight loop). What such a tensor keeps alive is
small, until the next device step releases it: after `backward()` its autograd graph holds no
saved activations (a loss handed over without a backward keeps them that long).

A device step:
- is bracketed by two CUDA events (its `device_time_s`; quiet steps have none);
- closes the loss window: the held losses are stacked (one kernel) and copied into pinned host
  memory (one copy, `non_blocking`), then the step's end event is recorded after the copies
  (and after the routing counters' copy, `snapshot`), so that event says when they landed;
- reads the allocator's peaks since the previous device step (then resets them), so the
  largest read is the run's peak.

The sink's thread reads a window's values once its event is done (`LossWindow.query`,
`settle`): no `.item()`, no `synchronize()`, ever, on the training thread. The step records of
a window wait in the sink's queue until then, at most `every` steps or about a second; the
window is also closed at a checkpoint's commit, at a failed step and at close.

Holding the loop's own loss tensor is safe while the loop makes a new one each step (eager,
torch.compile). A loop that writes one tensor again (CUDA graphs, whose outputs are static; an
accumulator zeroed each step) would overwrite a held value. The first `every` losses are
therefore copied (one small kernel a step) while their addresses are watched; a loop whose
losses share an address keeps copying for the rest of the run. A loop that starts reusing one
later is caught at the second step that reuses it: the one value already overwritten is
reported as missing (`loss` absent, the attempt's `losses_unread` counter, a warning), the
other held losses are copied at once, and from then on every loss is copied. A held output
that CUDA graph trees invalidated raises when read: counted the same way, never read wrong.

Pinned buffers come from PyTorch's caching host allocator, which reuses a block only after its
copy completed. Off CUDA the tensors are handed over as they are.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

log = logging.getLogger("trainer_hooks.device")

READY = "_ready"  # what says the record's copies landed: a LossWindow (CUDA) or an event
START = "_start_event"  # a device step's start and end events, for its device time
END = "_end_event"
POOL = "_event_pool"  # where settle returns the two events for reuse
LOSS_AT = "_loss_at"  # the step's index in its LossWindow (READY)
DEVICE_EVERY = 10  # steps per device step (the recorder's `device_every`)
MAX_DEFER_S = 1.0  # and at least one device step a second: records never wait longer

# how a window holds its losses: copies while the first `every` losses' addresses are watched,
# then the loop's own tensors, or copies for good once the loop was seen writing one again
PROBE, REFERENCE, COPY = "probe", "reference", "copy"


class LossWindow:
    """The losses of consecutive steps, held on the device until one copy reads them all.

    Filled on the training thread (`DeviceProbe.hold_loss`), closed by `DeviceProbe.flush`
    (the copy, then the event recorded after it), read on the sink's thread (`value`) once
    `query()` says the copy landed."""

    __slots__ = (
        "held",
        "addresses",
        "event",
        "_landed",
        "_host",
        "_kept",
        "_singles",
        "_values",
    )

    def __init__(self) -> None:
        self.held: list[Any] = []  # per step: a device tensor, or None for a value lost
        self.addresses: dict[int, int] = {}  # data_ptr -> the latest index held there
        self.event: Any = None  # recorded after the copy: set once the window is closed
        self._landed = False  # the event was seen done: its records ask no CUDA query more
        self._host: Any = None  # the stacked copy in pinned memory, and the indices it holds
        self._kept: list[int] = []
        self._singles: dict[int, Any] = {}  # index -> a host copy made alone (the slow path)
        self._values: list[Any] | None = None

    def query(self) -> bool:
        if not self._landed:
            ev = self.event
            self._landed = ev is not None and bool(ev.query())
        return self._landed

    def value(self, index: int) -> Any:
        """A step's loss (sink thread, after `query`): a float, a host tensor the sink reads,
        or None for a value lost."""
        if self._values is None:
            values: list[Any] = [None] * len(self.held)
            if self._host is not None:
                for i, v in zip(self._kept, self._host.tolist(), strict=True):
                    values[i] = v
            for i, host in self._singles.items():
                values[i] = host
            self._values = values
        return self._values[index]


class DeviceProbe:
    def __init__(self, device: Any, every: int = DEVICE_EVERY) -> None:
        import torch  # here, not at module level: the sink imports this module without torch

        if every < 1:
            raise ValueError(f"device_every must be >= 1, got {every}")
        self.torch = torch
        dev = torch.device(device) if device is not None else None
        self.cuda = bool(dev is not None and dev.type == "cuda" and torch.cuda.is_available())
        self.every = every
        self.pin = self.cuda  # host copies in pinned memory (tests on CPU turn it off)
        self.since = 0  # steps ended since the last device step
        self.flush_by = 0.0  # perf_counter time from which the next step is a device step
        self.mode = PROBE
        self.losses_unread = 0
        self._window = LossWindow()
        self._probe_left = every  # losses watched (and copied) before any is held as given
        self._probe_refs: list[Any] = []  # those losses as the loop gave them, and where
        self._probe_addresses: set[int] = set()
        self._events: deque[Any] = deque()  # settled events, to record again
        self._fresh = True  # the first step resets the peaks (set-up is not a step)
        self._streams: dict[Any, Any] = {}  # (stream id, device, type) -> its Stream
        self._fast = _fast_record(torch) if self.cuda else None

    def is_device_tensor(self, value: Any) -> bool:
        return isinstance(value, self.torch.Tensor) and value.is_cuda

    def begin(self) -> Any:
        """At a device step's start: its start event."""
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
        """A device tensor becomes a host copy in flight (pinned on CUDA); anything else
        passes."""
        if not self.is_device_tensor(value):
            return value
        src = value.detach()
        host = self.torch.empty(src.shape, dtype=src.dtype, pin_memory=self.pin)
        host.copy_(src, non_blocking=True)
        return host

    def snapshot(self, counters: Any, live: bool) -> Any:
        """A host copy of `counters` as they are now in stream order: on CUDA one pinned copy
        in flight (read it once the step's window is done), on CPU a clone where `counters`
        is `live` (the next forward adds to it), else `counters` itself."""
        if not self.cuda:
            return counters.clone() if live else counters
        host = self.torch.empty(counters.shape, dtype=counters.dtype, pin_memory=self.pin)
        host.copy_(counters.detach(), non_blocking=True)
        return host

    def hold_loss(self, loss: Any, fields: dict[str, Any]) -> None:
        """A step's loss into its record (CUDA): a device tensor is held in the open window
        (no CUDA call, after the first window) and read at the next device step; anything
        else is handed over as it is."""
        self.since += 1
        w = self._window
        fields[READY] = w
        if not self.is_device_tensor(loss):
            fields["loss"] = loss
            return
        index = len(w.held)
        fields[LOSS_AT] = index
        if self.mode == COPY:
            w.held.append(loss.detach().clone())
            return
        address = loss.data_ptr()
        if self.mode == PROBE:  # a copy, and the loop's tensor kept to hold its address:
            if address in self._probe_addresses:  # while kept, a repeat means a reused one
                self._written_again(w, -1)
            else:
                self._probe_addresses.add(address)
                self._probe_refs.append(loss.detach())
                self._probe_left -= 1
            w.held.append(loss.detach().clone())
            return
        earlier = w.addresses.get(address)
        if earlier is not None:
            self._written_again(w, earlier)
            w.held.append(loss.detach().clone())
            return
        w.addresses[address] = index
        w.held.append(loss)  # as given: no torch call here (see the module's docstring)

    def _written_again(self, w: LossWindow, earlier: int) -> None:
        """The loop handed over a tensor it had handed over at index `earlier` of this
        window: it reuses its loss tensor. From now on each loss is copied; the others held
        by reference are copied now, before the loop writes them again."""
        if self.mode == REFERENCE:
            w.held[earlier] = None  # overwritten in stream order before it was read
            self.losses_unread += 1
            log.warning(
                "goodput: the training loop wrote its loss tensor again before the hooks "
                "read it (CUDA graphs or a reused buffer); one step's loss is missing, and "
                "from now on each loss is copied (one small kernel a step)"
            )
            w.held = [t if t is None else t.detach().clone() for t in w.held]
        self.mode = COPY
        w.addresses.clear()
        self._end_probe()

    def _end_probe(self) -> None:
        self._probe_refs.clear()
        self._probe_addresses.clear()

    def flush(self, start: Any, fields: dict[str, Any]) -> None:
        """At a device step's end, after the routing counters' copy and `hold_loss`: close
        the loss window (the record's READY), and add to the record its events (when it has
        a start event: its device time) and the allocator's peaks since the previous read."""
        window = self.close_window()
        fields[READY] = window
        if start is None:
            return
        fields[START] = start
        fields[END] = window.event
        fields[POOL] = self._events
        allocated, reserved, retries = self._memory()
        self.torch.cuda.reset_peak_memory_stats()
        fields["mem_allocated_peak"] = allocated
        fields["mem_reserved_peak"] = reserved
        fields["alloc_retries"] = retries

    def close_window(self) -> Any:
        """Copy the open window's losses to the host (one stack, one copy), record the event
        that says they (and every copy enqueued before) landed, open a new window; returns
        the closed window. At device steps, and where records must not wait (a checkpoint's
        commit, a failed step, close)."""
        w = self._window
        self._window = LossWindow()
        self.since = 0
        self.flush_by = time.perf_counter() + MAX_DEFER_S
        if w.held:
            self._copy_out(w)
        if self.mode == PROBE and self._probe_left <= 0:  # `every` losses, each a new tensor
            self.mode = REFERENCE
            self._end_probe()
        ev = self._event()
        self._record(ev)
        w.event = ev
        return w

    def _copy_out(self, w: LossWindow) -> None:
        torch = self.torch
        kept = [i for i, t in enumerate(w.held) if t is not None]
        try:
            with torch.no_grad():  # the loop's own tensors, held with their autograd graph
                flat = torch.stack([w.held[i] for i in kept])
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=self.pin)
            host.copy_(flat, non_blocking=True)
            w._host, w._kept = host, kept
        except Exception:  # shapes that do not stack, or a tensor that can no longer be read
            for i in kept:
                try:
                    w._singles[i] = self.to_host(w.held[i])
                except Exception:  # e.g. an output CUDA graph trees invalidated: lost, said
                    self.losses_unread += 1
                    log.warning("goodput: a held loss could not be read", exc_info=True)
        w.held = [None] * len(w.held)  # the loop's tensors are free again; only the count stays

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
    """Once ready (only called after `is_ready`): a device step's events become its
    `device_time_s` and go back to their probe's pool; a held loss becomes its value."""
    ready = fields.pop(READY, None)
    start = fields.pop(START, None)
    end = fields.pop(END, None)
    pool = fields.pop(POOL, None)
    if end is not None and start is not None:
        fields["device_time_s"] = start.elapsed_time(end) / 1000.0
        if pool is not None:
            pool.append(start)
            pool.append(end)
    at = fields.pop(LOSS_AT, None)
    if at is not None:
        fields["loss"] = ready.value(at)
    return fields
