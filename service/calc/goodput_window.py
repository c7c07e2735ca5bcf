"""The accounting on raw records, whole run or window: the definition that the service's
sums (rollups for the whole run, store/rollups/windows.py for windows) are tested against, and
the rolling windows' bounds. The rules: docs/ACCOUNTING.md; the arithmetic: goodput.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from service.calc.goodput import (
    AttemptSplit,
    CompileCut,
    Decided,
    Disruption,
    GoodputInputs,
    Interval,
    RankGoodput,
    RankParts,
    RunGoodput,
    SpanIn,
    SpanIndex,
    StepIn,
    account,
    charged,
    decide,
    disruptions,
    inferred_compile,
    merged,
    minus,
    run_figures,
    slowest_rank,
)
from service.calc.step_stats import STRAGGLER_STEPS, ideal_step_time

MAX_WINDOWS = 10_000


def life_of(inputs: GoodputInputs) -> dict[tuple[int, int], tuple[float, float]]:
    """Per (attempt, rank): the earliest start and the latest sign of life of its records."""
    out: dict[tuple[int, int], tuple[float, float]] = {}

    def see(key: tuple[int, int], first: float, last: float) -> None:
        lo, hi = out.get(key, (math.inf, -math.inf))
        out[key] = (min(lo, first), max(hi, last))

    for s in inputs.steps:
        see((s.attempt, s.rank), s.start, s.end)
    for p in inputs.spans:
        see((p.attempt, p.rank), p.start, p.end)
    for c in inputs.checkpoints:
        if c.rank is not None and c.time is not None:
            see((c.attempt, c.rank), c.time, c.time)
    return out


def saved_of(inputs: GoodputInputs) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in inputs.checkpoints:
        if c.ok:
            out[c.attempt] = max(out.get(c.attempt, -1), c.step)
    return out


def ideal_of(steps: Sequence[StepIn]) -> float | None:
    """A rank's ideal step time for inferring compile: of its newest STRAGGLER_STEPS steps."""
    ordered = sorted(steps, key=lambda s: (s.attempt, s.step))[-STRAGGLER_STEPS:]
    return ideal_step_time([s.end - s.start for s in ordered])


def compile_cuts(inputs: GoodputInputs) -> list[CompileCut]:
    """The inferred compile of every attempt rank without compile spans."""
    by_rank: dict[int, list[StepIn]] = {}
    for s in inputs.steps:
        by_rank.setdefault(s.rank, []).append(s)
    with_compile = {(s.attempt, s.rank) for s in inputs.spans if s.category == "compile"}
    out = []
    for rank, steps in sorted(by_rank.items()):
        ideal = ideal_of(steps)
        first: dict[int, StepIn] = {}
        for s in steps:
            if s.attempt not in first or s.step < first[s.attempt].step:
                first[s.attempt] = s
        for attempt, s in sorted(first.items()):
            if (attempt, rank) in with_compile:
                continue
            blocking = [
                (b.start, b.end) for b in inputs.spans if b.rank == rank and not b.overlapped
            ]
            cut = inferred_compile(s.start, s.end, blocking, ideal)
            if cut:
                out.append(CompileCut(attempt, rank, s.step, cut))
    return out


def parts_of(
    inputs: GoodputInputs, rank: int, decided: Sequence[Decided], lo: float, hi: float
) -> RankParts:
    """One rank's records cut to [lo, hi], summed."""
    upto = {d.attempt: d.upto for d in decided}
    blocking = [s for s in inputs.spans if s.rank == rank and not s.overlapped]
    steps = [s for s in inputs.steps if s.rank == rank and s.end > lo and s.start < hi]
    cut = [(max(s.start, lo), min(s.end, hi)) for s in steps]
    blocked = SpanIndex(blocking).overlaps(cut)
    split: dict[int, list[float]] = {}
    for s, (a, b), x in zip(steps, cut, blocked, strict=True):
        acc = split.setdefault(s.attempt, [0.0, 0.0, 0])
        if s.step <= upto.get(s.attempt, math.inf):
            acc[0] += (b - a) - x
        else:
            acc[1] += (b - a) - x
            acc[2] += 1
    return RankParts(
        rank=rank,
        split={k: AttemptSplit(v[0], v[1], int(v[2])) for k, v in split.items()},
        blocking_s=charged(blocking, lo, hi),
        hook_s=sum(s.hook_overhead_s or 0.0 for s in steps if lo < s.end <= hi),
        steps=len(steps),
        tokens=sum(s.tokens for s in steps),
    )


