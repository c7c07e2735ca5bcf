"""A run's goodput timeline, like a Gantt chart: one row per (attempt, rank), bars of where
its wall time went (goodput, startup, compile, data stall, checkpoint, eval, wasted
progress...), each crash marked with its cause and each recovery gap between attempts.

Bounded at any length: intervals of one row and category closer than the resolution
(`RESOLUTION_STEPS` of the run's extent) are merged into one bar; past `MAX_BARS` bars the
resolution doubles until they fit, and past `MAX_ROWS` rows only some ranks are drawn.

What a bar tells (docs/ACCOUNTING.md charges each second of a rank to one part):
- `covered_s`: the seconds of its category charged inside it: blocking spans by precedence
  (a clashing span's charged seconds), committed steps' busy time less inferred compile
  (goodput), uncommitted steps' busy time plus the partial step at a crash (wasted progress),
  the inferred compile of a first step, the gap between attempts (infra recovery). Summed
  over a rank's bars per category, they are the accounting's figures of that rank to float
  rounding (1e-6 s), however coarse the bars: merging adds the seconds, it never measures
  the bar. Not drawn: the hooks' own time (`observability` of `hook_overhead_s`, spread
  between steps) and excluded windows (drawn as shaded spans, not cut out of the bars).
- `start`, `end`: the first start and the last end of what it merged; so it over-covers by
  the gaps it bridged, each shorter than the resolution. `covered_s / (end - start)` is its
  density, which the figure shows as its opacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy.orm import Session

from service.calc.goodput import FAILED_STATUSES, AttemptSplit, Decided
from service.services import accounting
from service.services.runs import run_or_404
from service.store import timeline as reads

RESOLUTION_STEPS = 1500  # the resolution: the run's extent / this
MAX_BARS = 5_000  # past this many bars, the resolution doubles until they fit
MAX_ROWS = 48  # (attempt, rank) rows drawn at most
GOODPUT = "goodput"
WASTED = "wasted_progress"
RECOVERY = "infra_recovery"


class Piece(NamedTuple):
    """An interval of one row and category, with the seconds charged inside it."""

    row: int
    category: str
    start: float
    end: float
    covered_s: float
    n: int = 1


@dataclass(frozen=True)
class Row:
    attempt: int
    rank: int
    start: float
    end: float
    status: str  # as the accounting decided it: completed, failed, stalled, running
    cause: str | None


@dataclass(frozen=True)
class Crash:
    row: int
    time: float
    cause: str


@dataclass
class Timeline:
    run_id: str
    extent: tuple[float, float] | None  # the first start and last end over every rank
    resolution_s: float
    rows: list[Row]
    bars: list[Piece]
    crashes: list[Crash]
    excluded: list[tuple[float, float]]
    ranks_shown: list[int]
    ranks_total: int
    attempt_ends: dict[int, str] = field(default_factory=dict)  # attempt -> how it ended

    def plain(self) -> dict[str, Any]:
        """As the figure builders take it: plain dicts and lists."""
        return {
            "extent": list(self.extent) if self.extent else None,
            "resolution_s": self.resolution_s,
            "rows": [r.__dict__ for r in self.rows],
            "bars": [b._asdict() for b in self.bars],
            "crashes": [c.__dict__ for c in self.crashes],
            "excluded": [list(e) for e in self.excluded],
            "ranks_shown": self.ranks_shown,
            "ranks_total": self.ranks_total,
        }


def merge(pieces: Iterable[Piece], resolution_s: float) -> list[Piece]:
    """Per row and category, intervals whose gap (the next start after the latest end so
    far) is shorter than `resolution_s` become one bar: its first start, latest end, the sum
    of their seconds and counts. Sorted by row, category, start."""
    out: list[Piece] = []
    for p in sorted(pieces, key=lambda p: (p.row, p.category, p.start, p.end)):
        last = out[-1] if out else None
        if (
            last is not None
            and (last.row, last.category) == (p.row, p.category)
            and p.start - last.end < resolution_s
        ):
            out[-1] = Piece(
                p.row,
                p.category,
                last.start,
                max(last.end, p.end),
                last.covered_s + p.covered_s,
                last.n + p.n,
            )
        else:
            out.append(p)
    return out


def bounded(pieces: Sequence[Piece], resolution_s: float) -> tuple[list[Piece], float]:
    """`merge` at the resolution, doubled until at most MAX_BARS bars remain."""
    bars = merge(pieces, resolution_s)
    while len(bars) > MAX_BARS:
        resolution_s *= 2
        bars = merge(bars, resolution_s)
    return bars, resolution_s


def ended(d: Decided) -> str:
    """How an attempt ended, as the accounting decided it (the stored status of a crash
    without an end record is empty): e.g. "failed: oom", "completed", "running"."""
    return f"{d.status}: {d.cause}" if d.cause and d.status in FAILED_STATUSES else d.status


def attempt_ends(acc: accounting.Accounted) -> dict[int, str]:
    """attempt -> how it ended, one for all its ranks (the accounting decides it so)."""
    return {d.attempt: ended(d) for ds in acc.decided.values() for d in ds}


def _shown(acc: accounting.Accounted) -> tuple[list[int], list[int]]:
    """(ranks, attempts) drawn: the run's rank first, then the lowest ranks, as many as fit
    MAX_ROWS rows with every attempt; with more attempts than rows, the newest ones."""
    ranks = sorted(acc.decided)
    attempts = sorted({d.attempt for ds in acc.decided.values() for d in ds})
    if len(attempts) > MAX_ROWS:
        attempts = attempts[-MAX_ROWS:]
    room = max(1, MAX_ROWS // max(1, len(attempts)))
    run_rank = acc.goodput.rank
    chosen = [run_rank] if run_rank is not None else []
    chosen += [r for r in ranks if r != run_rank][: room - len(chosen)]
    return sorted(chosen), attempts


def _cut_s(acc: accounting.Accounted, d: Decided) -> tuple[float, float, list[Piece]]:
    """Inferred compile of the attempt rank: (seconds taken from goodput, from wasted
    progress, its intervals as compile pieces of row -1)."""
    good = wasted = 0.0
    pieces = []
    for c in acc.cuts:
        if (c.attempt, c.rank) != (d.attempt, d.rank):
            continue
        x = sum(b - a for a, b in c.intervals)
        if c.step <= d.upto:
            good += x
        else:
            wasted += x
        pieces += [Piece(-1, "compile", a, b, b - a) for a, b in c.intervals]
    return good, wasted, pieces


def _row_pieces(session: Session, acc: accounting.Accounted, d: Decided, row: int) -> list[Piece]:
    """The row's goodput, wasted progress and inferred compile."""
    split = acc.parts[d.rank].split.get(d.attempt, AttemptSplit(0.0, 0.0, 0))
    good_cut, wasted_cut, cuts = _cut_s(acc, d)
    out = [p._replace(row=row) for p in cuts]
    last = reads.last_step(session, acc.run_id, d.attempt, d.rank)
    if last is None:
        committed = uncommitted = None
    else:
        upto = last if d.upto == math.inf else int(min(d.upto, last))
        committed = reads.steps_extent(session, acc.run_id, d.attempt, d.rank, 0, upto)
        uncommitted = reads.steps_extent(session, acc.run_id, d.attempt, d.rank, upto + 1, last)
    if committed is not None:
        out.append(Piece(row, GOODPUT, *committed, split.busy_upto - good_cut))
    if d.status in FAILED_STATUSES:
        tail = max(0.0, d.end - d.progress)  # the partial step at the crash
        covered = split.busy_after - wasted_cut + tail
        lo = min(uncommitted[0], d.progress) if uncommitted else d.progress
        if covered > 0 or uncommitted:
            out.append(Piece(row, WASTED, lo, d.end, covered, split.steps_after))
    return out


