"""The 5xx of issue 12, each answered now as it should be: hostile values are a 422 naming
the field (or the import's entry), HEAD is answered wherever GET is, and a database that is
busy, locked or down is a 503 with Retry-After on every route, never a 500."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests import factories as f
from tests.conftest import free_port
from trainer_hooks.records import MAX_JSON_DEPTH, MAX_STEP_TOKENS

INGEST = "/api/v1/ingest"
IMPORT = "/api/v1/import/ml-goodput"


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post(INGEST, content=json.dumps({"records": records}))


def fields(resp: Any) -> list[str]:
    return [e["field"] for e in resp.json()["detail"]]


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


# ---------------------------------------------------------------- JSON-typed fields


HOSTILE_RECORDS = [
    (f.run("r", model_plan={"pattern": "AE", "note": "a\x00b"}), "records.0.run.model_plan"),
    (f.run("r", model_plan={"a\x00": 1}), "records.0.run.model_plan"),
    (f.run("r", runtime_policy={"x": ["ok", {"y": "\x00"}]}), "records.0.run.runtime_policy"),
    (f.run("r", environment={"host": "\x00"}), "records.0.run.environment"),
    (f.run("r", model_plan={"x": float("nan")}), "records.0.run.model_plan"),
    (f.run("r", model_plan={"x": float("inf")}), "records.0.run.model_plan"),
    (f.run("r", model_plan=nested(MAX_JSON_DEPTH + 1)), "records.0.run.model_plan"),
    (f.attempt_end("r", counters={"a\x00": 1}), "records.0.attempt_end.counters.a\x00.[key]"),
    (f.observation("sdpa", "fl\x00sh", run_id="r"), "records.0.observation.observed"),
    (f.observation("s\x00", "flash", run_id="r"), "records.0.observation.seam"),
]


def test_a_value_no_database_can_read_back_is_a_422_naming_its_field(client: Any) -> None:
    for record, field in HOSTILE_RECORDS:
        # json.dumps writes NaN and Infinity, as a careless client would.
        resp = post(client, [record])
        assert resp.status_code == 422, resp.text
        assert field in fields(resp), resp.text
    # nothing was stored, and every list of runs still reads
    for params in ({}, {"pattern": "AE"}, {"project": "default"}):
        listed = client.get("/api/v1/runs", params=params)
        assert listed.status_code == 200 and listed.json()["runs"] == []


def test_a_json_field_as_deep_as_allowed_is_stored_and_reads(client: Any) -> None:
    plan = {"pattern": "AE", "deep": nested(MAX_JSON_DEPTH - 1), "text": "ünïcode \u2603"}
    assert post(client, [f.run("r", model_plan=plan)]).status_code == 200
    assert [r["run_id"] for r in client.get("/api/v1/runs?pattern=AE").json()["runs"]] == ["r"]
    assert client.get("/api/v1/runs/r/receipt").json()["model_plan"] == plan


@pytest.mark.fresh_db
def test_a_plan_stored_before_the_contract_refused_nul_breaks_no_list(
    app: Any, client: Any
) -> None:
    stored = post(client, [f.run("old"), f.run("new", model_plan={"pattern": "AE"})])
    assert stored.status_code == 200
    engine = app.state.engine
    # What an older version stored: PostgreSQL's json keeps \u0000, SQLite's text keeps NaN;
    # neither database can read either back as JSON (->>, json_extract).
    if engine.dialect.name == "postgresql":
        sql = "UPDATE runs SET model_plan = CAST(:p AS json) WHERE run_id = 'old'"
        plan = '{"pattern": "AE", "x": "\\u0000"}'
    else:
        sql = "UPDATE runs SET model_plan = :p WHERE run_id = 'old'"
        plan = '{"pattern": "AE", "x": NaN}'
    with engine.begin() as conn:
        conn.execute(text(sql), {"p": plan})
    resp = client.get("/api/v1/runs", params={"pattern": "AE"})
    assert resp.status_code == 200, resp.text
    assert "new" in [r["run_id"] for r in resp.json()["runs"]]


# ---------------------------------------------------------------- tokens that sums overflow


def test_tokens_past_what_sums_hold_are_a_422_and_store_nothing(client: Any) -> None:
    steps = [f.step(i, "big", tokens=2**53) for i in range(1_100)]
    resp = post(client, [f.run("big"), f.attempt_start("big"), *steps])
    assert resp.status_code == 422
    assert "records.2.step.tokens" in fields(resp)
    assert client.get("/api/v1/runs/big").status_code == 404


def test_1100_steps_of_the_most_tokens_are_stored_and_every_read_of_the_run_works(
    client: Any,
) -> None:
    steps = [f.step(i, "big", tokens=MAX_STEP_TOKENS) for i in range(1_100)]
    end = f.attempt_end("big", f.T0 + 10 + 2 * 1_100)
    resp = post(client, [f.run("big"), f.attempt_start("big"), *steps, end])
    assert resp.status_code == 200, resp.text
    for path in (
        "/api/v1/runs/big",
        "/api/v1/runs/big/steps",
        "/api/v1/runs/big/series?metric=loss",
        "/api/v1/runs/big/goodput",
        f"/api/v1/runs/big/goodput?start={f.T0 + 100}&end={f.T0 + 2_000}",
        "/api/v1/runs/big/goodput/rolling?window_s=300",
        "/api/v1/runs/big/receipt",
        "/api/v1/runs/big/export.csv?what=steps",
        "/api/v1/compare?baseline=big&candidate=big&allow_lane_mismatch=true",
        "/metrics",
        "/api/v1/runs",
    ):
        got = client.get(path)
        assert got.status_code < 500, (path, got.text[:300])
    points = client.get("/api/v1/runs/big/steps?max_points=10000").json()["points"]
    assert len(points) == 1_100 and all(p["tokens"] == MAX_STEP_TOKENS for p in points)


# ---------------------------------------------------------------- the import route


HOSTILE_LOGS = [
    ("[" * 100_000 + "]" * 100_000, "index.0"),  # nested too deeply: its first entry
    ('{"job_start_time": 1790000000.0}\n' + "[" * 100_000 + "]" * 100_000, "line.2"),
    ('{"job_name": "\\ud800", "job_start_time": 1790000000.0}', "line.1.job_name"),
    ('[{"job_name": "a\\u0000", "job_start_time": 1790000000.0}]', "index.0.job_name"),
    ('{"job_start_time": 1' + "0" * 400 + "}", "line.1.job_start_time"),
    (
        '{"job_start_time": 1790000000.0}\n'
        '{"step_start_time": 1790000001.0, "step_count": 9007199254740993}',  # 2^53 + 1
        "line.2.step_count",
    ),
    (
        '{"job_start_time": 1790000000.0}\n{"event_type": "save", '
        '"checkpoint_manager_blocking_start_time": 1790000001.0, '
        '"checkpoint_manager_blocking_duration_secs": 1e300}',
        "line.2.checkpoint_manager_blocking_duration_secs",
    ),
]


def test_a_hostile_import_is_a_422_naming_the_entry(client: Any) -> None:
    for body, field in HOSTILE_LOGS:
        resp = client.post(IMPORT, content=body.encode("utf-8"))
        assert resp.status_code == 422, resp.text
        assert fields(resp) == [field], resp.text


def test_import_refuses_a_media_type_it_does_not_read_with_415(client: Any) -> None:
    log = '{"job_start_time": 1790000000.0}'
    resp = client.post(IMPORT, content=log, headers={"content-type": "image/png"})
    assert resp.status_code == 415 and "application/x-ndjson" in resp.json()["detail"]
    for kind in ("application/x-ndjson", "text/plain; charset=utf-8", "application/json"):
        assert client.post(IMPORT, content=log, headers={"content-type": kind}).status_code == 200


# ---------------------------------------------------------------- HEAD


def test_head_is_answered_wherever_get_is(client: Any) -> None:
    assert post(client, f.full_run("run-a")).status_code == 200
    for path in (
        "/healthz",
        "/api/v1/runs",
        "/api/v1/runs/run-a",
        "/api/v1/runs/run-a/goodput",
        "/api/v1/runs/run-a/export.csv",
        "/metrics",
        "/runs/run-a/goodput",
        "/ui/data/runs/run-a/goodput",
        "/openapi.json",
    ):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/api/v1/runs/nope").status_code == 404
    assert client.head(INGEST).status_code == 405  # POST only


# ---------------------------------------------------------------- database busy or down


def assert_503(resp: Any) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"].isdigit()


ROUTES = (
    ("GET", "/api/v1/runs"),
    ("GET", "/api/v1/runs/run-a"),
    ("GET", "/api/v1/runs/run-a/goodput"),
    ("GET", "/api/v1/runs/run-a/receipt"),
    ("GET", "/metrics"),
    ("POST", INGEST),
    ("POST", IMPORT),
)


def call(client: Any, method: str, path: str) -> Any:
    if path == INGEST:
        return post(client, f.full_run("run-b"))
    if path == IMPORT:
        return client.post(IMPORT, content='{"job_start_time": 1790000000.0}')
    return client.request(method, path)


@pytest.fixture
def one_connection_pool(migrated_url: str) -> Iterator[tuple[Any, Any]]:
    from service.app import create_app
    from service.settings import Settings

    args: dict[str, Any] = {"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.2}
    if migrated_url.startswith("sqlite"):
        args["connect_args"] = {"check_same_thread": False}
    engine = create_engine(migrated_url, **args)
    app = create_app(Settings(database_url=migrated_url), engine=engine)
    with TestClient(app) as client:
        yield client, engine
    engine.dispose()


def test_a_pool_with_no_connection_free_in_time_is_a_503(
    one_connection_pool: tuple[Any, Any],
) -> None:
    client, engine = one_connection_pool
    assert post(client, f.full_run("run-a")).status_code == 200
    with engine.connect():  # holds the pool's only connection
        for method, path in ROUTES:
            assert_503(call(client, method, path))
    assert client.get("/api/v1/runs/run-a").status_code == 200  # and back once it is free


def test_a_locked_sqlite_database_is_a_503(tmp_path: Any) -> None:
    from service.app import create_app
    from service.settings import Settings

    path = tmp_path / "goodput.db"
    app = create_app(Settings(database_url=f"sqlite:///{path}", sqlite_busy_timeout_ms=50))
    with TestClient(app) as client:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            assert_503(post(client, f.full_run("run-a")))
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert post(client, f.full_run("run-a")).status_code == 200
    app.state.engine.dispose()


def test_an_unreachable_database_is_a_503_on_every_route() -> None:
    from service.app import create_app
    from service.settings import Settings

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    engine = create_engine(url, connect_args={"connect_timeout": 2})
    app = create_app(Settings(database_url=url), engine=engine)
    with TestClient(app) as client:
        for method, path in ROUTES:
            assert_503(call(client, method, path))
        assert client.get("/healthz").status_code == 503
    engine.dispose()
