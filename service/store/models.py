"""ORM models: typed wide tables, one row per run, attempt rank, step and span.

Natural-key unique constraints make ingest idempotent; CHECK constraints make the database
itself refuse impossible rows (negative durations, unknown categories), not only pydantic.
"""

from __future__ import annotations

import sys
from array import array
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from trainer_hooks.records import BADPUT_CATEGORIES

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
BigId = BigInteger().with_variant(Integer(), "sqlite")

_CATEGORY_SQL = "category IN ({}) OR category LIKE 'custom:%'".format(
    ", ".join(f"'{c}'" for c in BADPUT_CATEGORIES)
)


class PackedCounts(TypeDecorator[list[int]]):
    """A histogram of counts stored compactly: one byte naming the width (the narrowest of
    1, 2, 4 and 8 bytes that holds the largest count), then the counts little-endian in that
    width. 64 slots of counts below 65,536 take 129 bytes (about 300 as JSON text)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: list[int] | None, dialect: Dialect) -> bytes | None:
        return None if value is None else pack_counts(value)

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> list[int] | None:
        if value is None:
            return None
        packed = array(chr(value[0]))
        packed.frombytes(value[1:])
        if _BIG_ENDIAN:
            packed.byteswap()
        return packed.tolist()


_BIG_ENDIAN = sys.byteorder == "big"


def pack_counts(value: list[int]) -> bytes:
    """PackedCounts' bytes of a histogram (the bulk inserts call it directly)."""
    top = max(value, default=0)  # a plain if-chain: this runs twice per routing row
    code = "B" if top < 256 else "H" if top < 65_536 else "I" if top < 2**32 else "Q"
    packed = array(code, value)
    if _BIG_ENDIAN:
        packed.byteswap()
    return code.encode() + packed.tobytes()


assert [array(c).itemsize for c in "BHIQ"] == [1, 2, 4, 8], "unexpected C integer sizes"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON}


class Run(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    project: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    model_plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    runtime_policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    environment: Mapped[dict[str, Any]] = mapped_column(JSON)
    ingested_at: Mapped[float] = mapped_column(Double)
    # False while only other records of the run have arrived (records come in any order):
    # the row holds placeholders until the run record fills it in.
    declared: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    # The ablation this run is a replicate of, and its cell there (both or neither).
    ablation_id: Mapped[str | None] = mapped_column(String(128), index=True)
    ablation_cell: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (Index("ix_runs_created_at_run_id", "created_at", "run_id"),)


class Ablation(Base):
    """A declared ablation: the knob grid it runs, its cells (a name and the knob values
    each runs) and which cell is the baseline. Its runs name it (runs.ablation_id)."""

    __tablename__ = "ablations"

    ablation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    project: Mapped[str] = mapped_column(String(200), index=True)
    created_at: Mapped[float] = mapped_column(Double)
    knobs: Mapped[dict[str, Any]] = mapped_column(JSON)  # knob -> its values
    cells: Mapped[dict[str, Any]] = mapped_column(JSON)  # cell -> {knob: value}
    baseline_cell: Mapped[str] = mapped_column(String(200))
    repeats: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)  # what every cell shares


class RunTag(Base):
    """A free-form label on a run, one row per (run, tag), for filtering."""

    __tablename__ = "run_tags"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    __table_args__ = (Index("ix_run_tags_tag", "tag"),)


class Attempt(Base):
    """One rank of one attempt; `end` and `status` arrive with the attempt_end record."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    world_size: Mapped[int] = mapped_column(Integer)
    start: Mapped[float] = mapped_column(Double)
    end: Mapped[float | None] = mapped_column(Double)
    status: Mapped[str | None] = mapped_column(String(16))
    cause: Mapped[str | None] = mapped_column(Text)
    hook_errors: Mapped[int] = mapped_column(BigInteger, default=0)
    last_seen: Mapped[float | None] = mapped_column(Double)
    counters: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # False while the row was made by a heartbeat or attempt_end that arrived before the
    # attempt_start (its start is then a placeholder: the earliest time seen).
    start_declared: Mapped[bool] = mapped_column(Boolean, default=True, server_default="1")
    heartbeat_s: Mapped[float | None] = mapped_column(Double)  # the declared interval
    # What the rank's hooks dropped so far (their disk full, the service unreachable), as its
    # newest heartbeat said: a running total, of which the largest seen is kept.
    records_dropped: Mapped[int | None] = mapped_column(BigInteger)

    @property
    def dropped(self) -> int:
        """What the rank's hooks dropped: the largest of its heartbeats' running total and
        its attempt_end's count (counters.records_dropped)."""
        at_end = (self.counters or {}).get("records_dropped", 0)
        return max(self.records_dropped or 0, at_end if isinstance(at_end, int) else 0)

    __table_args__ = (
        UniqueConstraint("run_id", "attempt", "rank"),
        CheckConstraint('"end" IS NULL OR "end" >= start', name="end_after_start"),
        CheckConstraint("status IS NULL OR status IN ('completed', 'failed')", name="status"),
        CheckConstraint("attempt >= 0 AND rank >= 0 AND world_size >= 1", name="non_negative"),
    )


