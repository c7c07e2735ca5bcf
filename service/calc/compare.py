"""Keep/drop comparison of two sides of runs: pure functions of their stored figures.

Each side is one run or several replicates (runs of one lane that differ only by seed). Runs
are the unit of replication: every figure is first reduced to one value per run, and the
intervals come from how those values spread from run to run, not from the steps of one run.

One value per run
  step time, tokens/s  the median of the run's steady steps: its first max(5, 10%) steps
                       (warm-up, compilation, allocator growth) are left out of those compared
                       (the last attempt's newest COMPARE_STEPS). Tokens/s of a step is its
                       tokens / its time (steps of zero time skipped). A run with fewer than
                       MIN_STEADY_STEPS steady steps is left out of these two axes.
  eval loss            the loss at the newest step that every run of both sides evaluated
                       (matched steps: a run that went on longer is not flattered by its later,
                       lower losses). When no step is common to all, each run's final training
                       loss (one batch's loss, noisier: its own floor), and the reasons say so.
  peak memory, goodput fraction, drop rate, MaxVio: as given; a run without one is left out.
  badput mix           badput_s[category] / total_s for every category any run has (0 where a
                       run has none of it).

Axes are ratios (candidate / baseline: step time, tokens/s, eval loss, peak memory), worked on
log values, or differences (candidate - baseline: goodput fraction, badput shares, drop rate,
MaxVio), worked on the values. The estimate is the difference of the sides' means on that
scale: for a ratio the ratio of the sides' geometric means (one run a side: the plain ratio of
the two values). Each side's figure is its mean (geometric for a ratio), so value =
candidate / baseline (or candidate - baseline) exactly.

The 95% interval, by how many runs there are:
  >= 2 runs a side     a t interval on the per-run values (log values for ratios):
                       d +- t(0.975, df) * sqrt(s_b^2 / n_b + s_c^2 / n_c), s the sample
                       standard deviation (n - 1 degrees). With as many runs a side (n each,
                       what an ablation runs) df = 2n - 2: Student's pooled t, whose standard
                       error is then the same as Welch's; exact when both sides' runs spread
                       alike, as replicates of one lane and A/A pairs do, and robust to unequal
                       spreads at equal n. With unequal counts Welch's df (Welch-Satterthwaite).
  1 run against n >= 2 the replicated side's s stands for both (replicates of one lane differ
                       by seed only): d +- t(0.975, n - 1) * s * sqrt(1 / n_b + 1 / n_c).
  1 run a side         run-to-run noise cannot be estimated: each run is taken to carry the
                       axis's floor (RUN_NOISE_FLOORS; RUN_NOISE_FLOOR for step time and
                       tokens/s) as its standard deviation: d +- z(0.975) * sqrt(2 * floor^2 +
                       v_b + v_c), where v is the within-run variance of the run's log median
                       from a circular block bootstrap (blocks of ceil(sqrt(n)) consecutive
                       steady steps, so that steps correlated on a shared machine stay together;
                       BOOTSTRAP_SAMPLES resamples, fixed seed). v is 0 for the axes that have
                       one value per run. The reasons say how large a difference the floor
                       alone could explain.
  paired runs (PAIRED)  when every run of both sides has a pair key (RunFigures.pair: the
                       service passes the run's seed), each key once a side and the same keys
                       on both sides, at least 2 pairs: the runs are compared pair by pair,
                       d_i = c_i - b_i (log values for ratios), mean(d) +- t(0.975, n - 1) *
                       s_d / sqrt(n). `goodput ablate` runs every cell with the seeds of its
                       repeats, one repeat after another (ABAB...): a pair shares its seed (its
                       initialisation and data order: the eval losses of two dispatch lanes of
                       one seed agree to the last digits) and the machine's state at the time,
                       so the pairs' differences leave out both. The paired t interval holds
                       whatever the pairs share (it needs only that the differences be alike
                       and independent from pair to pair); with few pairs it has fewer degrees of
                       freedom (n - 1 against 2n - 2), so it is wider than the unpaired one when
                       a pair shares little. Runs of other seeds (the calibration's A/A sides,
                       replicates chosen by hand) are compared unpaired.
The run_noise reported is the step time's: the pooled between-run standard deviation of the
runs' log medians (about a relative noise), the within-pair one (s_d / sqrt(2)) for paired
runs, or the floor with one run a side.

Why a t interval on per-run medians rather than a bootstrap over runs: with 2 or 3 runs a side,
resampling runs sees at most 10 distinct sets a side, its spread underestimates the between-run
variance by (n - 1) / n, and its percentile ends stand where z = 1.96 would, where 3 runs a side
call for t(0.975, 4) = 2.78. On generated A/A triples like the tests' (AR(1) steps, run
offsets), a hierarchical percentile bootstrap (runs, then blocks of steps) excluded a ratio of 1
in 29 of 200 (nominal: 10). The t interval is exact for normally spread per-run log medians and
needs no model of the steps inside a run: their autocorrelation, drift and noise are all in
each run's median and show in how the runs' medians spread. It takes microseconds.

Why RUN_NOISE_FLOOR = 3%: identical runs on a shared machine can differ in step time by a few
percent (co-tenants, clocks, memory placement, data order); 3% a run is a deliberately cautious
assumption, so one run a side claims a speed difference only beyond about +-8% (1.96 *
sqrt(2) * 3%) plus the margin. The other floors (RUN_NOISE_FLOORS) are assumptions of the same
kind. With replicates the estimated noise replaces them; the calibration bench checks both.

Findings. With band b (margin for speed, peak memory, goodput fraction, badput shares and drop
rate; loss_tolerance for eval loss; MAX_VIO_BAND for MaxVio) the range of no real difference is
[1 - b, 1 + b] for a ratio and [-b, +b] for a difference:
  better / worse   the whole interval lies outside the range, on the better / worse side
  same             the whole interval lies inside the range
  unclear          the interval reaches across an end of the range
  no data          a side has no value for the axis

Verdict (decide()), from the findings of speed (step time, or tokens/s when the sides' median
tokens per step differ by more than TOKENS_PER_STEP_TOLERANCE), peak memory, quality (eval
loss) and routing (drop rate); the first rule that applies:
  1. quality worse                                              drop
  2. quality better, and speed or memory worse                  tax (keep only on purpose)
  3. quality better                                             keep (better quality, no cost)
  4. speed or memory worse, neither better                      drop (slower or heavier,
                                                                quality no better)
  5. speed or memory better, neither worse:
       drop rate worse, quality not shown the same              inconclusive (quality risk)
       quality unclear, its estimate worse than the tolerance   inconclusive
       otherwise                                                keep (faster or leaner)
  6. anything else (nothing clear, or faster but heavier)       inconclusive
On generated runs (bench/compare_bootstrap.py: AR(1) steps, normal run offsets of 2%, eval loss
spread 1%; 3 runs a side) 1.5% of A/A pairs got keep or drop and a 10% slowdown was dropped in
87% (offsets of 3%: 62%; with margin 0.01, 94% and 72%, A/A 2%). One run a side finds a 10%
slowdown in about 40%: the floor at work. bench/compare_calibration.py measures real runs.

Deterministic: the same figures and seed give the same answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MIN_STEADY_STEPS = 8
BOOTSTRAP_SAMPLES = 400  # within-run block bootstrap, one run a side only (+-7% on a variance)
COMPARE_STEPS = 2000  # the newest steps of a run's last attempt that are compared
SEED = 20261122
BOOTSTRAP_CHUNK_VALUES = 1 << 21  # resampled steps per block of the bootstrap (4 MiB of int16)
LEVEL = 0.95
RUN_NOISE_FLOOR = 0.03  # one run a side: each run's assumed relative step-time noise
RUN_NOISE_FLOORS: dict[str, float] = {  # the same for each axis (relative for a ratio)
    "step_time": RUN_NOISE_FLOOR,
    "tokens_per_s": RUN_NOISE_FLOOR,
    "eval_loss": 0.02,  # seed-to-seed eval loss of one lane
    "final_loss": 0.05,  # one batch's training loss: noisier
    "peak_memory": 0.01,  # allocator and routing-dependent buffers
    "goodput_fraction": 0.02,  # absolute: startup and stalls vary from run to run
    "badput": 0.02,  # absolute, each category's share of wall time
    "drop_rate": 0.01,  # absolute share of routed tokens
    "max_vio": 0.05,  # absolute
}
MAX_VIO_BAND = 0.05  # MaxVio moves less than this: no routing balance difference
TOKENS_PER_STEP_TOLERANCE = 0.01  # beyond it the sides' steps differ in work: judge tokens/s


@dataclass(frozen=True)
class RunFigures:
    """What the comparison needs of one run (plain data, extracted by the caller)."""

    run_id: str
    step_times_s: Sequence[float]  # last attempt, reference rank, newest COMPARE_STEPS, in order
    tokens: Sequence[int]  # per step, same order
    steps: Sequence[int]  # their step numbers, same order
    eval_loss: Mapping[int, float] = field(default_factory=dict)  # step -> eval loss
    final_loss: float | None = None  # the last training step's loss (quality fallback)
    goodput_fraction: float | None = None
    badput_s: Mapping[str, float] = field(default_factory=dict)  # category -> seconds
    total_s: float | None = None  # accounted wall time: badput mix = badput_s[c] / total_s
    peak_memory_bytes: int | None = None
    drop_rate: float | None = None  # dropped / routed tokens over the run; None: no MoE data
    max_vio: float | None = None  # mean MaxVio over the run; None: no data
    pair: Any = None  # runs of the two sides with one pair key are a pair (PAIRED below)


@dataclass(frozen=True)
class Ratio:
    value: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Axis:
    """One compared figure: estimate, 95% interval, each side's figure and the finding."""

    name: str
    kind: str  # "ratio" (candidate / baseline) or "difference" (candidate - baseline)
    value: float | None
    low: float | None
    high: float | None
    baseline: float | None
    candidate: float | None
    better: str  # "lower" or "higher"
    finding: str  # "better" | "worse" | "same" | "unclear" | "no data"
    reason: str


