"""Routing read as one batch per step (trainer_hooks.routing): the records a SpoolSink writes
from the batches equal, layer by layer, the differences of snapshots the test takes itself
around every step; a reset counter, a lost batch, the loss riding in front; and the device
probe's event pool and memory window, with a stand-in for torch.cuda."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.model import build_model
from moe_core.moe import unpack_counters
from trainer_hooks import Recorder, SpoolSink
from trainer_hooks.routing import ROUTING, RoutingCollector, expand_batch
from trainer_hooks.spool import Spool


def spooled(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        r
        for seg in Spool(directory).segments()
        for r in map(json.loads, seg.read(0, 100_000).payloads)
        if r["kind"] == kind
    ]


def test_batched_records_equal_the_snapshot_differences_of_every_window(tmp_path: Path) -> None:
    cfg = ModelConfig(
        pattern="EAE", d_model=16, n_heads=2, seq_len=8, num_experts=5, top_k=2, null_slot=True
    )
    model = build_model(cfg, seed=0).train()
    blocks = [m for m in model.modules() if hasattr(m, "routing_snapshot")]
    assert len(blocks) == 2
    rec = Recorder(
        run_name="batch", sink=SpoolSink(tmp_path, None), environment={}, routing_every=2
    )
    rec.watch(model)
    assert rec._parts.routing.batch and len(rec._parts.routing.batched_counters()) == 2
    expected = {}
    before = [b.routing_snapshot() for b in blocks]
    for step in range(6):
        x = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
        with rec.step(step, tokens=x.numel()) as s:
            logits, aux = model(x)
            s.loss = logits.float().mean() + aux
        if step % 2 == 1:  # the windows end at steps 1, 3, 5, two steps each
            now = [b.routing_snapshot() for b in blocks]
            for layer, (b, a) in enumerate(zip(before, now, strict=True)):
                d = unpack_counters(a - b, cfg.num_slots)
                expected[(step, layer)] = (
                    d["tokens_per_expert"].tolist(),
                    d["dropped_per_expert"].tolist(),
                    int(d["shared_only_tokens"]),
                    float(d["aux_loss"]),
                )
            before = now
    stats = rec.close()
    assert stats.records_dropped == 0 and stats.records_rejected == 0 and rec.errors == 0
    got = {(r["step"], r["layer"]): r for r in spooled(tmp_path, "routing")}
    assert sorted(got) == sorted(expected)
    for key, (tokens, dropped, shared, aux) in expected.items():
        r = got[key]
        assert r["num_steps"] == 2 and r["top_k"] == 2 and r["null_slot"] is True
        assert r["tokens_per_expert"] == tokens and r["dropped_per_expert"] == dropped
        assert r["shared_only_tokens"] == shared
        assert abs(r["aux_loss"] - aux) <= 1e-6 * max(1.0, abs(aux))  # the reference is fp32
        assert r["num_tokens"] == 3 * cfg.seq_len * 2  # two forwards of 3 x 8 tokens
    steps = spooled(tmp_path, "step")
    assert [s["step"] for s in steps] == list(range(6)) and all("loss" in s for s in steps)


class Source(torch.nn.Module):
    """A batchable source of S slots, its counters set by hand."""

    def __init__(self, slots: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.capacity: int | None = None
        self.register_buffer("routing_counters", torch.zeros(2 * slots + 4, dtype=torch.float64))

    def routing_snapshot(self) -> torch.Tensor:
        return self.routing_counters.clone()

    def read_and_reset_counters(self) -> dict[str, Any]:
        raise AssertionError("a batched source is never read and reset")

    def add(self, tokens: list[int], dropped: list[int], shared: int, aux: float) -> None:
        self.routing_counters += torch.tensor([*tokens, *dropped, shared, aux, 0.0, 1.0])


def window(col: RoutingCollector, step: int, loss: float | None = None) -> dict[str, Any]:
    """A step's record fields as the parts build them on CPU (the loss in front, as on CUDA,
    when given)."""
    col.due()
    col.take_window()
    counters = col.batched_counters()
    lead = [] if loss is None else [torch.tensor([loss], dtype=torch.float32)]
    flat = torch.cat([*lead, *counters])
    fields = {"run_id": "r", "attempt": 0, "rank": 0, "step": step}
    fields[ROUTING] = col.make_batch(step, flat, len(lead))
    return fields


def test_a_reset_counter_a_lost_batch_and_the_loss_in_front() -> None:
    a, b = Source(slots=2, top_k=1), Source(slots=3, top_k=2)
    col = RoutingCollector([("a", a), ("b", b)], every=1, batch=True)
    a.add([3, 1], [1, 0], 1, 0.5)
    b.add([2, 2, 4], [0, 0, 0], 0, 0.25)
    first = expand_batch(window(col, 0, loss=2.5))
    assert [(r["layer"], r["tokens_per_expert"], r["num_tokens"]) for r in first] == [
        (0, [3, 1], 4),
        (1, [2, 2, 4], 4),
    ]
    assert first[0]["dropped_per_expert"] == [1, 0] and first[0]["shared_only_tokens"] == 1
    assert first[1]["aux_loss"] == 0.25 and first[0]["run_id"] == "r"

    a.add([1, 1], [0, 0], 0, 0.5)
    b.add([1, 0, 1], [0, 0, 1], 0, 0.5)
    lost = window(col, 1)  # never expanded: a full queue dropped its step
    assert len(lost[ROUTING]) == 2
    a.routing_counters.zero_()  # someone reset layer 0: its snapshot is the window
    a.add([0, 2], [0, 0], 0, 0.5)
    b.add([1, 1, 0], [0, 0, 0], 0, 0.5)
    step = window(col, 2, loss=1.75)
    third = expand_batch(step)
    assert step["loss"] == 1.75 and ROUTING not in step
    assert [r["num_steps"] for r in third] == [2, 2]  # the lost window is in this one
    assert third[0]["tokens_per_expert"] == [0, 2] and third[0]["aux_loss"] == 0.5
    assert third[1]["tokens_per_expert"] == [2, 1, 1] and third[1]["dropped_per_expert"] == [
        0,
        0,
        1,
    ]
    assert third[1]["aux_loss"] == 0.5  # (0.5 + 0.5) over two forwards


def test_a_full_queue_counts_a_steps_routing_records_as_dropped(tmp_path: Path) -> None:
    a, b = Source(slots=2, top_k=1), Source(slots=2, top_k=1)
    col = RoutingCollector([("a", a), ("b", b)], every=1, batch=True)
    sink = SpoolSink(tmp_path, None, max_pending=1, flush_interval_s=60)
    for step in range(3):
        fields = window(col, step)
        fields.update(start=1.8e9 + step, end=1.8e9 + step + 0.5)
        sink.emit("step", fields)
    stats = sink.close()
    # the sink thread may take the first step before the second comes (then it takes the
    # second too): each step lost counts as itself and its two layers' records
    assert stats.records_dropped in (3, 6) and stats.records_dropped + stats.records_spooled == 9
