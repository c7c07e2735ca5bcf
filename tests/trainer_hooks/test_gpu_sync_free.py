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
    from trainer_hooks.device import MEMORY_EVERY
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
    assert all(r["device_time_s"] > 0 and "loss" in r for r in steps)
    # the allocator's peaks every MEMORY_EVERY steps, each covering the steps since the last
    read = [r["step"] for r in steps if r.get("mem_allocated_peak", 0) > 0]
    assert read == list(range(0, STEPS, MEMORY_EVERY))
    # the loss copied through the pooled pinned buffers is the loss the step returned
    assert steps[-1]["loss"] == pytest.approx(float(result.final_loss), rel=1e-6)
    # routing every ROUTING_EVERY steps: each record the sums over its window
    every = ROUTING_EVERY
    routing = [r for r in records if r["kind"] == "routing"]
    assert len(routing) == 2 * STEPS // every
    assert all(r["num_steps"] == every and r["num_tokens"] == every * 8 * 256 for r in routing)
    assert sorted({r["step"] for r in routing}) == list(range(every - 1, STEPS, every))
