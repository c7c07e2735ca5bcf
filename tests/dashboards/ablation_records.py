"""Ablations as the service stores them, built by ingest through the API (no training):
loop-shaped runs (tests/factories.py) that name their ablation and cell, with steps of a
chosen duration, and the ablation's declaration. The ablation and ledger pages' tests share
them (tests/dashboards, tests/e2e/pages)."""

from __future__ import annotations

import random
from typing import Any

from tests import factories as f

DAY = 86_400.0


def timed_run(
    run_id: str,
    step_s: float,
    seed: int,
    *,
    dispatch: str = "grouped",
    ablation: str | None = None,
    cell: str | None = None,
    steps: int = 30,
    created_at: float = f.T0,
    ended: bool = True,
    name: str | None = None,
    **environment: Any,
) -> list[dict[str, Any]]:
    """A loop-shaped run of the dispatch lane `dispatch` (asked and observed), its steps
    about `step_s` seconds (3% jitter by `seed`), completed unless `ended` is False; in
    `ablation`'s `cell` when given; `environment` overrides (torch=..., device=...)."""
    rng = random.Random(seed)
    kw: dict[str, Any] = {"name": name or run_id, "created_at": created_at}
    if ablation is not None:
        kw |= {"ablation_id": ablation, "ablation_cell": cell}
    records = f.loop_run(run_id, steps=0, **kw)
    end = records.pop()
    records[0]["runtime_policy"].update({"seed": seed, "dispatch_requested": dispatch})
    records[0]["environment"].update(environment)
    for r in records:
        if r["kind"] == "observation" and r["seam"].startswith("moe_dispatch."):
            r |= {"observed": dispatch, "requested": dispatch}
        for key in ("start", "end", "time"):
            if key in r:
                r[key] += created_at - f.T0
    t = created_at + 10
    for i in range(steps):
        dur = step_s * (1 + rng.uniform(-0.03, 0.03))
        records.append(f.step(i, run_id, start=t, dur=dur, loss=2.0 - 0.01 * i))
        t += dur + 0.01
    if ended:
        records.append({**end, "end": t + 1})
    return records


def declaration(
    ablation_id: str,
    values: list[str],
    *,
    repeats: int = 2,
    created_at: float = f.T0,
    name: str | None = None,
    project: str = "default",
) -> dict[str, Any]:
    """An AblationIn over dispatch values, the first the baseline cell."""
    cells = {f"dispatch={v}": {"dispatch": v} for v in values}
    return {
        "ablation_id": ablation_id,
        "name": name or ablation_id,
        "project": project,
        "created_at": created_at,
        "knobs": {"dispatch": values},
        "cells": cells,
        "baseline_cell": f"dispatch={values[0]}",
        "repeats": repeats,
        "settings": {"steps": 30},
    }


def post(client: Any, records: list[dict[str, Any]]) -> None:
    got = client.post("/api/v1/ingest", json={"records": records})
    assert got.status_code == 200, got.text


def ablate(
    client: Any,
    ablation_id: str,
    step_s: dict[str, float],
    *,
    repeats: int = 2,
    created_at: float = f.T0,
    running: dict[str, int] | None = None,
    name: str | None = None,
    **environment: Any,
) -> None:
    """Declare an ablation over the dispatch values of `step_s` (value -> step time; the
    first the baseline) and post its runs, `repeats` a cell, interleaved; `running`: how
    many of a cell's runs (its last ones) are still running."""
    body = declaration(ablation_id, list(step_s), repeats=repeats, created_at=created_at, name=name)
    got = client.post("/api/v1/ablations", json=body)
    assert got.status_code == 200, got.text
    seed = 0
    for i in range(repeats):
        for value, secs in step_s.items():
            seed += 1
            ended = i < repeats - (running or {}).get(value, 0)
            post(
                client,
                timed_run(
                    f"{ablation_id}-{value}-{i}", secs, seed, dispatch=value,
                    ablation=ablation_id, cell=f"dispatch={value}",
                    created_at=created_at + 60 * seed, ended=ended, **environment,
                ),
            )  # fmt: skip
