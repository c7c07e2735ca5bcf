"""Bulk writes of the tables with a row per step (steps, spans, routing): part of the
store, so callers pass a Session and nothing here commits.

A batch of 10,000 records spends most of its time in per-row work, so these rows go to the
driver as plain values, without SQLAlchemy's per-row parameter processing (the one typed
column among them, the packed routing histograms, is packed by the caller): on SQLite a few
hundred rows per INSERT (multi-row VALUES, in SQL built once per table, dialect and row
count), on PostgreSQL a one-row INSERT in one executemany (insert_rows says why).

Every insert says ON CONFLICT DO NOTHING and checks its row count: a row whose key was taken
raises AlreadyStored, so a caller that stored a batch as all new rolls it back
(store/ingest.py, _store_per_step) and stores it again with the new keys found first by
`probe_new`, which probes them in the primary key a few hundred at a time and reads, in the
same query, the stored columns the caller compares a re-sent record with (a conflicting
re-send is refused: issue 12). A key seen twice in one batch keeps its first record, as ON
CONFLICT DO NOTHING would, and the later one is compared with it. Callers hold the lock
of each run and rank they write (rollups/write.py lock_runs; every key here holds its
rank): no other ingest can store a key between the probe and the insert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any

from sqlalchemy import Dialect, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

PROBE_CHUNK = 400  # keys per probe
INSERT_ROWS = 200  # rows per INSERT: one statement's VALUES list, bound at once
MAX_PARAMETERS = 32_000  # per statement: SQLite allows 32,766, PostgreSQL 65,535


def _placeholder(dialect: Dialect) -> str:
    return "?" if dialect.paramstyle == "qmark" else "%s"


def _quoted(dialect: Dialect, names: Sequence[str]) -> list[str]:
    return [dialect.identifier_preparer.quote(n) for n in names]


@lru_cache(maxsize=64)
def _insert_sql(dialect: Dialect, table: Table, columns: tuple[str, ...], n: int) -> str:
    """INSERT of `n` rows in one statement (multi-row VALUES)."""
    name = dialect.identifier_preparer.format_table(table)
    cols = ", ".join(_quoted(dialect, columns))
    row = "(" + ", ".join([_placeholder(dialect)] * len(columns)) + ")"
    return f"INSERT INTO {name} ({cols}) VALUES {', '.join([row] * n)} ON CONFLICT DO NOTHING"


@lru_cache(maxsize=64)
def _probe_sql(
    dialect: Dialect, table: Table, prefix: tuple[str, ...], probe: str, columns: tuple[str, ...]
) -> str:
    mark = _placeholder(dialect)
    where = [f"{c} = {mark}" for c in _quoted(dialect, prefix)]
    (col,) = _quoted(dialect, [probe])
    where.append(f"{col} IN ({', '.join([mark] * PROBE_CHUNK)})")
    name = dialect.identifier_preparer.format_table(table)
    selected = ", ".join(_quoted(dialect, [probe, *columns]))
    return f"SELECT {selected} FROM {name} WHERE {' AND '.join(where)}"


# An upsert's statement, built for a dialect's INSERT (postgresql.insert or sqlite.insert).
UpsertBuilder = Callable[[Callable[[Table], Any]], Any]


class _Compiled:
    """An upsert compiled once for a dialect: its SQL and how a row (a tuple in the order of
    the columns it was compiled for) becomes the driver's parameters."""

    def __init__(self, dialect: Dialect, build: UpsertBuilder, columns: tuple[str, ...]) -> None:
        stmt = build(postgresql.insert if dialect.name == "postgresql" else sqlite.insert)
        compiled = stmt.compile(dialect=dialect, column_keys=list(columns))
        binds = compiled.positiontup or list(compiled.binds)
        assert sorted(binds) == sorted(columns), f"an upsert binds {binds}, not {columns}"
        self.sql = compiled.string
        table = stmt.table
        processors = [
            table.c[c].type.dialect_impl(dialect).bind_processor(dialect) for c in columns
        ]
        self.convert = [(i, f) for i, f in enumerate(processors) if f is not None]
        self.columns = columns
        self.order = (
            itemgetter(*(columns.index(b) for b in compiled.positiontup))
            if compiled.positiontup is not None
            else None
        )

    def params(self, row: Sequence[Any]) -> Any:
        if self.convert:
            row = list(row)
            for i, f in self.convert:
                row[i] = f(row[i])
        if self.order is not None:
            return self.order(row)
        return dict(zip(self.columns, row, strict=True))


