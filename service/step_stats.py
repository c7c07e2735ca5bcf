"""Step-time figures of a goodput summary, pure functions (ARCHITECTURE.md):

ideal step time      mean of the steady steps within median +- 3 * MAD (no 1 s floor)
step-time deviation  p90 of the last N steps minus the median of the M steps before them
stragglers           ranks whose median step time exceeds the ranks' median by a margin
disruptions          attempt boundaries: when an attempt ended, why, and how many of its
                     steps were wasted (not covered by a checkpoint)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.compare import steady
from service.goodput import AttemptIn, CheckpointIn, GoodputInputs, StepIn

LAST_N = 20
PREVIOUS_M = 100
STRAGGLER_MARGIN = 0.05


def ideal_step_time(step_times_s: Sequence[float]) -> float | None:
    values = steady(step_times_s)
    if not values:
        return None
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    kept = [v for v in values if abs(v - med) <= 3 * mad]
    return statistics.fmean(kept) if kept else med


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * (len(ordered) - 1) + 0.5))]


def step_time_deviation(
    step_times_s: Sequence[float], last_n: int = LAST_N, previous_m: int = PREVIOUS_M
) -> float | None:
    """Positive when the recent steps are slower than before; None without enough steps."""
    if len(step_times_s) < last_n + 2:
        return None
    recent = step_times_s[-last_n:]
    before = step_times_s[max(0, len(step_times_s) - last_n - previous_m) : -last_n]
    return _p90(recent) - statistics.median(before)


@dataclass(frozen=True)
class Straggler:
    rank: int
    median_step_time_s: float
    slower_by: float  # fraction above the median of the ranks' medians


def stragglers(
    medians_by_rank: Mapping[int, float], margin: float = STRAGGLER_MARGIN
) -> list[Straggler]:
    if len(medians_by_rank) < 2:
        return []
    center = statistics.median(medians_by_rank.values())
    if center <= 0:
        return []
    return [
        Straggler(rank, m, m / center - 1)
        for rank, m in sorted(medians_by_rank.items())
        if m > center * (1 + margin)
    ]


@dataclass(frozen=True)
class Disruption:
    attempt: int
    time: float
    cause: str
    wasted_steps: int


def disruptions(
    attempts: Sequence[AttemptIn], steps: Sequence[StepIn], checkpoints: Sequence[CheckpointIn]
) -> list[Disruption]:
    """One per attempt of this rank that a later attempt followed, or that failed."""
    ordered = sorted(attempts, key=lambda a: a.attempt)
    out = []
    for i, a in enumerate(ordered):
        followed = i < len(ordered) - 1
        if a.status == "completed" or not (followed or a.status == "failed"):
            continue
        mine = [s for s in steps if s.attempt == a.attempt]
        saved = max((c.step for c in checkpoints if c.attempt == a.attempt and c.ok), default=-1)
        end = (
            a.end
            if a.end is not None
            else max([a.start, a.last_seen or a.start, *(s.end for s in mine)])
        )
        cause = a.cause or ("no end record: the process died" if a.status is None else a.status)
        out.append(Disruption(a.attempt, end, cause, sum(1 for s in mine if s.step > saved)))
    return out


@dataclass(frozen=True)
class StepFigures:
    ideal_step_time_s: float | None
    step_time_deviation_s: float | None
    stragglers: list[Straggler]
    disruptions: list[Disruption]


def step_figures(inputs: GoodputInputs, rank: int | None) -> StepFigures:
    """The figures above for one rank (the summary's), stragglers over every rank."""
    by_rank: dict[int, list[StepIn]] = {}
    for s in inputs.steps:
        by_rank.setdefault(s.rank, []).append(s)
    medians = {r: statistics.median(s.end - s.start for s in v) for r, v in by_rank.items()}
    mine = sorted(
        by_rank.get(rank, []) if rank is not None else [], key=lambda s: (s.attempt, s.step)
    )
    times = [s.end - s.start for s in mine]
    attempts = [a for a in inputs.attempts if a.rank == rank]
    return StepFigures(
        ideal_step_time(times),
        step_time_deviation(times),
        stragglers(medians),
        disruptions(attempts, mine, inputs.checkpoints),
    )
