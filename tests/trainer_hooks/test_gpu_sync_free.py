"""On a CUDA device: the bundled loop with every hook on never synchronizes the device.

`torch.cuda.set_sync_debug_mode("error")` turns any synchronizing call (an `.item()`, a
blocking copy, a `synchronize()`) on any thread into an exception; the hooks' own errors are
counted, so the test also checks that the recorder counted none and that the step records
carry device times, losses and routing (every `ROUTING_EVERY` steps) read through pinned
copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
STEPS = 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fifty_steps_with_hooks_never_sync_the_device(tmp_path: Path) -> None:
    from moe_core.config import ModelConfig
    from moe_core.loop import TrainConfig, setup, train
    from trainer_hooks import Recorder, SpoolSink
    from trainer_hooks.device import DEVICE_EVERY
    from trainer_hooks.recorder import ROUTING_EVERY
    from trainer_hooks.spool import Spool

    model_cfg = ModelConfig(
        pattern="AEAE",
        d_model=256,
        n_heads=4,
        seq_len=256,
        num_experts=8,
        top_k=2,
        capacity_factor=1.25,
    )
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=8,
        device="cuda",
        dispatch="padded",
        eval_every=0,
        corpus_bytes=500_000,
    )
    st = setup(model_cfg, cfg, "sync-free", None, None)
    rec = Recorder(
        run_name="sync-free",
        sink=SpoolSink(tmp_path, None),
        device="cuda",
        environment={},
        heartbeat_s=0.5,
    )
    rec.watch(st.raw_model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = train(model_cfg, cfg, st, rec)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = rec.close(flush_timeout_s=30)
    assert result.steps == STEPS
    assert rec.errors == 0 and stats.errors == 0 and stats.records_dropped == 0
    records = [
        json.loads(p) for seg in Spool(tmp_path).segments() for p in seg.read(0, 100_000).payloads
    ]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == STEPS
    assert all("loss" in r for r in steps)
    # device steps: the first, each routing read's, and at most DEVICE_EVERY apart (closer
    # only if a second passed): their device time and the allocator's peaks since the last
    timed = [r["step"] for r in steps if "device_time_s" in r]
    reads = sorted({r["step"] for r in records if r["kind"] == "routing"})
    assert timed[0] == 0 and set(reads) <= set(timed) and len(timed) < STEPS // 2
    assert all(b - a <= DEVICE_EVERY for a, b in zip(timed, timed[1:], strict=False))
    assert all(r["device_time_s"] > 0 for r in steps if "device_time_s" in r)
    read = [r["step"] for r in steps if r.get("mem_allocated_peak", 0) > 0]
    assert read == timed
    # the loss read in one copy per window is the loss the step returned
    assert steps[-1]["loss"] == pytest.approx(float(result.final_loss), rel=1e-6)
    # routing every ROUTING_EVERY steps: each record the sums over its window
    every = ROUTING_EVERY
    routing = [r for r in records if r["kind"] == "routing"]
    assert len(routing) == 2 * STEPS // every
    assert all(r["num_steps"] == every and r["num_tokens"] == every * 8 * 256 for r in routing)
    assert sorted({r["step"] for r in routing}) == list(range(every - 1, STEPS, every))


def _graph_step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
    """A captured step whose loss is a static output: each replay writes the same tensor.
    Its inputs are returned too: the graph reads their memory, which must stay theirs."""
    x = torch.zeros(64, device="cuda")
    w = torch.linspace(0.0, 1.0, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (x * w).sum()  # warm-up on a side stream, as capture asks
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = (x * w).sum()
    return x, w, loss, graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("eager_steps", [0, 15])
def test_a_cuda_graph_loop_gets_its_losses_read_right(tmp_path: Path, eager_steps: int) -> None:
    """A loop replaying a CUDA graph hands over one static loss tensor each step. From the
    start: the first window sees the repeat, and every loss is copied, none lost. After 15
    eager steps (the losses held by reference by then): the one value the second replay
    overwrote is missing and counted, every other one is right."""
    from trainer_hooks import Recorder, SpoolSink
    from trainer_hooks.spool import Spool

    x, w, static_loss, graph = _graph_step()
    w_sum = float(torch.linspace(0.0, 1.0, 64).sum())
    rec = Recorder(
        run_name="graph",
        sink=SpoolSink(tmp_path, None),
        device="cuda",
        environment={},
        heartbeat_s=0,
    )
    expected = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(40):
            with rec.step(step) as h:
                x.fill_(float(step + 1))
                if step < eager_steps:
                    h.loss = (x * w).sum()
                else:
                    graph.replay()
                    h.loss = static_loss
            expected[step] = (step + 1) * w_sum
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = rec.close(flush_timeout_s=30)
    assert rec.errors == 0 and stats.records_dropped == 0
    records = [
        json.loads(p) for seg in Spool(tmp_path).segments() for p in seg.read(0, 100_000).payloads
    ]
    got = {r["step"]: r.get("loss") for r in records if r["kind"] == "step"}
    unread = [r for r in records if r["kind"] == "attempt_end"][0]["counters"]["losses_unread"]
    if eager_steps:
        assert got.pop(eager_steps) is None and unread == 1
        del expected[eager_steps]
    else:
        assert unread == 0
    assert got == pytest.approx(expected, rel=1e-5)
