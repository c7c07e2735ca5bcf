"""The goodput timeline (services/timeline.py): its merged bars against brute force.

- `merge` against the rule read literally: intervals at a distance below the resolution are
  connected, a bar is a connected component (pairwise, O(n^2)).
- On generated multi-rank timelines (the accounting properties' generator, without the
  hooks' own time and excluded windows, which the timeline does not draw), through the real
  ingest: per rank and category the bars' charged seconds equal the brute-force reference of
  docs/ACCOUNTING.md (tests/service/accounting_reference.py) within 1e-6 s; every blocking
  span lies inside a bar of its row and category; bars of one row and category are at
  least a resolution apart, and none bridges a gap of a resolution or more.
- A run with a span per step (the dense path: probed, not read) and one with a gap in it
  (summed run by run): the same totals, a bounded number of bars.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.services import timeline
from service.store.db import session_scope
from tests import factories as f
from tests.service.accounting_reference import Reference
from tests.service.test_accounting_properties import Features, Timeline, timelines

TOL = 1e-6


# ---- merge, against the rule read literally -------------------------------------------


def components(pieces: list[timeline.Piece], res: float) -> list[tuple[Any, ...]]:
    """Bars by the definition: two intervals of one row and category are joined when the
    distance between them is below `res`; a bar is a connected component."""
    n = len(pieces)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(n):
            a, b = pieces[i], pieces[j]
            if (a.row, a.category) != (b.row, b.category):
                continue
            distance = max(0.0, max(a.start, b.start) - min(a.end, b.end))
            if distance < res:
                parent[find(i)] = find(j)
    groups: dict[int, list[timeline.Piece]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(pieces[i])
    return sorted(
        (
            g[0].row,
            g[0].category,
            min(p.start for p in g),
            max(p.end for p in g),
            round(sum(p.covered_s for p in g), 9),
            sum(p.n for p in g),
        )
        for g in groups.values()
    )


@given(st.integers(0, 2**32), st.integers(1, 60), st.floats(0.01, 5.0))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_merge_joins_exactly_what_lies_closer_than_the_resolution(
    seed: int, n: int, res: float
) -> None:
    rnd = random.Random(seed)
    pieces = []
    for _ in range(n):
        start = rnd.uniform(0, 100)
        end = start + rnd.choice([0.0, rnd.uniform(0, 3), rnd.uniform(0, 20)])
        pieces.append(
            timeline.Piece(
                rnd.randrange(2), rnd.choice("ab"), start, end, rnd.uniform(0, end - start)
            )
        )
    got = sorted(
        (b.row, b.category, b.start, b.end, round(b.covered_s, 9), b.n)
        for b in timeline.merge(pieces, res)
    )
    assert got == components(pieces, res)


def test_bars_past_the_budget_coarsen_until_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline, "MAX_BARS", 10)
    pieces = [timeline.Piece(0, "data_stall", 10.0 * i, 10.0 * i + 1, 1.0) for i in range(100)]
    bars, res = timeline.bounded(pieces, 1.0)
    assert len(bars) <= 10 and res > 9.0  # gaps of 9 s bridged
    assert sum(b.covered_s for b in bars) == 100.0


# ---- through the service, against the brute-force reference -------------------------------

NO_HOOKS = Features(hooks=False, excluded_windows=False)


@pytest.fixture
def sessions(app: Any, client: Any) -> Iterator[Any]:
    """A unit of work of the app under test, after what the client posted."""

    def opened() -> Any:
        return session_scope(app.state.sessionmaker)

    yield opened


def post(client: Any, records: list[dict[str, Any]]) -> None:
    r = client.post("/api/v1/ingest", json={"records": records})
    assert r.status_code == 200, r.text


def blocking(
    records: list[dict[str, Any]],
) -> dict[tuple[int, int, str], list[tuple[float, float]]]:
    """The stored blocking spans by (attempt, rank, category): one per natural key."""
    seen: dict[tuple[int, int, str, float], tuple[float, float]] = {}
    for r in records:
        if r["kind"] == "span" and not r.get("overlapped", False):
            key = (r.get("attempt", 0), r.get("rank", 0), r["category"], r["start"])
            seen.setdefault(key, (r["start"], r["end"]))
    out: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    for (a, rk, c, _), iv in seen.items():
        out.setdefault((a, rk, c), []).append(iv)
    return out


def errors(tl: timeline.Timeline, records: list[dict[str, Any]], now: float) -> list[str]:
    ref = Reference(records, now)
    errs = []
    row_of = {(r.attempt, r.rank): i for i, r in enumerate(tl.rows)}
    sums: dict[tuple[int, str], float] = {}
    for b in tl.bars:
        rank = tl.rows[b.row].rank
        sums[rank, b.category] = sums.get((rank, b.category), 0.0) + b.covered_s
    for rank, parts in ref.whole.items():
        want = {"goodput": parts.goodput_s, **parts.badput_s}
        for cat in sorted(set(want) | {c for r, c in sums if r == rank}):
            got = sums.get((rank, cat), 0.0)
            if abs(got - want.get(cat, 0.0)) > TOL:
                errs.append(f"rank {rank} {cat}: bars {got:g} != reference {want.get(cat, 0):g}")
    res = tl.resolution_s
    bars: dict[tuple[int, str], list[timeline.Piece]] = {}
    for b in tl.bars:
        bars.setdefault((b.row, b.category), []).append(b)
    for (a, rank, cat), spans in blocking(records).items():
        mine = bars.get((row_of[a, rank], cat), [])
        for s, e in spans:
            if not any(b.start <= s and e <= b.end for b in mine):
                errs.append(f"attempt {a} rank {rank} {cat} [{s}, {e}] in no bar")
        if cat == "compile":
            continue  # its bars hold inferred compile too
        for b in mine:
            inside = sorted((s, e) for s, e in spans if b.start <= s and e <= b.end)
            reach = inside[0][1]
            for s, e in inside[1:]:
                if s - reach >= res * (1 + 1e-9):
                    errs.append(f"{cat} bar [{b.start}, {b.end}] bridges a gap of {s - reach:g}")
                reach = max(reach, e)
    for (row, cat), mine in bars.items():
        for x, y in zip(mine, mine[1:], strict=False):
            if y.start - x.end < res * (1 - 1e-9):
                errs.append(f"row {row} {cat}: bars {x.end:g} and {y.start:g} closer than {res:g}")
    return errs


@given(tl_in=timelines(NO_HOOKS))
@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_bars_charge_what_the_reference_charges(
    client: Any, sessions: Any, tl_in: Timeline
) -> None:
    run_id = "tl-" + uuid.uuid4().hex[:16]
    records = [{**r, "run_id": run_id} for r in tl_in.records]
    for batch in tl_in.batches:
        post(client, [records[i] for i in batch])
    now = time.time()
    with sessions() as s:
        tl = timeline.timeline(s, run_id)
    errs = errors(tl, records, now)
    assert not errs, "\n".join(errs[:20]) + f"\nin {tl_in!r}"


# ---- long runs: bounded, and still exact -------------------------------------------------


def stalled_steps(run_id: str, n: int, skip: range = range(0)) -> list[dict[str, Any]]:
    """A completed attempt of `n` 1-second steps every 2 s, each after a 0.5 s data stall
    (none for the steps in `skip`), a checkpoint save every 500 steps."""
    recs = [f.run(run_id), f.attempt_start(run_id), f.span("startup", f.T0, f.T0 + 9, run_id)]
    for i in range(n):
        t = f.T0 + 10 + 2 * i
        if i not in skip:
            recs.append(f.span("data_stall", t - 0.5, t, run_id, step=i))
        recs.append(f.step(i, run_id))
        if i % 500 == 499:
            recs.append(f.span("checkpoint_save", t + 1, t + 1.25, run_id, step=i))
    recs.append(f.attempt_end(run_id, f.T0 + 10 + 2 * n))
    return recs


@pytest.mark.parametrize("skip", [range(0), range(2000, 2100)], ids=["dense", "with-a-gap"])
def test_a_span_per_step_gives_a_few_bars_with_the_exact_seconds(
    client: Any, sessions: Any, skip: range
) -> None:
    run_id = "tl-long-" + uuid.uuid4().hex[:8]
    records = stalled_steps(run_id, 4000, skip)
    for i in range(0, len(records), 5000):
        post(client, records[i : i + 5000])
    g = client.get(f"/api/v1/runs/{run_id}/goodput").json()
    with sessions() as s:
        tl = timeline.timeline(s, run_id)
    stalls = [b for b in tl.bars if b.category == "data_stall"]
    # a stall every 2 s merges whole; the 200 s without stalls is wider than the resolution
    assert len(stalls) == (1 if not skip else 2)
    assert sum(b.n for b in stalls) == 4000 - len(skip)
    for cat in ("data_stall", "checkpoint_save", "startup"):
        got = sum(b.covered_s for b in tl.bars if b.category == cat)
        assert abs(got - g["badput_s"][cat]) < TOL, cat
    assert abs(sum(b.covered_s for b in tl.bars if b.category == "goodput") - g["goodput_s"]) < TOL
    spans = blocking(records)[0, 0, "data_stall"]
    assert all(any(b.start <= s and e <= b.end for b in stalls) for s, e in spans)
    if skip:
        gap = stalls[1].start - stalls[0].end
        assert gap == pytest.approx(2 * (len(skip) + 1) - 0.5)  # the stalls missing
        assert gap >= tl.resolution_s


def test_past_the_row_budget_the_runs_rank_is_kept(client: Any, sessions: Any) -> None:
    run_id = "tl-wide-" + uuid.uuid4().hex[:8]
    recs = [f.run(run_id)]
    for rank in range(60):
        recs.append(f.attempt_start(run_id, rank=rank, world_size=60))
        recs += [f.step(i, run_id, rank=rank) for i in range(2)]
        end = f.T0 + (25 if rank == 59 else 20)  # the longest rank: the run's rank
        recs.append(f.attempt_end(run_id, end, rank=rank))
    post(client, recs)
    with sessions() as s:
        tl = timeline.timeline(s, run_id)
    assert len(tl.rows) == timeline.MAX_ROWS and tl.ranks_total == 60
    assert 59 in tl.ranks_shown and tl.ranks_shown[:3] == [0, 1, 2]


def test_the_rolling_window_reads_well_and_fits_the_run() -> None:
    assert timeline.rolling_window_s(30.0) == 0.8
    assert timeline.rolling_window_s(3600.0) == 120.0
    assert timeline.rolling_window_s(400_000.0) == 14_400.0
    assert timeline.rolling_window_s(100 * 86_400.0) == 3 * 86_400.0
    for extent in (1.0, 30.0, 3600.0, 400_000.0, 1e7):
        assert 10 <= math.ceil(extent / timeline.rolling_window_s(extent)) <= 40
