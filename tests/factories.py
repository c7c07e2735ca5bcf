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
