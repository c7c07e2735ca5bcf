from __future__ import annotations

import pytest

from service.calc.goodput import AttemptIn, CheckpointIn, GoodputInputs, StepIn
from service.calc.goodput_window import raw_disruptions
from service.calc.step_stats import ideal_step_time, step_time_deviation, stragglers

T = 1_790_000_000.0


def test_ideal_step_time_ignores_warm_up_and_outliers() -> None:
    times = [5.0] * 5 + [1.0, 1.02, 0.98] * 10 + [9.0]
    assert ideal_step_time(times) == pytest.approx(1.0, abs=1e-9)
    assert ideal_step_time([]) is None


def test_deviation_is_positive_when_recent_steps_slow_down() -> None:
    steady = [1.0] * 100
    assert step_time_deviation(steady + [1.0] * 20) == pytest.approx(0.0)
    assert step_time_deviation(steady + [1.5] * 20) == pytest.approx(0.5)
    assert step_time_deviation([1.0] * 10) is None


def test_stragglers_are_ranks_slower_than_the_rest() -> None:
    found = stragglers({0: 1.0, 1: 1.01, 2: 1.3, 3: 0.99})
    assert [(s.rank, round(s.slower_by, 2)) for s in found] == [(2, 0.29)]
    assert stragglers({0: 1.0}) == []


def test_disruptions_come_from_attempt_boundaries_with_wasted_steps() -> None:
    attempts = [
        AttemptIn(0, 0, T, T + 10, "failed", None),
        AttemptIn(1, 0, T + 12, None, None, T + 20),
        AttemptIn(2, 0, T + 25, T + 40, "completed", None),
    ]
    steps = [
        StepIn(a, 0, n, T + a * 12 + n, T + a * 12 + n + 0.5, 1, None)
        for a in (0, 1)
        for n in range(6)
    ]
    checkpoints = [CheckpointIn(0, 3, True), CheckpointIn(1, 1, True)]
    found = raw_disruptions(GoodputInputs(attempts, steps, [], checkpoints), T + 1e6, 0)
    assert [(d.attempt, d.wasted_steps) for d in found] == [(0, 2), (1, 4)]
    assert found[0].cause == "failed" and found[1].time == T + 20
    assert found[1].cause == "restarted (no end record)"
