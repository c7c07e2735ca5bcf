"""Service settings, from the environment (prefix GOODPUT_) or arguments."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./goodput.db"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")
_ORIGIN_RE = re.compile(r"^https?://[^/\s]+$")


class Settings(BaseSettings):
    # Errors never print inputs: tokens and database passwords would end up in logs.
    model_config = SettingsConfigDict(
        env_prefix="GOODPUT_", extra="ignore", hide_input_in_errors=True
    )

    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL")
    auto_migrate_sqlite: bool = Field(
        default=True, description="upgrade an SQLite database at start"
    )
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
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
