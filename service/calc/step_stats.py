"""Step-time figures of a goodput summary, pure functions (ARCHITECTURE.md):

ideal step time      mean of the steady steps within median +- 3 * MAD (no 1 s floor), over
                     the summary rank's newest RECENT_STEPS steps
step-time deviation  p90 of the last N steps minus the median of the M steps before them
stragglers           ranks whose median step time (over each rank's newest STRAGGLER_STEPS
                     steps) exceeds the ranks' median by a margin
disruptions          from the accounting (goodput.disruptions)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.calc.compare import steady
from service.calc.goodput import Disruption, StepIn

LAST_N = 20
PREVIOUS_M = 100
STRAGGLER_MARGIN = 0.05
RECENT_STEPS = 10_000  # the summary rank's newest steps that the step-time figures read
STRAGGLER_STEPS = 1_000  # each rank's newest steps whose median finds stragglers


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
class StepFigures:
    ideal_step_time_s: float | None
    step_time_deviation_s: float | None
    stragglers: list[Straggler]
    disruptions: list[Disruption]


def step_figures(
    recent: Mapping[int, Sequence[float]],
    rank: int | None,
    disrupted: Sequence[Disruption] = (),
) -> StepFigures:
    """The figures above for one rank (the summary's), stragglers over every rank; the
    disruptions come from the accounting (goodput.disruptions).

    `recent[r]` holds rank r's newest step times, oldest first (by attempt, then step): at
    most RECENT_STEPS for the summary rank and STRAGGLER_STEPS for the others. So on a long run
    the ideal step time describes the newest RECENT_STEPS steps, and a straggler is a rank that
    is slow now."""
    medians = {r: statistics.median(v[-STRAGGLER_STEPS:]) for r, v in recent.items() if len(v) > 0}
    times = list(recent.get(rank, [])) if rank is not None else []
    return StepFigures(
        ideal_step_time(times[-RECENT_STEPS:]),
        step_time_deviation(times),
        stragglers(medians),
        list(disrupted),
    )


def raw_recent(steps: Sequence[StepIn], rank: int | None) -> dict[int, list[float]]:
    """What step_figures reads, on raw steps: the definition the figures read through the
    rollups and the window sums are tested against."""
    by_rank: dict[int, list[StepIn]] = {}
    for s in steps:
        by_rank.setdefault(s.rank, []).append(s)
    return {
        r: [s.end - s.start for s in sorted(v, key=lambda s: (s.attempt, s.step))][
            -(RECENT_STEPS if r == rank else STRAGGLER_STEPS) :
        ]
        for r, v in by_rank.items()
    }
