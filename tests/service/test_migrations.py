from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from service.store.db import make_engine
from service.store.migrate import (
    SchemaError,
    check_schema,
    downgrade,
    head_revision,
    prepare_database,
    upgrade,
)
from service.store.models import Base
from tests import factories as f


def test_models_and_migrations_agree(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_downgrade_round_trip_keeps_the_schema_usable(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(db_url)
    assert {"runs", "attempts", "steps", "spans"} <= set(inspect(engine).get_table_names())
    assert check_schema(engine) == head_revision()
    engine.dispose()


def test_data_survives_a_repeated_upgrade(client: Any, migrated_url: str) -> None:
    client.post("/api/v1/ingest", json={"records": f.full_run(steps=3)})
    upgrade(migrated_url)
    assert client.get("/api/v1/runs/run-a").json()["num_steps"] == 3


def test_unmigrated_database_is_refused_with_the_fix(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("SQLite is migrated at start")
    with pytest.raises(SchemaError, match="goodput db upgrade"):
        prepare_database(db_url)


def test_sqlite_is_migrated_at_start(tmp_path: Any) -> None:
    engine = prepare_database(f"sqlite:///{tmp_path / 'new.db'}")
    assert check_schema(engine) == head_revision()
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


def test_database_at_an_unknown_revision_gets_a_clear_message(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'fffffff'"))
    with pytest.raises(SchemaError, match="newer goodput"):
        prepare_database(migrated_url)
    engine.dispose()


def test_database_checks_refuse_impossible_rows(migrated_url: str) -> None:
    from sqlalchemy.exc import IntegrityError

    engine = make_engine(migrated_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO runs VALUES "
                "('r', 'n', 'p', 1.0, '{}', '{}', '{}', 1.0, true, NULL, NULL)"
            )
        )
    bad_rows = [
        'INSERT INTO steps (run_id, attempt, rank, step, start, "end", tokens) '
        "VALUES ('r', 0, 0, 0, 10.0, 5.0, 1)",
        'INSERT INTO spans (run_id, attempt, rank, category, start, "end", overlapped) '
        "VALUES ('r', 0, 0, 'naps', 1.0, 2.0, false)",
        'INSERT INTO steps (run_id, attempt, rank, step, start, "end", tokens) '
        "VALUES ('r', 0, 0, 0, 1.0, 2.0, -1)",
    ]
    for sql in bad_rows:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(sql))
    engine.dispose()


def test_downgrade_and_upgrade_keep_the_data_of_tables_that_stay(db_url: str) -> None:
    """0003 -> 0001 -> head with a run in place: runs, attempts and steps survive (the
    columns and tables added after 0001 come back empty)."""
    from service.store.db import make_sessionmaker, session_scope
    from service.store.ingest import ingest
    from service.store.queries import list_runs
    from trainer_hooks.records import IngestBatch

    upgrade(db_url)
    engine = make_engine(db_url)
    batch = IngestBatch.model_validate({"records": f.full_run(steps=3)}).records
    with session_scope(make_sessionmaker(engine)) as session:
        assert ingest(session, batch).inserted == len(batch)
    downgrade(db_url, "0001")
    upgrade(db_url)
    with session_scope(make_sessionmaker(engine)) as session:
        runs, _ = list_runs(session)
        assert [r.run_id for r in runs] == ["run-a"]
        steps = session.execute(text("SELECT count(*) FROM steps")).scalar()
        assert steps == 3
        from service.store.queries import count_steps

        assert count_steps(session, "run-a") == 3  # from the step blocks 0005 rebuilt
    engine.dispose()


def test_0005_flags_clashing_spans_and_measures_blocked_time_as_their_union(
    db_url: str,
) -> None:
    """A database at 0004 holds a step whose blocked time was the sum of two overlapping
    spans (as 0004's ingest stored it): the upgrade flags both spans and measures the step's
    blocked time, and its step blocks, again as the union."""
    from service.services import accounting
    from service.store.db import make_sessionmaker, session_scope
    from service.store.ingest import ingest
    from trainer_hooks.records import IngestBatch

    upgrade(db_url)
    engine = make_engine(db_url)
    T = f.T0
    records = [f.run(), f.attempt_start(), f.step(0, start=T + 1, dur=4.0)]
    records += [f.span("data_stall", T + 1, T + 3), f.span("custom:x", T + 2, T + 4)]
    records += [f.span("eval", T + 6, T + 7), f.attempt_end(end=T + 8)]
    with session_scope(make_sessionmaker(engine)) as session:
        ingest(session, IngestBatch.model_validate({"records": records}).records)
    with session_scope(make_sessionmaker(engine)) as session:
        want = accounting.whole_run(session, "run-a").goodput
    assert want.goodput_s == pytest.approx(1.0)  # 4 s less the union [1, 4] of the spans
    with engine.begin() as conn:  # what 0004 stored: the sum of the spans inside the step
        conn.execute(text("UPDATE steps SET blocked_s = 4.0"))
        conn.execute(text("UPDATE step_blocks SET blocked_s = 4.0"))
    downgrade(db_url, "0004")
    upgrade(db_url)
    with engine.connect() as conn:
        flags = dict(conn.execute(text("SELECT category, clashes FROM spans")).tuples().all())
        assert {k: bool(v) for k, v in flags.items()} == {
            "data_stall": True,
            "custom:x": True,
            "eval": False,
        }
        assert conn.execute(text("SELECT blocked_s FROM steps")).scalar() == pytest.approx(3.0)
        blocks = conn.execute(text("SELECT blocked_s FROM step_blocks")).scalars().all()
        assert blocks == pytest.approx([3.0, 3.0])
    with session_scope(make_sessionmaker(engine)) as session:
        got = accounting.whole_run(session, "run-a").goodput
    assert got.goodput_s == pytest.approx(want.goodput_s)
    assert got.badput_s == pytest.approx(want.badput_s)
    engine.dispose()


def test_no_migration_imports_service_code() -> None:
    """A migration runs at its own revision's schema, older than the service code reads:
    one that needs code carries a frozen copy (issue 13)."""
    import ast
    from pathlib import Path

    import migrations

    versions = Path(migrations.__file__).parent / "versions"
    for path in sorted(versions.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("service", "trainer_hooks")]
            assert not bad, f"{path.name} imports {bad}"


def test_runs_stored_before_0004_get_their_rollups_from_goodput_db_upgrade(
    client: Any, migrated_url: str
) -> None:
    """A database at revision 0003 with runs in it: `migrate.upgrade` (goodput db upgrade)
    brings the schema to its head, then builds those runs' rollups with the service's code;
    a database that Alembic alone upgraded is refused at start with the command to run,
    `goodput db rebuild-rollups`, which builds them."""
    import subprocess
    import sys

    from service.store.migrate import check_rollups

    client.post("/api/v1/ingest", json={"records": f.full_run(steps=6)})
    before = client.get("/api/v1/runs/run-a/goodput").json()
    downgrade(migrated_url, "0003")  # the rollup tables go: as stored before 0004
    assert upgrade(migrated_url) == ["run-a"]
    assert client.get("/api/v1/runs/run-a/goodput").json() == before
    assert upgrade(migrated_url) == []  # nothing left to build

    downgrade(migrated_url, "0003")
    from alembic import command

    from service.store.migrate import alembic_config

    command.upgrade(alembic_config(migrated_url), "head")  # Alembic alone: no rollups
    engine = make_engine(migrated_url)
    try:
        with pytest.raises(SchemaError, match="goodput db rebuild-rollups"):
            check_rollups(engine)
        done = subprocess.run(
            [sys.executable, "-m", "service.cli", "db", "rebuild-rollups", "--db", migrated_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "rollups rebuilt for 1 run(s)" in done.stdout
        check_rollups(engine)
    finally:
        engine.dispose()
    assert client.get("/api/v1/runs/run-a/goodput").json() == before


def test_0009_fills_the_device_time_extremes_of_blocks_stored_before_it(
    client: Any, migrated_url: str
) -> None:
    """Steps stored at 0008 (one in three with a device time, ties among them): 0009's
    backfill gives every block the count, lowest and highest device time and their steps
    that the definition gives on the rows (ties to the lower step), at both levels."""
    import random

    rng = random.Random(9)
    records = [f.run(), f.attempt_start()]
    for n in range(0, 4200):
        kw = {"device_time_s": rng.choice([0.5, 0.25, rng.uniform(0.1, 0.9)])} if n % 3 else {}
        records.append(f.step(n, dur=0.5, **kw))
    for i in range(0, len(records), 2000):
        assert (
            client.post("/api/v1/ingest", json={"records": records[i : i + 2000]}).status_code
            == 200
        )
    downgrade(migrated_url, "0008")
    upgrade(migrated_url)
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            blocks = conn.execute(
                text(
                    "SELECT level, block, dev_n, dev_low, dev_low_step, dev_high, dev_high_step "
                    "FROM step_blocks WHERE run_id = 'run-a'"
                )
            ).all()
    finally:
        engine.dispose()
    timed = {r["step"]: r["device_time_s"] for r in records[2:] if "device_time_s" in r}
    assert {b[0] for b in blocks} == {64, 4096}
    for level, block, n, low, low_at, high, high_at in blocks:
        inside = [(v, s) for s, v in timed.items() if block * level <= s < (block + 1) * level]
        want_low = min(inside)  # lowest value, then lowest step
        want_high = min(inside, key=lambda vs: (-vs[0], vs[1]))  # highest, then lowest step
        assert (n, low, low_at, high, high_at) == (len(inside), *want_low, *want_high)