# The three tables with a row per step (or more) are keyed by their natural key, and on SQLite
# stored WITHOUT ROWID: the rows live in the key's B-tree, with no second index to keep.
_CLUSTERED = {"sqlite_with_rowid": False}


class Step(Base):
    __tablename__ = "steps"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    start: Mapped[float] = mapped_column(Double)
    end: Mapped[float] = mapped_column(Double)
    tokens: Mapped[int] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Double)
    device_time_s: Mapped[float | None] = mapped_column(Double)
    hook_overhead_s: Mapped[float | None] = mapped_column(Double)
    flops: Mapped[int | None] = mapped_column(BigInteger)
    mem_allocated_peak: Mapped[int | None] = mapped_column(BigInteger)
    mem_reserved_peak: Mapped[int | None] = mapped_column(BigInteger)
    alloc_retries: Mapped[int | None] = mapped_column(BigInteger)
    # Seconds of blocking spans inside this step, kept by the service at ingest (whichever of
    # the step and the span arrives second adds their overlap): goodput is end - start - this.
    blocked_s: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")

    __table_args__ = (
        CheckConstraint('"end" >= start', name="end_after_start"),
        CheckConstraint("tokens >= 0 AND step >= 0", name="non_negative"),
        _CLUSTERED,
    )


class Span(Base):
    __tablename__ = "spans"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(80), primary_key=True)
    start: Mapped[float] = mapped_column(Double, primary_key=True)
    end: Mapped[float] = mapped_column(Double)
    overlapped: Mapped[bool] = mapped_column(Boolean, default=False)
    step: Mapped[int | None] = mapped_column(BigInteger)
    # A blocking span that shares time with another blocking span of its rank: the accounting
    # charges these by precedence (docs/ACCOUNTING.md); every other span is charged whole.
    clashes: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    # Of a clashing span: the seconds charged to it (each second of a clash goes to the span of
    # highest precedence covering it, the earliest on a tie); NULL for the others (all of it).
    charged_s: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint('"end" >= start', name="end_after_start"),
        CheckConstraint(_CATEGORY_SQL, name="known_category"),
        # The few clashing spans of a run, without reading the others.
        Index(
            "ix_spans_clashes",
            "run_id",
            "rank",
            "start",
            sqlite_where=text("clashes"),
            postgresql_where=text("clashes"),
        ),
        _CLUSTERED,
    )


class ExcludedWindow(Base):
    """Wall time the operator declared out of the run's accounting."""

    __tablename__ = "excluded_windows"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    start: Mapped[float] = mapped_column(Double, primary_key=True)
    end: Mapped[float] = mapped_column(Double, primary_key=True)
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (CheckConstraint('"end" > start', name="end_after_start"),)


class _RankRow:
    """Columns every rank-scoped table shares."""

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)


class CheckpointCommit(_RankRow, Base):
    __tablename__ = "checkpoints"

    step: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[float] = mapped_column(Double)
    ok: Mapped[bool] = mapped_column(Boolean)

    __table_args__ = (UniqueConstraint("run_id", "attempt", "rank", "step"),)


