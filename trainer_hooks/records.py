"""Wire contract v1: the records hooks send and the service stores.

One source of truth: the service validates ingest bodies with these models. Times are wall-clock
seconds since the epoch (float); a record's natural key makes resending it harmless.

Natural keys:
  run            (run_id)
  attempt_start  (run_id, attempt, rank)
  attempt_end    (run_id, attempt, rank)        completes the attempt row started above
  step           (run_id, attempt, rank, step)
  span           (run_id, attempt, rank, category, start)
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

SCHEMA_VERSION = 1

BADPUT_CATEGORIES: tuple[str, ...] = (
    "startup",
    "compile",
    "data_stall",
    "checkpoint_save",
    "checkpoint_restore",
    "eval",
    "wasted_progress",
    "infra_recovery",
    "observability",
    "profiling",
)
"""Categories a span may carry; `custom:<name>` is also accepted. `wasted_progress` and
`infra_recovery` are derived by the server, so hooks never send them."""

CUSTOM_PREFIX = "custom:"
_CUSTOM_RE = re.compile(r"^custom:[A-Za-z0-9_.\-]{1,64}$")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_DERIVED = {"wasted_progress", "infra_recovery"}

# Seconds since the epoch: later than 2000-01-01 and earlier than 2200-01-01. Catches
# milliseconds, monotonic clocks and zeros sent by mistake.
_MIN_EPOCH = 946_684_800.0
_MAX_EPOCH = 7_258_118_400.0


def _storable(text: str) -> str:
    """Text every database can hold: no NUL byte (PostgreSQL refuses it), valid UTF-8."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from exc
    return text


Text = Annotated[str, AfterValidator(_storable)]
RunId = Annotated[str, Field(pattern=ID_PATTERN, description="client-chosen id, e.g. a uuid4 hex")]
Name = Annotated[Text, Field(min_length=1, max_length=200)]
MAX_COUNT = 2**53  # the largest integer JSON numbers carry exactly
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
MAX_RANK = 1_000_000  # ranks, world sizes and attempt numbers are 32-bit columns
Small = Annotated[int, Field(ge=0, le=MAX_RANK)]
Epoch = Annotated[float, Field(ge=_MIN_EPOCH, le=_MAX_EPOCH, allow_inf_nan=False)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown schema_version {v}; this server speaks {SCHEMA_VERSION}")
        return v


class _RankScoped(_Record):
    run_id: RunId
    attempt: Small = 0
    rank: Small = 0


def _end_after_start(end: float, info: ValidationInfo) -> float:
    start = info.data.get("start")
    if start is not None and end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    return end


class RunRecord(_Record):
    """A run's identity and its receipt parts (model plan, runtime policy, environment)."""

    kind: Literal["run"] = "run"
    run_id: RunId
    name: Name
    project: Name = "default"
    created_at: Epoch
    model_plan: dict[str, Any] = Field(default_factory=dict)
    runtime_policy: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(default_factory=dict)


class AttemptStartRecord(_RankScoped):
    """One rank of one attempt (restart) began."""

    kind: Literal["attempt_start"] = "attempt_start"
    world_size: Annotated[int, Field(ge=1, le=MAX_RANK)] = 1
    start: Epoch


class AttemptEndRecord(_RankScoped):
    """One rank of one attempt ended, well or badly."""

    kind: Literal["attempt_end"] = "attempt_end"
    end: Epoch
    status: Literal["completed", "failed"]
    cause: Annotated[Text, Field(max_length=2000)] | None = None
    hook_errors: Count = 0


class StepRecord(_RankScoped):
    """One training step on one rank: its wall interval, tokens and loss."""

    kind: Literal["step"] = "step"
    step: Count
    start: Epoch
    end: Epoch
    tokens: Count = 0
    loss: Annotated[float, Field(allow_inf_nan=False)] | None = None

    _end = field_validator("end")(_end_after_start)


class SpanRecord(_RankScoped):
    """Wall time spent in one badput category. `overlapped` spans ran beside the step and do
    not block it, so they are shown but not charged."""

    kind: Literal["span"] = "span"
    category: str
    start: Epoch
    end: Epoch
    overlapped: bool = False
    step: Count | None = None

    @field_validator("category")
    @classmethod
    def _known_category(cls, v: str) -> str:
        if v in _DERIVED:
            raise ValueError(f"category {v!r} is derived by the server and cannot be sent")
        if v in BADPUT_CATEGORIES or _CUSTOM_RE.match(v):
            return v
        known = ", ".join(c for c in BADPUT_CATEGORIES if c not in _DERIVED)
        raise ValueError(f"unknown category {v!r}; expected one of {known} or custom:<name>")

    _end = field_validator("end")(_end_after_start)


Record = Annotated[
    RunRecord | AttemptStartRecord | AttemptEndRecord | StepRecord | SpanRecord,
    Field(discriminator="kind"),
]

MAX_BATCH_RECORDS = 10_000


class IngestBatch(BaseModel):
    """Body of POST /api/v1/ingest."""

    model_config = ConfigDict(extra="forbid")

    records: Annotated[list[Record], Field(max_length=MAX_BATCH_RECORDS)]


class IngestResult(BaseModel):
    inserted: int
    duplicates: int
