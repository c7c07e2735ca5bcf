"""The keep/drop calculator on hand-built figures."""

from __future__ import annotations

import random

import pytest

from service.compare import (
    RunFigures,
    bootstrap_ratio,
    compare,
    lane_diff,
    steady,
    unexplained,
)


def figures(
    step_s: float, n: int = 60, noise: float = 0.02, loss: float = 2.0, seed: int = 0
) -> RunFigures:
    rng = random.Random(seed)
    times = [5 * step_s] * 3 + [step_s * (1 + rng.uniform(-noise, noise)) for _ in range(n)]
    return RunFigures(times, [1000] * len(times), 0.9, {"data_stall": 1.0}, 10**9, loss)


def test_warm_up_steps_are_left_out() -> None:
    assert steady(list(range(100))) == list(range(10, 100))
    assert steady(list(range(20))) == list(range(5, 20))


def test_a_clearly_faster_candidate_is_kept_with_a_tight_interval() -> None:
    c = compare(figures(0.100), figures(0.080, seed=1))
    assert c.verdict == "keep"
    assert c.step_time_ratio.value == pytest.approx(0.8, rel=0.03)
    assert c.step_time_ratio.low < 0.8 < c.step_time_ratio.high < 0.98
    assert c.tokens_per_s_ratio.value == pytest.approx(1.25, rel=0.03)
    assert "faster" in c.reasons[0]


def test_a_slower_candidate_is_dropped() -> None:
    assert compare(figures(0.100), figures(0.120, seed=1)).verdict == "drop"


def test_noise_without_a_difference_is_inconclusive() -> None:
    c = compare(figures(0.100, noise=0.2), figures(0.101, noise=0.2, seed=1))
    assert c.verdict == "inconclusive"


def test_faster_but_worse_loss_is_dropped() -> None:
    c = compare(figures(0.100, loss=2.0), figures(0.080, loss=2.2, seed=1))
    assert c.verdict == "drop" and any("final loss" in r for r in c.reasons)


def test_too_few_steps_give_no_interval() -> None:
    c = compare(figures(0.1, n=5), figures(0.08, n=5))
    assert c.verdict == "inconclusive" and c.step_time_ratio.value is None


def test_bootstrap_is_deterministic() -> None:
    a, b = [1.0, 1.1, 0.9] * 5, [2.0, 2.1, 1.9] * 5
    assert bootstrap_ratio(a, b) == bootstrap_ratio(a, b)


def test_lane_diff_names_differing_fields_and_knobs_explain_them() -> None:
    base = {
        "runtime_policy": {"dispatch_requested": "loop", "dtype": "bf16"},
        "environment": {"host": "a"},
    }
    cand = {
        "runtime_policy": {"dispatch_requested": "grouped", "dtype": "bf16"},
        "environment": {"host": "b"},
    }
    diff = lane_diff(base, cand, ignore_prefixes=["environment.host"])
    assert diff == {
        "runtime_policy.dispatch_requested": {"baseline": "loop", "candidate": "grouped"}
    }
    assert unexplained(diff, ["runtime_policy.dispatch_requested"]) == []
    assert unexplained(diff, ["model_plan"]) == ["runtime_policy.dispatch_requested"]
