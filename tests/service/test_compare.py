"""The keep/drop engine against references written from its documented rules
(service/calc/compare.py's docstring), not from its code: plain-Python medians, t intervals
with a t quantile found by integrating the density, a plain block bootstrap, and the verdict
table evaluated by hand; then generated replicate sets that reach every verdict, and a small
A/A and power check on autocorrelated runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
import pytest

from service.calc import compare as engine
from service.calc.compare import (
    COMPARE_STEPS,
    RUN_NOISE_FLOOR,
    RUN_NOISE_FLOORS,
    Axis,
    RunFigures,
    block_length,
    compare,
    decide,
    lane_diff,
    steady,
    t_quantile,
    unexplained,
    within_run_variances,
)

Z = statistics.NormalDist().inv_cdf(0.975)


# --- references --------------------------------------------------------------------------


@cache
def ref_t_quantile(p: float, df: float) -> float:
    """Student's t quantile by bisection on a Simpson integral of the density."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float) -> float:
        panels = 2000
        h = x / panels
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(panels + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def ref_steady(values: Sequence[float]) -> list[float]:
    return list(values)[max(5, len(values) // 10) :]


def ref_log_medians(runs: Sequence[RunFigures]) -> tuple[list[float], list[float]]:
    """Each run's log median steady step time and log median steady tokens/s."""
    times = [math.log(statistics.median(ref_steady(r.step_times_s))) for r in runs]
    rates = [
        math.log(
            statistics.median(
                ref_steady([k / s for s, k in zip(r.step_times_s, r.tokens, strict=True) if s > 0])
            )
        )
        for r in runs
    ]
    return times, rates


def ref_t_interval(b: list[float], c: list[float]) -> tuple[float, float, float]:
    """d, low, high by the docstring: pooled df at equal counts, Welch's otherwise, the
    replicated side's spread when one side has a single run."""
    nb, nc = len(b), len(c)
    d = statistics.fmean(c) - statistics.fmean(b)
    if nb >= 2 and nc >= 2:
        vb, vc = statistics.variance(b), statistics.variance(c)
        se2 = vb / nb + vc / nc
        df = (
            (nb + nc - 2)
            if nb == nc
            else se2**2 / ((vb / nb) ** 2 / (nb - 1) + (vc / nc) ** 2 / (nc - 1))
        )
        half = ref_t_quantile(0.975, df) * math.sqrt(se2)
    else:
        rep = b if nb >= 2 else c
        half = (
            ref_t_quantile(0.975, len(rep) - 1) * statistics.stdev(rep) * math.sqrt(1 / nb + 1 / nc)
        )
    return d, d - half, d + half


def ref_block_variance(values: Sequence[float], draws: int, seed: int) -> float:
    """Variance of the log median over circular block bootstrap resamples, plainly."""
    rng = random.Random(seed)
    n = len(values)
    length = math.ceil(math.sqrt(n))
    logs = []
    for _ in range(draws):
        sample: list[float] = []
        while len(sample) < n:
            start = rng.randrange(n)
            sample.extend(values[(start + j) % n] for j in range(length))
        logs.append(math.log(statistics.median(sample[:n])))
    return statistics.variance(logs)


def ref_iid_variance(values: Sequence[float], draws: int, seed: int) -> float:
    rng = random.Random(seed)
    return statistics.variance(
        math.log(statistics.median(rng.choices(values, k=len(values)))) for _ in range(draws)
    )


# --- generated runs ----------------------------------------------------------------------


def ar1(rng: np.random.Generator, runs: int, steps: int, phi: float, spread: float) -> np.ndarray:
    """AR(1) series (runs x steps) of stationary standard deviation `spread`."""
    out = np.empty((runs, steps))
    level = rng.normal(0, spread, runs)
    shocks = rng.normal(0, spread * math.sqrt(1 - phi**2), size=(runs, steps))
    for i in range(steps):
        level = phi * level + shocks[:, i]
        out[:, i] = level
    return out


def side(
    rng: np.random.Generator,
    runs: int = 3,
    step_s: float = 0.1,
    steps: int = 200,
    offset: float = 0.02,
    spread: float = 0.05,
    phi: float = 0.8,
    tokens: int = 4096,
    **extra: Any,
) -> list[RunFigures]:
    """Replicates of one lane: autocorrelated step times around a between-run offset, three
    slow warm-up steps first; `extra` figures as given, a callable called per run."""
    times = step_s * np.exp(ar1(rng, runs, steps, phi, spread) + rng.normal(0, offset, (runs, 1)))
    times[:, :3] *= 5
    out = []
    for i in range(runs):
        kw = {k: (v(rng) if callable(v) else v) for k, v in extra.items()}
        out.append(
            RunFigures(f"r{i}", times[i].tolist(), [tokens] * steps, list(range(steps)), **kw)
        )
    return out


def loss_around(
    mean: float, spread: float = 0.003, step: int = 500
) -> Callable[[np.random.Generator], dict[int, float]]:
    """Per run: eval losses at step / 2 and step, the latter spread around `mean`."""
    return lambda rng: {step // 2: mean * 1.5, step: mean * math.exp(rng.normal(0, spread))}


def bounds(axis: Axis) -> tuple[float, float]:
    assert axis.low is not None and axis.high is not None
    return axis.low, axis.high


# --- the pieces --------------------------------------------------------------------------


def test_warm_up_steps_are_left_out() -> None:
    assert steady(list(range(100))) == list(range(10, 100))
    assert steady(list(range(20))) == list(range(5, 20))
    assert COMPARE_STEPS == 2000


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105), (30, 2.042272456)],
)
def test_t_quantile_matches_tables(df: float, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-8)


def test_t_quantile_closed_forms_and_a_fractional_df() -> None:
    for p in (0.6, 0.9, 0.995):  # df 1 is Cauchy; df 2 has a closed form
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx(
            (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9
        )
        assert t_quantile(1 - p, 2) == pytest.approx(-t_quantile(p, 2))
    for df in (1.7, 2.6, 5.3):
        assert t_quantile(0.975, df) == pytest.approx(ref_t_quantile(0.975, df), rel=1e-6)
    assert t_quantile(0.975, 1e9) == pytest.approx(Z, rel=1e-9)


@pytest.mark.parametrize(("nb", "nc"), [(3, 3), (2, 4), (1, 3), (4, 1)])
def test_speed_axes_match_a_plain_t_interval_on_run_medians(nb: int, nc: int) -> None:
    """Ratio = ratio of the geometric means of the runs' medians; interval from the documented
    t rule on log medians (pooled df at equal counts, Welch's otherwise). Bugs it catches:
    Welch's df at equal counts, z for t, means for medians, one side's spread missed."""
    rng = np.random.default_rng(nb * 10 + nc)
    base = side(rng, nb, offset=0.05)
    cand = side(rng, nc, step_s=0.09, offset=0.05)
    cand[0] = RunFigures(  # a zero-time step: left out of tokens/s only
        "c0", [0.0, *cand[0].step_times_s[1:]], cand[0].tokens, cand[0].steps
    )
    got = compare(base, cand)
    (tb, rb), (tc, rc) = ref_log_medians(base), ref_log_medians(cand)
    for name, b, c in (("step_time", tb, tc), ("tokens_per_s", rb, rc)):
        d, low, high = ref_t_interval(b, c)
        axis = got.axes[name]
        assert axis.kind == "ratio"
        assert axis.value == pytest.approx(math.exp(d), rel=1e-12)
        assert axis.low == pytest.approx(math.exp(low), rel=1e-7)
        assert axis.high == pytest.approx(math.exp(high), rel=1e-7)
        assert axis.baseline == pytest.approx(math.exp(statistics.fmean(b)), rel=1e-12)
        assert axis.candidate == pytest.approx(math.exp(statistics.fmean(c)), rel=1e-12)
    assert got.step_time_ratio.value == got.axes["step_time"].value
    assert got.tokens_per_s_ratio.high == got.axes["tokens_per_s"].high
    assert got.runs == (nb, nc)
    assert got.steady_steps == (nb * 180, nc * 180)
    if nb >= 2 and nc >= 2:  # the pooled between-run spread of the log medians
        pooled = ((nb - 1) * statistics.variance(tb) + (nc - 1) * statistics.variance(tc)) / (
            nb + nc - 2
        )
        assert got.run_noise == pytest.approx(math.sqrt(pooled), rel=1e-9)
    else:
        assert got.run_noise == pytest.approx(statistics.stdev(tb if nb > 1 else tc), rel=1e-9)


def paired(runs: list[RunFigures], keys: Sequence[Any]) -> list[RunFigures]:
    return [dataclasses.replace(r, pair=k) for r, k in zip(runs, keys, strict=True)]


def test_runs_that_pair_up_by_seed_are_compared_pair_by_pair() -> None:
    """The pair keys say which runs pair (here c0 with the baseline run of key 12, b2): the
    interval is the paired t of the pairs' differences of log medians, mean(d) +- t(0.975,
    n - 1) * s_d / sqrt(n) (written here from the docstring), the noise s_d / sqrt(2)."""
    rng = np.random.default_rng(7)
    base = side(rng, 3, offset=0.15)
    cand = side(rng, 3, step_s=0.11, offset=0.15)
    got = compare(paired(base, [10, 11, 12]), paired(cand, [12, 10, 11]))
    (tb, _), (tc, _) = ref_log_medians(base), ref_log_medians(cand)
    of_key = dict(zip((12, 10, 11), tc, strict=True))
    d = [of_key[k] - b for k, b in zip((10, 11, 12), tb, strict=True)]
    half = 4.302652729911275 * statistics.stdev(d) / math.sqrt(3)  # t(0.975, 2)
    axis = got.axes["step_time"]
    assert axis.value == pytest.approx(math.exp(statistics.fmean(d)), rel=1e-12)
    assert axis.low == pytest.approx(math.exp(statistics.fmean(d) - half), rel=1e-9)
    assert axis.high == pytest.approx(math.exp(statistics.fmean(d) + half), rel=1e-9)
    assert got.run_noise == pytest.approx(statistics.stdev(d) / math.sqrt(2), rel=1e-9)
    assert any("paired by seed (3 pairs)" in r for r in got.reasons)
    assert "3 pairs of runs" in axis.reason


def test_pairing_finds_what_a_shared_offset_hides_from_the_unpaired_interval() -> None:
    rng = np.random.default_rng(11)
    shared = rng.normal(0, 0.15, 3)
    base, cand = [], []
    for i, off in enumerate(shared):
        for out, step_s, tag in ((base, 0.10, "b"), (cand, 0.11, "c")):
            t = step_s * np.exp(off + rng.normal(0, 0.005) + rng.normal(0, 0.01, 120))
            out.append(RunFigures(f"{tag}{i}", t.tolist(), [4096] * 120, list(range(120))))
    assert compare(base, cand).verdict == "inconclusive"  # 15% between runs hides 10%
    got = compare(paired(base, [0, 1, 2]), paired(cand, [0, 1, 2]))
    assert got.verdict == "drop", got.reasons
    assert bounds(got.axes["step_time"])[0] > 1.02


@pytest.mark.parametrize(
    ("kb", "kc"),
    [
        ([0, 1, 2], [0, 1, 3]),  # other keys
        ([0, 0, 1], [0, 0, 1]),  # a key twice on a side
        ([0, 1, None], [0, 1, 2]),  # a run without one
        ([0], [0]),  # one pair: no spread to estimate
    ],
)
def test_runs_that_do_not_pair_up_one_to_one_are_compared_unpaired(
    kb: list[Any], kc: list[Any]
) -> None:
    rng = np.random.default_rng(3)
    base, cand = side(rng, len(kb)), side(rng, len(kc), step_s=0.09)
    plain = compare(base, cand)
    got = compare(paired(base, kb), paired(cand, kc))
    assert got.axes["step_time"] == plain.axes["step_time"]
    assert not any("paired by seed" in r for r in got.reasons)


def test_block_bootstrap_variance_matches_a_plain_one() -> None:
    """Within-run variance of the log median against a plain circular block bootstrap of
    4,000 draws: both are Monte Carlo estimates (relative error about sqrt(2 / draws): 7% at
    the engine's 400, 2% at 4,000), so 25% is about 3.5 of them."""
    rng = np.random.default_rng(3)
    values = (0.1 * np.exp(ar1(rng, 1, 150, 0.7, 0.3)[0])).tolist()
    got = within_run_variances([np.asarray(values)], np.random.default_rng(1))[0]
    assert engine.BOOTSTRAP_SAMPLES == 400  # the tolerance assumes it
    assert got == pytest.approx(ref_block_variance(values, 4000, 2), rel=0.25)
    assert block_length(150) == 13 and block_length(1) == 1


def test_block_bootstrap_sees_autocorrelation() -> None:
    """Strongly autocorrelated steps: blocks keep neighbours together, so the median's spread
    is far wider than an iid bootstrap's (blocks of 1 would match the iid one)."""
    rng = np.random.default_rng(4)
    values = (0.1 * np.exp(ar1(rng, 1, 400, 0.95, 0.1)[0])).tolist()
    blocks = within_run_variances([np.asarray(values)], np.random.default_rng(1))[0]
    assert blocks > 3 * ref_iid_variance(values, 2000, 5)


def test_one_run_a_side_adds_the_floor_to_the_within_run_spread() -> None:
    """d +- z * sqrt(2 * floor^2 + v_b + v_c): v from a plain block bootstrap (Monte Carlo
    tolerance as above, on the variance; short noisy runs so that v matters)."""
    rng = np.random.default_rng(5)
    base, cand = side(rng, 1, steps=60, spread=0.3, phi=0.5), side(rng, 1, 0.1, 60, spread=0.3)
    got = compare(base, cand)
    (tb,), _ = ref_log_medians(base)
    (tc,), _ = ref_log_medians(cand)
    v = sum(
        ref_block_variance(ref_steady(r.step_times_s), 4000, i)
        for i, r in enumerate([*base, *cand])
    )
    assert v > 2 * RUN_NOISE_FLOOR**2  # the within-run part is not negligible here
    low, high = bounds(got.axes["step_time"])
    half = (math.log(high) - math.log(low)) / 2
    assert got.axes["step_time"].value == pytest.approx(math.exp(tc - tb), rel=1e-12)
    assert (half / Z) ** 2 - 2 * RUN_NOISE_FLOOR**2 == pytest.approx(v, rel=0.2)
    assert got.run_noise == RUN_NOISE_FLOOR


def test_one_run_a_side_run_level_axes_use_their_floors() -> None:
    base = [
        RunFigures(
            "b",
            [0.1] * 50,
            [10] * 50,
            list(range(50)),
            goodput_fraction=0.80,
            peak_memory_bytes=10**9,
            drop_rate=0.01,
            max_vio=0.2,
        )
    ]
    cand = [
        RunFigures(
            "c",
            [0.1] * 50,
            [10] * 50,
            list(range(50)),
            goodput_fraction=0.85,
            peak_memory_bytes=9 * 10**8,
            drop_rate=0.30,
            max_vio=0.25,
        )
    ]
    got = compare(base, cand).axes
    g = got["goodput_fraction"]
    half = Z * math.sqrt(2) * RUN_NOISE_FLOORS["goodput_fraction"]
    assert (g.value, g.low, g.high) == pytest.approx((0.05, 0.05 - half, 0.05 + half))
    assert g.finding == "unclear"  # 5 points: within what noise could do with one run
    m = got["peak_memory"]
    half = Z * math.sqrt(2) * RUN_NOISE_FLOORS["peak_memory"]
    assert (m.low, m.high) == pytest.approx((0.9 * math.exp(-half), 0.9 * math.exp(half)))
    assert m.finding == "better"  # 10% leaner is beyond it
    assert got["drop_rate"].finding == "worse" and got["max_vio"].finding == "unclear"


def test_run_level_axes_with_replicates() -> None:
    """Goodput fraction (difference), peak memory (ratio of geometric means), badput shares
    (badput_s / total_s, 0 where a run lacks the category), by the documented t rule."""
    gb, gc = [0.80, 0.82, 0.81], [0.70, 0.73, 0.71]
    mb, mc = [10.0e9, 10.1e9, 9.9e9], [8.0e9, 8.1e9, 8.2e9]
    stall_b, stall_c = [10.0, 12.0, 11.0], [0.0, 1.0, 2.0]

    def runs(g: list[float], m: list[float], stall: list[float], tag: str) -> list[RunFigures]:
        return [
            RunFigures(
                f"{tag}{i}",
                [0.1] * 40,
                [1] * 40,
                list(range(40)),
                goodput_fraction=g[i],
                peak_memory_bytes=int(m[i]),
                total_s=100.0,
                badput_s={"data_stall": stall[i]} if stall[i] else {"startup": 3.0},
            )
            for i in range(3)
        ]

    got = compare(runs(gb, mb, stall_b, "b"), runs(gc, mc, stall_c, "c")).axes
    d, low, high = ref_t_interval(gb, gc)
    g = got["goodput_fraction"]
    assert (g.kind, g.value, g.low, g.high) == (
        "difference",
        pytest.approx(d),
        pytest.approx(low),
        pytest.approx(high),
    )
    assert g.finding == "worse" and g.baseline == pytest.approx(0.81)
    d, low, high = ref_t_interval([math.log(x) for x in mb], [math.log(x) for x in mc])
    m = got["peak_memory"]
    assert (m.value, m.low, m.high) == pytest.approx((math.exp(d), math.exp(low), math.exp(high)))
    assert m.finding == "better"
    d, low, high = ref_t_interval([s / 100 for s in stall_b], [s / 100 for s in stall_c])
    s = got["badput.data_stall"]
    assert (s.value, s.low, s.high) == pytest.approx((d, low, high))
    assert got["badput.startup"].baseline == 0.0 and got[
        "badput.startup"
    ].candidate == pytest.approx(0.01)
    assert got["drop_rate"].finding == "no data" and got["drop_rate"].value is None
    assert list(got)[:7] == [
        "step_time",
        "tokens_per_s",
        "eval_loss",
        "goodput_fraction",
        "peak_memory",
        "drop_rate",
        "max_vio",
    ]


def test_eval_loss_is_taken_at_the_newest_step_every_run_evaluated() -> None:
    """The candidate went on to step 900 with a lower loss: not matched, not used."""
    rng = np.random.default_rng(6)
    base = side(rng, 2, eval_loss={100: 3.0, 500: 2.0}, final_loss=1.9)
    cand = side(rng, 2, eval_loss={100: 3.0, 500: 2.0, 900: 1.0}, final_loss=0.9)
    got = compare(base, cand)
    q = got.axes["eval_loss"]
    assert q.value == pytest.approx(1.0) and q.finding == "same"
    assert "step 500" in q.reason and any("step 500" in r for r in got.reasons)
    # No step common to all: the final training loss, said so.
    cand = side(rng, 2, eval_loss={900: 1.0}, final_loss=0.9)
    got = compare(base, cand)
    assert got.axes["eval_loss"].value == pytest.approx(0.9 / 1.9)
    assert any("final training loss" in r for r in got.reasons)


def test_findings_follow_the_band() -> None:
    f = engine._finding
    assert f("ratio", "lower", 0.90, 0.97, 0.02) == "better"
    assert f("ratio", "lower", 0.90, 0.99, 0.02) == "unclear"
    assert f("ratio", "lower", 0.99, 1.01, 0.02) == "same"
    assert f("ratio", "higher", 0.99, 1.03, 0.02) == "unclear"
    assert f("ratio", "higher", 1.03, 1.10, 0.02) == "better"
    assert f("difference", "lower", 0.03, 0.40, 0.02) == "worse"
    assert f("difference", "higher", -0.01, 0.015, 0.02) == "same"


# --- the verdict table -------------------------------------------------------------------

FINDINGS = ("better", "worse", "same", "unclear", "no data")


def ref_verdict(speed: str, memory: str, quality: str, routing: str, leans_worse: bool) -> str:
    """The docstring's table, read line by line."""
    speed_or_memory_worse = speed == "worse" or memory == "worse"
    speed_or_memory_better = speed == "better" or memory == "better"
    if quality == "worse":
        return "drop"  # 1
    if quality == "better" and speed_or_memory_worse:
        return "tax"  # 2
    if quality == "better":
        return "keep"  # 3
    if speed_or_memory_worse and not speed_or_memory_better:
        return "drop"  # 4
    if speed_or_memory_better and not speed_or_memory_worse:  # 5
        if routing == "worse" and quality != "same":
            return "inconclusive"
        if quality == "unclear" and leans_worse:
            return "inconclusive"
        return "keep"
    return "inconclusive"  # 6


def test_decide_follows_the_table_in_every_case() -> None:
    seen: Counter[str] = Counter()
    for combo in itertools.product(FINDINGS, FINDINGS, FINDINGS, FINDINGS, (False, True)):
        expected = ref_verdict(*combo)
        assert decide(*combo) == expected, combo
        seen[expected] += 1
    assert set(seen) == {"keep", "tax", "drop", "inconclusive"}


# --- generated replicate sets ------------------------------------------------------------


def test_aa_replicates_are_inconclusive_with_reasons() -> None:
    rng = np.random.default_rng(10)
    got = compare(side(rng, eval_loss=loss_around(2.0)), side(rng, eval_loss=loss_around(2.0)))
    assert got.verdict == "inconclusive"
    assert got.reasons[0].startswith("inconclusive: no clear difference")
    assert any("noise estimated at" in r for r in got.reasons)
    assert got.run_noise is not None and 0.01 < got.run_noise < 0.06


@pytest.mark.parametrize("slowdown", [1.10, 1.20])
def test_a_clear_slowdown_is_dropped(slowdown: float) -> None:
    rng = np.random.default_rng(11)
    got = compare(side(rng, offset=0.01), side(rng, step_s=0.1 * slowdown, offset=0.01))
    assert got.verdict == "drop", got.reasons
    assert got.reasons[0].startswith("drop: slower without better quality")
    assert bounds(got.axes["step_time"])[0] > 1.02
    assert got.axes["tokens_per_s"].finding == "worse"


def test_a_clearly_faster_candidate_is_kept() -> None:
    rng = np.random.default_rng(12)
    got = compare(
        side(rng, eval_loss=loss_around(2.0)), side(rng, step_s=0.08, eval_loss=loss_around(2.0))
    )
    assert got.verdict == "keep" and got.reasons[0].startswith("keep: faster")
    assert got.step_time_ratio.high is not None and got.step_time_ratio.high < 0.98


def test_a_memory_saving_at_the_same_speed_is_kept() -> None:
    rng = np.random.default_rng(13)
    mem = lambda g: int(8e9 * math.exp(g.normal(0, 0.002)))  # noqa: E731
    base = side(rng, peak_memory_bytes=lambda g: int(1e10 * math.exp(g.normal(0, 0.002))))
    got = compare(base, side(rng, peak_memory_bytes=mem))
    assert got.axes["step_time"].finding != "better"
    assert got.verdict == "keep" and got.reasons[0].startswith("keep: leaner")


def test_worse_eval_loss_is_dropped_even_when_faster() -> None:
    rng = np.random.default_rng(14)
    got = compare(
        side(rng, eval_loss=loss_around(2.0)), side(rng, step_s=0.08, eval_loss=loss_around(2.2))
    )
    assert got.verdict == "drop" and got.reasons[0] == "drop: quality is clearly worse"
    assert "eval loss at step 500" in got.reasons[1]


def test_better_quality_bought_with_speed_is_a_tax() -> None:
    rng = np.random.default_rng(15)
    got = compare(
        side(rng, eval_loss=loss_around(2.0)), side(rng, step_s=0.12, eval_loss=loss_around(1.8))
    )
    assert got.verdict == "tax" and "keep it only on purpose" in got.reasons[0]


def test_a_large_eval_loss_gain_at_no_speed_cost_is_kept_with_one_run_a_side() -> None:
    """The learning-rate ablation of the issue: loss 4.74 -> 0.23, speed unchanged."""
    rng = np.random.default_rng(16)
    base = side(rng, 1, eval_loss={200: 4.74}, final_loss=4.8)
    cand = side(rng, 1, eval_loss={200: 0.23}, final_loss=0.25)
    got = compare(base, cand)
    assert got.axes["step_time"].finding == "unclear"
    assert got.verdict == "keep"
    assert got.reasons[0] == "keep: better quality at no clear cost in speed or memory"


def test_a_drop_rate_blow_up_blocks_keep_unless_eval_loss_clears_it() -> None:
    rng = np.random.default_rng(17)
    drops = lambda rate: lambda g: rate + g.uniform(0, 0.01)  # noqa: E731
    base = side(rng, drop_rate=drops(0.0))
    got = compare(base, side(rng, step_s=0.08, drop_rate=drops(0.40)))  # no eval loss
    assert got.verdict == "inconclusive"
    assert "drop rate got clearly worse" in got.reasons[0]
    assert any(r.startswith("quality risk: routing drop rate") for r in got.reasons)
    # Eval loss shows quality the same: the speed gain stands, the risk is still named.
    base = side(rng, drop_rate=drops(0.0), eval_loss=loss_around(2.0, 0.001))
    cand = side(rng, step_s=0.08, drop_rate=drops(0.40), eval_loss=loss_around(2.0, 0.001))
    got = compare(base, cand)
    assert got.axes["eval_loss"].finding == "same"
    assert got.verdict == "keep" and any(r.startswith("quality risk") for r in got.reasons)


def test_faster_but_heavier_is_a_trade_not_a_keep() -> None:
    rng = np.random.default_rng(18)
    got = compare(
        side(rng, peak_memory_bytes=10**10), side(rng, step_s=0.08, peak_memory_bytes=2 * 10**10)
    )
    assert got.verdict == "inconclusive" and "a trade" in got.reasons[0]


def test_one_run_a_side_claims_only_what_noise_cannot_explain() -> None:
    rng = np.random.default_rng(19)
    base = side(rng, 1, offset=0.0)
    small = compare(base, side(rng, 1, step_s=0.095, offset=0.0))
    assert small.verdict == "inconclusive"  # 5% faster: within what run noise could do
    assert small.run_noise == RUN_NOISE_FLOOR
    note = next(r for r in small.reasons if r.startswith("one run a side"))
    assert "noise could explain all of it" in note and "3% a run" in note
    large = compare(base, side(rng, 1, step_s=0.07, offset=0.0))
    assert large.verdict == "keep"
    assert any(r.startswith("one run a side") and "beyond it" in r for r in large.reasons)


def test_speed_is_judged_on_tokens_per_s_when_steps_differ_in_work() -> None:
    """Twice the tokens a step in 1.5x the time: slower steps, faster training."""
    rng = np.random.default_rng(20)
    got = compare(side(rng, tokens=4096), side(rng, step_s=0.15, tokens=8192))
    assert got.axes["step_time"].finding == "worse"
    assert got.axes["tokens_per_s"].finding == "better"
    assert got.verdict == "keep" and any("judged on tokens/s" in r for r in got.reasons)


def test_too_few_steady_steps_give_no_speed_data() -> None:
    rng = np.random.default_rng(21)
    got = compare(side(rng, 1, steps=12), side(rng, 1, steps=12, step_s=0.05))
    assert got.axes["step_time"].finding == "no data" and got.step_time_ratio.value is None
    assert got.verdict == "inconclusive" and got.run_noise is None
    assert any("fewer than 8 steady steps" in r for r in got.reasons)


def test_the_same_figures_give_the_same_answer() -> None:
    rng = np.random.default_rng(22)
    base, cand = side(rng, 1), side(rng, 1, step_s=0.09)
    assert compare(base, cand) == compare(base, cand)
    other = compare(base, cand, seed=1)  # another bootstrap stream: nearly the same interval
    assert other.axes["step_time"].value == compare(base, cand).axes["step_time"].value
    assert other.axes["step_time"].low == pytest.approx(
        compare(base, cand).axes["step_time"].low, rel=0.01
    )
    with pytest.raises(ValueError):
        compare([], cand)


def test_aa_false_verdicts_and_power_on_autocorrelated_triples() -> None:
    """100 generated A/A pairs of 3 runs a side (AR(1) steps, phi 0.8, 5% spread; run
    offsets of 2%): the step-time interval excludes 1 in about 5% of them (a run-level
    percentile bootstrap, too narrow, in about 15%); keep or drop at most 2 of 40; a 10%
    slowdown found in at least 30 of 40 (about 86% expected)."""
    rng = np.random.default_rng(23)
    misses, false = 0, 0
    for i in range(100):
        got = compare(side(rng), side(rng))
        low, high = bounds(got.axes["step_time"])
        misses += not low <= 1 <= high
        false += i < 40 and got.verdict in ("keep", "drop")
    assert misses <= 9
    assert false <= 2
    found = sum(compare(side(rng), side(rng, step_s=0.11)).verdict == "drop" for _ in range(40))
    assert found >= 30


# --- lanes (unchanged helpers) -----------------------------------------------------------


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
