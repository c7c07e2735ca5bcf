"""Routing read every `routing_every` steps (issue 16): each window's records equal the sums
of the per-step differences of snapshots the test takes itself; the window still open at
close is read then (a run's last steps are not lost, a failed step's forwards included); the
E blocks' counters live in one shared buffer and survive a model whose buffers are replaced;
and a step's end between reads leaves the parts alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_core.config import ModelConfig
from moe_core.model import build_model
from moe_core.moe import unpack_counters
from tests.trainer_hooks.list_sink import ListSink
from trainer_hooks import Recorder, SpoolSink
from trainer_hooks.recorder import ROUTING_EVERY
from trainer_hooks.routing import finish_routing_fields
from trainer_hooks.spool import Spool

CFG = ModelConfig(
    pattern="EAE", d_model=16, n_heads=2, seq_len=8, num_experts=5, top_k=2, null_slot=True
)


def spooled(directory: Path, kind: str) -> list[dict[str, Any]]:
    return [
        r
        for seg in Spool(directory).segments()
        for r in map(json.loads, seg.read(0, 100_000).payloads)
        if r["kind"] == kind
    ]


def blocks_of(model: torch.nn.Module) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "routing_snapshot")]


def forward(model: torch.nn.Module, batch: int = 3) -> torch.Tensor:
    x = torch.randint(0, CFG.vocab_size, (batch, CFG.seq_len))
    logits, aux = model(x)
    return logits.float().mean() + aux


def reference(
    blocks: list[Any], before: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[tuple[list[int], list[int], int, float]]]:
    """The window since `before`, layer by layer, from the test's own snapshots."""
    now = [b.routing_snapshot() for b in blocks]
    out = []
    for b, a in zip(before, now, strict=True):
        d = unpack_counters(a - b, CFG.num_slots)
        out.append(
            (
                d["tokens_per_expert"].tolist(),
                d["dropped_per_expert"].tolist(),
                int(d["shared_only_tokens"]),
                float(d["aux_loss"]),
            )
        )
    return now, out


def check(got: dict[str, Any], want: tuple[list[int], list[int], int, float]) -> None:
    tokens, dropped, shared, aux = want
    assert got["tokens_per_expert"] == tokens and got["dropped_per_expert"] == dropped
    assert got["shared_only_tokens"] == shared
    assert abs(got["aux_loss"] - aux) <= 1e-6 * max(1.0, abs(aux))  # the reference is fp32


def test_the_default_window_is_documented_and_not_one_step() -> None:
    rec = Recorder(run_name="w", sink=ListSink(), environment={}, heartbeat_s=0)
    assert rec._parts.routing.every == ROUTING_EVERY == 10
    rec.close()


def test_windows_of_n_steps_equal_the_per_step_sums_and_close_reads_the_last(
    tmp_path: Path,
) -> None:
    model = build_model(CFG, seed=0).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=SpoolSink(tmp_path, None), environment={}, routing_every=3)
    rec.watch(model)
    # one buffer for both E blocks, each a view of it: the read is one copy
    flat = rec._parts.routing._flat
    assert flat is not None and all(b.routing_counters._base is flat for b in blocks)
    expected: dict[tuple[int, int], Any] = {}
    before = [b.routing_snapshot() for b in blocks]
    for step in range(8):  # windows end at steps 2 and 5; steps 6 and 7 are read at close
        with rec.step(step, tokens=3 * CFG.seq_len) as s:
            s.loss = forward(model)
        if step in (2, 5):
            before, layers = reference(blocks, before)
            expected.update({(step, i): w for i, w in enumerate(layers)})
    _, layers = reference(blocks, before)
    expected.update({(7, i): w for i, w in enumerate(layers)})
    stats = rec.close()
    assert stats.records_dropped == 0 and stats.records_rejected == 0 and rec.errors == 0
    got = {(r["step"], r["layer"]): r for r in spooled(tmp_path, "routing")}
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        check(got[key], want)
        assert got[key]["num_steps"] == (2 if key[0] == 7 else 3)
        assert got[key]["num_tokens"] == got[key]["num_steps"] * 3 * CFG.seq_len
    steps = spooled(tmp_path, "step")
    assert [s["step"] for s in steps] == list(range(8)) and all("loss" in s for s in steps)


def test_per_step_differences_add_up_to_each_window(tmp_path: Path) -> None:
    model = build_model(CFG, seed=1).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=SpoolSink(tmp_path, None), environment={}, routing_every=4)
    rec.watch(model)
    snaps = [[b.routing_snapshot() for b in blocks]]
    for step in range(8):
        with rec.step(step) as s:
            s.loss = forward(model, batch=1 + step % 3)  # windows of unequal steps
        snaps.append([b.routing_snapshot() for b in blocks])
    rec.close()
    got = {(r["step"], r["layer"]): r for r in spooled(tmp_path, "routing")}
    assert sorted(got) == [(3, 0), (3, 1), (7, 0), (7, 1)]
    for end in (3, 7):
        for layer in range(2):
            steps = range(end - 3, end + 1)
            tokens = sum(
                unpack_counters(snaps[i + 1][layer] - snaps[i][layer], CFG.num_slots)[
                    "tokens_per_expert"
                ]
                for i in steps
            )
            assert got[(end, layer)]["tokens_per_expert"] == tokens.tolist()
            assert got[(end, layer)]["num_tokens"] == sum((1 + i % 3) for i in steps) * 8


