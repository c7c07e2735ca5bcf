"""A brute-force reference of docs/ACCOUNTING.md, written from the document alone.

`account(records, now, window)` takes the records as sent on the wire (plain dicts, in any
order, repeats allowed) and charges every elementary interval of every rank's timeline by the
ordered rules of section 2. It is meant to be obviously right, not fast: every time at which
any rule can change its answer is a boundary, and each interval between two consecutive
boundaries is classified by looking at its midpoint.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from trainer_hooks.records import BADPUT_CATEGORIES

STALL_INTERVALS = 6
# Section 2, rule 1: highest precedence first; custom:<name> come after, in name order.
PRECEDENCE = (
    "checkpoint_restore",
    "checkpoint_save",
    "startup",
    "compile",
    "eval",
    "data_stall",
    "profiling",
    "observability",
)
FAILED = ("failed", "stalled")

Interval = tuple[float, float]


@dataclass
class Parts:
    total_s: float = 0.0
    goodput_s: float = 0.0
    badput_s: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(BADPUT_CATEGORIES, 0.0)
    )
    other_s: float = 0.0
    steps: int = 0  # the rank's steps that overlap the window (section 3), and their tokens
    tokens: int = 0

    def add(self, part: str, seconds: float) -> None:
        if part == "goodput":
            self.goodput_s += seconds
        elif part == "other":
            self.other_s += seconds
        else:
            self.badput_s[part] = self.badput_s.get(part, 0.0) + seconds


@dataclass
class Disruption:
    attempt: int
    cause: str
    time: float | None  # the attempt's end on the run's rank (None: the rank is not in it)
    wasted_steps: int


@dataclass
class Accounting:
    ranks: dict[int, Parts]
    rank: int | None  # the run's (slowest) rank, chosen on the whole run
    run: Parts  # that rank's figures (empty Parts for a run without ranks)
    disruptions: list[Disruption]
    status: dict[int, tuple[str, str | None]]  # attempt -> (status, cause)
    extent: Interval | None  # the run's first start and last end, over all ranks


class Stored:
    """What the service keeps of the records: one row per natural key (the first one sent;
    the generated timelines never send two different records with one key), and the latest
    heartbeat (with its interval_s) per rank of an attempt."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        self.excluded: dict[Interval, None] = {}
        self.starts: dict[tuple[int, int], float] = {}
        self.ends: dict[tuple[int, int], dict[str, Any]] = {}
        self.heartbeats: dict[tuple[int, int], dict[str, Any]] = {}
        self.steps: dict[tuple[int, int, int], dict[str, Any]] = {}
        self.spans: dict[tuple[int, int, str, float], dict[str, Any]] = {}
        self.checkpoints: dict[tuple[int, int, int], dict[str, Any]] = {}
        for rec in records:
            kind = rec["kind"]
            if kind == "excluded_window":
                self.excluded.setdefault((rec["start"], rec["end"]), None)
                continue
            if kind not in (
                "attempt_start",
                "attempt_end",
                "heartbeat",
                "step",
                "span",
                "checkpoint",
            ):
                continue  # run, routing, observation, profile: no part in the accounting
            ar = (rec.get("attempt", 0), rec.get("rank", 0))
            if kind == "attempt_start":
                self.starts.setdefault(ar, rec["start"])
            elif kind == "attempt_end":
                self.ends.setdefault(ar, rec)
            elif kind == "heartbeat":
                if ar not in self.heartbeats or rec["time"] > self.heartbeats[ar]["time"]:
                    self.heartbeats[ar] = rec
            elif kind == "step":
                self.steps.setdefault((*ar, rec["step"]), rec)
            elif kind == "span":
                self.spans.setdefault((*ar, rec["category"], rec["start"]), rec)
            else:
                self.checkpoints.setdefault((*ar, rec["step"]), rec)

    def attempt_ranks(self) -> set[tuple[int, int]]:
        keys: set[tuple[int, int]] = set(self.starts) | set(self.ends) | set(self.heartbeats)
        keys |= {k[:2] for k in self.steps} | {k[:2] for k in self.spans}
        keys |= {k[:2] for k in self.checkpoints}
        return keys