@lru_cache(maxsize=64)
def _compiled(dialect: Dialect, build: UpsertBuilder, columns: tuple[str, ...]) -> _Compiled:
    return _Compiled(dialect, build, columns)


def upsert_rows(
    session: Session, build: UpsertBuilder, columns: tuple[str, ...], rows: Sequence[Any]
) -> None:
    """Run an INSERT ... ON CONFLICT DO UPDATE for `rows` (tuples in the order of `columns`,
    one row a key): `build` makes the statement from the dialect's INSERT; it is compiled
    once per dialect and its SQL then goes to the driver as it is (SQLAlchemy cannot cache
    the compiled form of an ON CONFLICT statement, and compiling one took more of a batch's
    time than running it). The columns' bind processors still apply."""
    if not rows:
        return
    conn = session.connection()
    c = _compiled(conn.dialect, build, columns)
    if len(rows) == 1:
        conn.exec_driver_sql(c.sql, c.params(rows[0]))
    else:
        conn.exec_driver_sql(c.sql, [c.params(r) for r in rows])


class AlreadyStored(RuntimeError):
    """An insert found some of its rows' keys taken."""


def insert_rows(
    session: Session, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    """INSERT rows (tuples in the order of `columns`) taken to be new, up to INSERT_ROWS per
    statement; AlreadyStored (and nothing inserted, once the caller rolls back) if any was
    not."""
    if not rows:
        return
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        # One row a statement, all in one executemany, which psycopg sends as one pipeline:
        # psycopg parses a statement's placeholders in Python whenever it binds more than 50
        # parameters (it caches only smaller ones), and that parse cost more than the rest
        # of the insert (10 routing rows: ~0.57 -> ~0.37 ms of CPU; 200: ~15 -> ~4.9 ms).
        sql = _insert_sql(conn.dialect, table, columns, 1)
        done = conn.exec_driver_sql(sql, rows).rowcount  # psycopg sums the statements'
    else:
        per = max(1, min(INSERT_ROWS, MAX_PARAMETERS // len(columns)))
        done = 0
        for i in range(0, len(rows), per):
            part = rows[i : i + per]
            sql = _insert_sql(conn.dialect, table, columns, len(part))
            done += conn.exec_driver_sql(sql, tuple(chain.from_iterable(part))).rowcount
    if done != len(rows):
        raise AlreadyStored(f"{table.name}: {len(rows) - done} of {len(rows)} rows were stored")


def keep_new(
    session: Session, table: Table, prefix: tuple[str, ...], probe: str, records: Sequence[Any]
) -> list[Any]:
    """The records whose natural key (attributes named like the key's columns: `prefix`,
    then `probe`) is neither stored nor taken by an earlier record of `records`."""
    return probe_new(session, table, prefix, probe, records)[0]


def probe_new(
    session: Session,
    table: Table,
    prefix: tuple[str, ...],
    probe: str,
    records: Sequence[Any],
    columns: tuple[str, ...] = (),
) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """`keep_new`'s records; and each other record paired with what holds its key: the
    stored row's `columns` (a tuple, read by the probe itself) or the batch's earlier
    record."""
    if not records:
        return [], []
    conn = session.connection()
    of_prefix, of_probe = attrgetter(*prefix), attrgetter(probe)
    groups: dict[Any, list[Any]] = {}
    for r in records:
        groups.setdefault(of_prefix(r), []).append(r)
    out: list[Any] = []
    seen: list[tuple[Any, Any]] = []
    sql = _probe_sql(conn.dialect, table, prefix, probe, columns)
    for key, group in groups.items():
        key = key if len(prefix) > 1 else (key,)
        wanted = list(dict.fromkeys(of_probe(r) for r in group))
        taken: dict[Any, Any] = {}
        for i in range(0, len(wanted), PROBE_CHUNK):
            chunk = wanted[i : i + PROBE_CHUNK]
            chunk += [chunk[-1]] * (PROBE_CHUNK - len(chunk))  # one statement text per table
            taken.update(
                (row[0], tuple(row[1:])) for row in conn.exec_driver_sql(sql, (*key, *chunk))
            )
        for r in group:
            v = of_probe(r)
            if v in taken:
                seen.append((r, taken[v]))
            else:
                taken[v] = r
                out.append(r)
    return out, seen