def test_a_failed_step_mid_window_loses_no_count(tmp_path: Path) -> None:
    model = build_model(CFG, seed=2).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=SpoolSink(tmp_path, None), environment={}, routing_every=4)
    rec.watch(model)
    start = [b.routing_snapshot() for b in blocks]
    for step in range(6):
        with rec.step(step) as s:
            s.loss = forward(model)
    with pytest.raises(RuntimeError), rec.step(6):
        forward(model)  # its forward counted, then the step fails
        raise RuntimeError("boom")
    rec.close(status="failed", cause="boom")
    records = spooled(tmp_path, "routing")
    assert sorted((r["step"], r["layer"], r["num_steps"]) for r in records) == [
        (3, 0, 4),
        (3, 1, 4),
        (5, 0, 2),  # steps 4, 5 and the failed step's forward: read at close
        (5, 1, 2),
    ]
    for layer, b in enumerate(blocks):
        total = unpack_counters(b.routing_snapshot() - start[layer], CFG.num_slots)
        summed = [
            sum(col)
            for col in zip(
                *(r["tokens_per_expert"] for r in records if r["layer"] == layer), strict=True
            )
        ]
        assert summed == total["tokens_per_expert"].tolist()
    assert [s["step"] for s in spooled(tmp_path, "step")] == list(range(6))


def test_close_reads_the_open_window_of_layers_read_one_by_one() -> None:
    sink = ListSink()  # no batches: each layer's snapshot is read and differenced alone
    model = build_model(CFG, seed=3).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=sink, environment={}, heartbeat_s=0, routing_every=4)
    rec.watch(model)
    before = [b.routing_snapshot() for b in blocks]
    for step in range(6):
        with rec.step(step) as s:
            s.loss = forward(model)
        if step == 3:
            before, first = reference(blocks, before)
    _, last = reference(blocks, before)
    rec.close()
    routing = [finish_routing_fields(f) for k, f in sink.records if k == "routing"]
    assert [(r["step"], r["layer"], r["num_steps"]) for r in routing] == [
        (3, 0, 4),
        (3, 1, 4),
        (5, 0, 2),
        (5, 1, 2),
    ]
    for r, want in zip(routing, first + last, strict=True):
        check(r, want)
    kinds = [k for k, _ in sink.records]
    assert kinds.index("attempt_end") > max(i for i, k in enumerate(kinds) if k == "routing")


def test_replaced_buffers_are_packed_again_and_counted_exactly(tmp_path: Path) -> None:
    model = build_model(CFG, seed=4).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=SpoolSink(tmp_path, None), environment={}, routing_every=2)
    rec.watch(model)
    before = [b.routing_snapshot() for b in blocks]
    expected = {}
    for step in range(6):
        if step == 3:  # as model.to(...) does: every buffer replaced by a new tensor
            model._apply(lambda t: t.clone())
            assert blocks[0].routing_counters._base is None
        with rec.step(step) as s:
            s.loss = forward(model)
        if step % 2 == 1:
            before, layers = reference(blocks, before)
            expected.update({(step, i): w for i, w in enumerate(layers)})
    # packed again at the first read after the replacement
    flat = rec._parts.routing._flat
    assert flat is not None and all(b.routing_counters._base is flat for b in blocks)
    rec.close()
    got = {(r["step"], r["layer"]): r for r in spooled(tmp_path, "routing")}
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        check(got[key], want)


def test_a_step_between_reads_leaves_the_parts_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU the parts' step end runs only when something is due: the first step, the
    dispatcher poll (every 8 steps) and the routing reads; every step is still recorded."""
    sink = ListSink()
    model = build_model(CFG, seed=5).train()
    rec = Recorder(run_name="w", sink=sink, environment={}, heartbeat_s=0, routing_every=5)
    rec.watch(model)
    parts = rec._parts
    looked: list[int] = []
    real = parts.step_exit

    def spy(h: Any, fields: dict[str, Any]) -> None:
        looked.append(h.step)
        real(h, fields)

    monkeypatch.setattr(parts, "step_exit", spy)
    for step in range(20):
        with rec.step(step, flops_key=(3,)) as s:
            s.loss = forward(model)
    rec.close()
    # step 0: the SDPA probe and the FLOPs count; then the reads at 4, 9, 14, 19 and the
    # polls at 8 and 16 (steps counted from 1: the 9th and 17th step)
    assert looked == [0, 4, 8, 9, 14, 16, 19]
    steps = [f for k, f in sink.records if k == "step"]
    assert [f["step"] for f in steps] == list(range(20))
    assert len({f["flops"] for f in steps}) == 1 and steps[0]["flops"] > 0
    assert rec.errors == 0


def test_steps_before_watching_are_in_no_window(tmp_path: Path) -> None:
    model = build_model(CFG, seed=6).train()
    blocks = blocks_of(model)
    rec = Recorder(run_name="w", sink=SpoolSink(tmp_path, None), environment={}, routing_every=3)
    for step in range(2):  # not watched yet: their forwards belong to no window
        with rec.step(step) as s:
            s.loss = forward(model)
    rec.watch(model)
    before = [b.routing_snapshot() for b in blocks]
    for step in range(2, 5):
        with rec.step(step) as s:
            s.loss = forward(model)
    _, layers = reference(blocks, before)
    rec.close()
    got = sorted(spooled(tmp_path, "routing"), key=lambda r: r["layer"])
    assert [(r["step"], r["num_steps"]) for r in got] == [(4, 3), (4, 3)]
    for r, want in zip(got, layers, strict=True):
        check(r, want)
