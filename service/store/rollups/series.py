"""Downsampled series read from the rollups: steps, one step metric, routing records per
layer. Per bucket of step numbers, the rows with the lowest and the highest value (ties: the
lowest step, then attempt), read from blocks where a bucket holds them. Callers pass a
Session; nothing here commits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.calc.downsample import bucket_plan, pick
from service.store.models import ROLLUP_LEVELS, RoutingBlock, RoutingRow, Step, StepBlock
from service.store.rollups.common import (
    COARSE,
    DESCENDING,
    POINT_COLUMNS,
    POINT_FIELDS,
    ROUTING_POINT,
    STEP_IN_COLUMNS,
    attempts_with,
    core_rows,
    decompose,
)

Where = list[ColumnElement[bool]]
Picked = Sequence[Any]  # a kept row: the values of the columns asked for, in order


@dataclass(frozen=True)
class _Series:
    blocks: type[StepBlock] | type[RoutingBlock]
    rows: type[Step] | type[RoutingRow]
    count: str  # block column: rows of the block in this series
    low: tuple[str, str]  # block columns: lowest value and its step
    high: tuple[str, str]
    value: ColumnElement[Any] | InstrumentedAttribute[Any]  # the raw rows' value expression
    present: ColumnElement[bool] | None = None  # the raw rows in this series (None: all)


_STEP_SERIES = _Series(
    StepBlock, Step, "n", ("fast_s", "fast_step"), ("slow_s", "slow_step"), Step.end - Step.start
)
_LOSS_SERIES = _Series(
    StepBlock,
    Step,
    "loss_n",
    ("loss_low", "loss_low_step"),
    ("loss_high", "loss_high_step"),
    Step.loss,
    Step.loss.isnot(None),
)
_DEVICE_SERIES = _Series(
    StepBlock,
    Step,
    "dev_n",
    ("dev_low", "dev_low_step"),
    ("dev_high", "dev_high_step"),
    Step.device_time_s,
    Step.device_time_s.isnot(None),
)
_ROUTING_SERIES = _Series(
    RoutingBlock,
    RoutingRow,
    "n",
    ("low", "low_step"),
    ("high", "high_step"),
    func.coalesce(RoutingRow.max_vio, -math.inf),
)


class SeriesPick(NamedTuple):
    total: int  # rows in [lo, hi]
    keys: list[tuple[int, int]] | None  # (step, attempt) of the rows kept; None: every row
    values: dict[tuple[int, int], float] | None = None  # each kept row's value, with keys


def _downsample(
    session: Session,
    spec: _Series,
    where_blocks: Where,
    where_rows: Where,
    lo: int,
    hi: int,
    max_points: int,
) -> SeriesPick:
    """Which rows of [lo, hi] a downsampled series keeps."""
    if lo > hi:
        return SeriesPick(0, [])
    b, r = spec.blocks, spec.rows
    count: InstrumentedAttribute[int] = getattr(b, spec.count)
    present = [] if spec.present is None else [spec.present]
    width, level = bucket_plan(lo, hi, max_points, ROLLUP_LEVELS)  # buckets of whole blocks
    if level == 1:  # the picks would read every row: count from blocks first, read rows once
        total = _count(session, spec, where_blocks, [*where_rows, *present], lo, hi)
        if total <= max_points:
            return SeriesPick(total, None)
    blocks, raw = decompose(lo, hi, tuple(lv for lv in DESCENDING if lv <= level))
    extremes = zip(("low", "low_step", "high", "high_step"), (*spec.low, *spec.high), strict=True)
    cols = (
        count.label("n"),
        b.attempt,
        b.level,
        b.block,
        *(getattr(b, column).label(name) for name, column in extremes),
    )
    candidates: list[tuple[int, float, int, int]] = []  # (bucket, value, step, attempt)
    total = 0
    for lv, first, last in blocks:
        stmt = select(*cols).where(
            *where_blocks, b.level == lv, b.block.between(first, last), count > 0
        )
        # Unpacked in the order of `cols` (the names it labels): a Row's attribute is a name
        # lookup per field, far dearer than tuple unpacking, and these loops are the query.
        for n, attempt, lv_, block, low, low_step, high, high_step in core_rows(session, stmt):
            total += n
            bucket = block * lv_ // width
            candidates.append((bucket, low, low_step, attempt))
            candidates.append((bucket, high, high_step, attempt))
    for first, last in raw:
        stmt = select(r.step, r.attempt, spec.value.label("value")).where(
            *where_rows, *present, r.step.between(first, last)
        )
        for step, attempt, value in core_rows(session, stmt):
            total += 1
            candidates.append((step // width, value, step, attempt))
    if total <= max_points:
        return SeriesPick(total, None)
    values = {(step, attempt): value for _, value, step, attempt in candidates}
    return SeriesPick(total, pick(candidates), values)


def _count(
    session: Session,
    spec: _Series,
    where_blocks: Where,
    where_rows: Where,
    lo: int,
    hi: int,
) -> int:
    """Rows of [lo, hi]: block counts over the coarsest cover, raw counts at its edges."""
    b, r = spec.blocks, spec.rows
    count: InstrumentedAttribute[int] = getattr(b, spec.count)
    blocks, raw = decompose(lo, hi)
    total = 0
    for lv, first, last in blocks:
        total += int(  # PostgreSQL sums bigints as numeric
            session.scalar(
                select(func.coalesce(func.sum(count), 0)).where(
                    *where_blocks, b.level == lv, b.block.between(first, last)
                )
            )
            or 0
        )
    for first, last in raw:
        total += (
            session.scalar(select(func.count()).where(*where_rows, r.step.between(first, last)))
            or 0
        )
    return total


def step_series(
    session: Session,
    run_id: str,
    rank: int,
    start_step: int | None,
    end_step: int | None,
    max_points: int,
    *,
    metric: str = "step_time_s",
    columns: Sequence[ColumnElement[Any] | InstrumentedAttribute[Any]] | None = None,
    metric_only: bool = False,
) -> tuple[int, list[Picked]]:
    """(steps in the range, the kept rows ordered by step then attempt): rows of `columns`
    (default STEP_IN_COLUMNS), buckets keeping the extremes of `metric` (STEP_METRICS; a loss
    or device-time series holds the steps that have one). `metric_only`: the columns are
    (step, attempt, the metric's value)."""
    spec = STEP_METRICS[metric]
    where_blocks: Where = [StepBlock.run_id == run_id, StepBlock.rank == rank]
    attempts = attempts_with(session, spec.blocks, where_blocks)
    if not attempts:
        return 0, []
    where_rows: Where = [Step.run_id == run_id, Step.attempt.in_(attempts), Step.rank == rank]
    lo, hi = start_step, end_step
    if lo is None or hi is None:
        bounds = _bounds(session, _STEP_SERIES, where_blocks, where_rows)
        if bounds is None:
            return 0, []
        lo = bounds[0] if lo is None else lo
        hi = bounds[1] if hi is None else hi
    pick = _downsample(session, spec, where_blocks, where_rows, lo, hi, max_points)
    if metric_only and pick.keys is not None and pick.values is not None:
        # The blocks' extremes carry their values: no second read of the kept rows.
        return pick.total, [(s, a, pick.values[s, a]) for s, a in pick.keys]
    where = [*where_rows, *([] if spec.present is None else [spec.present])]
    rows = _fetch(session, Step, columns or STEP_IN_COLUMNS, where, lo, hi, pick.keys)
    return pick.total, list(rows)


STEP_METRICS = {
    "step_time_s": _STEP_SERIES,
    "loss": _LOSS_SERIES,
    "device_time_s": _DEVICE_SERIES,
}


def metric_series(
    session: Session,
    run_id: str,
    rank: int,
    metric: str,
    start_step: int | None,
    end_step: int | None,
    max_points: int,
) -> tuple[int, list[Picked]]:
    """One scalar of STEP_METRICS as (step, attempt, value) rows, downsampled on it."""
    columns = (Step.step, Step.attempt, STEP_METRICS[metric].value)
    return step_series(
        session,
        run_id,
        rank,
        start_step,
        end_step,
        max_points,
        metric=metric,
        columns=columns,
        metric_only=True,
    )


def _fetch(
    session: Session,
    model: type[Step] | type[RoutingRow],
    columns: Sequence[ColumnElement[Any] | InstrumentedAttribute[Any]],
    where: Where,
    lo: int,
    hi: int,
    keys: list[tuple[int, int]] | None,
) -> list[Picked]:
    stmt = select(*columns).where(*where)
    if keys is None:
        return list(
            core_rows(
                session, stmt.where(model.step.between(lo, hi)).order_by(model.step, model.attempt)
            ).all()
        )
    # By step numbers (an IN on one indexed column: SQLite looks each up in the key, where a
    # row-value IN would scan the range), then exactly the wanted (step, attempt) pairs.
    wanted = set(keys)
    steps = sorted({step for step, _ in keys})
    rows: list[Picked] = []
    for i in range(0, len(steps), _KEYS_PER_QUERY):  # bound parameters stay under SQLite's limit
        part = stmt.where(model.step.in_(steps[i : i + _KEYS_PER_QUERY]))
        for row in core_rows(session, part.order_by(model.step, model.attempt)):
            if (row.step, row.attempt) in wanted:
                rows.append(row)
    return rows


_KEYS_PER_QUERY = 4000


class LayerSeries(NamedTuple):
    total: int  # records of the layer in the range
    rows: list[Picked]  # the kept ones, by step then attempt: (layer, step, attempt, *figures)
    newest_attempt: int  # the newest attempt with records of the layer


def routing_series(
    session: Session,
    run_id: str,
    rank: int,
    layer: int | None,
    max_points: int,
) -> dict[int, LayerSeries]:
    """Per E layer (every layer, or `layer`), its routing records downsampled by MaxVio. The
    layers share one step range (lowest to highest step of any of them) and so one set of
    buckets; each statement covers every layer. Rows are ROUTING_POINT: (layer, step,
    attempt, *POINT_FIELDS); the kept records' figures come from the blocks (or the rows read
    at the range's edges), with no second read."""
    where_blocks: Where = [RoutingBlock.run_id == run_id, RoutingBlock.rank == rank]
    if layer is not None:
        where_blocks.append(RoutingBlock.layer == layer)
    attempts_by_layer: dict[int, list[int]] = {}
    stmt = (
        select(RoutingBlock.layer, RoutingBlock.attempt)
        .where(*where_blocks, RoutingBlock.level == COARSE)
        .group_by(RoutingBlock.layer, RoutingBlock.attempt)
    )
    for row in core_rows(session, stmt):
        attempts_by_layer.setdefault(row.layer, []).append(row.attempt)
    del stmt
    if not attempts_by_layer:
        return {}
    layers = sorted(attempts_by_layer)
    attempts = sorted({a for v in attempts_by_layer.values() for a in v})
    where_blocks = [*where_blocks[:2], RoutingBlock.layer.in_(layers)]
    where_rows: Where = [
        RoutingRow.run_id == run_id,
        RoutingRow.attempt.in_(attempts),
        RoutingRow.rank == rank,
        RoutingRow.layer.in_(layers),
    ]
    bounds = _bounds(session, _ROUTING_SERIES, where_blocks, where_rows)
    if bounds is None:
        return {}
    lo, hi = bounds
    width, level = bucket_plan(lo, hi, max_points, ROLLUP_LEVELS)
    blocks, raw = decompose(lo, hi, tuple(lv for lv in DESCENDING if lv <= level))
    totals = dict.fromkeys(layers, 0)
    candidates: dict[int, list[tuple[int, float, int, int]]] = {n: [] for n in layers}
    points: dict[tuple[int, int, int], Sequence[Any]] = {}  # (layer, step, attempt) -> figures
    b = RoutingBlock
    cols = (b.layer, b.n, b.attempt, b.block, b.low, b.low_step, b.high, b.high_step)
    sides = [getattr(b, f"{side}_{f}") for side in ("low", "high") for f in POINT_FIELDS]
    # Each side's figures, POINT_FIELDS in order, after the named columns.
    lows = slice(len(cols), len(cols) + len(POINT_FIELDS))
    highs = slice(lows.stop, None)
    for lv, first, last in blocks:
        found = select(*cols, *sides).where(
            *where_blocks, b.level == lv, b.block.between(first, last)
        )
        for row in core_rows(session, found).all():  # thousands of rows for every layer: lean
            # The named columns unpacked in the order of `cols` (Row attributes made this
            # loop most of the query's time), then each side's figures.
            n, count, attempt, block, low, low_step, high, high_step = row[: len(cols)]
            totals[n] += count
            bucket = block * lv // width
            found_n = candidates[n]
            found_n.append((bucket, low, low_step, attempt))
            found_n.append((bucket, high, high_step, attempt))
            points[n, low_step, attempt] = row[lows]
            points[n, high_step, attempt] = row[highs]
    named = (*ROUTING_POINT[:3], _ROUTING_SERIES.value.label("value"))
    figures = slice(len(named), None)  # then POINT_FIELDS
    for first, last in raw:
        edge = select(*named, *POINT_COLUMNS).where(
            *where_rows, RoutingRow.step.between(first, last)
        )
        for row in core_rows(session, edge).all():
            n, step, attempt, value = row[: len(named)]  # in the order of `named`
            totals[n] += 1
            candidates[n].append((step // width, value, step, attempt))
            points[(n, step, attempt)] = row[figures]
    every = [n for n in layers if totals[n] <= max_points]
    rows: dict[int, list[Picked]] = {}
    if every:
        rows = _fetch_routing(session, where_rows, lo, hi, every)
    for n in layers:
        if n not in every:  # the kept records' figures came with the candidates
            rows[n] = [(n, s, a, *points[(n, s, a)]) for s, a in pick(candidates[n])]
    return {n: LayerSeries(totals[n], rows.get(n, []), max(attempts_by_layer[n])) for n in layers}


def _bounds(
    session: Session, spec: _Series, where_blocks: Where, where_rows: Where
) -> tuple[int, int] | None:
    """Lowest and highest step of the series (over every layer the filters admit): the end
    coarse block, the end fine block inside it, then at most FINE step numbers of rows; no
    scan of the series, and one statement (each end a chain of scalar subqueries)."""
    b, r = spec.blocks, spec.rows
    ends = []
    for agg, name in ((func.min, "lo"), (func.max, "hi")):
        first: ColumnElement[int] | None = None  # the end block found so far: its first step
        size = 0  # and its size
        for level in DESCENDING:
            stmt = select(agg(b.block)).where(*where_blocks, b.level == level)
            if first is not None:
                stmt = stmt.where(b.block.between(first // level, (first + size - 1) // level))
            first, size = stmt.scalar_subquery() * level, level
        assert first is not None  # ROLLUP_LEVELS is not empty
        ends.append(
            select(agg(r.step))
            .where(*where_rows, r.step.between(first, first + size - 1))
            .scalar_subquery()
            .label(name)
        )
    found = session.execute(select(*ends)).one()
    return None if found.lo is None or found.hi is None else (int(found.lo), int(found.hi))


def _fetch_routing(
    session: Session,
    where_rows: Where,
    lo: int,
    hi: int,
    layers: list[int],
) -> dict[int, list[Picked]]:
    """Every row of [lo, hi] of these layers, by layer."""
    out: dict[int, list[Picked]] = {}
    stmt = (
        select(*ROUTING_POINT)
        .where(*where_rows, RoutingRow.layer.in_(layers), RoutingRow.step.between(lo, hi))
        .order_by(RoutingRow.step, RoutingRow.attempt)
    )
    for row in core_rows(session, stmt).all():
        out.setdefault(row.layer, []).append(row)
    return out
