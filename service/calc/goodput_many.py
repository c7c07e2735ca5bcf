"""`goodput.account` for many windows at once: the same arithmetic on arrays over the windows
(one element a window), in the same order of operations, so that each window's figures are
the very floats `account` gives for it (tests/service/test_goodput_many.py holds the two
together). `/goodput/rolling` accounts up to 10,000 windows a request; one call of `account`
a window and rank was most of its time in Python (BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.calc.goodput import (
    FAILED_STATUSES,
    CompileCut,
    Decided,
    RankGoodput,
    RankParts,
    empty_badput,
)
from trainer_hooks.records import BADPUT_CATEGORIES

Array = np.ndarray


@dataclass
class PartsColumns:
    """One rank's `RankParts` of many windows, as arrays over the windows: zeros where the
    rank has no record in a window (what `RankParts.empty` accounts as)."""

    rank: int
    split: dict[int, tuple[Array, Array, Array]]  # attempt -> busy_upto, busy_after, steps_after
    blocking_s: dict[str, Array]  # 0.0 where a window charges the category nothing
    hook_s: Array
    steps: Array  # int64
    tokens: Array  # int64
    # Where a category is a key of a window's blocking_s: where it is not 0.0 unless given
    # (WindowReader.parts keeps a category of spans of no length, at 0.0).
    blocking_keys: dict[str, Array] | None = None

    @classmethod
    def empty(cls, rank: int, n: int) -> PartsColumns:
        zeros = np.zeros(n, dtype=np.int64)
        return cls(rank, {}, {}, np.zeros(n), zeros, zeros.copy(), {})

    def keyed(self, category: str) -> Array:
        """The windows whose blocking_s has `category` as a key."""
        if self.blocking_keys is None or category not in self.blocking_keys:
            return self.blocking_s[category] != 0.0
        return self.blocking_keys[category]

    @classmethod
    def of(cls, rank: int, parts: Sequence[RankParts | None]) -> PartsColumns:
        """Columns of one rank's parts, window by window (None: no record there)."""
        n = len(parts)
        out = cls.empty(rank, n)
        for i, p in enumerate(parts):
            if p is None:
                continue
            for attempt, s in p.split.items():
                if attempt not in out.split:
                    out.split[attempt] = (np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))
                col = out.split[attempt]
                col[0][i], col[1][i], col[2][i] = s.busy_upto, s.busy_after, s.steps_after
            for category, x in p.blocking_s.items():
                out.blocking_s.setdefault(category, np.zeros(n))[i] = x
                assert out.blocking_keys is not None
                out.blocking_keys.setdefault(category, np.zeros(n, dtype=bool))[i] = True
            out.hook_s[i], out.steps[i], out.tokens[i] = p.hook_s, p.steps, p.tokens
        return out


@dataclass
class GoodputColumns:
    """One rank's `RankGoodput` of many windows, as arrays over the windows. `badput_s` holds
    every category of BADPUT_CATEGORIES and each custom one that some window charges;
    `shown[c]` says which windows have a custom category c as a key (where `account` and
    `minus` would put it in the dict)."""

    rank: int
    start: float
    end: float
    total_s: Array
    goodput_s: Array
    badput_s: dict[str, Array]
    shown: dict[str, Array]
    other_s: Array
    steps: Array
    tokens: Array

    def window(self, i: int) -> RankGoodput:
        """Window i's RankGoodput."""
        return RankGoodput(
            rank=self.rank,
            start=self.start,
            end=self.end,
            total_s=float(self.total_s[i]),
            goodput_s=float(self.goodput_s[i]),
            badput_s=self.badput_of(i),
            other_s=float(self.other_s[i]),
            steps=int(self.steps[i]),
            tokens=int(self.tokens[i]),
        )

    def badput_of(self, i: int) -> dict[str, float]:
        return {
            c: float(x[i])
            for c, x in self.badput_s.items()
            if c not in self.shown or self.shown[c][i]
        }

    def take(self, idx: Array) -> GoodputColumns:
        """The windows at positions idx."""
        return GoodputColumns(
            self.rank,
            self.start,
            self.end,
            self.total_s[idx],
            self.goodput_s[idx],
            {c: x[idx] for c, x in self.badput_s.items()},
            {c: x[idx] for c, x in self.shown.items()},
            self.other_s[idx],
            self.steps[idx],
            self.tokens[idx],
        )

    def subtract_at(self, idx: Array, b: GoodputColumns) -> None:
        """`goodput.minus` on the windows at positions idx (distinct), b given for each of
        them in the same order: their seconds less b's; steps and tokens stay."""
        n = len(self.total_s)
        self.total_s[idx] -= b.total_s
        self.goodput_s[idx] -= b.goodput_s
        self.other_s[idx] -= b.other_s
        for c, x in b.badput_s.items():
            if c not in self.badput_s:
                self.badput_s[c] = np.zeros(n)
                self.shown[c] = np.zeros(n, dtype=bool)
            self.badput_s[c][idx] -= x
            if c in b.shown:
                self.shown[c][idx] |= b.shown[c]