def _union_measure(intervals: Iterable[Interval], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by the union of the intervals."""
    cut = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, cur_a, cur_b = 0.0, None, None
    for a, b in cut:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a  # type: ignore[operator]
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a  # type: ignore[operator]
    return total


def ideal_step_time(step_times: list[float]) -> float | None:
    """Section 1: `step_times` in (attempt, step) order."""
    times = step_times[-1000:]
    n = len(times)
    if n < 6:
        return None
    rest = times[max(5, n // 10) :]
    m = statistics.median(rest)
    d = statistics.median(abs(x - m) for x in rest)
    inside = [x for x in rest if m - 3 * d <= x <= m + 3 * d]
    return sum(inside) / len(inside) if inside else m


def precedence_key(category: str) -> tuple[int, str]:
    if category in PRECEDENCE:
        return (PRECEDENCE.index(category), "")
    return (len(PRECEDENCE), category)  # custom:<name>, in name order


class Reference:
    """The whole-run decisions of section 1, made once from every stored record; then
    `charge(rank, lo, hi)` charges any window by section 2."""

    def __init__(self, records: Iterable[dict[str, Any]], now: float) -> None:
        db = self.db = Stored(records)
        self.attempt_ranks = attempt_ranks = db.attempt_ranks()
        self.attempts = attempts = sorted({a for a, _ in attempt_ranks})
        self.ranks = ranks = sorted({r for _, r in attempt_ranks})

        # Attempts: start, last progress P, last sign of life L, end, per rank.
        self.start: dict[tuple[int, int], float] = {}
        self.last_progress: dict[tuple[int, int], float] = {}
        self.last_sign: dict[tuple[int, int], float] = {}
        self.end: dict[tuple[int, int], float] = {}
        for a, r in attempt_ranks:
            starts, ends = self._signs_of_life(a, r)
            if (a, r) in db.ends:
                starts.append(db.ends[a, r]["end"])  # a record too, when nothing else is there
            if (a, r) in db.starts:
                starts.append(db.starts[a, r])
            self.start[a, r] = min(starts)
            self.last_progress[a, r] = max([*self._progress(a, r), self.start[a, r]])
            self.last_sign[a, r] = last = max([*ends, self.start[a, r]])
            sent_end = db.ends[a, r]["end"] if (a, r) in db.ends else None
            self.end[a, r] = sent_end if sent_end is not None and sent_end >= last else last

        # Attempt status, one for all ranks, by the first rule that applies.
        self.status: dict[int, tuple[str, str | None]] = {}
        for a in attempts:
            sent = [e for (a2, _), e in sorted(db.ends.items()) if a2 == a]
            failed = [e for e in sent if e["status"] == "failed"]
            beats = [hb for (a2, _), hb in db.heartbeats.items() if a2 == a]
            declared = [hb["interval_s"] for hb in beats if hb.get("interval_s") is not None]
            silent = now - max((hb["time"] for hb in beats), default=now)
            if failed:
                self.status[a] = ("failed", failed[0].get("cause"))  # the lowest rank's
            elif any(e["status"] == "completed" for e in sent):
                self.status[a] = ("completed", None)
            elif any(a2 > a for a2 in attempts):
                self.status[a] = ("failed", "restarted (no end record)")
            elif declared and silent > STALL_INTERVALS * max(declared):
                self.status[a] = ("stalled", f"stalled: no heartbeat for {silent:.0f} s")
            else:
                self.status[a] = ("running", None)

        # Commits: the last saved (ok) checkpoint of each attempt, from any rank.
        self.saved: dict[int, int] = {}
        for (a, _, step), c in db.checkpoints.items():
            if c.get("ok", True):
                self.saved[a] = max(self.saved.get(a, -1), step)

        self.blocking: dict[int, list[dict[str, Any]]] = {r: [] for r in ranks}
        for (_, r, _, _), s in db.spans.items():
            if not s.get("overlapped", False):
                self.blocking[r].append(s)

        # Inferred compile: the first step's excess over the ideal step time.
        self.compile_runs: dict[int, list[Interval]] = {r: [] for r in ranks}
        for r in ranks:
            ideal = ideal_step_time([s["end"] - s["start"] for _, s in self.steps_of(r)])
            blocked = [(s["start"], s["end"]) for s in self.blocking[r]]
            for a in attempts:
                if ideal is None or any(k[:3] == (a, r, "compile") for k in db.spans):
                    continue
                mine = [s for a2, s in self.steps_of(r) if a2 == a]
                if not mine:
                    continue
                first = min(mine, key=lambda s: s["step"])
                s0, s1 = first["start"], first["end"]
                excess = (s1 - s0) - _union_measure(blocked, s0, s1) - ideal
                cuts = sorted({s0, s1} | {x for b in blocked for x in b if s0 < x < s1})
                for x, y in zip(cuts, cuts[1:], strict=False):  # unblocked seconds, in order
                    if excess <= 0:
                        break
                    if any(b0 <= (x + y) / 2 <= b1 for b0, b1 in blocked):
                        continue
                    take = min(y - x, excess)
                    self.compile_runs[r].append((x, x + take))
                    excess -= take

        self.excluded = list(db.excluded)

        # The run's rank: the slowest, on the whole run.
        inf = float("inf")
        self.whole = {r: self.charge(r, -inf, inf) for r in ranks}
        self.slowest = min(
            ranks,
            key=lambda r: (-round(self.whole[r].total_s, 6), round(self.whole[r].goodput_s, 6), r),
            default=None,
        )

    def _signs_of_life(self, a: int, r: int) -> tuple[list[float], list[float]]:
        """(start times, end times) of the rank's records in the attempt."""
        db = self.db
        intervals = [s for k, s in [*db.steps.items(), *db.spans.items()] if k[:2] == (a, r)]
        starts = [s["start"] for s in intervals]
        ends = [s["end"] for s in intervals]
        instants = [c for (a2, r2, _), c in db.checkpoints.items() if (a2, r2) == (a, r)]
        if (a, r) in db.heartbeats:
            instants.append(db.heartbeats[a, r])
        starts += [x["time"] for x in instants]
        ends += [x["time"] for x in instants]
        return starts, ends

    def _progress(self, a: int, r: int) -> list[float]:
        """Ends and times of the rank's records of progress in the attempt: steps, spans and
        checkpoint commits (not heartbeats)."""
        db = self.db
        intervals = [s for k, s in [*db.steps.items(), *db.spans.items()] if k[:2] == (a, r)]
        commits = [c for (a2, r2, _), c in db.checkpoints.items() if (a2, r2) == (a, r)]
        return [s["end"] for s in intervals] + [c["time"] for c in commits]

    def steps_of(self, r: int) -> list[tuple[int, dict[str, Any]]]:
        """(attempt, step) of the rank, ordered by attempt, then step number."""
        mine = [(a, s) for (a, r2, _), s in self.db.steps.items() if r2 == r]
        return sorted(mine, key=lambda x: (x[0], x[1]["step"]))

    def committed(self, a: int, step: int) -> bool:
        return self.status[a][0] in ("completed", "running") or self.saved.get(a, -1) >= step

    def is_excluded(self, t: float) -> bool:
        # An excluded window [lo, hi] holds lo < t <= hi, as a window does (section 2); the
        # document says so for windows only. Only a step's end can sit on an edge.
        return any(lo < t <= hi for lo, hi in self.excluded)

    def charge(self, r: int, lo: float, hi: float) -> Parts:
        """Section 2: the rank's seconds in [lo, hi], each charged to the first part that
        applies, then the hooks' own time of the steps that end in (lo, hi]."""
        parts = Parts()
        mine = [a for a in self.attempts if (a, r) in self.attempt_ranks]
        if not mine:
            return parts
        start, end, last_progress = self.start, self.end, self.last_progress
        extent = (min(start[a, r] for a in mine), max(end[a, r] for a in mine))
        gaps = [(end[a, r], start[b, r]) for a, b in zip(mine, mine[1:], strict=False)]
        steps, blocking = self.steps_of(r), self.blocking[r]
        bounds = {lo, hi, *extent, *(x for e in self.excluded for x in e)}
        for a in mine:
            bounds |= {start[a, r], end[a, r], last_progress[a, r]}
        for rec in [*(s for _, s in steps), *blocking]:
            bounds |= {rec["start"], rec["end"]}
        bounds |= {x for c in self.compile_runs[r] for x in c}
        edges = sorted(b for b in bounds if max(lo, extent[0]) <= b <= min(hi, extent[1]))
        for x, y in zip(edges, edges[1:], strict=False):
            t = (x + y) / 2
            if self.is_excluded(t):
                continue
            parts.total_s += y - x
            cover = [s["category"] for s in blocking if s["start"] < t < s["end"]]
            stepping = [(a, s) for a, s in steps if s["start"] < t < s["end"]]
            if cover:  # 1. blocking spans: the highest precedence
                parts.add(min(cover, key=precedence_key), y - x)
            elif any(c0 < t < c1 for c0, c1 in self.compile_runs[r]):  # 2. inferred compile
                parts.add("compile", y - x)
            elif stepping:  # 3. a step
                a, s = stepping[0]
                committed = self.committed(a, s["step"])
                parts.add("goodput" if committed else "wasted_progress", y - x)
            elif any(
                self.status[a][0] in FAILED and last_progress[a, r] < t < end[a, r] for a in mine
            ):  # 4. the partial step at a crash: after the last progress P
                parts.add("wasted_progress", y - x)
            elif any(g0 < t < g1 for g0, g1 in gaps):  # 5. between attempts
                parts.add("infra_recovery", y - x)
            else:  # 6.
                parts.add("other", y - x)
        for _, s in steps:
            if s["start"] < hi and s["end"] > lo:  # overlaps: shares some time with it
                parts.steps += 1
                parts.tokens += s.get("tokens", 0)
        for _, s in steps:  # the hooks' own time, charged at the step's end
            hook = s.get("hook_overhead_s")
            if hook and lo < s["end"] <= hi and not self.is_excluded(s["end"]):
                parts.add("other", -hook)
                parts.add("observability", hook)
        customs = {k[2] for k in self.db.spans if k[2].startswith("custom:")}
        for c in customs:
            parts.badput_s.setdefault(c, 0.0)
        return parts

    def disruptions(self) -> list[Disruption]:
        """Section 4: one per failed or stalled attempt, seen from the run's rank."""
        out = []
        r = self.slowest
        for a in self.attempts:
            if self.status[a][0] not in FAILED or r is None:
                continue
            wasted = sum(
                1
                for (a2, r2, n) in self.db.steps
                if (a2, r2) == (a, r) and not self.committed(a, n)
            )
            when = self.end[a, r] if (a, r) in self.attempt_ranks else None
            out.append(Disruption(a, self.status[a][1] or "", when, wasted))
        return out

    def account(self, window: Interval | None = None, rank: int | None = None) -> Accounting:
        figures = self.whole
        if window is not None:
            figures = {r: self.charge(r, *window) for r in self.ranks}
        chosen = self.slowest if rank is None else rank
        keys = self.attempt_ranks
        extent = (
            (min(self.start[k] for k in keys), max(self.end[k] for k in keys)) if keys else None
        )
        return Accounting(
            ranks=figures,
            rank=self.slowest,
            run=figures.get(chosen, Parts()) if chosen is not None else Parts(),
            disruptions=self.disruptions(),
            status=self.status,
            extent=extent,
        )


def account(
    records: Iterable[dict[str, Any]],
    now: float,
    window: Interval | None = None,
    rank: int | None = None,
) -> Accounting:
    """The figures of the whole run (window None) or of the window `(lo, hi)`, per rank; `run`
    holds those of `rank` (default: the run's slowest rank, section 1)."""
    return Reference(records, now).account(window, rank)
