"""Service settings, from the environment (prefix GOODPUT_) or arguments."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./goodput.db"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
_ORIGIN_RE = re.compile(r"^https?://[^/\s]+$")


class DatabaseSettings(BaseSettings):
    """How long a request may wait on the database, and the connection pool: every wait is
    bounded, and one that runs out is a 503 with `Retry-After` (service/app.py), which
    clients retry. service/store/db.py reads these from the environment when it builds an engine
    and a sessionmaker for serving; `Settings` carries them too, to validate and document.

    Bounds, from the inside out: a statement waits for a row lock (the run's, which
    serialises ingests into one run) at most `pg_lock_timeout_ms`; on SQLite for the write
    lock `sqlite_busy_timeout_ms`; a request waits for a pooled connection at most
    `db_pool_timeout_s`; a statement runs at most `pg_statement_timeout_ms`; a transaction
    left idle (its client stuck) is ended by PostgreSQL after
    `pg_idle_in_transaction_timeout_ms`, releasing its locks. 0 turns a PostgreSQL bound
    off. The PostgreSQL bounds apply to the service's sessions only, never to migrations
    (`goodput db upgrade` may need longer). Of a `Settings` handed to `create_app`, only
    `sqlite_busy_timeout_ms` reaches the engine (migrate.prepare_database takes no more): the
    others come from the environment."""

    # Errors never print inputs: tokens and database passwords would end up in logs.
    model_config = SettingsConfigDict(
        env_prefix="GOODPUT_", extra="ignore", hide_input_in_errors=True
    )

    # Waits stay under the sink's 10 s request timeout (trainer_hooks/sink.py), so that it
    # gets the 503 and its Retry-After rather than giving up on its own.
    sqlite_busy_timeout_ms: int = Field(
        default=5_000, ge=0, description="SQLite: wait for the write lock, then 503"
    )
    db_pool_size: int = Field(
        default=5, ge=1, description="connections each server process keeps open"
    )
    db_max_overflow: int = Field(
        default=10, ge=0, description="connections opened beyond db_pool_size under load"
    )
    db_pool_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="wait for a free pooled connection, then 503"
    )
    pg_lock_timeout_ms: int = Field(
        default=5_000, ge=0, description="PostgreSQL: wait for a lock (a run's row), then 503"
    )
    pg_statement_timeout_ms: int = Field(
        default=60_000, ge=0, description="PostgreSQL: longest statement, then 503"
    )
    pg_idle_in_transaction_timeout_ms: int = Field(
        default=60_000, ge=0, description="PostgreSQL: end a transaction idle this long"
    )


class Settings(DatabaseSettings):
    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL")
    max_concurrent_requests: int = Field(
        default=40,
        ge=1,
        le=10_000,
        description="requests a server process runs at once (its thread pool holds 40)",
    )
    admission_wait_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="a request's wait for a place among them, then 503 with Retry-After",
    )
    auto_migrate_sqlite: bool = Field(
        default=True, description="upgrade an SQLite database at start"
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="request body limit, after decompression"
    )
    max_compressed_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="limit of a gzip request body on the wire"
    )
    write_token: SecretStr | None = Field(
        default=None, description="token for ingest (POST); None: no token needed"
    )
    read_token: SecretStr | None = Field(
        default=None, description="token for queries and dashboards; the write token also reads"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (comma-separated in the env)"
    )
    page_refresh_s: float = Field(
        default=5.0,
        ge=0.5,
        le=3600,
        description="how often a dashboard page of a live run fetches its data again",
    )

    @field_validator("write_token", "read_token")
    @classmethod
    def _visible_ascii(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not _TOKEN_RE.match(v.get_secret_value()):
            raise ValueError("a token must be non-empty visible ASCII, without spaces")
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [o.strip() for o in v.split(",") if o.strip()]
        return v

    @field_validator("cors_origins")
    @classmethod
    def _origin_shape(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ValueError(
                    f"origin {origin!r} is not scheme://host[:port] (no path, no trailing /)"
                )
        return v

    @property
    def auth_enabled(self) -> bool:
        return self.write_token is not None or self.read_token is not None