def _recovery(decided: Sequence[Decided], index: dict[tuple[int, int], int]) -> list[Piece]:
    """The gaps between one rank's attempts, each on the row of the attempt before it."""
    out = []
    prev: Decided | None = None
    for d in sorted(decided, key=lambda d: d.attempt):
        if prev is not None and d.start > prev.end and (prev.attempt, prev.rank) in index:
            row = index[prev.attempt, prev.rank]
            out.append(Piece(row, RECOVERY, prev.end, d.start, d.start - prev.end))
        if prev is None or d.end > prev.end:
            prev = d
    return out


def timeline(session: Session, run_id: str, acc: accounting.Accounted | None = None) -> Timeline:
    """The run's timeline, bounded (module docstring); `acc`: its accounting, if read."""
    run_or_404(session, run_id)
    acc = acc or accounting.whole_run(session, run_id)
    every = [d for ds in acc.decided.values() for d in ds]
    ranks, attempts = _shown(acc)
    excluded = [(e.start, e.end) for e in acc.excluded]
    if not every:
        return Timeline(run_id, None, 0.0, [], [], [], excluded, [], 0)
    lo, hi = min(d.start for d in every), max(d.end for d in every)
    resolution = max((hi - lo) / RESOLUTION_STEPS, 1e-6)
    shown = sorted(
        (d for d in every if d.rank in ranks and d.attempt in attempts),
        key=lambda d: (d.attempt, d.rank),
    )
    rows = [Row(d.attempt, d.rank, d.start, d.end, d.status, d.cause) for d in shown]
    index = {(d.attempt, d.rank): i for i, d in enumerate(shown)}
    pieces: list[Piece] = []
    for d in shown:
        pieces += _row_pieces(session, acc, d, index[d.attempt, d.rank])
    for rank in ranks:
        pieces += _recovery(acc.decided[rank], index)
    for s in reads.span_pieces(session, run_id, lo, resolution, attempts, ranks):
        pieces.append(Piece(index[s.attempt, s.rank], s.category, s.start, s.end, s.charged_s, s.n))
    bars, resolution = bounded(pieces, resolution)
    crashes = [
        Crash(index[d.attempt, d.rank], d.end, ended(d))
        for d in shown
        if d.status in FAILED_STATUSES
    ]
    return Timeline(
        run_id=run_id,
        extent=(lo, hi),
        resolution_s=resolution,
        rows=rows,
        bars=bars,
        crashes=crashes,
        excluded=excluded,
        ranks_shown=ranks,
        ranks_total=len(acc.decided),
        attempt_ends=attempt_ends(acc),
    )


NICE_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200)
ROLLING_WINDOWS = 40  # about this many windows over the run


def rolling_window_s(extent_s: float) -> float:
    """A window for rolling goodput: about ROLLING_WINDOWS over the run, rounded up to a
    readable length (seconds, minutes, hours, then days); sub-second for tiny runs."""
    want = extent_s / ROLLING_WINDOWS
    if want < 1:
        return max(0.1, math.ceil(want * 10) / 10)
    for nice in NICE_S:
        if want <= nice:
            return float(nice)
    return float(math.ceil(want / 86_400) * 86_400)