@dataclass
class Comparison:
    axes: dict[str, Axis]  # in display order
    verdict: str  # "keep" | "tax" | "drop" | "inconclusive"
    reasons: list[str]  # plain words, the verdict's grounds first
    runs: tuple[int, int]  # runs per side
    steady_steps: tuple[int, int]  # steady steps summed per side (runs with enough of them)
    run_noise: float | None  # the step time's between-run relative noise used
    step_time_ratio: Ratio
    tokens_per_s_ratio: Ratio


def warm_up(n: int) -> int:
    """How many of n steps are warm-up: max(5, 10%)."""
    return max(5, n // 10)


def steady(values: Sequence[float]) -> list[float]:
    """Drop the warm-up: the first max(5, 10%) values."""
    return list(values[warm_up(len(values)) :])


# --- Student's t quantile (no scipy here) -------------------------------------------------


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return h


def _beta_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p quantile of Student's t with df (> 0, not necessarily whole) degrees of freedom.

    For t > 0, P(T > t) = I_x(df / 2, 1 / 2) / 2 with x = df / (df + t^2): x is found by
    bisection (I_x grows with x), then t = sqrt(df * (1 - x) / x)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    if df > 1e7:
        return statistics.NormalDist().inv_cdf(p)
    tail = 1.0 - p if p > 0.5 else p  # the upper tail beyond |t|
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _beta_regularized(df / 2, 0.5, mid) / 2 < tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-17 + 1e-13 * lo:
            break
    x = (lo + hi) / 2
    t = math.sqrt(df * (1.0 - x) / x)
    return t if p > 0.5 else -t


# --- the within-run block bootstrap (one run a side) --------------------------------------


def block_length(n: int) -> int:
    """Consecutive steady steps per bootstrap block: ceil(sqrt(n))."""
    return max(1, math.ceil(math.sqrt(n)))


def within_run_variances(
    series: Sequence[np.ndarray], rng: np.random.Generator, samples: int = BOOTSTRAP_SAMPLES
) -> list[float]:
    """Variance (n - 1 degrees) of the log median of each series (one run's steady step times,
    its tokens/s...) over `samples` circular block bootstrap resamples.

    A resample is ceil(n / L) blocks of L = block_length(n) consecutive values, each block
    starting at a uniformly drawn position and wrapping around the end, cut to n values. Series
    of one length share the drawn starts (one run's times and rates move together). The values
    are ranked once and the ranks resampled: a resample's middle ranks give its median, with no
    gather of the values."""
    out: list[float] = []
    starts: dict[int, np.ndarray] = {}
    for values in series:
        n = values.size
        length = block_length(n)
        blocks = -(-n // length)
        if n not in starts:
            starts[n] = rng.integers(0, n, size=(samples, blocks))
        order = np.argsort(values, kind="stable")
        ranks = np.empty(n, dtype=np.int16 if n < 2**15 else np.int32)
        ranks[order] = np.arange(n, dtype=ranks.dtype)
        windows = sliding_window_view(np.concatenate([ranks, ranks[: length - 1]]), length)
        ordered = values[order]
        mid = sorted({(n - 1) // 2, n // 2})
        medians = np.empty(samples)
        rows = max(1, BOOTSTRAP_CHUNK_VALUES // (blocks * length))
        for first in range(0, samples, rows):
            drawn = windows[starts[n][first : first + rows]]
            resampled = drawn.reshape(drawn.shape[0], blocks * length)[:, :n]
            middle = np.partition(resampled, mid, axis=1)
            medians[first : first + rows] = (
                ordered[middle[:, mid[0]]] + ordered[middle[:, mid[-1]]]
            ) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(medians)
        out.append(float(np.var(logs, ddof=1)) if np.all(np.isfinite(logs)) else math.inf)
    return out


# --- one axis -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Interval:
    d: float  # candidate - baseline on the working scale
    low: float
    high: float
    noise: float  # between-run standard deviation used (estimated or the floor)
    estimated: bool  # False: the floor (one run a side)
    noise_only: float  # one run a side: half-width of the floor alone; else 0
    pairs: int = 0  # paired: how many pairs; 0 unpaired


def _interval(b: np.ndarray, c: np.ndarray, floor: float, within: float = 0.0) -> _Interval:
    """The 95% interval of mean(c) - mean(b) by the module docstring's rules."""
    nb, nc = b.size, c.size
    d = float(c.mean() - b.mean())
    q_level = (1 + LEVEL) / 2
    if nb >= 2 and nc >= 2:
        vb, vc = float(np.var(b, ddof=1)), float(np.var(c, ddof=1))
        se2 = vb / nb + vc / nc
        pooled = math.sqrt(((nb - 1) * vb + (nc - 1) * vc) / (nb + nc - 2))
        if se2 <= 0:
            return _Interval(d, d, d, pooled, True, 0.0)
        if nb == nc:
            df = float(nb + nc - 2)
        else:
            df = se2**2 / ((vb / nb) ** 2 / (nb - 1) + (vc / nc) ** 2 / (nc - 1))
        half = t_quantile(q_level, df) * math.sqrt(se2)
        return _Interval(d, d - half, d + half, pooled, True, 0.0)
    if nb >= 2 or nc >= 2:
        rep = b if nb >= 2 else c
        s = float(np.std(rep, ddof=1))
        half = t_quantile(q_level, rep.size - 1) * s * math.sqrt(1 / nb + 1 / nc)
        return _Interval(d, d - half, d + half, s, True, 0.0)
    z = statistics.NormalDist().inv_cdf(q_level)
    half = z * math.sqrt(2 * floor**2 + within)
    return _Interval(d, d - half, d + half, floor, False, z * math.sqrt(2) * floor)


def _paired_interval(b: np.ndarray, c: np.ndarray) -> _Interval:
    """Paired runs (b[i] with c[i]): the t interval of the mean of their differences,
    mean(d) +- t(0.975, n - 1) * s_d / sqrt(n); the noise a run, s_d / sqrt(2)."""
    d = c - b
    n = d.size
    mean = float(d.mean())
    s_d = float(np.std(d, ddof=1))
    half = t_quantile((1 + LEVEL) / 2, n - 1) * s_d / math.sqrt(n)
    return _Interval(mean, mean - half, mean + half, s_d / math.sqrt(2), True, 0.0, n)


def _pair_up(
    base: Sequence[tuple[Any, float]], cand: Sequence[tuple[Any, float]]
) -> tuple[list[float], list[float]] | None:
    """The values in pair order when the runs pair up one to one (PAIRED), else None."""
    kb, kc = [k for k, _ in base], [k for k, _ in cand]
    if (
        len(kb) < 2
        or any(k is None for k in kb + kc)
        or len(set(kb)) != len(kb)
        or len(set(kc)) != len(kc)
        or set(kb) != set(kc)
    ):
        return None
    of_c = dict(cand)
    order = sorted(kb, key=repr)
    of_b = dict(base)
    return [of_b[k] for k in order], [of_c[k] for k in order]


def _finding(kind: str, better: str, low: float, high: float, band: float) -> str:
    lo_edge, hi_edge = (1 - band, 1 + band) if kind == "ratio" else (-band, band)
    if high < lo_edge:
        return "better" if better == "lower" else "worse"
    if low > hi_edge:
        return "worse" if better == "lower" else "better"
    if low >= lo_edge and high <= hi_edge:
        return "same"
    return "unclear"


@dataclass(frozen=True)
class _Spec:
    name: str
    label: str  # plain words
    kind: str
    better: str
    band: float
    floor: float
    fmt: Callable[[float], str]


def _g(x: float) -> str:
    return f"{x:.4g}"


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _gib(x: float) -> str:
    return f"{x / 2**30:.3g} GiB"


def _axis(
    spec: _Spec,
    base_keyed: Sequence[tuple[Any, float]],
    cand_keyed: Sequence[tuple[Any, float]],
    within: float = 0.0,
) -> tuple[Axis, _Interval | None]:
    """The axis from each side's per-run values, each with its run's pair key (runs without
    a value already left out; a ratio's non-positive values, which have no log, are left out
    too). Paired when the runs left pair up one to one (PAIRED)."""
    usable: Callable[[float], bool] = (
        (lambda v: v > 0 and math.isfinite(v)) if spec.kind == "ratio" else math.isfinite
    )
    base_keyed = [(k, v) for k, v in base_keyed if usable(v)]
    cand_keyed = [(k, v) for k, v in cand_keyed if usable(v)]
    paired = _pair_up(base_keyed, cand_keyed)
    if paired is not None:
        base, cand = paired
    else:
        base, cand = [v for _, v in base_keyed], [v for _, v in cand_keyed]
    if not base or not cand:
        missing = [name for name, got in (("baseline", base), ("candidate", cand)) if not got]
        reason = f"{spec.label}: no data on the {' or the '.join(missing)}"
        empty = Axis(spec.name, spec.kind, None, None, None, None, None, spec.better, "no data",
                     reason)  # fmt: skip
        return empty, None
    ratio = spec.kind == "ratio"
    wb, wc = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if ratio:  # worked on logs: the interval of the log ratio, then back
        wb, wc = np.log(wb), np.log(wc)
    est = _paired_interval(wb, wc) if paired is not None else _interval(wb, wc, spec.floor, within)
    back: Callable[[float], float] = math.exp if ratio else float
    value, low, high = back(est.d), back(est.low), back(est.high)
    b_fig, c_fig = back(float(wb.mean())), back(float(wc.mean()))
    finding = _finding(spec.kind, spec.better, low, high, spec.band)
    lo_edge, hi_edge = (1 - spec.band, 1 + spec.band) if ratio else (-spec.band, spec.band)
    num = "{:.3f}" if ratio else "{:+.4g}"
    if finding in ("better", "worse"):
        where = f"wholly below {lo_edge:.4g}" if high < lo_edge else f"wholly above {hi_edge:.4g}"
    elif finding == "same":
        where = f"wholly within {lo_edge:.4g}..{hi_edge:.4g} (no real difference)"
    else:
        where = f"not clear of the {lo_edge:.4g}..{hi_edge:.4g} band of no real difference"
    if paired is not None:
        runs = f"{len(base)} pairs of runs"
    else:
        runs = f"{len(base)} + {len(cand)} runs" if len(base) + len(cand) > 2 else "one run a side"
    reason = (
        f"{spec.label} {spec.fmt(b_fig)} -> {spec.fmt(c_fig)}: {spec.kind} {num.format(value)}, "
        f"95% interval [{num.format(low)}, {num.format(high)}] ({runs}), {where}: {finding}"
    )
    axis = Axis(spec.name, spec.kind, value, low, high, b_fig, c_fig, spec.better, finding, reason)
    return axis, est


# --- the verdict ------------------------------------------------------------------------


def decide(speed: str, memory: str, quality: str, routing: str, quality_leans_worse: bool) -> str:
    """The verdict from the findings (the module docstring's rules, in their order).
    `quality_leans_worse`: the quality estimate itself is worse than the tolerance."""
    gain = "better" in (speed, memory)
    cost = "worse" in (speed, memory)
    if quality == "worse":
        return "drop"
    if quality == "better":
        return "tax" if cost else "keep"
    if cost and not gain:
        return "drop"
    if gain and not cost:
        if routing == "worse" and quality != "same":
            return "inconclusive"
        if quality == "unclear" and quality_leans_worse:
            return "inconclusive"
        return "keep"
    return "inconclusive"


# --- the comparison ---------------------------------------------------------------------


@dataclass
class _Speed:
    times: list[np.ndarray] = field(default_factory=list)  # steady step times, usable runs
    rates: list[np.ndarray] = field(default_factory=list)  # steady tokens/s, usable runs
    tokens: list[float] = field(default_factory=list)  # median tokens per steady step
    short: list[str] = field(default_factory=list)  # runs left out: too few steady steps
    time_keys: list[Any] = field(default_factory=list)  # the pair key of each of `times`
    rate_keys: list[Any] = field(default_factory=list)  # the pair key of each of `rates`


def _speed(runs: Sequence[RunFigures]) -> _Speed:
    out = _Speed()
    for run in runs:
        t = np.asarray(run.step_times_s, dtype=np.float64)
        tok = np.asarray(run.tokens, dtype=np.float64)
        if t.shape != tok.shape:
            raise ValueError(f"run {run.run_id}: {t.size} step times but {tok.size} token counts")
        times = t[warm_up(t.size) :]
        positive = t > 0
        rates = tok[positive] / t[positive]
        rates = rates[warm_up(rates.size) :]
        if times.size < MIN_STEADY_STEPS or float(np.median(times)) <= 0:
            out.short.append(run.run_id)
            continue
        out.times.append(times)
        out.time_keys.append(run.pair)
        out.tokens.append(float(np.median(tok[warm_up(tok.size) :])))
        if rates.size >= MIN_STEADY_STEPS and float(np.median(rates)) > 0:
            out.rates.append(rates)
            out.rate_keys.append(run.pair)
    return out


def _specs(margin: float, loss_tolerance: float) -> dict[str, _Spec]:
    f = RUN_NOISE_FLOORS
    return {
        "step_time": _Spec("step_time", "step time (s, median of steady steps)", "ratio",
                           "lower", margin, f["step_time"], _g),
        "tokens_per_s": _Spec("tokens_per_s", "tokens/s (median of steady steps)", "ratio",
                              "higher", margin, f["tokens_per_s"], _g),
        "peak_memory": _Spec("peak_memory", "peak memory", "ratio", "lower", margin,
                             f["peak_memory"], _gib),
        "goodput_fraction": _Spec("goodput_fraction", "goodput fraction", "difference",
                                  "higher", margin, f["goodput_fraction"], _pct),
        "drop_rate": _Spec("drop_rate", "routing drop rate (dropped / routed tokens)",
                           "difference", "lower", margin, f["drop_rate"], _pct),
        "max_vio": _Spec("max_vio", "MaxVio (mean over the run)", "difference", "lower",
                         MAX_VIO_BAND, f["max_vio"], _g),
    }  # fmt: skip


def _values(
    runs: Sequence[RunFigures], get: Callable[[RunFigures], float | None]
) -> list[tuple[Any, float]]:
    """Each run's value with its pair key; runs without a value left out."""
    return [(r.pair, float(v)) for r in runs if (v := get(r)) is not None]


def _quality(
    base: Sequence[RunFigures], cand: Sequence[RunFigures], tolerance: float
) -> tuple[_Spec, list[tuple[Any, float]], list[tuple[Any, float]], str]:
    """The quality spec and per-run values: eval loss at the newest matched step, else the
    final training loss; with a sentence that says which."""
    matched = set.intersection(*(set(r.eval_loss) for r in [*base, *cand]))
    if matched:
        step = max(matched)
        spec = _Spec("eval_loss", f"eval loss at step {step}", "ratio", "lower", tolerance,
                     RUN_NOISE_FLOORS["eval_loss"], _g)  # fmt: skip
        source = f"quality is the eval loss at step {step}, the newest step every run evaluated"
        b = [(r.pair, r.eval_loss[step]) for r in base]
        return spec, b, [(r.pair, r.eval_loss[step]) for r in cand], source
    spec = _Spec("eval_loss", "final training loss", "ratio", "lower", tolerance,
                 RUN_NOISE_FLOORS["final_loss"], _g)  # fmt: skip

    def final(r: RunFigures) -> float | None:
        return r.final_loss

    b, c = _values(base, final), _values(cand, final)
    source = (
        "no eval step is common to all runs: quality falls back to the final training loss "
        "(one batch's loss, noisier; a wider floor with one run a side)"
        if b and c
        else "no quality figure: no eval step is common to all runs, and a side has no final "
        "training loss"
    )
    return spec, b, c, source


def _badput_axes(
    base: Sequence[RunFigures], cand: Sequence[RunFigures], margin: float
) -> dict[str, Axis]:
    categories = sorted({c for r in [*base, *cand] for c in r.badput_s})
    out = {}
    for cat in categories:
        spec = _Spec(f"badput.{cat}", f"badput share {cat} (of wall time)", "difference",
                     "lower", margin, RUN_NOISE_FLOORS["badput"], _pct)  # fmt: skip

        def share(r: RunFigures, cat: str = cat) -> float | None:
            return r.badput_s.get(cat, 0.0) / r.total_s if r.total_s else None

        out[spec.name] = _axis(spec, _values(base, share), _values(cand, share))[0]
    return out


def _ratio(axis: Axis) -> Ratio:
    return Ratio(axis.value, axis.low, axis.high)


def compare(
    base: Sequence[RunFigures],
    cand: Sequence[RunFigures],
    *,
    margin: float = 0.02,
    loss_tolerance: float = 0.01,
    seed: int = SEED,
) -> Comparison:
    """Compare the candidate side with the baseline side (each one run or replicates); see the
    module docstring for the figures, intervals, findings and verdict."""
    if not base or not cand:
        raise ValueError("compare needs at least one run on each side")
    specs = _specs(margin, loss_tolerance)
    sb, sc = _speed(base), _speed(cand)
    within_t = within_r = 0.0
    if len(sb.times) == 1 and len(sc.times) == 1:
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
        var_t: list[float] = []
        var_r: list[float] = []
        for runs, rng in zip((sb, sc), rngs, strict=True):
            got = within_run_variances([*runs.times, *runs.rates], rng)
            var_t.append(got[0])
            var_r.extend(got[1:])
        within_t = sum(var_t)
        within_r = sum(var_r) if len(var_r) == 2 else 0.0
    axes: dict[str, Axis] = {}
    ests: dict[str, _Interval | None] = {}
    median: Callable[[np.ndarray], float] = lambda a: float(np.median(a))  # noqa: E731
    axes["step_time"], ests["step_time"] = _axis(
        specs["step_time"],
        list(zip(sb.time_keys, map(median, sb.times), strict=True)),
        list(zip(sc.time_keys, map(median, sc.times), strict=True)),
        within_t,
    )
    axes["tokens_per_s"], ests["tokens_per_s"] = _axis(
        specs["tokens_per_s"],
        list(zip(sb.rate_keys, map(median, sb.rates), strict=True)),
        list(zip(sc.rate_keys, map(median, sc.rates), strict=True)),
        within_r,
    )
    q_spec, q_base, q_cand, q_source = _quality(base, cand, loss_tolerance)
    axes["eval_loss"], ests["eval_loss"] = _axis(q_spec, q_base, q_cand)
    gets: dict[str, Callable[[RunFigures], float | None]] = {
        "goodput_fraction": lambda r: r.goodput_fraction,
        "peak_memory": lambda r: r.peak_memory_bytes,
        "drop_rate": lambda r: r.drop_rate,
        "max_vio": lambda r: r.max_vio,
    }
    for name, get in gets.items():
        axes[name], ests[name] = _axis(specs[name], _values(base, get), _values(cand, get))
    axes.update(_badput_axes(base, cand, margin))

    # Speed: step time, unless the sides' steps do different amounts of work.
    speed_name = "step_time"
    tokens_b = statistics.fmean(sb.tokens) if sb.tokens else None
    tokens_c = statistics.fmean(sc.tokens) if sc.tokens else None
    if tokens_b and tokens_c and abs(tokens_c / tokens_b - 1) > TOKENS_PER_STEP_TOLERANCE:
        speed_name = "tokens_per_s"
    speed, memory, quality, routing = (
        axes[speed_name], axes["peak_memory"], axes["eval_loss"], axes["drop_rate"]
    )  # fmt: skip
    leans_worse = quality.value is not None and quality.value > 1 + loss_tolerance
    verdict = decide(speed.finding, memory.finding, quality.finding, routing.finding, leans_worse)
    reasons = _reasons(verdict, speed, memory, quality, routing, leans_worse)
    if speed_name == "tokens_per_s":
        reasons.append(
            f"tokens per step differ ({tokens_b:.6g} -> {tokens_c:.6g}): speed is judged on "
            "tokens/s, not step time"
        )
    reasons.append(q_source)
    reasons.extend(_noise_notes(axes, ests, speed_name, len(sb.times), len(sc.times)))
    for side, left in (("baseline", sb), ("candidate", sc)):
        if left.short:
            reasons.append(
                f"{side} run(s) {', '.join(left.short)} left out of speed: fewer than "
                f"{MIN_STEADY_STEPS} steady steps"
            )
    est_t = ests["step_time"]
    return Comparison(
        axes=axes,
        verdict=verdict,
        reasons=reasons,
        runs=(len(base), len(cand)),
        steady_steps=(sum(t.size for t in sb.times), sum(t.size for t in sc.times)),
        run_noise=est_t.noise if est_t is not None else None,
        step_time_ratio=_ratio(axes["step_time"]),
        tokens_per_s_ratio=_ratio(axes["tokens_per_s"]),
    )


def _reasons(
    verdict: str, speed: Axis, memory: Axis, quality: Axis, routing: Axis, leans_worse: bool
) -> list[str]:
    """The verdict's grounds in plain words, then the axes they rest on."""
    costs = [a for a in (speed, memory) if a.finding == "worse"]
    gains = [a for a in (speed, memory) if a.finding == "better"]
    words = {"step_time": "slower", "tokens_per_s": "slower", "peak_memory": "heavier"}
    good = {"step_time": "faster", "tokens_per_s": "faster", "peak_memory": "leaner"}
    cost_words = " and ".join(words[a.name] for a in costs)
    gain_words = " and ".join(good[a.name] for a in gains)
    if verdict == "drop" and quality.finding == "worse":
        head = "drop: quality is clearly worse"
    elif verdict == "drop":
        head = f"drop: {cost_words} without better quality"
    elif verdict == "tax":
        head = f"tax: better quality, but {cost_words}: keep it only on purpose"
    elif verdict == "keep" and quality.finding == "better":
        head = "keep: better quality at no clear cost in speed or memory"
    elif verdict == "keep":
        head = (
            f"keep: {gain_words}, "
            + {
                "same": "and quality is the same",
                "unclear": "and quality is not clearly worse",
                "no data": "with no quality figure to check",
            }[quality.finding]
        )
    elif gains and costs:
        head = f"inconclusive: {gain_words} but {cost_words}, a trade to decide on purpose"
    elif gains and routing.finding == "worse":
        head = (
            f"inconclusive: {gain_words}, but the routing drop rate got clearly worse, a "
            "quality risk that eval loss does not clear"
        )
    elif gains and leans_worse:
        head = f"inconclusive: {gain_words}, but quality may be worse (its interval is unclear)"
    else:
        head = "inconclusive: no clear difference in speed, memory or quality"
    if verdict in ("keep", "drop") and quality.finding not in ("better", "worse"):
        shown = [*gains, *costs, quality]  # on speed or memory
    else:
        shown = [quality, speed, memory] if verdict != "inconclusive" else [speed, memory, quality]
    out = [head, *(a.reason for a in dict.fromkeys(shown))]
    if routing.finding == "worse":
        out.append(f"quality risk: {routing.reason}")
    return out


def _noise_notes(
    axes: Mapping[str, Axis],
    ests: Mapping[str, _Interval | None],
    speed_name: str,
    nb: int,
    nc: int,
) -> list[str]:
    """How much of the speed difference run-to-run noise could explain."""
    est, axis = ests[speed_name], axes[speed_name]
    if est is None or axis.value is None:
        return []
    label = "step-time" if speed_name == "step_time" else "tokens/s"
    if not est.estimated:
        lo, hi = math.exp(-est.noise_only), math.exp(est.noise_only)
        inside = lo <= axis.value <= hi
        return [
            f"one run a side: run-to-run noise cannot be measured, so {est.noise:.0%} a run is "
            f"assumed; that noise alone could put the {label} ratio anywhere in "
            f"[{lo:.3f}, {hi:.3f}], and the observed {axis.value:.3f} is "
            + ("inside it: noise could explain all of it" if inside else "beyond it")
            + "; replicate runs to measure it"
        ]
    if est.pairs:
        return [
            f"runs paired by seed ({est.pairs} pairs): the interval is that of the pairs' "
            f"differences, which leaves out what a pair shares (its seed, the machine's state "
            f"at the time); {label} noise within a pair estimated at {est.noise:.1%} a run"
        ]
    runs = f"{nb} + {nc} runs" if nb >= 2 and nc >= 2 else f"the side with {max(nb, nc)} runs"
    return [f"run-to-run {label} noise estimated at {est.noise:.1%} a run from {runs}"]


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}; lists stay values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def lane_diff(
    base: Mapping[str, Any], cand: Mapping[str, Any], ignore_prefixes: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """Fields that differ between two receipts' parts, as {field: {baseline, candidate}}."""
    a, b = flatten("", base), flatten("", cand)
    out = {}
    for key in sorted(set(a) | set(b)):
        name = key.lstrip(".")
        if any(name == p or name.startswith(p + ".") for p in ignore_prefixes):
            continue
        if a.get(key) != b.get(key):
            out[name] = {"baseline": a.get(key), "candidate": b.get(key)}
    return out


def unexplained(diff: Mapping[str, Any], knobs: Sequence[str]) -> list[str]:
    """Differing fields not covered by a declared knob (a knob covers itself and below)."""
    return [f for f in diff if not any(f == k or f.startswith(k + ".") for k in knobs)]
