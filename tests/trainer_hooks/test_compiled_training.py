"""The bundled loop with `compile=True` under the real recorder: the model must really
compile (dynamo's backend sees its graphs) and the run must say so, compile time included."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_core import loop
from moe_core.config import ModelConfig, model_plan
from moe_core.loop import TrainConfig, setup, train
from tests.trainer_hooks.list_sink import ListSink
from trainer_hooks import Recorder


def test_a_compiled_run_under_the_recorder_compiles_and_records_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    real_compile = torch.compile
    # The loop's own torch.compile call, with a backend that counts graphs and runs them as
    # traced (inductor's code generation would take a minute of CI for nothing asserted here).
    monkeypatch.setattr(
        loop.torch, "compile", lambda model, **kw: real_compile(model, backend=backend, **kw)
    )
    torch._dynamo.reset()
    mc = ModelConfig(
        pattern="AE",
        d_model=32,
        n_heads=2,
        ffn_hidden=64,
        expert_hidden=32,
        num_experts=4,
        top_k=2,
        seq_len=16,
    )
    cfg = TrainConfig(steps=3, batch_size=2, device="cpu", compile=True, eval_every=0)
    st = setup(mc, cfg, "compiled", None, None)
    sink = ListSink()
    rec = Recorder(
        run_name="compiled", sink=sink, environment={}, model_plan=model_plan(mc), heartbeat_s=0
    )
    rec.watch(st.model)
    train(mc, cfg, st, rec)
    rec.close()
    assert graphs, "the compiled model never reached dynamo's backend: it ran eager"
    assert any(s["category"] == "compile" for s in sink.of("span"))
    assert ("compile", "compiled") in {(o["seam"], o["observed"]) for o in sink.of("observation")}
    steps = sink.of("step")
    assert len(steps) == 3 and len({s["flops"] for s in steps}) == 1 and steps[0]["flops"] > 0
