"""Ingest of the receipt and routing records: heartbeats, checkpoints, routing histograms,
backend observations and profiler summaries."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from service.calc.routing_stats import routing_figures
from service.store.db import session_scope
from service.store.models import Attempt, Observation, Profile, RoutingRow
from tests import factories as f


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/ingest", json={"records": records})


def rows(app: Any, model: Any) -> list[Any]:
    with session_scope(app.state.sessionmaker) as s:
        return list(s.scalars(select(model)))


def test_heartbeats_keep_the_latest_time_and_repeat_as_duplicates(app: Any, client: Any) -> None:
    post(client, [f.run(), f.attempt_start()])
    assert post(client, [f.heartbeat(f.T0 + 5), f.heartbeat(f.T0 + 9)]).json()["inserted"] == 2
    assert post(client, [f.heartbeat(f.T0 + 7), f.heartbeat(f.T0 + 9)]).json() == {
        "inserted": 0,
        "duplicates": 2,
    }
    assert rows(app, Attempt)[0].last_seen == f.T0 + 9


def test_heartbeat_of_an_attempt_never_started_makes_a_placeholder(app: Any, client: Any) -> None:
    resp = post(client, [f.run(), f.heartbeat(f.T0 + 1, attempt=3, interval_s=5.0)])
    assert resp.json() == {"inserted": 2, "duplicates": 0}
    (row,) = rows(app, Attempt)
    assert (row.attempt, row.start, row.last_seen) == (3, f.T0 + 1, f.T0 + 1)
    assert not row.start_declared and row.heartbeat_s == 5.0


def test_routing_rows_store_the_histogram_and_derived_rates(app: Any, client: Any) -> None:
    batch = [f.run(), f.routing(0), f.routing(0), f.routing(0, layer=1)]
    assert post(client, batch).json() == {"inserted": 3, "duplicates": 1}
    row = next(r for r in rows(app, RoutingRow) if r.layer == 0)
    assert row.tokens_per_expert == [80, 40, 40, 40]
    assert row.max_vio == pytest.approx(80 / 50 - 1)
    assert row.drop_rate == pytest.approx(20 / 200)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dropped_per_expert": [0, 0, 0]}, "records.1.routing.dropped_per_expert"),
        ({"dropped_per_expert": [90, 0, 0, 0]}, "records.1.routing.dropped_per_expert"),
        ({"tokens_per_expert": []}, "records.1.routing.tokens_per_expert"),
        ({"top_k": 0}, "records.1.routing.top_k"),
        ({"aux_loss": float("nan")}, "records.1.routing.aux_loss"),
    ],
)
def test_inconsistent_routing_is_refused_naming_the_field(
    client: Any, change: dict[str, Any], field: str
) -> None:
    import json

    body = json.dumps({"records": [f.run(), f.routing(0, **change)]})
    resp = client.post("/api/v1/ingest", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"].startswith(field)


def test_each_distinct_observation_of_a_seam_is_kept(app: Any, client: Any) -> None:
    batch = [
        f.run(),
        f.observation("moe_dispatch.layer1", "grouped", requested="auto"),
        f.observation("moe_dispatch.layer1", "grouped", requested="auto"),
        f.observation("moe_dispatch.layer1", "loop", requested="auto", reason="no CUDA"),
    ]
    assert post(client, batch).json() == {"inserted": 3, "duplicates": 1}
    assert sorted(o.observed for o in rows(app, Observation)) == ["grouped", "loop"]


def test_checkpoint_and_profile_records_are_idempotent(app: Any, client: Any) -> None:
    prof = {
        "kind": "profile",
        "run_id": "run-a",
        "first_step": 5,
        "num_steps": 3,
        "trace_path": "/tmp/trace.json",
        "top_kernels": [{"name": "sm90_gemm", "device_time_s": 0.01, "count": 6}],
    }
    batch = [f.run(), f.checkpoint(4, f.T0 + 3), prof]
    assert post(client, batch).json()["inserted"] == 3
    assert post(client, batch).json()["inserted"] == 0
    assert rows(app, Profile)[0].top_kernels[0]["name"] == "sm90_gemm"


def test_attempt_end_keeps_the_hooks_counters(client: Any) -> None:
    post(
        client,
        [
            f.run(),
            f.attempt_start(),
            f.attempt_end(counters={"records_dropped": 3, "recompiles": 1}),
        ],
    )
    assert client.get("/api/v1/runs/run-a").json()["attempts"][0]["status"] == "completed"


def test_routing_figures_with_a_null_slot() -> None:
    fig = routing_figures(
        [30, 10, 20, 40], [5, 0, 0, 0], num_tokens=50, top_k=2, null_slot=True, shared_only_tokens=5
    )
    assert fig.max_vio == pytest.approx(30 / 20 - 1)
    assert fig.null_fraction == pytest.approx(40 / 100)
    assert fig.drop_rate == pytest.approx(5 / 100)
    assert fig.shared_only_fraction == pytest.approx(0.1)


def test_routing_figures_of_an_empty_window_are_null() -> None:
    fig = routing_figures([0, 0], [0, 0], num_tokens=0, top_k=1, null_slot=False)
    assert fig == fig.__class__(None, None, None, None)
