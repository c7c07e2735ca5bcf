"""calc/goodput_many.py against goodput.py: `account_many` over many windows gives, window by
window, the very floats `account` gives (not within a tolerance: the same operations in the
same order), and `subtract_at` what `minus` gives; on random ranks of every kind of attempt
(completed, failed with the partial step, stalled, running, gaps between them), compile cuts
on either side of the checkpoint, custom categories and windows inside, across and outside
the records."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from service.calc.goodput import (
    AttemptSplit,
    CompileCut,
    Decided,
    Interval,
    RankParts,
    account,
    minus,
)
from service.calc.goodput_many import PartsColumns, account_many

FIXED = ("data_stall", "eval", "checkpoint_save", "compile", "observability")


def random_decided(rng: random.Random) -> list[Decided]:
    out, t = [], 100.0
    for attempt in range(rng.randint(1, 3)):
        start = t + rng.choice([0.0, 0.0, rng.uniform(0.1, 9.0)])  # a gap: infra_recovery
        end = start + rng.uniform(5.0, 60.0)
        progress = end - rng.choice([0.0, rng.uniform(0.0, 3.0)])
        status = rng.choice(["completed", "failed", "stalled", "running"])
        upto = rng.choice([math.inf, float(rng.randint(0, 50)), -1.0])
        out.append(Decided(attempt, 0, start, end, progress, status, None, upto))
        t = end - rng.choice([0.0, rng.uniform(0.0, 2.0)])  # overlapping attempts too
    rng.shuffle(out)  # account sorts them
    return out


def random_parts(rng: random.Random, attempts: int) -> RankParts | None:
    if rng.random() < 0.15:
        return None  # no record in the window
    split = {
        a: AttemptSplit(rng.uniform(0, 9), rng.uniform(0, 3), rng.randint(0, 5))
        for a in range(attempts)
        if rng.random() < 0.7
    }
    names = [c for c in FIXED if rng.random() < 0.5]
    names += sorted(c for c in ("custom:a", "custom:b") if rng.random() < 0.3)
    blocking = {c: rng.uniform(0.001, 4.0) for c in names}
    return RankParts(0, split, blocking, rng.uniform(0, 0.1), rng.randint(0, 40), rng.randint(0, 9))


def random_cuts(rng: random.Random, decided: list[Decided]) -> list[CompileCut]:
    out = []
    for d in decided:
        if rng.random() < 0.6:
            a = d.start + rng.uniform(0.0, 1.0)
            intervals = [Interval(a, a + rng.uniform(0.1, 2.0))]
            if rng.random() < 0.5:
                b = intervals[0].end + rng.uniform(0.0, 1.0)
                intervals.append(Interval(b, b + rng.uniform(0.1, 1.0)))
            out.append(CompileCut(d.attempt, 0, rng.randint(0, 60), tuple(intervals)))
    return out


def random_windows(rng: random.Random, n: int) -> list[tuple[float, float]]:
    out = [(-math.inf, math.inf), (0.0, 50.0), (400.0, 500.0)]
    while len(out) < n:
        lo = rng.uniform(90.0, 300.0)
        out.append((lo, lo + rng.choice([0.5, 3.0, 40.0, 200.0])))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_account_many_gives_accounts_floats_window_by_window(seed: int) -> None:
    rng = random.Random(seed)
    decided = random_decided(rng)
    cuts = random_cuts(rng, decided)
    windows = random_windows(rng, 60)
    parts = [random_parts(rng, len(decided)) for _ in windows]
    lo = np.array([a for a, _ in windows])
    hi = np.array([b for _, b in windows])
    got = account_many(decided, PartsColumns.of(0, parts), cuts, lo, hi)
    for i, (a, b) in enumerate(windows):
        want = account(decided, parts[i] or RankParts.empty(0), cuts, a, b)
        assert got.window(i) == want, (seed, i)


@pytest.mark.parametrize("seed", range(20))
def test_subtract_at_gives_minus(seed: int) -> None:
    """An excluded interval's share taken out of the windows that meet it, custom categories
    of either side kept as keys where `minus` keeps them."""
    rng = random.Random(seed)
    decided = random_decided(rng)
    windows = random_windows(rng, 30)
    lo = np.array([a for a, _ in windows])
    hi = np.array([b for _, b in windows])
    parts = [random_parts(rng, len(decided)) for _ in windows]
    inside = [random_parts(rng, len(decided)) for _ in windows]
    a = account_many(decided, PartsColumns.of(0, parts), [], lo, hi)
    b = account_many(decided, PartsColumns.of(0, inside), [], lo, hi)
    meets = np.array(sorted(rng.sample(range(len(windows)), 12)))
    want = [
        minus(a.window(i), b.window(i)) if i in set(meets.tolist()) else a.window(i)
        for i in range(len(windows))
    ]
    a.subtract_at(meets, b.take(meets))
    assert [a.window(i) for i in range(len(windows))] == want


def test_a_category_kept_at_zero_stays_a_key() -> None:
    """WindowReader.parts keeps a category of spans of no length at 0.0: the window's badput
    has it as a key, as `account` gives it."""
    decided = [Decided(0, 0, 0.0, 10.0, 10.0, "completed", None, math.inf)]
    parts = [RankParts(0, {}, {"custom:zero": 0.0}, 0.0, 0, 0), None]
    got = account_many(decided, PartsColumns.of(0, parts), [], np.zeros(2), np.full(2, 5.0))
    assert "custom:zero" in got.window(0).badput_s
    assert "custom:zero" not in got.window(1).badput_s
    assert got.window(0) == account(decided, parts[0], [], 0.0, 5.0)  # type: ignore[arg-type]
