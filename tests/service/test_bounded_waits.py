"""Issue 12: an ingest blocked behind another transaction waits a bounded time, then answers
503 with Retry-After (which the sink honours), never hangs and never a 500. PostgreSQL: the
run's row lock held by `SELECT ... FOR UPDATE` elsewhere, bounded by lock_timeout (and by
statement_timeout when that is shorter). SQLite: the write lock held by `BEGIN IMMEDIATE`,
bounded by busy_timeout. The bounds come from GOODPUT_* variables (service/settings.py)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests import factories as f
from tests.conftest import (
    LiveServer,
    drop_postgres_schema,
    fresh_postgres_url,
    postgres_base_url,
    postgres_reachable,
)

INGEST = "/api/v1/ingest"
BOUND_S = 0.4
SLACK_S = 3.0  # a shared, busy machine: the answer may come this much after the bound


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post(INGEST, content=json.dumps({"records": records}))


def timed_post(client: Any, records: list[dict[str, Any]]) -> tuple[Any, float]:
    t = time.monotonic()
    resp = post(client, records)
    return resp, time.monotonic() - t


def assert_bounded_503(resp: Any, waited: float, bound_s: float = BOUND_S) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    assert "retry later" in resp.json()["detail"]
    assert bound_s * 0.9 <= waited < bound_s + SLACK_S, waited


def opening(run_id: str) -> list[dict[str, Any]]:
    """A run's first batch: the run, its attempt's start, steps 0-4 (the attempt goes on)."""
    return f.full_run(run_id)[:-1]


def more_steps(run_id: str = "run-a") -> list[dict[str, Any]]:
    return [f.step(i, run_id) for i in range(10, 15)]


def stored_steps(client: Any, run_id: str = "run-a") -> list[int]:
    resp = client.get(f"/api/v1/runs/{run_id}/steps")
    assert resp.status_code == 200, resp.text
    return sorted(p["step"] for p in resp.json()["points"])


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL not reachable at {postgres_base_url()}")
    from service.store.migrate import upgrade

    url, schema = fresh_postgres_url()
    try:
        upgrade(url)
        yield url
    finally:
        drop_postgres_schema(schema)


class RunLock:
    """Another transaction holding run `run_id`'s row exclusively (as one filling in the
    run record does): every ingest into the run waits for it, since its rows reference it."""

    def __init__(self, url: str, run_id: str) -> None:
        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        self.conn.execute(
            text("SELECT run_id FROM runs WHERE run_id = :r FOR UPDATE"), {"r": run_id}
        ).one()

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


@pytest.fixture
def pg_app(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("GOODPUT_PG_LOCK_TIMEOUT_MS", str(int(BOUND_S * 1000)))
    app = create_app(Settings(database_url=pg_url))
    yield app
    app.state.engine.dispose()


def test_postgres_ingest_behind_a_held_run_lock_is_a_503_after_lock_timeout(
    pg_app: Any, pg_url: str
) -> None:
    with TestClient(pg_app) as client:
        assert post(client, opening("run-a")).status_code == 200
        lock = RunLock(pg_url, "run-a")
        try:
            resp, waited = timed_post(client, more_steps())
            assert_bounded_503(resp, waited)
            other, _ = timed_post(client, opening("run-b"))  # another run is not held up
            assert other.status_code == 200, other.text
        finally:
            lock.release()
        resp = post(client, more_steps())  # the retry, once the lock is free
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"inserted": 5, "duplicates": 0}
        assert stored_steps(client) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]


class RankLock:
    """Another ingest writing rank `rank` of run `run_id`: it holds that rank's lock
    (rollups/write.py lock_runs) until it commits."""

    def __init__(self, url: str, run_id: str, rank: int) -> None:
        from service.store.rollups.write import _lock_key

        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        self.conn.execute(
            text("SELECT pg_advisory_xact_lock_shared(:k, -1)"), {"k": _lock_key(run_id)}
        )
        self.conn.execute(
            text("SELECT pg_advisory_xact_lock(:k, :r)"), {"k": _lock_key(run_id), "r": rank}
        )

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


def test_postgres_ranks_of_one_run_ingest_side_by_side(pg_app: Any, pg_url: str) -> None:
    """A batch waits only for the ingests of its own ranks: rank 1 is stored while rank 0's
    lock is held, and rank 0's batch is a 503 after the lock timeout, then stored."""
    with TestClient(pg_app) as client:
        opening_ranks = [*opening("run-a"), f.attempt_start(rank=1)]
        assert post(client, opening_ranks).status_code == 200
        rank1 = [f.step(i, rank=1) for i in range(10, 15)]
        lock = RankLock(pg_url, "run-a", 0)
        try:
            resp, waited = timed_post(client, rank1)
            assert resp.status_code == 200, resp.text
            assert waited < BOUND_S * 0.9, waited  # never waited for rank 0
            assert_bounded_503(*timed_post(client, more_steps()))
        finally:
            lock.release()
        assert post(client, more_steps()).json() == {"inserted": 5, "duplicates": 0}