class RoutingRow(Base):
    """One MoE layer's histogram per step: slots packed (PackedCounts), derived rates in
    columns."""

    __tablename__ = "routing"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    num_steps: Mapped[int] = mapped_column(Integer)
    num_tokens: Mapped[int] = mapped_column(BigInteger)
    top_k: Mapped[int] = mapped_column(Integer)
    null_slot: Mapped[bool] = mapped_column(Boolean)
    tokens_per_expert: Mapped[list[int]] = mapped_column(PackedCounts)
    dropped_per_expert: Mapped[list[int]] = mapped_column(PackedCounts)
    capacity: Mapped[int | None] = mapped_column(BigInteger)
    shared_only_tokens: Mapped[int | None] = mapped_column(BigInteger)
    aux_loss: Mapped[float | None] = mapped_column(Double)
    z_loss: Mapped[float | None] = mapped_column(Double)
    max_vio: Mapped[float | None] = mapped_column(Double)
    drop_rate: Mapped[float | None] = mapped_column(Double)
    null_fraction: Mapped[float | None] = mapped_column(Double)
    shared_only_fraction: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint(
            "drop_rate IS NULL OR (drop_rate >= 0 AND drop_rate <= 1)", name="drop_rate_fraction"
        ),
        CheckConstraint(
            "null_fraction IS NULL OR (null_fraction >= 0 AND null_fraction <= 1)",
            name="null_fraction_fraction",
        ),
        CheckConstraint(
            "shared_only_fraction IS NULL OR "
            "(shared_only_fraction >= 0 AND shared_only_fraction <= 1)",
            name="shared_only_fraction_fraction",
        ),
        _CLUSTERED,
    )


class Observation(_RankRow, Base):
    """What ran at one seam, beside what was requested."""

    __tablename__ = "observations"

    seam: Mapped[str] = mapped_column(String(200))
    requested: Mapped[str | None] = mapped_column(String(200))
    observed: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    time: Mapped[float] = mapped_column(Double)
    step: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("run_id", "attempt", "rank", "seam", "observed"),)


class Metric(_RankRow, Base):
    """A value measured at a step besides the training loss (`eval_loss`, say)."""

    __tablename__ = "metrics"

    name: Mapped[str] = mapped_column(String(200))
    step: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float] = mapped_column(Double)
    time: Mapped[float] = mapped_column(Double)

    __table_args__ = (UniqueConstraint("run_id", "attempt", "rank", "name", "step"),)


class Profile(_RankRow, Base):
    __tablename__ = "profiles"

    first_step: Mapped[int] = mapped_column(BigInteger)
    num_steps: Mapped[int] = mapped_column(Integer)
    trace_path: Mapped[str | None] = mapped_column(Text)
    top_kernels: Mapped[list[dict[str, Any]]] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("run_id", "attempt", "rank", "first_step"),)


# -- rollups: kept at ingest, so that summaries and downsampled series of long runs read a few
# hundred rows instead of every step (service/store/rollups/ keeps and reads them) --

ROLLUP_LEVELS = (64, 4096)  # block sizes in step numbers: block = step // level
# The rollup tables' CHECK on their level, from ROLLUP_LEVELS: "level IN (64, 4096)".
_LEVEL_SQL = f"level IN ({', '.join(map(str, ROLLUP_LEVELS))})"


class StepBlock(Base):
    """Aggregates of one attempt rank's steps numbered [block * level, (block + 1) * level)."""

    __tablename__ = "step_blocks"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    busy_s: Mapped[float] = mapped_column(Double)  # sum of end - start
    blocked_s: Mapped[float] = mapped_column(Double)  # sum of the steps' blocked_s
    tokens: Mapped[int] = mapped_column(BigInteger)
    hook_s: Mapped[float] = mapped_column(Double)
    first_start: Mapped[float] = mapped_column(Double)
    last_end: Mapped[float] = mapped_column(Double)
    fast_s: Mapped[float] = mapped_column(Double)  # the shortest step time, and its step
    fast_step: Mapped[int] = mapped_column(BigInteger)
    slow_s: Mapped[float] = mapped_column(Double)  # the longest, and its step
    slow_step: Mapped[int] = mapped_column(BigInteger)
    mem_peak: Mapped[int | None] = mapped_column(BigInteger)  # largest mem_allocated_peak
    loss_n: Mapped[int] = mapped_column(BigInteger)  # steps with a loss; then the lowest and
    loss_low: Mapped[float | None] = mapped_column(Double)  # the highest loss and their steps
    loss_low_step: Mapped[int | None] = mapped_column(BigInteger)
    loss_high: Mapped[float | None] = mapped_column(Double)
    loss_high_step: Mapped[int | None] = mapped_column(BigInteger)
    dev_n: Mapped[int] = mapped_column(BigInteger)  # steps with a device time (the hooks time
    dev_low: Mapped[float | None] = mapped_column(Double)  # one in device_every); the lowest
    dev_low_step: Mapped[int | None] = mapped_column(BigInteger)  # and highest, their steps
    dev_high: Mapped[float | None] = mapped_column(Double)
    dev_high_step: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_step_blocks_last_end", "run_id", "rank", "level", "last_end"),
        CheckConstraint(_LEVEL_SQL, name="level"),
        CheckConstraint("n >= 1 AND busy_s >= 0 AND blocked_s >= 0", name="non_negative"),
        _CLUSTERED,
    )


