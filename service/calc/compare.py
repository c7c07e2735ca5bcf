"""Keep/drop comparison of two runs: pure functions of their stored figures.

Steady state: a run's first steps (warm-up, compilation, allocator growth) are left out: the
first max(5, 10%) of the steps compared, which are its last attempt's, the newest
COMPARE_STEPS of them on a long run. Step time and tokens/s are compared as ratios of
medians (candidate / baseline) with a percentile bootstrap confidence interval (resampling
each run's steady steps, a fixed seed, so the same data always gives the same answer). The
bootstrap is vectorised with numpy: each block of resamples is an index matrix drawn at once.

Verdict, from the step-time ratio's interval and the quality guard:
  keep          the interval lies below 1 - margin (faster) and the final loss is not worse
                than the baseline's by more than loss_tolerance (relative)
  drop          the interval lies above 1 + margin (slower), or the loss got worse
  inconclusive  otherwise (the interval straddles the margin band, or too few steps)
Every verdict comes with its reasons.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_STEADY_STEPS = 8
BOOTSTRAP_SAMPLES = 2000
COMPARE_STEPS = 2000  # the newest steps of a run's last attempt that are compared
SEED = 20261122
BOOTSTRAP_CHUNK_VALUES = 1 << 21  # indices per block: 16 MiB, twice that with the partition


@dataclass(frozen=True)
class RunFigures:
    """What the comparison needs of one run (plain data, extracted by the caller)."""

    step_times_s: Sequence[float]  # the last attempt's steps of the reported rank, in order
    tokens: Sequence[int]  # per step, same order
    goodput_fraction: float | None
    badput_s: Mapping[str, float]
    peak_memory_bytes: int | None
    final_loss: float | None


@dataclass(frozen=True)
class Ratio:
    value: float | None
    low: float | None
    high: float | None


@dataclass
class Comparison:
    step_time_ratio: Ratio
    tokens_per_s_ratio: Ratio
    steady_steps: tuple[int, int]
    verdict: str
    reasons: list[str] = field(default_factory=list)


def steady(values: Sequence[float]) -> list[float]:
    """Drop the warm-up: the first max(5, 10%) values."""
    skip = max(5, len(values) // 10)
    return list(values[skip:])


def _median_ratio(cand: Sequence[float], base: Sequence[float]) -> float:
    return statistics.median(cand) / statistics.median(base)


def _resampled_medians(
    rng: np.random.Generator, values: np.ndarray, rows: int, out: np.ndarray
) -> None:
    """Medians of `rows` resamples (with replacement, same size) of `values`, into `out`.

    With the values sorted once, a resample's middle values are those at its middle indices
    (indices into sorted values order as the values do): the index matrix is partitioned
    directly, with no gather of the resampled values."""
    ordered = np.sort(values)
    n = ordered.size
    mid = sorted({(n - 1) // 2, n // 2})  # one middle for odd n, two for even n
    per_block = max(1, BOOTSTRAP_CHUNK_VALUES // n)
    for start in range(0, rows, per_block):
        k = min(per_block, rows - start)
        middle = np.partition(rng.integers(0, n, size=(k, n)), mid, axis=1)
        out[start : start + k] = (ordered[middle[:, mid[0]]] + ordered[middle[:, mid[-1]]]) / 2


def bootstrap_ratio(
    cand: Sequence[float],
    base: Sequence[float],
    level: float = 0.95,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = SEED,
) -> Ratio:
    """Ratio of medians with a percentile bootstrap interval; None when either side is
    too short or has a zero median.

    Each of `samples` draws resamples both runs independently (with replacement, each at its
    own size) and takes median(candidate) / median(baseline); the interval's ends are the
    draws' order statistics at (1 - level) / 2 and (1 + level) / 2 of the way, lower-indexed
    (`np.quantile(method="lower")`). The same inputs and seed give the same interval."""
    if len(cand) < MIN_STEADY_STEPS or len(base) < MIN_STEADY_STEPS:
        return Ratio(None, None, None)
    if statistics.median(base) <= 0 or statistics.median(cand) <= 0:
        return Ratio(None, None, None)
    cand_rng, base_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    cand_medians, base_medians = np.empty(samples), np.empty(samples)
    _resampled_medians(cand_rng, np.asarray(cand, dtype=np.float64), samples, cand_medians)
    _resampled_medians(base_rng, np.asarray(base, dtype=np.float64), samples, base_medians)
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample's median may be 0
        draws = cand_medians / base_medians
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail], method="lower")
    return Ratio(_median_ratio(cand, base), float(low), float(high))


def _rates(fig: RunFigures) -> list[float]:
    return [t / s for t, s in zip(fig.tokens, fig.step_times_s, strict=True) if s > 0]


def compare(
    base: RunFigures, cand: RunFigures, margin: float = 0.02, loss_tolerance: float = 0.01
) -> Comparison:
    """Compare candidate with baseline; see the module docstring for the verdict rules."""
    base_t, cand_t = steady(base.step_times_s), steady(cand.step_times_s)
    time_ratio = bootstrap_ratio(cand_t, base_t)
    rate_ratio = bootstrap_ratio(steady(_rates(cand)), steady(_rates(base)))
    verdict, reasons = _verdict(time_ratio, base, cand, margin, loss_tolerance)
    return Comparison(time_ratio, rate_ratio, (len(base_t), len(cand_t)), verdict, reasons)


def _verdict(
    r: Ratio, base: RunFigures, cand: RunFigures, margin: float, loss_tolerance: float
) -> tuple[str, list[str]]:
    reasons: list[str] = []
    worse_loss = (
        base.final_loss is not None
        and cand.final_loss is not None
        and cand.final_loss > base.final_loss * (1 + loss_tolerance) + 1e-12
    )
    if worse_loss:
        reasons.append(
            f"final loss {cand.final_loss:.4g} is worse than the baseline's "
            f"{base.final_loss:.4g} by more than {loss_tolerance:.0%}"
        )
    if r.value is None or r.low is None or r.high is None:
        reasons.append(f"fewer than {MIN_STEADY_STEPS} steady steps on a side: no interval")
        return ("drop" if worse_loss else "inconclusive"), reasons
    band = f"[{r.low:.3f}, {r.high:.3f}]"
    if r.high < 1 - margin:
        reasons.append(
            f"step time ratio {r.value:.3f}, 95% interval {band}, below {1 - margin:.2f}: faster"
        )
        return ("drop" if worse_loss else "keep"), reasons
    if r.low > 1 + margin:
        reasons.append(
            f"step time ratio {r.value:.3f}, 95% interval {band}, above {1 + margin:.2f}: slower"
        )
        return "drop", reasons
    reasons.append(
        f"step time ratio {r.value:.3f}, 95% interval {band}, overlaps the "
        f"+-{margin:.0%} band: no clear difference"
    )
    return ("drop" if worse_loss else "inconclusive"), reasons


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
