"""The keep/drop calculator on hand-built figures."""

from __future__ import annotations

import random
import statistics

import pytest

from service.calc.compare import (
    BOOTSTRAP_SAMPLES,
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
    other = bootstrap_ratio(a, b, seed=1)  # another seed: another draw of the same interval
    assert other.value == bootstrap_ratio(a, b).value
    assert other.low is not None and other.high is not None
    assert other.low <= 0.5 <= other.high


def reference_draws(cand: list[float], base: list[float], resamples: int, seed: int) -> list[float]:
    """The percentile bootstrap's distribution written plainly: each draw resamples both runs
    (with replacement, each at its own size) and takes the ratio of their medians."""
    rng = random.Random(seed)
    return sorted(
        statistics.median(rng.choices(cand, k=len(cand)))
        / statistics.median(rng.choices(base, k=len(base)))
        for _ in range(resamples)
    )


def mid_rank(sorted_draws: list[float], x: float) -> float:
    """The fraction of draws below x, ties counted half."""
    below = sum(d < x for d in sorted_draws)
    at_or_below = sum(d <= x for d in sorted_draws)
    return (below + at_or_below) / 2 / len(sorted_draws)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_bootstrap_interval_matches_a_plain_reference(seed: int) -> None:
    """The interval's ends sit at the 2.5% and 97.5% points of an independent plain-Python
    bootstrap of 20,000 draws, within Monte Carlo error. The interval has BOOTSTRAP_SAMPLES
    draws: the fraction of reference draws below its 2.5% end has a standard error of
    sqrt(0.025 * 0.975 / 2000) ~ 0.0035 (0.0011 more from the reference's own draws); 0.015
    is about 4 of them. Bugs it catches (tried): resampling one run only (the other's median
    held) puts an end 0.04-0.3 off, a mean instead of a median moves the interval by as much,
    ends taken at the wrong quantiles shift them by the difference."""
    rng = random.Random(seed)
    base = [0.10 * (1 + rng.uniform(-0.25, 0.25)) for _ in range(64)]
    cand = [0.09 * rng.lognormvariate(0, 0.25) for _ in range(48)]  # skewed: mean > median
    got = bootstrap_ratio(cand, base)
    assert got.value == pytest.approx(statistics.median(cand) / statistics.median(base))
    assert got.low is not None and got.high is not None
    assert got.low < got.value < got.high
    ref = reference_draws(cand, base, 20_000, seed)
    tol = 0.015
    assert BOOTSTRAP_SAMPLES == 2000  # the tolerance above assumes it
    assert mid_rank(ref, got.low) == pytest.approx(0.025, abs=tol)
    assert mid_rank(ref, got.high) == pytest.approx(0.975, abs=tol)
    ref_low, ref_high = ref[int(0.025 * (len(ref) - 1))], ref[int(0.975 * (len(ref) - 1))]
    assert got.high - got.low == pytest.approx(ref_high - ref_low, rel=0.15)


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
