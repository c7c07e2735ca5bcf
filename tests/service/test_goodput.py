"""The goodput calculator on hand-built records (the raw-records definition,
service/goodput_window.run_goodput, over goodput.py's arithmetic)."""

from __future__ import annotations

import math

import pytest

from service.calc import goodput_window
from service.calc.goodput import (
    AttemptIn,
    CheckpointIn,
    GoodputInputs,
    RankGoodput,
    RunGoodput,
    SpanIn,
    StepIn,
)

T = 1_790_000_000.0
NOW = T + 1e6


def run_goodput(inputs: GoodputInputs) -> RunGoodput:
    return goodput_window.run_goodput(inputs, NOW)


def rank_goodput(
    rank: int,
    attempts: list[AttemptIn],
    steps: list[StepIn],
    spans: list[SpanIn],
    checkpoints: list[CheckpointIn] | None = None,
) -> RankGoodput:
    g = run_goodput(GoodputInputs(attempts, steps, spans, checkpoints or []))
    return next(r for r in g.ranks if r.rank == rank)


def st(n: int, start: float, end: float, attempt: int = 0, rank: int = 0) -> StepIn:
    return StepIn(attempt, rank, n, T + start, T + end, 100, 1.0)


def sp(
    cat: str, start: float, end: float, attempt: int = 0, rank: int = 0, overlapped: bool = False
) -> SpanIn:
    return SpanIn(attempt, rank, cat, T + start, T + end, overlapped)


def at(
    start: float,
    end: float | None,
    status: str | None = "completed",
    attempt: int = 0,
    rank: int = 0,
) -> AttemptIn:
    return AttemptIn(attempt, rank, T + start, None if end is None else T + end, status)


def assert_adds_up(g: object) -> None:
    parts = g.goodput_s + sum(g.badput_s.values()) + g.other_s  # type: ignore[attr-defined]
    assert math.isclose(parts, g.total_s, rel_tol=0, abs_tol=1e-9)  # type: ignore[attr-defined]


def test_simple_run_splits_time_into_steps_startup_stalls_and_residual() -> None:
    g = rank_goodput(
        0,
        [at(0, 20)],
        [st(0, 5, 8), st(1, 9, 12)],
        [sp("startup", 0, 4), sp("data_stall", 8, 9), sp("eval", 12, 14)],
    )
    assert g.total_s == pytest.approx(20)
    assert g.goodput_s == pytest.approx(6)
    assert g.badput_s["startup"] == pytest.approx(4)
    assert g.badput_s["data_stall"] == pytest.approx(1)
    assert g.badput_s["eval"] == pytest.approx(2)
    assert g.other_s == pytest.approx(7)
    assert g.goodput_fraction == pytest.approx(0.3)
    assert_adds_up(g)


def test_blocking_span_inside_a_step_is_taken_out_of_goodput() -> None:
    g = rank_goodput(0, [at(0, 10)], [st(0, 0, 10)], [sp("checkpoint_save", 2, 5)])
    assert g.goodput_s == pytest.approx(7)
    assert g.badput_s["checkpoint_save"] == pytest.approx(3)
    assert g.other_s == pytest.approx(0, abs=1e-9)


def test_overlapped_span_is_not_charged() -> None:
    g = rank_goodput(0, [at(0, 10)], [st(0, 0, 10)], [sp("checkpoint_save", 2, 5, overlapped=True)])
    assert g.goodput_s == pytest.approx(10)
    assert g.badput_s["checkpoint_save"] == 0


def test_failed_attempt_steps_are_wasted_and_the_gap_is_infra_recovery() -> None:
    attempts = [at(0, 10, "failed", attempt=0), at(15, 30, "completed", attempt=1)]
    steps = [st(0, 1, 4, attempt=0), st(1, 4, 7, attempt=0), st(0, 16, 20, attempt=1)]
    g = rank_goodput(0, attempts, steps, [])
    assert g.total_s == pytest.approx(30)
    assert g.badput_s["wasted_progress"] == pytest.approx(6 + 3)  # steps + the crash tail
    assert g.badput_s["infra_recovery"] == pytest.approx(5)
    assert g.goodput_s == pytest.approx(4)
    assert_adds_up(g)


def test_attempt_still_running_ends_at_the_last_record_seen() -> None:
    g = rank_goodput(0, [at(0, None, None)], [st(0, 1, 3), st(1, 3, 9)], [sp("eval", 9, 12)])
    assert g.total_s == pytest.approx(12)
    assert g.goodput_s == pytest.approx(8)


def test_nested_blocking_spans_charge_their_union_by_precedence() -> None:
    g = rank_goodput(0, [at(0, 10)], [], [sp("eval", 0, 10), sp("checkpoint_save", 2, 4)])
    assert g.badput_s["checkpoint_save"] == pytest.approx(2)
    assert g.badput_s["eval"] == pytest.approx(8)
    assert g.other_s == pytest.approx(0, abs=1e-9)
    assert_adds_up(g)