def run_goodput(
    inputs: GoodputInputs, now: float, lo: float = -math.inf, hi: float = math.inf
) -> RunGoodput:
    """The run's accounting on raw records, over the whole run or the window [lo, hi]."""
    decided = decide(inputs.attempts, life_of(inputs), saved_of(inputs), now)
    cuts = compile_cuts(inputs)
    excluded = merged(inputs.excluded)

    def rank_in(rank: int, a: float, b: float) -> RankGoodput:
        mine = decided[rank]
        whole = account(mine, parts_of(inputs, rank, mine, a, b), _cuts(cuts, rank), a, b)
        for e in excluded:
            x0, x1 = max(e.start, a), min(e.end, b)
            if x1 > x0:
                part = account(
                    mine, parts_of(inputs, rank, mine, x0, x1), _cuts(cuts, rank), x0, x1
                )
                whole = minus(whole, part)
        return whole

    whole_run = [rank_in(r, -math.inf, math.inf) for r in sorted(decided)]
    chosen = slowest_rank(whole_run)
    if lo == -math.inf and hi == math.inf:
        return run_figures(whole_run, chosen)
    if not hi > lo:
        raise ValueError(f"end ({hi}) must be after start ({lo})")
    return run_figures([rank_in(r, lo, hi) for r in sorted(decided)], chosen)


def raw_disruptions(inputs: GoodputInputs, now: float, rank: int | None) -> list[Disruption]:
    """goodput.disruptions of one rank, on raw records."""
    decided = decide(inputs.attempts, life_of(inputs), saved_of(inputs), now)
    if rank is None or rank not in decided:
        return []
    mine = decided[rank]
    return disruptions(mine, parts_of(inputs, rank, mine, -math.inf, math.inf))


def cut_steps(steps: Sequence[StepIn], lo: float, hi: float) -> list[StepIn]:
    """The steps that overlap [lo, hi], cut to it."""
    return [
        s._replace(start=max(s.start, lo), end=min(s.end, hi))
        for s in steps
        if s.end > lo and s.start < hi
    ]


def _cuts(cuts: Sequence[CompileCut], rank: int) -> list[CompileCut]:
    return [c for c in cuts if c.rank == rank]


def run_extent(g: RunGoodput) -> tuple[float, float] | None:
    """First start and last end over every rank of an accounted run, or None for a run with
    no records."""
    if not g.ranks:
        return None
    return min(r.start for r in g.ranks), max(r.end for r in g.ranks)


def rolling(
    extent: tuple[float, float] | None, window_s: float, step_s: float
) -> list[tuple[float, float]]:
    """Window bounds from the run's start, every step_s, each window_s long."""
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
    if not (math.isfinite(step_s) and step_s > 0):
        raise ValueError(f"step_s must be a positive number of seconds, got {step_s}")
    if extent is None:
        return []
    first, last = extent
    count = max(1, math.ceil((last - first - window_s) / step_s) + 1) if last > first else 1
    if count > MAX_WINDOWS:
        raise ValueError(f"window_s/step_s give {count} windows; at most {MAX_WINDOWS}")
    if window_s == step_s:  # back to back: each window ends on the very float the next starts
        edges = [first + i * step_s for i in range(count + 1)]
        bounds = list(zip(edges, edges[1:], strict=False))
    else:
        bounds = [(first + i * step_s, first + i * step_s + window_s) for i in range(count)]
    if any(b <= a for a, b in bounds):  # e.g. 1e-9 s on an epoch timestamp
        raise ValueError(f"window_s={window_s} is below the resolution of the run's timestamps")
    return bounds


__all__ = [
    "Interval",
    "SpanIn",
    "cut_steps",
    "raw_disruptions",
    "rolling",
    "run_extent",
    "run_goodput",
]