def test_postgres_statement_timeout_is_a_503_too(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("GOODPUT_PG_LOCK_TIMEOUT_MS", "0")  # no lock bound: the statement's
    monkeypatch.setenv("GOODPUT_PG_STATEMENT_TIMEOUT_MS", str(int(BOUND_S * 1000)))
    app = create_app(Settings(database_url=pg_url))
    try:
        with TestClient(app) as client:
            assert post(client, opening("run-a")).status_code == 200
            lock = RunLock(pg_url, "run-a")
            try:
                assert_bounded_503(*timed_post(client, more_steps()))
            finally:
                lock.release()
            assert post(client, more_steps()).status_code == 200
    finally:
        app.state.engine.dispose()


def test_the_sink_reads_the_503_as_retry_after_one_second(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a real HTTP server, as the trainer's sink sends: the batch is kept, to be sent
    again after the Retry-After the service asked for."""
    from trainer_hooks.sink import Sender, SinkStats

    monkeypatch.setenv("GOODPUT_PG_LOCK_TIMEOUT_MS", str(int(BOUND_S * 1000)))
    server = LiveServer(pg_url)
    server.start()
    sender = Sender(server.base)
    try:
        stats = SinkStats()
        body = json.dumps({"records": opening("run-a")}).encode()
        assert sender.post(body, stats) == "sent"
        lock = RunLock(pg_url, "run-a")
        try:
            body = json.dumps({"records": more_steps()}).encode()
            assert sender.post(body, stats) == "retry"
            assert sender.retriable and sender.retry_after == 1.0
            assert "HTTP 503" in str(stats.last_error)
        finally:
            lock.release()
        assert sender.post(body, stats) == "sent"
    finally:
        sender.close()
        server.stop()


def test_postgres_bounds_are_set_on_served_sessions_only(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.store.db import make_engine, make_sessionmaker, session_scope

    monkeypatch.setenv("GOODPUT_PG_LOCK_TIMEOUT_MS", "1234")
    monkeypatch.setenv("GOODPUT_PG_STATEMENT_TIMEOUT_MS", "0")
    monkeypatch.setenv("GOODPUT_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS", "45000")
    monkeypatch.setenv("GOODPUT_DB_POOL_TIMEOUT_S", "2.5")
    engine = make_engine(pg_url)
    try:
        assert engine.pool.timeout() == 2.5  # type: ignore[attr-defined]
        with engine.connect() as conn:  # opened before: a migration's connection, say
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "0"
        factory = make_sessionmaker(engine)
        for _ in range(2):  # the pooled connection of before, then again (set once)
            with session_scope(factory) as s:
                assert s.execute(text("SHOW lock_timeout")).scalar() == "1234ms"
                assert s.execute(text("SHOW statement_timeout")).scalar() == "0"
                shown = s.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
                assert shown == "45s"
    finally:
        engine.dispose()


# ---------------------------------------------------------------- SQLite


def test_sqlite_ingest_behind_a_held_write_lock_is_a_503_after_busy_timeout(
    tmp_path: Path,
) -> None:
    from service.app import create_app
    from service.settings import Settings

    path = tmp_path / "goodput.db"
    busy_ms = int(BOUND_S * 1000)
    app = create_app(Settings(database_url=f"sqlite:///{path}", sqlite_busy_timeout_ms=busy_ms))
    try:
        with TestClient(app) as client:
            assert post(client, opening("run-a")).status_code == 200
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the write lock, as another writer holds it
            try:
                assert_bounded_503(*timed_post(client, more_steps()))
                assert stored_steps(client) == [0, 1, 2, 3, 4]  # WAL: reads go on meanwhile
            finally:
                other.execute("ROLLBACK")
                other.close()
            resp = post(client, more_steps())
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"inserted": 5, "duplicates": 0}
            assert stored_steps(client) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    finally:
        app.state.engine.dispose()


def test_sqlite_ingest_behind_a_writer_of_the_same_process_is_a_503_after_busy_timeout(
    tmp_path: Path,
) -> None:
    """In one process, writers queue in the engine's WriteGate (service/store/db.py), not in
    SQLite's busy handler: bounded by the busy timeout all the same."""
    from service.app import create_app
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'goodput.db'}"
    app = create_app(Settings(database_url=url, sqlite_busy_timeout_ms=int(BOUND_S * 1000)))
    try:
        with TestClient(app) as client:
            assert post(client, opening("run-a")).status_code == 200
            writer = app.state.sessionmaker()  # a write transaction left open, in-process
            writer.execute(text("UPDATE runs SET ingested_at = ingested_at"))
            try:
                assert_bounded_503(*timed_post(client, more_steps()))
            finally:
                writer.rollback()
                writer.close()
            resp = post(client, more_steps())
            assert resp.status_code == 200, resp.text
            assert stored_steps(client) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    finally:
        app.state.engine.dispose()


def test_sqlite_reads_with_temporary_tables_pass_a_held_write_gate(tmp_path: Path) -> None:
    """Rolling goodput fills a temporary table of its windows on its own connection: no
    write to the database file, so it neither waits for nor takes the write gate."""
    from service.app import create_app
    from service.settings import Settings

    url = f"sqlite:///{tmp_path / 'goodput.db'}"
    app = create_app(Settings(database_url=url, sqlite_busy_timeout_ms=int(BOUND_S * 1000)))
    try:
        with TestClient(app) as client:
            assert post(client, f.full_run("run-a", steps=20)).status_code == 200
            writer = app.state.sessionmaker()
            writer.execute(text("UPDATE runs SET ingested_at = ingested_at"))
            try:
                t = time.monotonic()
                resp = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 5})
                assert resp.status_code == 200, resp.text
                assert len(resp.json()["windows"]) > 1
                assert time.monotonic() - t < BOUND_S * 0.9  # never queued behind the writer
            finally:
                writer.rollback()
                writer.close()
    finally:
        app.state.engine.dispose()


