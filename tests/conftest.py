"""Shared fixtures: a fresh, migrated database per test on SQLite and, when reachable,
PostgreSQL (GOODPUT_TEST_POSTGRES_URL, a new schema per test), and an app client."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_base_url() -> str:
    return os.environ.get("GOODPUT_TEST_POSTGRES_URL", DEFAULT_PG)


_pg_ok: bool | None = None


def postgres_reachable() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            eng = create_engine(postgres_base_url(), connect_args={"connect_timeout": 3})
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
            eng.dispose()
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


def fresh_postgres_url() -> tuple[str, str]:
    """A new schema in the test database; the URL pins search_path to it."""
    schema = f"gp_{uuid.uuid4().hex[:12]}"
    eng = create_engine(postgres_base_url())
    with eng.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng.dispose()
    url = make_url(postgres_base_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def drop_postgres_schema(schema: str) -> None:
    eng = create_engine(postgres_base_url())
    with eng.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet) of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'goodput.db'}"
        return
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL not reachable at {postgres_base_url()}")
    url, schema = fresh_postgres_url()
    try:
        yield url
    finally:
        drop_postgres_schema(schema)


@pytest.fixture
def migrated_url(db_url: str) -> str:
    from service.store.migrate import upgrade

    upgrade(db_url)
    return db_url


@pytest.fixture
def app(migrated_url: str) -> Iterator[Any]:
    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=migrated_url))
    yield application
    application.state.engine.dispose()


@pytest.fixture
def client(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


class LiveServer:
    """The app served by uvicorn from a thread on a loopback port; can stop and start again
    on the same port, to play an outage."""

    def __init__(self, url: str, **settings: Any) -> None:
        self.db_url = url
        self.settings = settings
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        import threading

        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        app = create_app(Settings(database_url=self.db_url, **self.settings))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_http(self.base + "/healthz")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)
            self._server.config.app.state.engine.dispose()
            self._server = None


@pytest.fixture
def live_server(migrated_url: str) -> Iterator[LiveServer]:
    server = LiveServer(migrated_url)
    server.start()
    yield server
    server.stop()
