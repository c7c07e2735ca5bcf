"""Service settings, from the environment (prefix GOODPUT_) or arguments."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./goodput.db"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GOODPUT_", extra="ignore")

    database_url: str = Field(default=DEFAULT_DATABASE_URL, description="SQLAlchemy URL")
    auto_migrate_sqlite: bool = Field(
        default=True, description="upgrade an SQLite database at start"
    )
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
