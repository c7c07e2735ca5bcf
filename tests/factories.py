"""Wire records as plain dicts, for tests that post them."""

from __future__ import annotations

from typing import Any

T0 = 1_790_000_000.0


def run(run_id: str = "run-a", name: str = "alpha", **kw: Any) -> dict[str, Any]:
    return {"kind": "run", "run_id": run_id, "name": name, "created_at": T0, **kw}


def attempt_start(run_id: str = "run-a", start: float = T0, **kw: Any) -> dict[str, Any]:
    return {"kind": "attempt_start", "run_id": run_id, "start": start, **kw}


def attempt_end(
    run_id: str = "run-a", end: float = T0 + 100, status: str = "completed", **kw: Any
) -> dict[str, Any]:
    return {"kind": "attempt_end", "run_id": run_id, "end": end, "status": status, **kw}


def step(
    n: int, run_id: str = "run-a", start: float | None = None, dur: float = 1.0, **kw: Any
) -> dict[str, Any]:
    s = T0 + 10 + 2 * n if start is None else start
    return {
        "kind": "step",
        "run_id": run_id,
        "step": n,
        "start": s,
        "end": s + dur,
        "tokens": 512,
        "loss": 3.0 - 0.01 * n,
        **kw,
    }


def span(
    category: str, start: float, end: float, run_id: str = "run-a", **kw: Any
) -> dict[str, Any]:
    return {
        "kind": "span",
        "run_id": run_id,
        "category": category,
        "start": start,
        "end": end,
        **kw,
    }


def full_run(run_id: str = "run-a", steps: int = 5, name: str = "alpha") -> list[dict[str, Any]]:
    return [
        run(run_id, name),
        attempt_start(run_id),
        span("startup", T0, T0 + 10, run_id),
        *[step(i, run_id) for i in range(steps)],
        attempt_end(run_id, T0 + 10 + 2 * steps),
    ]


def heartbeat(t: float, run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    return {"kind": "heartbeat", "run_id": run_id, "time": t, **kw}


def checkpoint(step: int, t: float, run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    return {"kind": "checkpoint", "run_id": run_id, "step": step, "time": t, **kw}


def routing(step: int, layer: int = 0, run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    base = {
        "kind": "routing",
        "run_id": run_id,
        "step": step,
        "layer": layer,
        "num_tokens": 100,
        "top_k": 2,
        "tokens_per_expert": [80, 40, 40, 40],
        "dropped_per_expert": [20, 0, 0, 0],
        "capacity": 60,
        "aux_loss": 0.01,
        "z_loss": 0.001,
    }
    return {**base, **kw}


def observation(seam: str, observed: str, run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    return {
        "kind": "observation",
        "run_id": run_id,
        "seam": seam,
        "observed": observed,
        "time": T0 + 1,
        **kw,
    }


# -- runs as the bundled loop (moe_core.train) sends them --


def loop_plan(pattern: str = "AEME", num_experts: int = 4, top_k: int = 2) -> dict[str, Any]:
    """A model plan shaped like moe_core.config.model_plan (plain letters, no `*N`)."""
    return {
        "pattern": pattern,
        "layers": pattern,
        "family_counts": {letter: pattern.count(letter) for letter in "AMER"},
        "e_positions": [i for i, letter in enumerate(pattern) if letter == "E"],
        "num_experts": num_experts,
        "top_k": top_k,
        "num_slots": num_experts,
        "null_slot": False,
        "capacity_factor": None,
    }


def loop_policy(**kw: Any) -> dict[str, Any]:
    """A runtime policy shaped like moe_core.train.runtime_policy."""
    return {
        "world_size": 1,
        "dp_size": 1,
        "ep_size": 1,
        "batch_size": 8,
        "seq_len": 64,
        "tokens_per_step": 512,
        "compile": "eager",
        "dispatch_requested": "auto",
        "dtype": "float32",
        "device": "cpu",
        **kw,
    }


def loop_environment(**kw: Any) -> dict[str, Any]:
    """An environment shaped like trainer_hooks.environment.collect_environment on a CPU."""
    return {
        "python": "3.11.9",
        "platform": "Linux",
        "host": "node-1",
        "git_sha": None,
        "torch": "2.13.0",
        "cuda": None,
        "device": "cpu",
        "peak_flops_per_s": None,
        **kw,
    }


def loop_run(
    run_id: str = "run-a", pattern: str = "AEME", steps: int = 6, **run_kw: Any
) -> list[dict[str, Any]]:
    """A whole completed attempt with everything the bundled loop sends: the run's receipt
    parts, startup and data-stall spans, steps, routing per E layer, backend observations."""
    num_e = pattern.count("E")
    records = [
        run(
            run_id,
            model_plan=loop_plan(pattern),
            runtime_policy=loop_policy(),
            environment=loop_environment(),
            **run_kw,
        ),
        attempt_start(run_id),
        span("startup", T0, T0 + 9, run_id),
        observation("compile", "eager", run_id),
        observation("sdpa", "flash", run_id, requested="auto", step=0),
        observation("dtype.attention", "float32", run_id, step=0),
        *[
            observation(f"moe_dispatch.layer{j}", "grouped", run_id, requested="auto", step=0)
            for j in range(num_e)
        ],
    ]
    for i in range(steps):
        records.append(span("data_stall", T0 + 9.5 + 2 * i, T0 + 10 + 2 * i, run_id, step=i))
        records.append(step(i, run_id))
        records += [routing(i, layer=j, run_id=run_id) for j in range(num_e)]
    counters = {"ooms": 0, "compiles": 0, "recompiles": 0, "records_dropped": 0}
    records.append(attempt_end(run_id, T0 + 10 + 2 * steps, counters=counters))
    return records
