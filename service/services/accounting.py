"""The run's goodput accounting, read from the store: whole run and windows (the rules:
docs/ACCOUNTING.md; the arithmetic: goodput.py; the sums: store/rollups/ for the whole
run, store/rollups/windows.py for windows). Plain functions the routes, /metrics and the
receipts call; no HTTP here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from service.calc.goodput import (
    CompileCut,
    Decided,
    Disruption,
    Interval,
    RankGoodput,
    RankParts,
    RunGoodput,
    account,
    decide,
    disruptions,
    merged,
    minus,
    run_figures,
    slowest_rank,
)
from service.calc.step_stats import STRAGGLER_STEPS, ideal_step_time
from service.store.rollups import read as rollup_read
from service.store.rollups import rolling as rolling_sums
from service.store.rollups import windows


@dataclass
class Accounted:
    """A run accounted on the whole run, with the decisions its windows are cut from."""

    run_id: str
    goodput: RunGoodput
    decided: dict[int, list[Decided]]
    parts: dict[int, RankParts]
    cuts: list[CompileCut]
    excluded: list[Interval]
    now: float

    def disruptions(self, rank: int | None) -> list[Disruption]:
        if rank is None or rank not in self.decided:
            return []
        return disruptions(self.decided[rank], self.parts[rank])

    def status(self) -> str:
        """The run's status: its newest attempt's (running, completed, failed, stalled)."""
        return status_of(self.decided)


def status_of(decided: dict[int, list[Decided]]) -> str:
    newest = [d for ds in decided.values() for d in ds]
    if not newest:
        return "running"
    last = max(d.attempt for d in newest)
    return next(d.status for d in newest if d.attempt == last)


def _cuts(cuts: Sequence[CompileCut], rank: int) -> list[CompileCut]:
    return [c for c in cuts if c.rank == rank]


def whole_run(session: Session, run_id: str, now: float | None = None) -> Accounted:
    """The whole run, from the rollups: fast at any length."""
    now = time.time() if now is None else now
    roll = rollup_read.run_rollup(session, run_id)
    decided = decide(roll.rows, roll.life, roll.saved, now)
    parts = rollup_read.run_parts(session, roll, decided)
    ideal = {
        rank: ideal_step_time(rollup_read.newest_step_times(session, run_id, rank, STRAGGLER_STEPS))
        for rank in roll.coarse
        if any((a, rank) not in roll.with_compile for a in roll.coarse[rank])
    }
    cuts = rollup_read.compile_cuts(session, roll, ideal)
    excluded = merged(roll.excluded)
    acc = Accounted(run_id, run_figures([], None), decided, parts, cuts, excluded, now)
    reader = windows.WindowReader(session, run_id, acc.decided) if excluded else None

    def excluded_parts(lo: float, hi: float) -> dict[int, RankParts]:
        assert reader is not None  # read only when windows are excluded
        return reader.parts(lo, hi).ranks

    per_rank = _shares(acc, parts, excluded_parts, -math.inf, math.inf)
    acc.goodput = run_figures(per_rank, slowest_rank(per_rank))
    return acc


def _shares(
    acc: Accounted,
    parts: Mapping[int, RankParts],
    excluded_parts: Callable[[float, float], Mapping[int, RankParts]],
    lo: float,
    hi: float,
) -> list[RankGoodput]:
    """Each rank's share of [lo, hi] (its records there: `parts`), without the seconds of the
    excluded windows: each one's share of [lo, hi] (`excluded_parts(a, b)`) accounted and
    taken out."""
    per_rank = [_account(acc, parts, rank, lo, hi) for rank in sorted(acc.decided)]
    for e in acc.excluded:
        a, b = max(e.start, lo), min(e.end, hi)
        if b > a:
            inside = excluded_parts(a, b)
            per_rank = [minus(g, _account(acc, inside, g.rank, a, b)) for g in per_rank]
    return per_rank


def _account(
    acc: Accounted, parts: Mapping[int, RankParts], rank: int, lo: float, hi: float
) -> RankGoodput:
    mine = parts.get(rank) or RankParts.empty(rank)
    return account(acc.decided[rank], mine, _cuts(acc.cuts, rank), lo, hi)


def window(
    reader: windows.WindowReader, acc: Accounted, lo: float, hi: float
) -> tuple[RunGoodput, windows.WindowParts]:
    """The run's share of [lo, hi]: the whole run's decisions, every interval cut to it;
    reported for the rank the whole run chose."""
    if not hi > lo:
        raise ValueError(f"end ({hi}) must be after start ({lo})")
    parts = reader.parts(lo, hi)
    per_rank = _shares(acc, parts.ranks, lambda a, b: reader.parts(a, b).ranks, lo, hi)
    return run_figures(per_rank, acc.goodput.rank), parts


def rolling(
    reader: windows.WindowReader, acc: Accounted, bounds: Sequence[tuple[float, float]]
) -> list[RunGoodput]:
    """`window` for many windows at once, their records summed incrementally
    (store/rollups/rolling.py): each window's figures, the same as `window` gives."""
    cuts = [(max(e.start, lo), min(e.end, hi)) for lo, hi in bounds for e in acc.excluded]
    cuts = [(a, b) for a, b in cuts if b > a]
    sums = rolling_sums.parts_many(reader, [*bounds, *cuts])
    excluded = dict(zip(cuts, sums[len(bounds) :], strict=True))
    return [
        run_figures(_shares(acc, parts, lambda a, b: excluded[a, b], lo, hi), acc.goodput.rank)
        for (lo, hi), parts in zip(bounds, sums, strict=False)
    ]
