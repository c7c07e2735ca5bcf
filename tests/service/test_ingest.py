from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests import factories as f


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    # allow_nan: Python's json writes Infinity/NaN, which the service must refuse itself
    body = json.dumps({"records": records}, allow_nan=True)
    return client.post("/api/v1/ingest", content=body, headers={"content-type": "application/json"})


def stored_steps(client: Any, run_id: str = "run-a") -> list[int]:
    resp = client.get(f"/api/v1/runs/{run_id}/steps", params={"max_points": 100_000})
    return [p["step"] for p in resp.json()["points"]] if resp.status_code == 200 else []


def test_ingest_stores_each_record_once_when_sent_twice(client: Any) -> None:
    batch = f.full_run(steps=5)
    first = post(client, batch)
    assert first.status_code == 200
    assert first.json() == {"inserted": len(batch), "duplicates": 0}
    second = post(client, batch)
    assert second.json() == {"inserted": 0, "duplicates": len(batch)}
    assert stored_steps(client) == [0, 1, 2, 3, 4]


def test_duplicates_inside_one_batch_are_counted(client: Any) -> None:
    batch = [f.run(), f.step(0), f.step(0), f.step(1)]
    assert post(client, batch).json() == {"inserted": 3, "duplicates": 1}


def test_overlapping_batches_insert_only_the_new_records(client: Any) -> None:
    post(client, [f.run(), f.step(0), f.step(1)])
    resp = post(client, [f.step(1), f.step(2)])
    assert resp.json() == {"inserted": 1, "duplicates": 1}
    assert stored_steps(client) == [0, 1, 2]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (f.step(0, loss=math.inf), "records.1.step.loss"),
        (f.step(0, dur=-1.0), "records.1.step.end"),
        (f.step(0, tokens=-5), "records.1.step.tokens"),
        (f.step(0, schema_version=99), "records.1.step.schema_version"),
        (f.span("coffee_break", f.T0, f.T0 + 1), "records.1.span.category"),
        (f.span("wasted_progress", f.T0, f.T0 + 1), "records.1.span.category"),
        (f.step(0, start=1_790_000.0, end=1_790_001.0), "records.1.step.start"),
        ({**f.step(0), "surprise": 1}, "records.1.step.surprise"),
        ({"kind": "heartbeat", "run_id": "run-a"}, "records.1"),
        (f.run(name="bad\x00name"), "records.1.run.name"),
    ],
)
def test_invalid_record_is_refused_naming_the_field_and_nothing_is_stored(
    client: Any, record: dict[str, Any], field: str
) -> None:
    resp = post(client, [f.run(), record, f.step(7)])
    assert resp.status_code == 422, resp.text
    fields = [e["field"] for e in resp.json()["detail"]]
    assert any(x.startswith(field) for x in fields), fields
    assert client.get("/api/v1/runs/run-a").status_code == 404


def test_nan_loss_is_refused(client: Any) -> None:
    body = b'{"records": [%s]}' % (
        b'{"kind":"run","run_id":"r","name":"n","created_at":1790000000.0},'
        b'{"kind":"step","run_id":"r","step":0,"start":1790000001.0,"end":1790000002.0,'
        b'"loss":NaN}'
    )
    resp = client.post("/api/v1/ingest", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "records.1.step.loss"
    assert client.get("/api/v1/runs/r").status_code == 404


def test_body_must_be_json(client: Any) -> None:
    """The body is parsed by pydantic-core straight from bytes: a declared media type other
    than JSON is a 415 and unparsable JSON a 422; no Content-Type at all is taken as JSON."""
    body = json.dumps({"records": [f.run()]}).encode()
    url = "/api/v1/ingest"
    plain = client.post(url, content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["detail"]
    assert client.get("/api/v1/runs/run-a").status_code == 404
    bad = client.post(url, content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid"
    charset = {"content-type": "application/json; charset=utf-8"}
    assert client.post(url, content=body, headers=charset).json()["inserted"] == 1
    bare = client.post(url, content=json.dumps({"records": [f.run("run-b")]}).encode())
    assert bare.status_code == 200 and bare.json()["inserted"] == 1


def test_a_refused_batch_leaves_no_placeholder_run_behind(client: Any) -> None:
    """A record of a run not stored yet makes a placeholder run (tests/service/
    test_ingest_order.py); a batch refused for another record rolls that back too."""
    post(client, [f.run(), f.attempt_start(start=f.T0 + 50)])
    resp = post(client, [f.step(0, run_id="nope"), f.attempt_end(end=f.T0 + 10)])
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "records.1.end"
    assert client.get("/api/v1/runs/nope").status_code == 404
    assert stored_steps(client, "nope") == []


def test_attempt_end_before_its_start_is_refused(client: Any) -> None:
    post(client, [f.run(), f.attempt_start(start=f.T0 + 50)])
    resp = post(client, [f.step(0), f.attempt_end(end=f.T0 + 10)])
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "records.1.end"
    assert stored_steps(client) == []
    assert client.get("/api/v1/runs/run-a").json()["status"] == "running"


def test_attempt_end_without_start_is_stored_on_a_placeholder_attempt(client: Any) -> None:
    resp = post(client, [f.run(), f.attempt_end()])
    assert resp.json() == {"inserted": 2, "duplicates": 0}
    (attempt,) = client.get("/api/v1/runs/run-a").json()["attempts"]
    assert attempt["start"] == attempt["end"] == f.T0 + 100
    assert attempt["status"] == "completed" and attempt["world_size"] == 1


def test_malformed_json_is_a_422_not_a_server_error(client: Any) -> None:
    resp = client.post(
        "/api/v1/ingest", content=b'{"records": [', headers={"content-type": "application/json"}
    )
    assert resp.status_code == 422


def test_batch_over_the_record_limit_is_refused(client: Any) -> None:
    from trainer_hooks.records import MAX_BATCH_RECORDS

    batch = [f.run()] + [f.step(i) for i in range(MAX_BATCH_RECORDS)]
    resp = post(client, batch)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "records"


def test_body_over_the_size_limit_gets_413_with_the_limit(client: Any) -> None:
    limit = client.app.state.settings.max_body_bytes
    resp = client.post(
        "/api/v1/ingest", content=b" " * (limit + 1), headers={"content-type": "application/json"}
    )
    assert resp.status_code == 413
    assert str(limit) in resp.json()["detail"]


def test_attempt_end_completes_the_attempt_once(client: Any) -> None:
    batch = [f.run(), f.attempt_start(), f.attempt_end(cause="done", hook_errors=2)]
    assert post(client, batch).json() == {"inserted": 3, "duplicates": 0}
    again = f.attempt_end(cause="done", hook_errors=2)
    assert post(client, [again]).json() == {"inserted": 0, "duplicates": 1}
    assert post(client, [f.attempt_end(end=f.T0 + 500)]).status_code == 409  # issue 12
    run = client.get("/api/v1/runs/run-a").json()
    assert run["status"] == "completed"
    assert run["attempts"][0]["end"] == f.T0 + 100
    assert run["attempts"][0]["hook_errors"] == 2


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (f.step(0, rank=2**31), "records.1.step.rank"),
        (f.step(0, attempt=2**31), "records.1.step.attempt"),
        (f.step(0, step=2**63), "records.1.step.step"),
        (f.step(0, tokens=2**63), "records.1.step.tokens"),
    ],
)
def test_integers_beyond_the_columns_are_refused_not_overflowed(
    client: Any, record: dict[str, Any], field: str
) -> None:
    resp = post(client, [f.run(), record])
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == field
