"""The CUDA step path without a GPU (issue 16): a device probe whose events and allocator are
stand-ins, and whose "device" tensors are CPU tensors. A CPU tensor written in place shows the
new value at once, as a held CUDA tensor would to a copy enqueued after the write, so what the
loop overwrote before the hooks read it is as lost here as there.

What is checked, against values the test's loop keeps itself:
- the hooks touch the device on one step in `device_every`, on the first step, and once the
  time bound passed: only those steps carry events, device time and the allocator's peaks;
  every other step makes no call that stands for a CUDA call;
- every step's loss is read exactly, in one copy per window;
- the first window copies the losses while watching their addresses; a loop that hands over
  one tensor again there loses nothing and keeps copying;
- a loop that starts reusing its tensor later loses exactly the one value it overwrote
  (missing, counted in `losses_unread`), and every other value is right;
- a held loss that can no longer be read is counted the same way, never read wrong;
- a checkpoint's commit, a failed step and close read the window still open.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trainer_hooks import Recorder, SpoolSink
from trainer_hooks.device import (
    COPY,
    END,
    LOSS_AT,
    POOL,
    READY,
    REFERENCE,
    START,
    DeviceProbe,
    is_ready,
    settle,
)
from trainer_hooks.spool import Spool


class FakeEvent:
    made = 0
    recorded = 0

    def __init__(self, enable_timing: bool = False) -> None:
        FakeEvent.made += 1
        self.done = True

    def record(self) -> None:
        FakeEvent.recorded += 1

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, other: FakeEvent) -> float:
        return 2.0


class FakeTorch:
    """Real torch, except `cuda` and the allocator's statistics."""

    def __init__(self) -> None:
        self.resets = 0
        self.reads = 0
        self.peak = 0
        self.cuda = SimpleNamespace(
            Event=FakeEvent,
            reset_peak_memory_stats=self._reset,
            current_device=lambda: 0,
            Stream=None,
        )
        self._C = SimpleNamespace(_cuda_memoryStats=self._stats)

    def _reset(self) -> None:
        self.resets += 1

    def _stats(self, device: int) -> dict[str, Any]:
        self.reads += 1
        return {
            "allocated_bytes": {"all": {"peak": self.peak}},
            "reserved_bytes": {"all": {"peak": 2 * self.peak}},
            "num_alloc_retries": 0,
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def fake_cuda(probe: DeviceProbe) -> FakeTorch:
    """Turn a CPU probe into one that takes CPU tensors for device tensors."""
    fake = FakeTorch()
    probe.torch = fake  # type: ignore[assignment]
    probe.cuda = True
    probe.pin = False
    probe._fast = None
    probe.is_device_tensor = lambda v: isinstance(v, torch.Tensor)  # type: ignore[method-assign]
    return fake


def recorder(tmp_path: Path, **kw: Any) -> tuple[Recorder, FakeTorch]:
    rec = Recorder(
        run_name="window",
        sink=SpoolSink(tmp_path, None, flush_interval_s=0.01),
        environment={},
        heartbeat_s=0,
        **kw,
    )
    fake = fake_cuda(rec._parts.device)
    return rec, fake


def spooled(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        r
        for seg in Spool(directory).segments()
        for r in map(json.loads, seg.read(0, 100_000).payloads)
        if r["kind"] == kind
    ]


def fresh_loss(step: int) -> torch.Tensor:
    return torch.tensor(1.0 + step / 8, requires_grad=True) * 1.0  # a graph, as a loop's


def test_device_steps_every_n_and_each_loss_read_exactly(tmp_path: Path) -> None:
    FakeEvent.made = FakeEvent.recorded = 0
    rec, fake = recorder(tmp_path, device_every=4)
    probe = rec._parts.device
    recorded_per_step, expected = [], {}
    for step in range(13):
        before = FakeEvent.recorded
        fake.peak = 100 + step
        with rec.step(step, tokens=8) as s:
            s.loss = fresh_loss(step)
        expected[step] = float(s.loss)
        recorded_per_step.append(FakeEvent.recorded - before)
        if step == 4:
            assert probe.mode == REFERENCE  # four losses watched, none at a repeated address
    # the first step, then every 4th: start and end events; no other step records any
    assert recorded_per_step == [2, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]
    assert fake.reads == 4 and fake.resets == 1 + 4  # at the first step, then at each read
    stats = rec.close()
    assert rec.errors == 0 and stats.records_dropped == 0 and stats.records_rejected == 0
    steps = spooled(tmp_path, "step")
    assert [r["step"] for r in steps] == list(range(13))
    assert {r["step"]: r["loss"] for r in steps} == pytest.approx(expected, rel=1e-7)
    timed = [r["step"] for r in steps if "device_time_s" in r]
    assert timed == [0, 4, 8, 12] and all(r["device_time_s"] == 0.002 for r in steps[::4])
    peaks = {r["step"]: r["mem_allocated_peak"] for r in steps if "mem_allocated_peak" in r}
    assert peaks == {0: 100, 4: 104, 8: 108, 12: 112}
    end = spooled(tmp_path, "attempt_end")[0]
    assert end["counters"]["losses_unread"] == 0


def test_quiet_steps_hold_the_loops_tensor_without_a_copy(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, device_every=10)
    probe = rec._parts.device
    for step in range(11):  # the first ten losses are copied, their addresses watched
        with rec.step(step) as s:
            s.loss = fresh_loss(step)
    assert probe.mode == REFERENCE  # since the device step 10
    losses = [fresh_loss(11 + i) for i in range(3)]
    for i, loss in enumerate(losses):
        with rec.step(11 + i) as s:
            s.loss = loss
    held = probe._window.held
    assert all(a is b for a, b in zip(held, losses, strict=True))  # no copy, no detach
    rec.close()
    assert [r["loss"] for r in spooled(tmp_path, "step")[11:]] == pytest.approx(
        [float(t) for t in losses]
    )


def test_a_loop_reusing_its_loss_tensor_from_the_start_loses_nothing(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, device_every=4)
    static = torch.zeros(())  # a CUDA graph's static output, written by each replay
    expected = {}
    for step in range(11):
        static.fill_(0.5 + step)  # the "replay" writes the value in place
        expected[step] = 0.5 + step
        with rec.step(step) as s:
            s.loss = static
    assert rec._parts.device.mode == COPY
    stats = rec.close()
    assert rec.errors == 0 and stats.records_dropped == 0
    assert {r["step"]: r["loss"] for r in spooled(tmp_path, "step")} == expected
    assert spooled(tmp_path, "attempt_end")[0]["counters"]["losses_unread"] == 0


def test_a_loop_that_starts_reusing_later_loses_exactly_the_value_it_overwrote(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec, _ = recorder(tmp_path, device_every=5)
    a, b = torch.zeros(()), torch.zeros(())  # two static outputs, used in turn
    expected = {}
    for step in range(17):
        if step < 7:
            loss = fresh_loss(step)
        else:
            loss = a if step % 2 else b
            loss.fill_(100.0 + step)  # in stream order: before any later read
        expected[step] = float(loss)
        with rec.step(step) as s:
            s.loss = loss
    # steps 5-9 are one window held by reference: a at 7, b at 8, a again at 9 (the repeat)
    assert rec._parts.device.mode == COPY
    stats = rec.close()
    assert rec.errors == 0 and stats.records_dropped == 0
    got = {r["step"]: r.get("loss") for r in spooled(tmp_path, "step")}
    assert got.pop(7) is None  # its tensor was written again by step 9 before the read
    del expected[7]
    assert got == pytest.approx(expected)  # step 8 (b, held too) was copied in time
    assert spooled(tmp_path, "attempt_end")[0]["counters"]["losses_unread"] == 1
    assert "wrote its loss tensor again" in caplog.text


class Unreadable(torch.Tensor):
    """A held output that CUDA graph trees invalidated: any read raises."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.Tensor.detach, torch.Tensor.data_ptr, torch.Tensor.__float__):
            return super().__torch_function__(func, types, args, kwargs or {})
        if getattr(cls, "broken", False):
            raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_held_loss_that_cannot_be_read_is_counted_not_read_wrong(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, device_every=3)
    for step in range(3):
        with rec.step(step) as s:
            s.loss = fresh_loss(step)
    Unreadable.broken = False
    odd = torch.tensor(7.0).as_subclass(Unreadable)
    with rec.step(3) as s:
        s.loss = fresh_loss(3)
    with rec.step(4) as s:
        s.loss = odd
    Unreadable.broken = True  # invalidated before the window (steps 4, 5) is read at close
    with rec.step(5) as s:
        s.loss = fresh_loss(5)
    try:
        rec.close()
    finally:
        Unreadable.broken = False
    got = {r["step"]: r.get("loss") for r in spooled(tmp_path, "step")}
    assert got[4] is None
    assert [got[i] for i in (0, 1, 2, 3, 5)] == pytest.approx(
        [1.0 + i / 8 for i in (0, 1, 2, 3, 5)]
    )
    assert spooled(tmp_path, "attempt_end")[0]["counters"]["losses_unread"] == 1


def test_records_wait_at_most_the_time_bound(tmp_path: Path, monkeypatch: Any) -> None:
    from trainer_hooks import device as device_mod

    monkeypatch.setattr(device_mod, "MAX_DEFER_S", 0.05)
    rec, _ = recorder(tmp_path, device_every=1000)
    starts = []
    for step in range(4):
        with rec.step(step) as s:
            s.loss = fresh_loss(step)
            starts.append(s._start_event is not None)
        time.sleep(0.06 if step == 1 else 0)
    assert starts == [True, False, True, False]  # step 2 began past the bound
    rec.close()


def test_a_checkpoint_a_failed_step_and_close_read_the_open_window(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, device_every=100)
    probe = rec._parts.device
    for step in range(3):
        with rec.step(step) as s:
            s.loss = fresh_loss(step)
    window = probe._window
    assert window.event is None
    rec.checkpoint_committed(2)  # the sink's flush must not wait for step 100
    assert window.event is not None and probe._window is not window
    assert [r["step"] for r in spooled(tmp_path, "step")] == [0, 1, 2]
    with rec.step(3) as s:
        s.loss = fresh_loss(3)
    window = probe._window
    with pytest.raises(ValueError), rec.step(4):
        raise ValueError("the step failed")
    assert window.event is not None  # step 3's loss is read after the failure
    with rec.step(5) as s:
        s.loss = fresh_loss(5)
    rec.close()
    got = {r["step"]: r["loss"] for r in spooled(tmp_path, "step")}
    assert got == pytest.approx({i: 1.0 + i / 8 for i in (0, 1, 2, 3, 5)})


def test_settle_reads_a_window_once_its_event_is_done() -> None:
    probe = DeviceProbe("cpu", every=2)
    fake_cuda(probe)
    fields: list[dict[str, Any]] = [{}, {}]
    start = probe.begin()
    probe.hold_loss(torch.tensor(1.5), fields[0])
    probe.hold_loss(torch.tensor(2.5), fields[1])
    assert fields[0][READY] is fields[1][READY] and not is_ready(fields[0])  # not closed yet
    probe.flush(start, fields[1])
    window = fields[1][READY]
    window.event.done = False
    assert not is_ready(fields[0])
    window.event.done = True
    assert fields[1][END] is window.event and fields[1][POOL] is probe._events
    assert fields[0][LOSS_AT] == 0 and START not in fields[0]
    out = [settle(f) for f in fields]
    assert [o["loss"] for o in out] == [1.5, 2.5]
    assert "device_time_s" not in out[0] and out[1]["device_time_s"] == 0.002
    assert len(probe._events) == 2  # both events back in the pool


def test_device_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="device_every must be >= 1"):
        DeviceProbe("cpu", every=0)


def test_routing_reads_are_device_steps_and_quiet_steps_skip_the_parts(tmp_path: Path) -> None:
    """With routing read every 3 steps and device_every 10: the device steps are the first
    and each routing read's (the read's copy needs the window's event); the other steps'
    ends never reach the parts' step_exit, and every routing window sums its steps."""
    from moe_core.config import ModelConfig
    from moe_core.model import build_model

    cfg = ModelConfig(pattern="EAE", d_model=16, n_heads=2, seq_len=8, num_experts=5, top_k=2)
    model = build_model(cfg, seed=0).train()
    rec, _ = recorder(tmp_path, device_every=10, routing_every=3)
    rec.watch(model)
    parts = rec._parts
    exits = []
    step_exit = parts.step_exit

    def counted(h: Any, fields: dict[str, Any]) -> None:
        exits.append(h.step)
        step_exit(h, fields)

    parts.step_exit = counted  # type: ignore[method-assign]
    for step in range(10):
        x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
        with rec.step(step, tokens=x.numel()) as s:
            logits, aux = model(x)
            s.loss = logits.float().mean() + aux
    rec.close()
    steps = spooled(tmp_path, "step")
    assert [r["step"] for r in steps if "device_time_s" in r] == [0, 2, 5, 8]
    assert exits == [0, 2, 5, 8]  # besides the device steps' ends, none (no poll due yet)
    assert all(isinstance(r["loss"], float) for r in steps)
    routing = spooled(tmp_path, "routing")
    assert sorted({r["step"] for r in routing}) == [2, 5, 8, 9]  # 9: the window read at close
    assert sum(r["num_steps"] for r in routing if r["layer"] == 0) == 10
