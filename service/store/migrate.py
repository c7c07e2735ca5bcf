"""Alembic, driven from code: upgrade, downgrade, and the start-up schema check."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from service.settings import DatabaseSettings
from service.store.db import make_engine, normalize_url

MIGRATIONS_DIR = Path(migrations.__file__).parent


class SchemaError(RuntimeError):
    """The database is not at the schema this code expects; the message says what to do."""


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> list[str]:
    """Run the migrations up to `revision`; at the head, then build the rollups of the runs
    stored before the rollup tables existed (`build_missing_rollups`). Returns those runs."""
    command.upgrade(alembic_config(url), revision)
    if revision != "head":
        return []
    engine = make_engine(url)
    try:
        return build_missing_rollups(engine)
    finally:
        engine.dispose()


def build_missing_rollups(engine: Engine) -> list[str]:
    """Compute the rollups of every run that has records but none (runs stored before
    revision 0004), with the code that keeps them at ingest: here, not in a migration, since
    a migration runs at an older schema than this code reads. Returns those runs."""
    from sqlalchemy.orm import Session

    from service.store.rollups import write as rollup_write

    with Session(engine) as session, session.begin():
        missing = rollup_write.missing_rollups(session)
        for run_id in missing:
            rollup_write.rebuild_run(session, run_id)
    return missing


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def _check_known(engine: Engine, current: str | None) -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        url = engine.url.render_as_string(hide_password=True)
        head = head_revision()
        raise SchemaError(
            f"database {url} is at revision {current!r}, which this goodput version does not "
            f"know (its newest is {head!r}); it was written by a newer goodput: upgrade goodput"
        )


def check_schema(engine: Engine) -> str:
    """Return the database's revision, or raise SchemaError naming the fix."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return current
    _check_known(engine, current)
    url = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise SchemaError(f"database {url} has no goodput schema; run: goodput db upgrade --db URL")
    raise SchemaError(
        f"database {url} is at revision {current!r}, behind {head!r}; run: goodput db upgrade"
    )


def prepare_database(
    url: str,
    auto_migrate_sqlite: bool = True,
    busy_timeout_ms: int | None = None,
    db: DatabaseSettings | None = None,
) -> Engine:
    """Engine for serving, its pool and waits from `db` (default: the GOODPUT_* variables):
    SQLite is upgraded in place, any database is then schema-checked."""
    engine = make_engine(url, busy_timeout_ms, db)
    _check_known(engine, current_revision(engine))
    if auto_migrate_sqlite and engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        build_missing_rollups(engine)
    check_schema(engine)
    check_rollups(engine)
    return engine


def check_rollups(engine: Engine) -> None:
    """Raise SchemaError naming the fix when runs hold records without their rollups (a
    database upgraded by Alembic alone, not by `goodput db upgrade`)."""
    from sqlalchemy.orm import Session

    from service.store.rollups import write as rollup_write

    with Session(engine) as session:
        missing = rollup_write.missing_rollups(session)
    if missing:
        url = engine.url.render_as_string(hide_password=True)
        raise SchemaError(
            f"database {url} holds {len(missing)} run(s) without rollups (stored before "
            f"revision 0004, e.g. {missing[0]!r}); run: goodput db rebuild-rollups --db URL"
        )


def rebuild_rollups(url: str, run_id: str | None = None) -> int:
    """Recompute the rollups from the stored records, of one run or of every run, in one
    transaction; the number of runs rebuilt. LookupError for a run that is not stored."""
    from sqlalchemy.orm import Session

    from service.store.models import Run
    from service.store.rollups import write as rollup_write

    engine = make_engine(url)
    try:
        check_schema(engine)
        with Session(engine) as session, session.begin():
            if run_id is None:
                return rollup_write.rebuild_all(session)
            if session.get(Run, run_id) is None:
                raise LookupError(run_id)
            rollup_write.rebuild_run(session, run_id)
            return 1
    finally:
        engine.dispose()
