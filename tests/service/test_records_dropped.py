"""What a run's hooks dropped reaches the service while the run goes on: heartbeats carry the
sink's running count, the service keeps the largest per attempt rank, and the run reports the
total with its attempt_end counts folded in."""

from __future__ import annotations

from typing import Any

from tests import factories as f


def post(client: Any, *records: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/api/v1/ingest", json={"records": list(records)})
    assert r.status_code == 200, r.text
    return r.json()


def dropped(client: Any) -> tuple[int, dict[int, int | None]]:
    run = client.get("/api/v1/runs/run-a").json()
    return run["records_dropped"], {a["rank"]: a["records_dropped"] for a in run["attempts"]}


def test_heartbeats_report_dropped_records_as_a_running_total(client: Any) -> None:
    post(client, f.run(), f.attempt_start(rank=0), f.attempt_start(rank=1))
    assert dropped(client) == (0, {0: None, 1: None})
    assert post(client, f.heartbeat(f.T0 + 5, rank=0, records_dropped=5))["inserted"] == 1
    assert dropped(client) == (5, {0: 5, 1: None})
    # an older heartbeat with a smaller count changes nothing (counts only grow)
    assert post(client, f.heartbeat(f.T0 + 4, rank=0, records_dropped=3)) == {
        "inserted": 0,
        "duplicates": 1,
    }
    # the same time with a larger count is news, not a duplicate
    assert post(client, f.heartbeat(f.T0 + 5, rank=0, records_dropped=9))["inserted"] == 1
    post(client, f.heartbeat(f.T0 + 6, rank=1, records_dropped=2))
    assert dropped(client) == (11, {0: 9, 1: 2})
    listed = client.get("/api/v1/runs").json()["runs"]
    assert [r["records_dropped"] for r in listed] == [11]
    # the attempt_end's final count wins when it is larger
    end = f.attempt_end(end=f.T0 + 50, rank=0, counters={"records_dropped": 12})
    post(client, end)
    assert dropped(client)[0] == 14
    metrics = client.get("/metrics").text
    line = 'goodput_records_dropped{project="default",run_id="run-a",run_name="alpha"} 14.0'
    assert line in metrics
