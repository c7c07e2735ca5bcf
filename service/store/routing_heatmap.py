"""Reads for the routing page's heatmap: one E layer's routing records, their histograms
decoded in bulk (numpy, not a list per row), chunk by chunk in step order; the layers and
step ranges of a run, and record counts per bucket of step numbers from the rollup blocks
(what tells a cached bucket is still whole). Callers pass a Session; nothing here commits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import LargeBinary, func, select, type_coerce
from sqlalchemy.orm import Session

from service.calc.routing_heatmap import Ints, RecordChunk
from service.store.models import RoutingBlock, RoutingRow, Run
from service.store.rollups.common import COARSE, FINE, core_rows

CHUNK_ROWS = 8192  # records decoded at once: bounded memory at any run length

# PackedCounts (store/models.py): a width code, then little-endian counts of that width
_WIDTHS = {ord("B"): 1, ord("H"): 2, ord("I"): 4, ord("Q"): 8}

_COLUMNS = (
    RoutingRow.step,
    RoutingRow.num_tokens,
    RoutingRow.top_k,
    RoutingRow.null_slot,
    RoutingRow.shared_only_tokens,
    RoutingRow.max_vio,
    RoutingRow.aux_loss,
    RoutingRow.z_loss,
    type_coerce(RoutingRow.tokens_per_expert, LargeBinary).label("tokens"),  # the raw bytes
    type_coerce(RoutingRow.dropped_per_expert, LargeBinary).label("dropped"),
)


def unpack(blobs: list[bytes]) -> tuple[Ints, Ints]:
    """(slots per histogram, the histograms as one matrix padded with zeros) of packed
    histograms: one numpy view per (width, length) group instead of a list per row."""
    n = len(blobs)
    lengths = np.fromiter(map(len, blobs), np.int64, n)
    codes = np.frombuffer(bytes(b[0] for b in blobs), np.uint8).astype(np.int64)
    widths = np.zeros(n, np.int64)
    for code, width in _WIDTHS.items():
        widths[codes == code] = width
    if n and not widths.all():
        raise ValueError(f"unknown histogram width code {chr(int(codes[widths == 0][0]))!r}")
    slots = (lengths - 1) // np.maximum(widths, 1)
    out = np.zeros((n, int(slots.max(initial=0))), np.int64)
    for width, length in np.unique(np.stack([widths, lengths], axis=1), axis=0).tolist():
        rows = np.flatnonzero((widths == width) & (lengths == length))
        raw = b"".join(blobs) if len(rows) == n else b"".join([blobs[i] for i in rows])
        body = np.frombuffer(raw, np.uint8).reshape(len(rows), length)[:, 1:]
        values = np.ascontiguousarray(body).view(f"<u{width}")
        out[rows, : values.shape[1]] = values
    return slots, out


_NUMBERS = 8  # the leading columns of _COLUMNS that are numbers (or null), then 2 histograms


def _chunk(rows: Sequence[Any]) -> RecordChunk:
    # One float matrix of the number columns (None -> NaN; step numbers and counts are exact
    # in a double up to 2**53), then the histograms.
    nums = np.array([r[:_NUMBERS] for r in rows], np.float64).reshape(len(rows), _NUMBERS)
    slots, tokens = unpack([r[_NUMBERS] for r in rows])
    _, dropped = unpack([r[_NUMBERS + 1] for r in rows])
    if dropped.shape[1] < tokens.shape[1]:
        dropped = np.pad(dropped, ((0, 0), (0, tokens.shape[1] - dropped.shape[1])))
    ints = nums[:, :3].astype(np.int64)
    return RecordChunk(
        steps=ints[:, 0],
        num_tokens=ints[:, 1],
        top_k=ints[:, 2],
        null_slot=nums[:, 3] != 0,
        shared_only=nums[:, 4],
        max_vio=nums[:, 5],
        aux_loss=nums[:, 6],
        z_loss=nums[:, 7],
        slots=slots,
        tokens=tokens,
        dropped=dropped,
    )


def _where(run_id: str, rank: int, layer: int, attempt: int) -> list[Any]:
    return [
        RoutingRow.run_id == run_id,
        RoutingRow.attempt == attempt,
        RoutingRow.rank == rank,
        RoutingRow.layer == layer,
    ]


def record_chunks(
    session: Session, run_id: str, rank: int, layer: int, attempt: int, lo: int, hi: int
) -> Iterator[RecordChunk]:
    """The layer's records of one attempt with steps in [lo, hi], in step order, CHUNK_ROWS
    at a time."""
    stmt = (
        select(*_COLUMNS)
        .where(*_where(run_id, rank, layer, attempt), RoutingRow.step.between(lo, hi))
        .order_by(RoutingRow.step)
    )
    # The driver's own rows (DBAPI cursor): a million records per layer at a million steps,
    # where building a Row per record costs more than the decoding. Nothing here needs the
    # result processing: numbers come as numbers, and booleans as numbers or booleans.
    cursor = core_rows(session, stmt).cursor
    while rows := cursor.fetchmany(CHUNK_ROWS):
        yield _chunk(rows)


def newest_records(
    session: Session, run_id: str, rank: int, layer: int, attempts: list[int], limit: int
) -> list[RecordChunk]:
    """The layer's newest `limit` records: the newest attempt's highest steps first, then
    the attempt before it (`attempts`, newest first); each chunk in reverse step order."""
    out = []
    for attempt in attempts:
        if limit <= 0:
            break
        stmt = (
            select(*_COLUMNS)
            .where(*_where(run_id, rank, layer, attempt))
            .order_by(RoutingRow.step.desc())
            .limit(limit)
        )
        rows = core_rows(session, stmt).cursor.fetchall()
        if rows:
            out.append(_chunk(rows))
            limit -= len(rows)
    return out


def generation(session: Session, run_id: str) -> float | None:
    """When the run's row was stored: a run deleted and stored again gets another, so
    whatever was computed of the one before is told apart."""
    return session.scalar(select(Run.ingested_at).where(Run.run_id == run_id))


def layers(session: Session, run_id: str, rank: int) -> list[int]:
    """The E layers that have routing records on this rank, from the coarse blocks."""
    stmt = (
        select(RoutingBlock.layer)
        .where(
            RoutingBlock.run_id == run_id,
            RoutingBlock.rank == rank,
            RoutingBlock.level == COARSE,
        )
        .distinct()
        .order_by(RoutingBlock.layer)
    )
    return [int(n) for n in session.scalars(stmt)]


def extents(session: Session, run_id: str, rank: int, layer: int) -> dict[int, tuple[int, int]]:
    """Per attempt, the step range of the layer's fine blocks that hold records (the
    records' own range, widened to whole blocks of FINE steps)."""
    b = RoutingBlock
    stmt = (
        select(b.attempt, func.min(b.block), func.max(b.block))
        .where(b.run_id == run_id, b.rank == rank, b.layer == layer, b.level == FINE, b.n > 0)
        .group_by(b.attempt)
    )
    return {
        int(a): (int(lo) * FINE, int(hi) * FINE + FINE - 1)
        for a, lo, hi in core_rows(session, stmt)
    }


def bucket_counts(
    session: Session, run_id: str, rank: int, layer: int, width: int
) -> dict[tuple[int, int], int]:
    """Records per (attempt, bucket of `width` steps), from the fine blocks; `width` is a
    whole number of them."""
    assert width % FINE == 0, f"width {width} is not a whole number of {FINE}-step blocks"
    b = RoutingBlock
    bucket = (b.block // (width // FINE)).label("bucket")
    stmt = (
        select(b.attempt, bucket, func.sum(b.n))
        .where(b.run_id == run_id, b.rank == rank, b.layer == layer, b.level == FINE)
        .group_by(b.attempt, bucket)
    )
    return {(int(a), int(k)): int(n) for a, k, n in core_rows(session, stmt)}
