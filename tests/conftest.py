"""Shared fixtures: the app and its client on SQLite and, when reachable, PostgreSQL
(GOODPUT_TEST_POSTGRES_URL).

`app`/`client` run a test on a database of each kind migrated once per session (one SQLite
file, one PostgreSQL database), its work rolled back after it (SQLAlchemy's "join a session
into an external transaction" recipe).
A test that needs a database of its own (several connections writing at once, locks, another
engine or process reading what was committed, migrations) is marked `fresh_db`, or asks for
`migrated_url`/`db_url`: then `app` is built on a new, freshly migrated database (a new SQLite
file, a new PostgreSQL schema)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
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


DB_KINDS = ("sqlite", "postgresql")
FRESH_DB = "fresh_db"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FRESH_DB}: the `app` and `client` fixtures give this test a database of its own, "
        "freshly migrated (not the session's, rolled back after the test)",
    )


@pytest.fixture(params=DB_KINDS)
def db_kind(request: pytest.FixtureRequest) -> str:
    """Which database a test runs on: every test of the database runs on both."""
    if request.param == "postgresql" and not postgres_reachable():
        pytest.skip(f"PostgreSQL not reachable at {postgres_base_url()}")
    return str(request.param)


@pytest.fixture
def db_url(db_kind: str, tmp_path: Path) -> Iterator[str]:
    """An empty database (no schema yet) of each kind, the test's own."""
    if db_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'goodput.db'}"
        return
    url, schema = fresh_postgres_url()
    try:
        yield url
    finally:
        drop_postgres_schema(schema)


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """The test's own database, migrated to the head revision."""
    from service.store.migrate import upgrade

    upgrade(db_url)
    return db_url


class SharedDatabase:
    """One database of a kind, migrated once per session, that tests share: each test's
    work runs inside an outer transaction that is rolled back after it (`_rolled_back_app`)."""

    def __init__(self, kind: str, directory: Path) -> None:
        from service.store.db import make_engine
        from service.store.migrate import upgrade

        self.database: str | None = None
        if kind == "sqlite":
            self.url = f"sqlite:///{directory / 'shared.db'}"
        else:
            self.url, self.database = new_postgres_database()
        upgrade(self.url)
        self.engine = make_engine(self.url)
        if kind == "sqlite":
            _sqlite_transactions_by_sqlalchemy(self.engine)

    def close(self) -> None:
        """Drop it, having checked that no test's work outlived its test."""
        with self.engine.connect() as conn:
            left = conn.execute(text("SELECT count(*) FROM runs")).scalar_one()
        self.engine.dispose()
        if self.database is not None:
            drop_postgres_database(self.database)
        assert left == 0, f"{left} runs were left in the shared {self.url}: a test committed"


def new_postgres_database() -> tuple[str, str]:
    """A new database beside the test database. Not a schema of it: a test's transaction
    advisory locks (service/store/rollups: a run's lock while it ingests) are held until the
    test's outer transaction is rolled back, and they are per database, so in a database of
    its own they hold up no other pytest session on the same server."""
    name = f"gp_shared_{uuid.uuid4().hex[:12]}"
    eng = create_engine(postgres_base_url(), isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return make_url(postgres_base_url()).set(database=name).render_as_string(False), name


def drop_postgres_database(name: str) -> None:
    eng = create_engine(postgres_base_url(), isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


def _sqlite_transactions_by_sqlalchemy(engine: Any) -> None:
    """pysqlite begins a transaction only before a write and SQLite's SAVEPOINT outside one
    starts (and its RELEASE commits) a transaction of its own, so a rolled-back outer
    transaction would not hold the savepoints inside it: the driver's own transaction handling
    is turned off and SQLAlchemy's BEGIN emitted (SQLAlchemy's pysqlite "Serializable isolation /
    Savepoints / Transactional DDL" recipe)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


@pytest.fixture(scope="session")
def shared_databases(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str], SharedDatabase]]:
    """Lazily, one SharedDatabase per kind for the whole session."""
    made: dict[str, SharedDatabase] = {}
    directory = tmp_path_factory.mktemp("shared-db")

    def get(kind: str) -> SharedDatabase:
        if kind not in made:
            made[kind] = SharedDatabase(kind, directory)
        return made[kind]

    yield get
    for database in made.values():
        database.close()


def wants_fresh_database(request: pytest.FixtureRequest) -> bool:
    """A test marked fresh_db, or one that reaches its own database by URL (migrated_url,
    db_url: it downgrades it, serves it from another process, opens more engines on it),
    gets `app` on a database of its own; every other test the session's, rolled back.
    GOODPUT_TEST_FRESH_DB=1 gives every test a database of its own (to compare)."""
    node = request.node
    if os.environ.get("GOODPUT_TEST_FRESH_DB") or node.get_closest_marker(FRESH_DB) is not None:
        return True
    return bool({"migrated_url", "db_url"} & set(getattr(node, "fixturenames", ())))


@pytest.fixture
def app(request: pytest.FixtureRequest, db_kind: str) -> Iterator[Any]:
    """The app on a migrated database of `db_kind`: by default the session's database, the
    test's work rolled back after it; a fresh database of its own for the tests
    `wants_fresh_database` names."""
    if wants_fresh_database(request):
        yield from _fresh_app(request.getfixturevalue("migrated_url"))
    else:
        yield from _rolled_back_app(request.getfixturevalue("shared_databases")(db_kind))


def _fresh_app(url: str) -> Iterator[Any]:
    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=url))
    yield application
    application.state.engine.dispose()


def _rolled_back_app(database: SharedDatabase) -> Iterator[Any]:
    """SQLAlchemy's "joining a session into an external transaction" recipe: one connection,
    an outer transaction begun on it, and the app's sessions bound to that connection, each
    in a savepoint (a session's commit releases its savepoint, its rollback rolls back to
    it); the outer transaction is rolled back after the test, which leaves the database empty
    for the next one. The app's own sessionmaker (that its parts hold) is reconfigured in
    place, so the pooled engine, PostgreSQL's bounded waits and all stay the service's."""
    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=database.url), engine=database.engine)
    connection = database.engine.connect()
    outer = connection.begin()
    application.state.sessionmaker.configure(
        bind=connection, join_transaction_mode="create_savepoint"
    )
    try:
        yield application
    finally:
        if outer.is_active:
            outer.rollback()
        connection.close()


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


# ---------------------------------------------------------------- the one browser

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium, one per test module, closed after it: Playwright's sync API
    runs one driver per thread at a time, and while it runs it holds an event loop in this
    thread (so a later test's asyncio.run() would fail): every browser test takes this one."""
    import shutil

    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()