class SpanTotal(Base):
    """Sums of one attempt rank's spans of one category, blocking or overlapped."""

    __tablename__ = "span_totals"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(80), primary_key=True)
    overlapped: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    total_s: Mapped[float] = mapped_column(Double)
    longest_s: Mapped[float] = mapped_column(Double)
    first_start: Mapped[float] = mapped_column(Double)
    last_end: Mapped[float] = mapped_column(Double)
    # Charged minus summed seconds of its clashing spans (<= 0): total_s + this is what the
    # category is charged, by precedence, without reading any span.
    correction_s: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")

    __table_args__ = (
        CheckConstraint("n >= 1 AND total_s >= 0 AND longest_s >= 0", name="non_negative"),
        _CLUSTERED,
    )


class RoutingBlock(Base):
    """Per layer and block of step numbers: the routing records with the lowest and highest
    MaxVio (a record without one counts as -inf), for downsampled series."""

    __tablename__ = "routing_blocks"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    low: Mapped[float] = mapped_column(Double)  # -inf: a record without MaxVio
    low_step: Mapped[int] = mapped_column(BigInteger)
    high: Mapped[float] = mapped_column(Double)
    high_step: Mapped[int] = mapped_column(BigInteger)
    # The two records' figures, so that a downsampled series needs no second read.
    low_num_steps: Mapped[int] = mapped_column(Integer)
    low_num_tokens: Mapped[int] = mapped_column(BigInteger)
    low_max_vio: Mapped[float | None] = mapped_column(Double)
    low_drop_rate: Mapped[float | None] = mapped_column(Double)
    low_null_fraction: Mapped[float | None] = mapped_column(Double)
    low_shared_only_fraction: Mapped[float | None] = mapped_column(Double)
    low_aux_loss: Mapped[float | None] = mapped_column(Double)
    low_z_loss: Mapped[float | None] = mapped_column(Double)
    high_num_steps: Mapped[int] = mapped_column(Integer)
    high_num_tokens: Mapped[int] = mapped_column(BigInteger)
    high_max_vio: Mapped[float | None] = mapped_column(Double)
    high_drop_rate: Mapped[float | None] = mapped_column(Double)
    high_null_fraction: Mapped[float | None] = mapped_column(Double)
    high_shared_only_fraction: Mapped[float | None] = mapped_column(Double)
    high_aux_loss: Mapped[float | None] = mapped_column(Double)
    high_z_loss: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint(_LEVEL_SQL, name="level"),
        CheckConstraint("n >= 1", name="non_negative"),
        _CLUSTERED,
    )


# Spans are bucketed by start time in buckets of this many seconds (a power of two: a start
# divided by it, and a bucket's bounds, are exact in floating point).
SPAN_BUCKET_S = 16.0


class SpanBucket(Base):
    """Sums of one attempt rank's blocking spans of one category that start in one bucket of
    SPAN_BUCKET_S seconds (bucket = floor(start / SPAN_BUCKET_S)), clashing or not: many
    windows' span seconds are read from these and from the spans of the few buckets that
    straddle a window's edge (service/store/rollups/rolling.py)."""

    __tablename__ = "span_buckets"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(80), primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    total_s: Mapped[float] = mapped_column(Double)  # sum of end - start
    first_start: Mapped[float] = mapped_column(Double)
    last_end: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint("n >= 1 AND total_s >= 0", name="non_negative"),
        _CLUSTERED,
    )


# Steps are also summed in blocks of this many step numbers, finer than any level of
# ROLLUP_LEVELS (each of which it divides).
MICRO_BLOCK = 8


class StepMicroBlock(Base):
    """Sums of one attempt rank's steps numbered MICRO_BLOCK * micro to MICRO_BLOCK * (micro +
    1) - 1: many windows read these inside the fine step blocks that straddle a window's edge,
    and only the steps of the micro blocks that straddle it (service/store/rollups/rolling.py)."""

    __tablename__ = "step_micro_blocks"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    micro: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)
    busy_s: Mapped[float] = mapped_column(Double)  # sum of end - start
    blocked_s: Mapped[float] = mapped_column(Double)  # sum of the steps' blocked_s
    tokens: Mapped[int] = mapped_column(BigInteger)
    hook_s: Mapped[float] = mapped_column(Double)
    first_start: Mapped[float] = mapped_column(Double)
    last_end: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        CheckConstraint("n >= 1 AND busy_s >= 0 AND blocked_s >= 0", name="non_negative"),
        _CLUSTERED,
    )