def test_equal_spans_of_two_categories_inside_a_step_are_charged_once() -> None:
    """Issue 11, item 3: step [1,2] with blocking data_stall [1,2] and custom:x [1,2]."""
    g = rank_goodput(0, [at(0, 3)], [st(0, 1, 2)], [sp("data_stall", 1, 2), sp("custom:x", 1, 2)])
    assert g.goodput_s == pytest.approx(0, abs=1e-9)
    assert g.badput_s["data_stall"] == pytest.approx(1)
    assert g.badput_s.get("custom:x", 0.0) == pytest.approx(0, abs=1e-9)
    assert all(v >= -1e-9 for v in g.badput_s.values())
    assert_adds_up(g)


def test_a_failed_rank_fails_the_attempt_on_every_rank() -> None:
    """Issue 11, item 4: rank 1 sent no end record and a last heartbeat at 3.5."""
    attempts = [
        AttemptIn(0, 0, T, T + 3, "failed", None, "NCCL timeout"),
        AttemptIn(0, 1, T, None, None, T + 3.5),
    ]
    steps = [st(0, 1, 2, rank=0), st(0, 1, 2, rank=1)]
    g = run_goodput(GoodputInputs(attempts, steps, []))
    one = next(r for r in g.ranks if r.rank == 1)
    assert one.goodput_s == pytest.approx(0, abs=1e-9)
    assert one.badput_s["wasted_progress"] == pytest.approx(1 + 1.5)  # the step, then [2, 3.5]
    assert one.total_s == pytest.approx(3.5)
    assert g.rank == 1  # the longer rank
    assert [
        (d.cause, d.wasted_steps)
        for d in goodput_window.raw_disruptions(GoodputInputs(attempts, steps, []), NOW, 1)
    ] == [("NCCL timeout", 1)]


def test_a_checkpoint_commit_is_progress_not_wasted() -> None:
    """Issue 11, item 5: step [1,2], commit of step 0 at 2.5, failed at 3."""
    ck = [CheckpointIn(0, 0, True, 0, T + 2.5)]
    g = rank_goodput(0, [at(0, 3, "failed")], [st(0, 1, 2)], [], ck)
    assert g.goodput_s == pytest.approx(1)
    assert g.badput_s["wasted_progress"] == pytest.approx(0.5)
    no_end = rank_goodput(0, [at(0, None, None)], [st(0, 1, 2)], [], ck)
    assert no_end.total_s == pytest.approx(2.5)  # the death dated at the commit, not at 2.0


def test_a_stalled_run_is_accounted_as_ended_at_its_last_sign_of_life() -> None:
    rows = [AttemptIn(0, 0, T, None, None, T + 4, None, 1.0)]
    steps = [st(n, 1 + n, 2 + n) for n in range(3)]  # 1..4, no checkpoint
    g = goodput_window.run_goodput(GoodputInputs(rows, steps, []), T + 100)
    assert g.total_s == pytest.approx(4)
    assert g.goodput_s == pytest.approx(0, abs=1e-9)  # stalled: uncommitted steps are wasted
    assert g.badput_s["wasted_progress"] == pytest.approx(3)
    fresh = goodput_window.run_goodput(GoodputInputs(rows, steps, []), T + 5)
    assert fresh.goodput_s == pytest.approx(3)  # heartbeats are recent: still running


def test_compile_is_inferred_from_the_first_steps_excess() -> None:
    steps = [st(0, 0, 5)] + [st(n, 5 + (n - 1), 5 + n) for n in range(1, 20)]
    g = rank_goodput(0, [at(0, 24)], steps, [sp("data_stall", 1, 2)])
    # first step: 5 s with 1 s blocked, busy 4 s, ideal 1 s: the first 3 unblocked seconds
    assert g.badput_s["compile"] == pytest.approx(3)
    assert g.badput_s["data_stall"] == pytest.approx(1)
    assert g.goodput_s == pytest.approx(1 + 19)
    with_records = rank_goodput(
        0, [at(0, 24)], steps, [sp("data_stall", 1, 2), sp("compile", 0, 0.5, overlapped=True)]
    )
    assert with_records.badput_s["compile"] == 0  # compile records: nothing inferred
    windowed = goodput_window.run_goodput(
        GoodputInputs([at(0, 24)], steps, [sp("data_stall", 1, 2)]), NOW, T + 0, T + 1.5
    )
    assert windowed.badput_s["compile"] == pytest.approx(1)  # [0, 1] of [0, 1] + [2, 4]
    assert windowed.badput_s["data_stall"] == pytest.approx(0.5)


def test_excluded_windows_leave_the_total_and_every_part() -> None:
    from service.calc.goodput import Interval

    inputs = GoodputInputs(
        [at(0, 20)],
        [st(0, 5, 8), st(1, 9, 12)],
        [sp("startup", 0, 4)],
        [],
        [Interval(T + 2, T + 6), Interval(T + 3, T + 7)],
    )
    g = run_goodput(inputs)
    assert g.total_s == pytest.approx(15)
    assert g.badput_s["startup"] == pytest.approx(2)
    assert g.goodput_s == pytest.approx(1 + 3)
    assert_adds_up(g)


