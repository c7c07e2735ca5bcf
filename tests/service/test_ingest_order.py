"""Records in any order, across batches and ranks: a record whose run has not arrived makes a
placeholder run, a heartbeat or attempt_end whose attempt_start has not arrived a placeholder
attempt; the run and attempt_start records fill them in when they come. On SQLite and
PostgreSQL (the `app` and `client` fixtures run each test on both)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.store.db import make_engine, make_sessionmaker, session_scope
from service.store.models import Attempt, Base, Run
from tests import factories as f
from tests.conftest import LiveServer

T0 = f.T0


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/ingest", json={"records": records})


def profile(run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    return {"kind": "profile", "run_id": run_id, "first_step": 2, "num_steps": 3, **kw}


def excluded(start: float, end: float, run_id: str = "run-a", **kw: Any) -> dict[str, Any]:
    return {"kind": "excluded_window", "run_id": run_id, "start": start, "end": end, **kw}


def run_row(app: Any, run_id: str = "run-a") -> Run | None:
    with session_scope(app.state.sessionmaker) as s:
        return s.get(Run, run_id)


def attempt_rows(app: Any, run_id: str = "run-a") -> list[Attempt]:
    with session_scope(app.state.sessionmaker) as s:
        stmt = select(Attempt).where(Attempt.run_id == run_id)
        return list(s.scalars(stmt.order_by(Attempt.attempt, Attempt.rank)))


# Each kind alone, before its run record; its time becomes the placeholder's created_at.
ALONE: list[tuple[dict[str, Any], float | None]] = [
    (f.attempt_start(start=T0 + 1), T0 + 1),
    (f.attempt_end(end=T0 + 2), T0 + 2),
    (f.heartbeat(T0 + 3), T0 + 3),
    (f.step(0), T0 + 10),
    (f.span("eval", T0 + 4, T0 + 5), T0 + 4),
    (f.checkpoint(0, T0 + 6), T0 + 6),
    (f.routing(0), None),
    (f.observation("sdpa", "flash"), T0 + 1),
    (profile(), None),
    (excluded(T0 + 7, T0 + 8, reason="maintenance"), T0 + 7),
]


@pytest.mark.parametrize(("record", "created"), ALONE, ids=[r["kind"] for r, _ in ALONE])
def test_every_kind_is_stored_before_its_run_and_the_run_record_fills_it_in(
    app: Any, client: Any, record: dict[str, Any], created: float | None
) -> None:
    before = time.time()
    assert post(client, [record]).json() == {"inserted": 1, "duplicates": 0}
    placeholder = run_row(app)
    assert placeholder is not None and not placeholder.declared
    assert (placeholder.name, placeholder.project) == ("run-a", "default")
    assert placeholder.model_plan == placeholder.runtime_policy == placeholder.environment == {}
    if created is None:
        assert before <= placeholder.created_at <= time.time()
    else:
        assert placeholder.created_at == created
    shown = client.get("/api/v1/runs/run-a")
    assert shown.status_code == 200 and shown.json()["name"] == "run-a"
    assert shown.json()["declared"] is False
    listed = client.get("/api/v1/runs").json()["runs"]
    assert [(r["run_id"], r["project"]) for r in listed] == [("run-a", "default")]

    plan = {"pattern": "AEME"}
    assert post(client, [f.run(model_plan=plan, tags=["x"])]).json()["inserted"] == 1
    filled = run_row(app)
    assert filled is not None and filled.declared
    assert (filled.name, filled.created_at, filled.model_plan) == ("alpha", T0, plan)
    assert client.get("/api/v1/runs/run-a").json()["tags"] == ["x"]
    assert client.get("/api/v1/runs/run-a").json()["declared"] is True
    # The record that came first is still there, once: resending it is a duplicate.
    assert post(client, [record]).json() == {"inserted": 0, "duplicates": 1}


def test_a_run_record_resent_after_the_fill_is_a_duplicate(app: Any, client: Any) -> None:
    post(client, [f.step(0)])
    assert post(client, [f.run()]).json() == {"inserted": 1, "duplicates": 0}
    again = post(client, [f.run(created_at=T0 + 5)])  # another rank's start: the first stays
    assert again.json() == {"inserted": 0, "duplicates": 1}
    assert post(client, [f.run(name="renamed")]).status_code == 409  # issue 12: a conflict
    row = run_row(app)
    assert row is not None and (row.name, row.created_at) == ("alpha", T0)
    # A run record sent twice in one batch, its run a placeholder: the first one counts.
    post(client, [f.step(0, run_id="run-b")])
    both = post(client, [f.run("run-b", "first"), f.run("run-b", "first", created_at=T0 + 1)])
    assert both.json() == {"inserted": 1, "duplicates": 1}
    second = run_row(app, "run-b")
    assert second is not None and (second.name, second.created_at) == ("first", T0)


def test_placeholder_created_at_is_the_earliest_time_of_its_records_in_the_batch(
    app: Any, client: Any
) -> None:
    batch = [f.step(3), f.heartbeat(T0 + 2), f.checkpoint(3, T0 + 30), f.routing(3)]
    assert post(client, batch).json()["inserted"] == 4
    row = run_row(app)
    assert row is not None and row.created_at == T0 + 2


def test_attempt_end_and_heartbeats_before_attempt_start(app: Any, client: Any) -> None:
    post(client, [f.run()])
    early = [f.heartbeat(T0 + 20, rank=1), f.attempt_end(end=T0 + 50, rank=1)]
    assert post(client, early).json() == {"inserted": 2, "duplicates": 0}
    (row,) = attempt_rows(app)
    assert not row.start_declared and row.world_size == 1
    assert (row.start, row.end, row.last_seen, row.status) == (
        T0 + 20,
        T0 + 50,
        T0 + 20,
        "completed",
    )
    assert client.get("/api/v1/runs/run-a").json()["status"] == "completed"

    start = f.attempt_start(start=T0 + 1, rank=1, world_size=4)
    assert post(client, [start]).json() == {"inserted": 1, "duplicates": 0}
    (row,) = attempt_rows(app)
    assert row.start_declared  # the declared start, not the lower of the two
    assert (row.start, row.world_size, row.end, row.last_seen) == (T0 + 1, 4, T0 + 50, T0 + 20)
    assert post(client, [start]).json() == {"inserted": 0, "duplicates": 1}
    other = post(client, [f.attempt_start(start=T0 + 3, rank=1)])  # issue 12: a conflict
    assert other.status_code == 409
    assert other.json()["detail"][0]["fields"]["start"] == {"stored": T0 + 1, "sent": T0 + 3}
    assert attempt_rows(app)[0].start == T0 + 1


def test_a_placeholder_start_is_the_earliest_time_seen_and_a_later_one_replaces_it(
    app: Any, client: Any
) -> None:
    post(client, [f.heartbeat(T0 + 38)])
    post(client, [f.attempt_end(end=T0 + 40, status="failed", cause="oom")])
    post(client, [f.heartbeat(T0 + 30)])
    (row,) = attempt_rows(app)
    assert (row.start, row.end, row.last_seen) == (T0 + 30, T0 + 40, T0 + 38)
    # Once declared, an end before the start is refused as before.
    assert post(client, [f.attempt_start(start=T0 + 35)]).json()["inserted"] == 1
    post(client, [f.attempt_start(start=T0 + 50, attempt=1)])
    refused = post(client, [f.attempt_end(end=T0 + 45, attempt=1)])
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["field"] == "records.0.end"


def test_a_declared_start_after_a_stored_end_is_refused_naming_the_field(
    app: Any, client: Any
) -> None:
    post(client, [f.run(), f.attempt_end(end=T0 + 10)])
    resp = post(client, [f.step(0), f.attempt_start(start=T0 + 20)])
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["detail"]
    assert error["field"] == "records.1.start" and error["type"] == "start_after_end"
    (row,) = attempt_rows(app)
    assert not row.start_declared and row.start == T0 + 10
    assert client.get("/api/v1/runs/run-a").json()["num_steps"] == 0


def test_heartbeat_interval_the_newest_heartbeat_wins(app: Any, client: Any) -> None:
    post(client, [f.run(), f.attempt_start()])
    post(client, [f.heartbeat(T0 + 5, interval_s=2.0), f.heartbeat(T0 + 9, interval_s=3.0)])
    assert attempt_rows(app)[0].heartbeat_s == 3.0
    assert post(client, [f.heartbeat(T0 + 7, interval_s=10.0)]).json()["inserted"] == 0
    assert attempt_rows(app)[0].heartbeat_s == 3.0
    post(client, [f.heartbeat(T0 + 12)])  # no interval given: the one known stays
    assert attempt_rows(app)[0].heartbeat_s == 3.0
    post(client, [f.heartbeat(T0 + 15, interval_s=1.5)])
    row = attempt_rows(app)[0]
    assert (row.heartbeat_s, row.last_seen) == (1.5, T0 + 15)


def test_excluded_windows_are_stored_once(app: Any, client: Any) -> None:
    batch = [f.run(), excluded(T0 + 1, T0 + 2), excluded(T0 + 1, T0 + 2), excluded(T0 + 3, T0 + 4)]
    assert post(client, batch).json() == {"inserted": 3, "duplicates": 1}
    assert post(client, batch[1:]).json() == {"inserted": 0, "duplicates": 3}
    assert len(table_rows(app, "excluded_windows", "run-a")) == 2


# -- a whole run, shuffled into batches, stores what the ordered batches store --


def whole_run(run_id: str, ranks: int = 2) -> list[dict[str, Any]]:
    """Two attempts of `ranks` ranks: the first fails after a checkpoint, the second finishes;
    steps, spans, routing, heartbeats with intervals, observations, a profile and an
    excluded window."""
    recs: list[dict[str, Any]] = [
        f.run(run_id, "whole", tags=["a", "b"], model_plan=f.loop_plan()),
        excluded(T0 + 3, T0 + 4, run_id, reason="maintenance"),
        profile(run_id),
    ]
    t = T0
    for attempt, steps, status in ((0, 6, "failed"), (1, 5, "completed")):
        for rank in range(ranks):
            kw = {"attempt": attempt, "rank": rank}
            recs.append(f.attempt_start(run_id, start=t, world_size=ranks, **kw))
            recs.append(f.span("startup", t, t + 2, run_id, **kw))
            recs.append(f.observation("sdpa", "flash", run_id, **kw))
            for n in range(steps):
                s = t + 3 + 2 * n
                recs.append(f.span("data_stall", s - 0.5, s, run_id, step=n, **kw))
                recs.append(f.step(n, run_id, start=s, dur=1.5 + 0.1 * rank, **kw))
                recs.append(f.routing(n, 0, run_id, **kw))
                recs.append(f.heartbeat(s + 1, run_id, interval_s=1.0 + n, **kw))
                if n == 2:
                    recs.append(f.checkpoint(n, s + 1.6, run_id, **kw))
            end = t + 3 + 2 * steps
            recs.append(
                f.attempt_end(run_id, end, status, cause="boom" if attempt == 0 else None, **kw)
            )
        t += 3 + 2 * steps + 5
    return recs


def table_rows(app: Any, table_name: str, run_id: str) -> list[tuple[Any, ...]]:
    """A table's rows of one run, without surrogate ids, the run id and ingest times,
    sorted."""
    table = Base.metadata.tables[table_name]
    cols = [c for c in table.c if c.name not in ("id", "run_id", "ingested_at")]
    with session_scope(app.state.sessionmaker) as s:
        rows = s.execute(select(*cols).where(table.c.run_id == run_id)).all()
    return sorted((tuple(r) for r in rows), key=_sort_key)


def _sort_key(row: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(f"{v:.6f}" if isinstance(v, float) else repr(v) for v in row)


def _same(got: Any, want: Any) -> bool:
    """Equal, floats up to rounding (rollups sum in the order records came)."""
    if isinstance(want, float) and isinstance(got, float):
        return got == pytest.approx(want, rel=1e-12, abs=1e-9)
    return bool(got == want)


RUN_TABLES = sorted(name for name, t in Base.metadata.tables.items() if "run_id" in t.c)


def assert_same_rows(app: Any, expected_run: str, run_id: str) -> None:
    for name in RUN_TABLES:
        want, got = table_rows(app, name, expected_run), table_rows(app, name, run_id)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            assert all(map(_same, g, w)), (name, g, w)


def batches(records: list[dict[str, Any]], rng: random.Random) -> list[list[dict[str, Any]]]:
    out = []
    i = 0
    while i < len(records):
        n = rng.randint(1, 12)
        out.append(records[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_batches_of_a_whole_run_store_the_same_rows_as_ordered_ones(
    app: Any, client: Any, seed: int
) -> None:
    ordered = whole_run("ordered")
    assert post(client, ordered).json() == {"inserted": len(ordered), "duplicates": 0}
    rng = random.Random(seed)
    shuffled = whole_run("shuffled")
    rng.shuffle(shuffled)
    for batch in batches(shuffled, rng):  # a heartbeat older than one stored: a duplicate
        resp = post(client, batch)
        assert resp.status_code == 200, resp.text
    backwards = list(reversed(whole_run("backwards")))  # run record last, ends before starts
    for batch in batches(backwards, rng):
        assert post(client, batch).status_code == 200
    for run_id in ("shuffled", "backwards"):
        assert_same_rows(app, "ordered", run_id)
        want = client.get("/api/v1/runs/ordered").json()
        got = client.get(f"/api/v1/runs/{run_id}").json()
        assert {**got, "run_id": "ordered"} == want
    # Sending everything again, in any order, stores nothing twice.
    again = post(client, whole_run("shuffled")[::-1])
    assert again.json() == {"inserted": 0, "duplicates": len(shuffled)}


def test_ranks_sending_at_once_in_any_order_store_what_ordered_batches_store(
    migrated_url: str, live_server: LiveServer
) -> None:
    """Each rank's records, shuffled into small batches, sent by one thread per rank to a
    real server at the same time: every batch is a 200 (no lock or key clash between the
    placeholders they race to make) and the rows are those of the ordered batch."""
    ranks = 4
    url = live_server.base + "/api/v1/ingest"
    ordered = whole_run("ordered", ranks)
    assert httpx.post(url, json={"records": ordered}, timeout=30).status_code == 200
    per_rank: dict[int, list[dict[str, Any]]] = {r: [] for r in range(ranks)}
    for rec in whole_run("racing", ranks):
        per_rank[rec.get("rank", 0)].append(rec)

    def send(rank: int) -> list[int]:
        rng = random.Random(rank)
        records = per_rank[rank]
        rng.shuffle(records)
        with httpx.Client(timeout=30) as client:
            return [
                client.post(url, json={"records": batch}).status_code
                for batch in batches(records, rng)
            ]

    with ThreadPoolExecutor(ranks) as pool:
        codes = [code for sent in pool.map(send, range(ranks)) for code in sent]
    assert set(codes) == {200}, codes
    engine = make_engine(migrated_url)
    try:
        reader = SimpleNamespace(state=SimpleNamespace(sessionmaker=make_sessionmaker(engine)))
        assert_same_rows(reader, "ordered", "racing")
    finally:
        engine.dispose()