def test_the_write_gate_hands_over_in_arrival_order_and_bounds_the_wait() -> None:
    from service.store.db import WriteGate

    gate = WriteGate(timeout_s=5.0)
    assert gate.acquire("holder")
    order: list[str] = []

    def wait_turn(name: str) -> None:
        assert gate.acquire(name)
        order.append(name)
        gate.release(name)

    threads = []
    for name in ("a", "b", "c"):
        threads.append(threading.Thread(target=wait_turn, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(gate._queue) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)
    gate.release("holder")
    for thread in threads:
        thread.join(10)
    assert order == ["a", "b", "c"]
    assert gate.acquire("x")
    short = WriteGate(timeout_s=0.05)
    assert short.acquire("x")
    began = time.monotonic()
    assert not short.acquire("y")  # waited its bound, then gave up
    assert 0.04 <= time.monotonic() - began < 2.0
    short.release("x")
    assert short.acquire("y")  # a waiter that gave up left the queue


def test_sqlite_pool_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.store.db import make_engine

    monkeypatch.setenv("GOODPUT_DB_POOL_SIZE", "3")
    monkeypatch.setenv("GOODPUT_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("GOODPUT_DB_POOL_TIMEOUT_S", "0.75")
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        pool: Any = engine.pool
        assert (pool.size(), pool._max_overflow, pool.timeout()) == (3, 0, 0.75)
    finally:
        engine.dispose()
