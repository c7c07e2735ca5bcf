"""A 200 from ingest means committed: a real uvicorn server on loopback, on SQLite and on
PostgreSQL. The moment a batch's 200 arrives, what it stored is read back over another
connection and a batch that depends on it is sent.

Commits are made slower than a request's round trip (a busy disk, a remote database): a
server that answered before committing would be read back empty here every time, not once
in a while. A commit that fails is an error response, never a 200."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from tests import factories as f
from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.e2e

RUNS = 100
STEPS = 5  # per batch; each run gets two batches


class SlowCommits:
    """Engine hooks: a transaction that wrote sleeps `delay_s` before its commit; `fail`
    makes the next such commit raise (a database that went away at that moment)."""

    def __init__(self, engine: Engine) -> None:
        self.delay_s = 0.0
        self.fail = 0
        event.listen(engine, "before_cursor_execute", self._before_execute)
        event.listen(engine, "commit", self._commit)

    @staticmethod
    def _before_execute(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            conn.info["wrote"] = True

    def _commit(self, conn: Any) -> None:
        if not conn.info.pop("wrote", False):
            return
        if self.fail:
            self.fail -= 1
            raise OperationalError("COMMIT", None, Exception("database is locked"))
        time.sleep(self.delay_s)


class Served:
    """The app under uvicorn, from a thread, on a free loopback port."""

    def __init__(self, db_url: str) -> None:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        self.app = create_app(Settings(database_url=db_url))
        self.commits = SlowCommits(self.app.state.engine)
        self.base = f"http://127.0.0.1:{free_port()}"
        port = int(self.base.rsplit(":", 1)[1])
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_http(self.base + "/healthz")
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.engine.dispose()


@pytest.fixture
def served(migrated_url: str) -> Iterator[Served]:
    if not migrated_url.startswith("sqlite") and not os.environ.get("GOODPUT_TEST_POSTGRES_URL"):
        pytest.skip("GOODPUT_TEST_POSTGRES_URL is not set")
    with Served(migrated_url) as server:
        yield server


def first_batch(run_id: str, i: int) -> list[dict[str, Any]]:
    return [
        f.run(run_id, f"run {i}"),
        f.attempt_start(run_id, world_size=1),
        *[f.step(n, run_id) for n in range(STEPS)],
    ]


def second_batch(run_id: str) -> list[dict[str, Any]]:
    """Depends on the first: its attempt's steps go on and the attempt ends."""
    steps = [f.step(n, run_id) for n in range(STEPS, 2 * STEPS)]
    return [*steps, f.heartbeat(f.T0 + 30, run_id), f.attempt_end(run_id, f.T0 + 40)]


def send(client: httpx.Client, records: list[dict[str, Any]]) -> None:
    sent = client.post("/api/v1/ingest", json={"records": records})
    assert sent.status_code == 200, sent.text
    assert sent.json() == {"inserted": len(records), "duplicates": 0}


def read_back(client: httpx.Client, run_id: str, i: int, steps: int, status: str) -> None:
    read = client.get(f"/api/v1/runs/{run_id}")
    assert read.status_code == 200, f"run {i}: acknowledged but not readable: {read.text}"
    body = read.json()
    got = (body["name"], body["num_steps"], body["status"], len(body["attempts"]))
    assert got == (f"run {i}", steps, status, 1), f"run {i}: acknowledged but not stored"
    assert body["attempts"][0]["start"] == f.T0


@pytest.mark.parametrize("commit_delay_s", [0.0, 0.01], ids=["fast-commits", "slow-commits"])
def test_every_200_is_committed_when_it_arrives(served: Served, commit_delay_s: float) -> None:
    served.commits.delay_s = commit_delay_s
    started = time.monotonic()
    # Two clients, two connections: the reader shares nothing with the writer.
    with (
        httpx.Client(base_url=served.base, timeout=10) as writer,
        httpx.Client(base_url=served.base, timeout=10) as reader,
    ):
        for i in range(RUNS):
            run_id = f"ack-{i}"
            send(writer, first_batch(run_id, i))
            if i % 2 == 0:  # read back what the 200 acknowledged, then send what depends on it
                read_back(reader, run_id, i, STEPS, "running")
            # (odd runs: the dependent batch the moment the 200 arrives)
            send(writer, second_batch(run_id))
            read_back(reader, run_id, i, 2 * STEPS, "completed")
    assert time.monotonic() - started < 60  # a few seconds in practice
    listed = httpx.get(served.base + "/api/v1/runs", params={"limit": 500}).json()["runs"]
    assert len(listed) == RUNS


def test_a_commit_that_fails_is_an_error_response_and_stores_nothing(served: Served) -> None:
    served.commits.fail = 1
    batch = {"records": first_batch("fails-once", 0)}
    with httpx.Client(base_url=served.base, timeout=10) as client:
        refused = client.post("/api/v1/ingest", json=batch)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert client.get("/api/v1/runs/fails-once").status_code == 404
        retried = client.post("/api/v1/ingest", json=batch)  # what a sink does after a 503
        assert retried.json() == {"inserted": STEPS + 2, "duplicates": 0}
        assert client.get("/api/v1/runs/fails-once").json()["num_steps"] == STEPS
