"""Ingest integrity (issue 12): a record re-sent under its natural key with other content is a
409 naming it, its key and both values; timings that contradict each other or the server's
clock are a 422 naming the record. Either way nothing of the batch is stored. On SQLite and
PostgreSQL (the `client` and `app` fixtures run each test on both)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import func, select

from service.store.db import session_scope
from service.store.models import Attempt, CheckpointCommit, RoutingRow, Run, RunTag, Span, Step
from tests import factories as f

T0 = f.T0


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/ingest", json={"records": records})


def profile(**kw: Any) -> dict[str, Any]:
    base = {"kind": "profile", "run_id": "run-a", "first_step": 2, "num_steps": 3}
    return {**base, "top_kernels": [{"name": "gemm", "device_time_s": 0.5, "count": 3}], **kw}


def excluded(**kw: Any) -> dict[str, Any]:
    base = {"kind": "excluded_window", "run_id": "run-a", "start": T0 + 1, "end": T0 + 2}
    return {**base, "reason": "maintenance", **kw}


def counts(app: Any) -> dict[str, int]:
    with session_scope(app.state.sessionmaker) as s:
        return {
            m.__tablename__: s.scalar(select(func.count()).select_from(m)) or 0
            for m in (Run, RunTag, Attempt, Step, Span, RoutingRow, CheckpointCommit)
        }


def conflict_of(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["retriable"] is False
    (item,) = body["detail"]
    return item


# (stored record, the same key re-sent with other content, the field that differs)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("step", f.step(3), f.step(3, loss=1.25), "loss"),
    ("step_time", f.step(3), f.step(3, start=T0 + 16.5, dur=0.5), "start"),
    ("span", f.span("eval", T0 + 1, T0 + 2), f.span("eval", T0 + 1, T0 + 3), "end"),
    (
        "span_overlapped",
        f.span("eval", T0 + 1, T0 + 2),
        f.span("eval", T0 + 1, T0 + 2, overlapped=True),
        "overlapped",
    ),
    ("checkpoint", f.checkpoint(5, T0 + 30), f.checkpoint(5, T0 + 30, ok=False), "ok"),
    (
        "routing",
        f.routing(4),
        f.routing(4, tokens_per_expert=[80, 40, 40, 41], num_tokens=101),
        "tokens_per_expert",
    ),
    ("observation", f.observation("sdpa", "flash"), f.observation("sdpa", "flash", step=9), "step"),
    ("profile", profile(), profile(top_kernels=[]), "top_kernels"),
    ("excluded_window", excluded(), excluded(reason="incident"), "reason"),
    (
        "attempt_start",
        f.attempt_start(world_size=2),
        f.attempt_start(world_size=2, start=T0 + 0.5),
        "start",
    ),
    (
        "attempt_end",
        f.attempt_end(),
        f.attempt_end(status="failed", cause="NCCL timeout"),
        "status",
    ),
    ("attempt_end_time", f.attempt_end(), f.attempt_end(end=T0 + 101), "end"),
    ("run", f.run(), f.run(name="beta"), "name"),
    ("run_plan", f.run(model_plan={"layers": 4}), f.run(model_plan={"layers": 5}), "model_plan"),
]


@pytest.mark.parametrize(("what", "stored", "sent", "field"), CASES, ids=[c[0] for c in CASES])
def test_conflicting_resend_is_a_409_naming_it(
    client: Any, app: Any, what: str, stored: dict[str, Any], sent: dict[str, Any], field: str
) -> None:
    first = [stored] if stored["kind"] == "run" else [f.run(), stored]
    assert post(client, first).status_code == 200
    before = counts(app)
    # The conflicting record last, behind new records of every table: none of them is stored.
    batch = [f.step(40), f.span("eval", T0 + 95, T0 + 96), f.routing(40), f.checkpoint(40, T0 + 99)]
    item = conflict_of(post(client, [*batch, sent]))
    assert item["record"] == f"records.4.{sent['kind']}"
    assert item["key"]["run_id"] == "run-a"
    default = {"overlapped": False, "ok": True, "step": None}  # the contract's defaults
    pair = item["fields"][field]
    assert pair == {"stored": stored.get(field, default.get(field)), "sent": sent[field]}
    assert counts(app) == before
    # The same record unchanged is still a duplicate.
    assert post(client, [stored]).json() == {"inserted": 0, "duplicates": 1}


def test_conflict_within_one_batch(client: Any, app: Any) -> None:
    item = conflict_of(post(client, [f.run(), f.step(1), f.step(1, tokens=7)]))
    assert item["record"] == "records.2.step"
    assert item["fields"] == {"tokens": {"stored": 512, "sent": 7}}
    assert item["key"] == {"run_id": "run-a", "attempt": 0, "rank": 0, "step": 1}
    assert counts(app)["runs"] == 0


def test_resent_batch_is_all_duplicates(client: Any) -> None:
    batch = [
        f.run(tags=["a"]),
        f.attempt_start(),
        f.span("startup", T0, T0 + 10),
        *[f.step(i) for i in range(5)],
        f.routing(2),
        f.checkpoint(2, T0 + 16),
        f.observation("sdpa", "flash"),
        profile(),
        excluded(),
        f.heartbeat(T0 + 20),
        f.attempt_end(end=T0 + 40),
    ]
    assert post(client, batch).json() == {"inserted": len(batch), "duplicates": 0}
    assert post(client, batch).json() == {"inserted": 0, "duplicates": len(batch)}
    # Every conflict of a batch is listed, one entry per record.
    changed = [f.step(1, loss=9.0), f.checkpoint(2, T0 + 17), f.attempt_end(end=T0 + 41)]
    resp = post(client, [*batch, *changed])
    assert resp.status_code == 409
    assert [c["record"] for c in resp.json()["detail"]] == [
        f"records.{len(batch) + 1}.checkpoint",
        f"records.{len(batch)}.step",
        f"records.{len(batch) + 2}.attempt_end",
    ]


def test_run_record_tags_only_grow(client: Any, app: Any) -> None:
    assert post(client, [f.run(tags=["a", "b"])]).status_code == 200
    # Each rank and attempt sends its own created_at and environment: not a conflict.
    again = f.run(tags=["b", "a"], created_at=T0 + 5, environment={"host": "n2"})
    assert post(client, [again]).json() == {"inserted": 0, "duplicates": 1}
    assert post(client, [f.run(tags=["a", "b", "c"])]).json() == {"inserted": 1, "duplicates": 0}
    item = conflict_of(post(client, [f.run(tags=["a"])]))
    assert item["fields"] == {"tags": {"stored": ["a", "b", "c"], "sent": ["a"]}}
    tags = client.get("/api/v1/runs/run-a").json()["tags"]
    assert sorted(tags) == ["a", "b", "c"]
    with session_scope(app.state.sessionmaker) as s:
        run = s.get(Run, "run-a")
        assert run is not None and run.created_at == T0


def test_placeholders_are_filled_not_conflicts(client: Any) -> None:
    # A step makes a placeholder run, a heartbeat a placeholder attempt: their records fill
    # them in, whatever the placeholder held.
    assert post(client, [f.heartbeat(T0 + 5), f.step(0)]).status_code == 200
    resp = post(client, [f.run(name="real"), f.attempt_start(start=T0, world_size=4)])
    assert resp.json() == {"inserted": 2, "duplicates": 0}
    # Heartbeats are never a conflict: an older one is a duplicate.
    assert post(client, [f.heartbeat(T0 + 3)]).json() == {"inserted": 0, "duplicates": 1}


def test_failed_end_after_completed_is_a_conflict(client: Any, app: Any) -> None:
    assert post(client, [*f.full_run(steps=3)]).status_code == 200
    end = f.attempt_end(end=T0 + 16, status="failed", cause="OOM")
    item = conflict_of(post(client, [end]))
    assert item["fields"]["status"] == {"stored": "completed", "sent": "failed"}
    assert item["fields"]["cause"] == {"stored": None, "sent": "OOM"}
    with session_scope(app.state.sessionmaker) as s:
        assert s.scalar(select(Attempt.status)) == "completed"


def errors_of(resp: Any) -> list[dict[str, Any]]:
    assert resp.status_code == 422, resp.text
    return list(resp.json()["detail"])


def test_overlapping_steps_of_a_rank_are_refused(client: Any, app: Any) -> None:
    assert post(client, [f.run(), f.step(0, start=T0, dur=1.0)]).status_code == 200
    # Touching is fine, and another rank may run at the same time.
    touching = [f.step(1, start=T0 + 1, dur=1.0), f.step(0, start=T0, rank=1)]
    assert post(client, touching).json() == {"inserted": 2, "duplicates": 0}
    before = counts(app)
    # Against a stored step of another attempt (either order), and within the batch.
    for batch, index in (
        ([f.span("eval", T0 + 5, T0 + 6), f.step(0, start=T0 + 0.5, attempt=1)], 1),
        ([f.step(7, start=T0 + 10), f.step(8, start=T0 + 10.5)], 1),
        ([f.step(9, start=T0 - 0.5, dur=0.6)], 0),
    ):
        (err,) = errors_of(post(client, batch))
        assert err["field"] == f"records.{index}.step"
        assert "overlaps step" in err["msg"]
    assert counts(app) == before


def test_overlap_found_through_many_stored_steps(client: Any) -> None:
    steps = [f.step(i, start=T0 + i, dur=1.0) for i in range(300)]
    assert post(client, [f.run(), *steps]).status_code == 200
    (err,) = errors_of(post(client, [f.step(1000, start=T0 + 150.25, dur=0.5)]))
    assert "step 150 of attempt 0" in err["msg"]
    resent = [f.step(i, start=T0 + i, dur=1.0) for i in range(100, 200)]
    assert post(client, resent).json() == {"inserted": 0, "duplicates": 100}


def test_records_after_the_attempt_end_are_refused(client: Any, app: Any) -> None:
    assert post(client, [*f.full_run(steps=3)]).status_code == 200  # ends at T0 + 16
    before = counts(app)
    late = [
        (f.step(3, start=T0 + 16, dur=1.0), "records.0.step.end"),
        (f.span("eval", T0 + 15, T0 + 17, overlapped=True), "records.0.span.end"),
        (f.checkpoint(3, T0 + 20), "records.0.checkpoint.time"),
        (f.heartbeat(T0 + 30), "records.0.heartbeat.time"),
    ]
    for rec, field in late:
        (err,) = errors_of(post(client, [rec]))
        assert err["field"] == field and err["type"] == "after_attempt_end"
    assert counts(app) == before
    # Another attempt is not bound by this one's end.
    assert post(client, [f.step(3, start=T0 + 20, attempt=1)]).status_code == 200


def test_attempt_end_in_the_batch_bounds_its_records(client: Any) -> None:
    batch = [f.run(), f.attempt_end(end=T0 + 20), f.step(5, start=T0 + 19.5, dur=1.0)]
    (err,) = errors_of(post(client, batch))
    assert err["field"] == "records.2.step.end"


def test_attempt_end_before_stored_records_is_refused(client: Any, app: Any) -> None:
    for stored, what in (
        (f.step(3), "step"),
        (f.span("eval", T0 + 30, T0 + 31), "span"),
        (f.checkpoint(3, T0 + 30), "checkpoint"),
        (f.heartbeat(T0 + 30), "heartbeat"),
    ):
        run_id = f"run-{what}"
        assert post(client, [f.run(run_id), {**stored, "run_id": run_id}]).status_code == 200
        (err,) = errors_of(post(client, [f.attempt_end(run_id, end=T0 + 12)]))
        assert err["field"] == "records.0.end" and what in err["msg"]
    with session_scope(app.state.sessionmaker) as s:
        assert s.scalar(select(func.count()).where(Attempt.end.is_not(None))) == 0


def test_dates_far_in_the_future_are_refused(client: Any, app: Any) -> None:
    later = time.time() + 2 * 86_400
    (err,) = errors_of(post(client, [f.run(), f.step(0, start=later)]))
    assert err["field"] == "records.1.step.end" and err["type"] == "in_future"
    (err,) = errors_of(post(client, [f.run(created_at=later)]))
    assert err["field"] == "records.0.run.created_at"
    assert counts(app)["runs"] == 0
    soon = time.time() + 3600  # a clock a little ahead is fine
    assert post(client, [f.run(), f.step(0, start=soon)]).status_code == 200


def test_conflict_reported_before_timing_errors(client: Any) -> None:
    # Two trainers writing one run id: the second one's steps are both re-sent keys with
    # other times and overlapping the first's: the conflict is what is reported.
    assert post(client, [f.run(), *[f.step(i) for i in range(3)]]).status_code == 200
    resp = post(client, [f.step(i, start=T0 + 10.5 + 2 * i) for i in range(3)])
    assert resp.status_code == 409
    assert len(resp.json()["detail"]) == 3
