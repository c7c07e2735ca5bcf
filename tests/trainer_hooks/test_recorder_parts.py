"""The recorder's parts on CPU: compile time, FLOPs, routing, receipts, profiler window,
heartbeats, checkpoints, OOM, and its own overhead."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests.trainer_hooks.list_sink import ListSink
from trainer_hooks import Recorder
from trainer_hooks.routing import finish_routing_fields
from trainer_hooks.sink import to_payload


def recorder(**kw: Any) -> tuple[Recorder, ListSink]:
    sink = ListSink()
    kw.setdefault("heartbeat_s", 0)
    return Recorder(run_name="parts", sink=sink, environment={}, **kw), sink


class FakeDispatcher:
    def __init__(self) -> None:
        self.requested = "auto"
        self.observed: str | None = None
        self.fallback_reason: str | None = None


class FakeMoE(torch.nn.Module):
    """Speaks the counters protocol: 3 routed experts and a null slot, top-2."""

    top_k = 2
    null_slot = True

    def __init__(self) -> None:
        super().__init__()
        self.dispatcher = FakeDispatcher()
        self.register_buffer("tokens", torch.zeros(4, dtype=torch.long))
        self.register_buffer("dropped", torch.zeros(4, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dispatcher.observed = "loop"
        self.dispatcher.fallback_reason = "no CUDA"
        self.tokens += torch.tensor([3, 1, 2, 2])
        self.dropped += torch.tensor([1, 0, 0, 0])
        q = x.view(1, 1, -1, 4)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).view_as(x)

    def read_and_reset_counters(self) -> dict[str, Any]:
        out = {
            "tokens_per_expert": self.tokens.clone(),
            "dropped_per_expert": self.dropped.clone(),
            "aux_loss": torch.tensor(0.5),
            "z_loss": torch.tensor(0.1),
            "capacity": 2,
        }
        self.tokens.zero_()
        self.dropped.zero_()
        return out


def test_routing_receipts_and_sdpa_are_recorded_from_a_watched_model() -> None:
    rec, sink = recorder(routing_every=2)
    model = FakeMoE()
    rec.watch(model)
    for step in range(4):
        with rec.step(step, tokens=4) as s:
            s.loss = model(torch.randn(4, 4)).sum()
    rec.close()
    routing = [finish_routing_fields(r) for r in sink.of("routing")]
    assert [(r["step"], r["num_steps"]) for r in routing] == [(1, 2), (3, 2)]
    assert routing[0]["tokens_per_expert"] == [6, 2, 4, 4]
    assert routing[0]["num_tokens"] == 8 and routing[0]["null_slot"] is True
    seams = {(o["seam"], o["observed"], o.get("requested")) for o in sink.of("observation")}
    assert ("moe_dispatch.layer0", "loop", "auto") in seams
    assert ("compile", "eager", None) in seams
    assert any(seam == "sdpa" for seam, _, _ in seams)
    assert ("dtype.attention", "float32", None) in seams
    assert len([o for o in sink.of("observation") if o["seam"] == "moe_dispatch.layer0"]) == 1


def test_compile_time_and_recompiles_are_recorded_and_survive_a_dynamo_reset() -> None:
    rec, sink = recorder()
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    shapes = [(3,), (3, 4), (3,)]
    for step, shape in enumerate(shapes):
        with rec.step(step):
            fn(torch.randn(*shape))
    torch._dynamo.reset()  # clears every callback; the recorder must put its own back
    with rec.step(3):
        torch.compile(lambda x: x + 1, backend="eager")(torch.randn(2))
    rec.close()
    compiles = [s for s in sink.of("span") if s["category"] == "compile"]
    assert len(compiles) == 3  # first compile, one recompile, the compile after the reset
    assert all(s["end"] >= s["start"] for s in compiles)
    recompiles = [o for o in sink.of("observation") if o["seam"] == "recompile"]
    assert len(recompiles) == 1 and "mismatch" in recompiles[0]["reason"]
    end = sink.of("attempt_end")[0]
    assert end["counters"]["compiles"] == 3 and end["counters"]["recompiles"] == 1


def test_flops_are_counted_once_per_shape_key() -> None:
    rec, sink = recorder()
    w = torch.randn(8, 16)
    for step, n in enumerate([4, 4, 6]):
        with rec.step(step, flops_key=(n,)):
            torch.randn(n, 8) @ w
    rec.close()
    flops = [s["flops"] for s in sink.of("step")]
    assert flops == [2 * 4 * 8 * 16, 2 * 4 * 8 * 16, 2 * 6 * 8 * 16]


def test_a_compiled_model_whose_flops_are_counted_still_compiles() -> None:
    # Dynamo skips for good a frame it first meets under a dispatch mode such as
    # FlopCounterMode: counting the first step that way left compiled models eager forever.
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))
        return gm.forward

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    compiled = torch.compile(model, backend=backend)
    rec, sink = recorder()
    rec.watch(compiled)
    for step in range(3):
        with rec.step(step, flops_key=(5,)):
            compiled(torch.randn(5, 8))
    rec.close()
    assert graphs, "the model never reached dynamo's backend: it ran eager"
    assert [s["flops"] for s in sink.of("step")] == [2 * 5 * (8 * 16 + 16 * 4)] * 3
    assert ("compile", "compiled", None) in {
        (o["seam"], o["observed"], o.get("requested")) for o in sink.of("observation")
    }


def test_profile_window_sends_a_summary_and_counts_as_profiling(tmp_path: Path) -> None:
    rec, sink = recorder()
    rec.profile(1, 2, trace_dir=str(tmp_path))
    a = torch.randn(64, 64)
    for step in range(4):
        with rec.step(step):
            (a @ a).relu()
    rec.close()
    [prof] = sink.of("profile")
    assert prof["first_step"] == 1 and prof["num_steps"] == 2
    assert Path(prof["trace_path"]).exists()
    assert any("mm" in k["name"] for k in prof["top_kernels"])
    [span] = [s for s in sink.of("span") if s["category"] == "profiling"]
    steps = {s["step"]: s for s in sink.of("step")}
    assert span["start"] <= steps[1]["start"] and span["end"] >= steps[2]["end"]


def test_the_profilers_start_and_export_are_charged_to_its_span_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window's start and its stop (trace export, summary) run inside the hooks' calls and
    # inside the profiling span; counted in hook_overhead_s as well, `other` went negative.
    import trainer_hooks.profiling as profiling

    summarise = profiling.top_kernels

    def slow_summary(*args: Any, **kw: Any) -> Any:
        time.sleep(0.3)
        return summarise(*args, **kw)

    monkeypatch.setattr(profiling, "top_kernels", slow_summary)
    rec, sink = recorder()
    rec.profile(1, 2, trace_dir=str(tmp_path))
    for step in range(5):
        with rec.step(step):
            time.sleep(0.01)
    rec.close()
    [span] = [s for s in sink.of("span") if s["category"] == "profiling"]
    assert span["end"] - span["start"] >= 0.3
    overheads = {s["step"]: s["hook_overhead_s"] for s in sink.of("step")}
    assert max(overheads.values()) < 0.1, overheads
    # Charged once: the steps, the span's seconds outside them and the hooks' own time fit in
    # the wall time the steps and the span cover.
    steps = sorted(sink.of("step"), key=lambda s: s["step"])
    covered = steps[-1]["end"] - steps[0]["start"]
    inside_steps = sum(s["end"] - s["start"] for s in steps)
    in_span_between = sum(
        max(0.0, min(b["start"], span["end"]) - max(a["end"], span["start"]))
        for a, b in zip(steps, steps[1:], strict=False)
    )
    hooks = sum(overheads[s] for s in (1, 2, 3, 4))
    assert inside_steps + in_span_between + hooks <= covered + 1e-9


def test_out_of_memory_is_recorded_before_it_propagates() -> None:
    rec, sink = recorder()
    with pytest.raises(torch.OutOfMemoryError), rec.step(0):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert [o["seam"] for o in sink.of("observation")] == ["oom"]
    rec.close(status="failed", cause="OOM")
    assert sink.of("attempt_end")[0]["counters"]["ooms"] == 1
    assert sink.of("step") == []


def test_a_loss_is_told_by_a_heartbeat_at_once_not_at_the_next_period() -> None:
    """The sink's running count of dropped records rides on heartbeats; when it grows, a
    heartbeat goes out within LOSS_CHECK_S although the period is an hour."""
    from types import SimpleNamespace

    sink = ListSink()
    sink.stats = SimpleNamespace(records_dropped=0)  # type: ignore[attr-defined]
    rec = Recorder(run_name="loss", sink=sink, environment={}, heartbeat_s=3600.0)
    try:
        time.sleep(1.5)
        assert sink.of("heartbeat") == []  # nothing lost, the period not over: nothing sent
        sink.stats.records_dropped = 7  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5.0
        while not sink.of("heartbeat") and time.monotonic() < deadline:
            time.sleep(0.05)
        beats = sink.of("heartbeat")
        assert [b.get("records_dropped") for b in beats] == [7]
        assert json.loads(to_payload("heartbeat", beats[0]))["records_dropped"] == 7
        time.sleep(1.5)
        assert len(sink.of("heartbeat")) == 1  # told once: no repeat until it grows again
    finally:
        rec.close()
    assert sink.of("attempt_end")[0]["counters"]["records_dropped"] == 7


def test_heartbeats_checkpoints_and_overhead() -> None:
    rec, sink = recorder(heartbeat_s=0.02)
    for step in range(3):
        with rec.span("data_stall", step=step):
            pass
        with rec.step(step):
            time.sleep(0.03)
    rec.checkpoint_committed(2)
    rec.close()
    beats = sink.of("heartbeat")
    assert len(beats) >= 2
    assert all(b["interval_s"] == 0.02 for b in beats)  # each declares its period
    sent = [json.loads(to_payload("heartbeat", b)) for b in beats]  # as the contract takes it
    assert all(b["interval_s"] == 0.02 for b in sent)
    assert sink.of("checkpoint")[0]["step"] == 2 and sink.of("checkpoint")[0]["ok"] is True
    overheads = [s["hook_overhead_s"] for s in sink.of("step")]
    assert all(0 <= o < 0.01 for o in overheads)
    assert overheads[1] > 0  # the span and the previous step's exit were measured
