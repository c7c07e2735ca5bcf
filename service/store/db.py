"""Engine and session: SQLite in WAL mode with a busy timeout and foreign keys, or PostgreSQL
through psycopg 3. Commits happen in one place: `session_scope`.

Every wait is bounded (service/settings.py, `DatabaseSettings`, from GOODPUT_* variables):
the pool's wait for a connection (`db_pool_timeout_s`), SQLite's wait for its write lock
(`sqlite_busy_timeout_ms`) and, on the service's PostgreSQL sessions, the waits for a lock
and the length of a statement and of an idle transaction (`pg_*`). One that runs out raises
an error service/app.py answers with 503 and `Retry-After`."""

from __future__ import annotations

import re
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from service.settings import DatabaseSettings


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy would otherwise pick psycopg2)."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(
    url: str, busy_timeout_ms: int | None = None, db: DatabaseSettings | None = None
) -> Engine:
    """An engine with the pool of `db` (default: read from GOODPUT_* variables);
    `busy_timeout_ms`, when given, overrides `db.sqlite_busy_timeout_ms`."""
    db = db if db is not None else DatabaseSettings()
    busy = db.sqlite_busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
    url = normalize_url(url)
    if is_sqlite(url):
        memory = make_url(url).database in (None, "", ":memory:")
        pool = {} if memory else _pool_args(db)  # in memory: one connection, no QueuePool
        engine = create_engine(url, connect_args={"check_same_thread": False}, **pool)
        _sqlite_pragmas(engine, busy)
        if not memory:
            _gate_sqlite_writers(engine, busy / 1000)
        return engine
    return create_engine(url, pool_pre_ping=True, **_pool_args(db))


def _pool_args(db: DatabaseSettings) -> dict[str, Any]:
    return {
        "poolclass": QueuePool,
        "pool_size": db.db_pool_size,
        "max_overflow": db.db_max_overflow,
        "pool_timeout": db.db_pool_timeout_s,
    }


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


class WriteGate:
    """One writer at a time, first come first served, among one engine's connections.

    SQLite takes one writer at a time; its busy handler makes the others poll (sleeps of 1 to
    100 ms), so under many concurrent ingests in one process a writer can lose every round
    for the whole busy timeout while others pass, and the lock sits free while the waiters
    sleep. Here a connection about to write first queues in this process, and the write
    lock is handed to the next in line as soon as the holder's transaction ends (at its
    checkin to the pool), so SQLite's own busy wait is left for writers of other processes.
    A wait is bounded like SQLite's: `timeout_s`, then "database is locked" (a 503)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._mutex = threading.Lock()
        self._owner: Any = None
        self._queue: deque[tuple[Any, threading.Event]] = deque()

    def holds(self, owner: Any) -> bool:
        return self._owner is owner

    def acquire(self, owner: Any) -> bool:
        with self._mutex:
            if self._owner is owner:
                return True
            if self._owner is None and not self._queue:
                self._owner = owner
                return True
            entry = (owner, threading.Event())
            self._queue.append(entry)
        if entry[1].wait(self.timeout_s):
            return True
        with self._mutex:
            if entry[1].is_set():  # handed over as the wait ran out
                return True
            self._queue.remove(entry)
            return False

    def release(self, owner: Any) -> None:
        with self._mutex:
            if self._owner is not owner:
                return
            if self._queue:
                self._owner, event = self._queue.popleft()
                event.set()
            else:
                self._owner = None


_WRITE_RE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b", re.IGNORECASE)
_CTE_WRITE_RE = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


_TEMP_RE = re.compile(r"\s*(CREATE\s+TEMP(ORARY)?\s|(INSERT\s+INTO|DELETE\s+FROM)\s+temp\.)", re.I)


def _writes(statement: str) -> bool:
    """Whether a statement writes the database file: a connection's own temporary tables
    (store/rollups/rolling.py's lists of windows, on a read) are not, and take no lock."""
    if _TEMP_RE.match(statement):
        return False
    if _WRITE_RE.match(statement):
        return True
    return statement.lstrip()[:4].upper() == "WITH" and bool(_CTE_WRITE_RE.search(statement))


def _gate_sqlite_writers(engine: Engine, timeout_s: float) -> None:
    """Put `engine`'s writers through a WriteGate: taken at a connection's first writing
    statement, released when the connection goes back to the pool (after its commit or
    rollback) or is invalidated or closed. Reads (WAL) never wait for it."""
    gate = WriteGate(timeout_s)

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        owner = conn.connection.dbapi_connection
        if gate.holds(owner) or not _writes(statement):
            return
        if not gate.acquire(owner):
            cause = sqlite3.OperationalError(
                f"database is locked: another writer held it for the busy timeout "
                f"({gate.timeout_s:g} s)"
            )
            raise OperationalError(statement, params, cause)

    def _release(dbapi_conn: Any, *_: Any) -> None:
        if dbapi_conn is not None:
            gate.release(dbapi_conn)

    for name in ("checkin", "reset", "invalidate", "soft_invalidate", "close", "close_detached"):
        event.listen(engine, name, _release)


def postgres_bounds(db: DatabaseSettings) -> dict[str, int]:
    """The session settings that bound a PostgreSQL connection's waits (milliseconds)."""
    return {
        "lock_timeout": db.pg_lock_timeout_ms,
        "statement_timeout": db.pg_statement_timeout_ms,
        "idle_in_transaction_session_timeout": db.pg_idle_in_transaction_timeout_ms,
    }


_BOUND = "goodput_bounds"  # key in a pooled connection's info: its bounds are set
_bounded_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def bound_postgres_waits(engine: Engine, db: DatabaseSettings | None = None) -> None:
    """Set `postgres_bounds` on each connection of `engine` at its first checkout (once per
    connection, one round trip; connections opened before this call too). The serving path
    calls this through `make_sessionmaker`; migrations (migrations/env.py) do not, so a long
    upgrade is not cut short. Idempotent; nothing on SQLite."""
    if engine.dialect.name != "postgresql" or engine in _bounded_engines:
        return
    values = postgres_bounds(db if db is not None else DatabaseSettings())
    sql = "; ".join(f"SET {name} = {int(ms)}" for name, ms in values.items())

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if record.info.get(_BOUND):
            return
        with dbapi_conn.cursor() as cur:
            cur.execute(sql)
        dbapi_conn.commit()  # session settings: kept for the connection's life
        record.info[_BOUND] = True

    _bounded_engines.add(engine)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for serving, their waits bounded (`bound_postgres_waits`)."""
    bound_postgres_waits(engine)
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
