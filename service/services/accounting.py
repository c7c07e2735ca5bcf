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
from typing import Any

import numpy as np
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
    empty_badput,
    merged,
    minus,
    run_figures,
    slowest_rank,
)
from service.calc.goodput_many import GoodputColumns, PartsColumns, account_many
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


@dataclass
class Rolling:
    """Many windows' figures at once: each rank's as columns over the windows
    (calc/goodput_many.py), and the rank the whole run chose."""

    bounds: list[tuple[float, float]]
    ranks: dict[int, GoodputColumns]
    rank: int | None

    def rows(self, rank: int | None = None) -> list[dict[str, Any]]:
        """Each window's figures for `rank` (by default the whole run's), as plain dicts in
        the fields of schemas.GoodputWindow: 10,000 of them are built and encoded far faster
        than as a pydantic model each."""
        chosen = self.rank if rank is None else rank
        g = self.ranks.get(chosen) if chosen is not None else None
        if g is None:
            return [
                _row(a, b, 0.0, 0.0, None, empty_badput(), 0.0, chosen, 0, 0)
                for a, b in self.bounds
            ]
        total, goodput = g.total_s.tolist(), g.goodput_s.tolist()
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.where(g.total_s > 0, g.goodput_s / g.total_s, np.nan).tolist()
        badput = _badput_rows(g)
        return [
            _row(a, b, t, x, f if t > 0 else None, bad, o, chosen, s, k)
            for (a, b), t, x, f, bad, o, s, k in zip(
                self.bounds,
                total,
                goodput,
                fraction,
                badput,
                g.other_s.tolist(),
                g.steps.tolist(),
                g.tokens.tolist(),
                strict=True,
            )
        ]


def _row(
    start: float,
    end: float,
    total: float,
    goodput: float,
    fraction: float | None,
    badput: dict[str, float],
    other: float,
    rank: int | None,
    steps: int,
    tokens: int,
) -> dict[str, Any]:
    return {
        "start": start,
        "end": end,
        "total_s": total,
        "goodput_s": goodput,
        "goodput_fraction": fraction,
        "badput_s": badput,
        "other_s": other,
        "rank": rank,
        "steps": steps,
        "tokens": tokens,
    }


def _badput_rows(g: GoodputColumns) -> list[dict[str, float]]:
    """Each window's badput dict: every fixed category, and the custom ones it has."""
    fixed = [c for c in g.badput_s if c not in g.shown]
    out = [
        dict(zip(fixed, values, strict=True))
        for values in zip(*(g.badput_s[c].tolist() for c in fixed), strict=True)
    ]
    for c, shown in g.shown.items():
        values = g.badput_s[c]
        for i in np.flatnonzero(shown).tolist():
            out[i][c] = float(values[i])
    return out


def rolling(
    reader: windows.WindowReader, acc: Accounted, bounds: Sequence[tuple[float, float]]
) -> Rolling:
    """`window` for many windows at once, their records summed incrementally
    (store/rollups/rolling.py) and accounted as arrays (calc/goodput_many.py): each window's
    figures, the same as `window` gives. A window that meets an excluded interval has the
    accounting of their overlap (a further interval read with the windows) taken out, as
    `_shares` takes it out."""
    lo = np.array([a for a, _ in bounds], dtype=float)
    hi = np.array([b for _, b in bounds], dtype=float)
    meeting: list[np.ndarray] = []  # per excluded interval, the windows that meet it
    cut_lo, cut_hi = [lo], [hi]
    for e in acc.excluded:
        a, b = np.maximum(e.start, lo), np.minimum(e.end, hi)
        meets = np.flatnonzero(b > a)
        meeting.append(meets)
        cut_lo.append(a[meets])
        cut_hi.append(b[meets])
    all_lo, all_hi = np.concatenate(cut_lo), np.concatenate(cut_hi)
    intervals = list(zip(all_lo.tolist(), all_hi.tolist(), strict=True))
    columns = rolling_sums.parts_many(reader, intervals)
    n, out = len(bounds), {}
    for rank in sorted(acc.decided):
        parts = columns.get(rank) or PartsColumns.empty(rank, len(intervals))
        g = account_many(acc.decided[rank], parts, _cuts(acc.cuts, rank), all_lo, all_hi)
        mine = g.take(np.arange(n))
        at = n
        for meets in meeting:
            mine.subtract_at(meets, g.take(np.arange(at, at + len(meets))))
            at += len(meets)
        out[rank] = mine
    return Rolling(list(bounds), out, acc.goodput.rank)