def test_steps_without_attempt_record_infer_the_attempt() -> None:
    g = rank_goodput(0, [], [st(0, 2, 4), st(1, 4, 6)], [])
    assert g.total_s == pytest.approx(4)
    assert g.goodput_s == pytest.approx(4)


def test_run_takes_the_slowest_rank_and_keeps_every_rank() -> None:
    inputs = GoodputInputs(
        attempts=[at(0, 10, rank=0), at(0, 14, rank=1)],
        steps=[st(0, 1, 9, rank=0), st(0, 1, 13, rank=1)],
        spans=[],
    )
    g = run_goodput(inputs)
    assert g.rank == 1
    assert g.total_s == pytest.approx(14)
    assert [r.rank for r in g.ranks] == [0, 1]
    assert_adds_up(g)


def test_empty_run_has_zero_total_and_no_fraction() -> None:
    g = run_goodput(GoodputInputs([], [], []))
    assert g.total_s == 0 and g.goodput_fraction is None and g.rank is None


def test_many_steps_and_spans_still_add_up() -> None:
    steps = [st(i, 3 * i + 1, 3 * i + 3) for i in range(2000)]
    spans = [sp("data_stall", 3 * i, 3 * i + 1) for i in range(2000)]
    g = rank_goodput(0, [at(0, 6000)], steps, spans)
    assert g.goodput_s == pytest.approx(4000)
    assert g.badput_s["data_stall"] == pytest.approx(2000)
    assert_adds_up(g)


def test_checkpoint_commits_the_steps_it_covers_and_the_rest_is_wasted() -> None:
    attempts = [at(0, 20, "failed", attempt=0), at(25, 40, "completed", attempt=1)]
    steps = [st(n, 2 * n, 2 * n + 2, attempt=0) for n in range(8)]  # 0..16 s
    steps += [st(n, 25 + n, 26 + n, attempt=1) for n in range(5, 10)]
    g = rank_goodput(0, attempts, steps, [], [CheckpointIn(0, 4, True), CheckpointIn(0, 6, False)])
    # attempt 0: steps 0-4 committed (10 s), steps 5-7 wasted (6 s) plus the tail 16 -> 20 s
    assert g.badput_s["wasted_progress"] == pytest.approx(6 + 4)
    assert g.badput_s["infra_recovery"] == pytest.approx(5)
    # the newest steps take 1 s: attempt 0's first step (2 s) holds 1 s of inferred compile
    assert g.badput_s["compile"] == pytest.approx(1)
    assert g.goodput_s == pytest.approx(10 - 1 + 5)
    assert_adds_up(g)


def test_crashed_attempt_without_end_ends_at_its_last_heartbeat() -> None:
    attempts = [AttemptIn(0, 0, T + 0, None, None, T + 12), at(15, 20, "completed", attempt=1)]
    steps = [st(0, 1, 5, attempt=0), st(0, 16, 18, attempt=1)]
    g = rank_goodput(0, attempts, steps, [])
    # attempt 0 never ended but a later attempt exists: it crashed; nothing was checkpointed
    assert g.badput_s["wasted_progress"] == pytest.approx(4 + 7)
    assert g.badput_s["infra_recovery"] == pytest.approx(3)
    assert g.goodput_s == pytest.approx(2)
    assert_adds_up(g)


def test_hooks_overhead_is_charged_as_observability() -> None:
    steps = [StepIn(0, 0, n, T + 2 * n, T + 2 * n + 1, 10, None, 0.25) for n in range(4)]
    g = rank_goodput(0, [at(0, 8)], steps, [])
    assert g.badput_s["observability"] == pytest.approx(1.0)
    assert g.goodput_s == pytest.approx(4.0)
    assert g.other_s == pytest.approx(3.0)


@pytest.mark.parametrize("seed", range(20))
def test_span_index_sweep_measures_the_union_of_the_spans(seed: int) -> None:
    import random

    from service.calc.goodput import SpanIndex

    def by_definition(a: float, b: float) -> float:  # a point-by-point union, on a grid
        cuts = sorted({a, b} | {min(max(x, a), b) for s in index.spans for x in (s.start, s.end)})
        return sum(
            y - x
            for x, y in zip(cuts, cuts[1:], strict=False)
            if any(s.start <= x and y <= s.end for s in index.spans)
        )

    rng = random.Random(seed)
    spans = []
    for _ in range(rng.randint(0, 40)):  # nested, overlapping, empty and long spans
        s = rng.uniform(0, 100)
        spans.append(sp("data_stall", s, s + rng.choice([0.0, 0.01, 0.3, 2.0, 40.0])))
    index = SpanIndex(spans)
    steps = []
    for _ in range(rng.randint(0, 60)):
        s = T + rng.uniform(-5, 110)
        steps.append((s, s + rng.choice([0.0, 0.2, 1.0, 7.0])))
    got = index.overlaps(steps)
    assert got == pytest.approx([by_definition(a, b) for a, b in steps], abs=1e-6)