def clip(a: float, b: float, lo: Array, hi: Array) -> Array:
    """`goodput.clip` of [a, b] against each window [lo, hi]."""
    return np.maximum(0.0, np.minimum(b, hi) - np.maximum(a, lo))


def account_many(
    decided: Sequence[Decided],
    parts: PartsColumns,
    compile_cuts: Sequence[CompileCut],
    lo: Array,
    hi: Array,
) -> GoodputColumns:
    """`goodput.account` of one rank over each window [lo[i], hi[i]], its parts there given
    as columns: the same steps in the same order (docs/ACCOUNTING.md, section 2)."""
    n = len(lo)
    ordered = sorted(decided, key=lambda d: d.attempt)
    badput = {c: np.zeros(n) for c in empty_badput()}
    shown: dict[str, Array] = {}
    for category in sorted(parts.blocking_s):  # custom categories after the fixed ones
        seconds = parts.blocking_s[category]
        if category not in badput:
            badput[category] = np.zeros(n)
            shown[category] = parts.keyed(category)
        badput[category] = badput[category] + seconds
    badput["observability"] = badput["observability"] + parts.hook_s
    goodput = np.zeros(n)
    start = min((d.start for d in ordered), default=0.0)
    end = max((d.end for d in ordered), default=start)
    prev_end: float | None = None
    zeros = np.zeros(n)
    for d in ordered:
        if prev_end is not None and d.start > prev_end:
            badput["infra_recovery"] = badput["infra_recovery"] + clip(prev_end, d.start, lo, hi)
        busy_upto, busy_after, _ = parts.split.get(d.attempt, (zeros, zeros, zeros))
        goodput = goodput + busy_upto
        badput["wasted_progress"] = badput["wasted_progress"] + busy_after
        if d.status in FAILED_STATUSES:  # the partial step
            badput["wasted_progress"] = badput["wasted_progress"] + clip(d.progress, d.end, lo, hi)
        prev_end = d.end if prev_end is None else max(prev_end, d.end)
    upto = {d.attempt: d.upto for d in ordered}
    for c in compile_cuts:
        x = zeros
        for i, (a, b) in enumerate(c.intervals):
            x = clip(a, b, lo, hi) if i == 0 else x + clip(a, b, lo, hi)
        badput["compile"] = badput["compile"] + x
        if c.step <= upto.get(c.attempt, math.inf):
            goodput = goodput - x
        else:
            badput["wasted_progress"] = badput["wasted_progress"] - x
    total = clip(start, end, lo, hi)
    return GoodputColumns(
        rank=parts.rank,
        start=start,
        end=end,
        total_s=total,
        goodput_s=goodput,
        badput_s=badput,
        shown=shown,
        other_s=total - goodput - _summed(badput),
        steps=parts.steps,
        tokens=parts.tokens,
    )


def _summed(badput: dict[str, Array]) -> Array:
    """sum(badput.values()) as Python adds them: in the dict's order, from the first."""
    values = list(badput.values())
    out = values[0].copy()
    for x in values[1:]:
        out += x
    return out


assert tuple(empty_badput()) == BADPUT_CATEGORIES  # the fixed categories come first, in order
