from __future__ import annotations

from typing import Any

from dashboards.figures import goodput as figures
from dashboards.figures import timeline as gantt


def summary(**kw: Any) -> dict[str, Any]:
    base = {
        "run_id": "r",
        "total_s": 10.0,
        "goodput_s": 6.0,
        "goodput_fraction": 0.6,
        "badput_s": {"startup": 1.0, "data_stall": 2.0, "eval": 0.0},
        "other_s": 1.0,
    }
    return {**base, **kw}


def test_headline_stacks_the_wall_time_in_percent_and_says_the_goodput() -> None:
    fig = figures.goodput_headline(summary())
    assert [t.name for t in fig.data] == [
        "goodput",
        "data_stall",
        "startup",
        "other (unattributed)",
    ]
    assert [t.x[0] for t in fig.data] == [60.0, 20.0, 10.0, 10.0]  # of 10 s, summing to 100
    assert fig.layout.barmode == "stack"
    assert fig.layout.title.text == "Goodput 60.0% · 6.00 s of 10.00 s"
    assert {t.type for t in fig.data} <= {"bar"}  # in the cartesian bundle (pages.TRACE_TYPES)


def test_badput_rows_skip_zero_categories_and_order_by_size() -> None:
    rows = figures.badput_rows(summary())
    assert [r.label for r in rows] == ["goodput", "data_stall", "startup", "other (unattributed)"]
    assert sum(r.seconds for r in rows) == 10.0


def test_badput_breakdown_bars_cover_the_total() -> None:
    fig = figures.badput_breakdown(summary())
    assert sum(fig.data[0].x) == 10.0


def test_negative_other_is_shown_not_hidden() -> None:
    rows = figures.badput_rows(summary(other_s=-0.5))
    assert rows[-1].seconds == -0.5


def test_each_attempt_is_its_own_trace_and_each_restart_is_marked() -> None:
    pts = [
        {"step": s, "attempt": a, "step_time_s": 0.1, "loss": 1.0, "start": 1e9 + s}
        for a, steps in ((0, range(0, 6)), (1, range(4, 8)))
        for s in steps
    ]
    fig = figures.step_time_series(pts, "step", {0: "failed"})
    names = [t.name for t in fig.data]
    assert names == [
        "step time (ms) · attempt 0",
        "step time (ms) · attempt 1",
        "loss · attempt 0",
        "loss · attempt 1",
    ]
    assert list(fig.data[1].x) == [4, 5, 6, 7]  # no line back from step 5 to step 4
    assert [s.x0 for s in fig.layout.shapes] == [4]
    assert fig.layout.annotations[0].text == "attempt 1 (after: failed)"
    hostile = figures.step_time_series(pts, "step", {0: "failed: <a href='x'>oom</a>"})
    assert hostile.layout.annotations[0].text == (
        "attempt 1 (after: failed: &lt;a href='x'&gt;oom&lt;/a&gt;)"
    )
    wall = figures.step_time_series(pts, "time")
    assert wall.data[0].x[0].timestamp() == 1e9 and wall.layout.xaxis.title.text.startswith("wall")


def test_step_time_series_plots_milliseconds_and_loss() -> None:
    pts = [{"step": i, "step_time_s": 0.01 * (i + 1), "loss": 3.0 - i} for i in range(3)]
    fig = figures.step_time_series(pts)
    assert list(fig.data[0].y) == [10.0, 20.0, 30.0]
    assert list(fig.data[1].y) == [3.0, 2.0, 1.0]


def test_empty_data_gives_empty_figures_with_a_note() -> None:
    empty = summary(total_s=0.0, goodput_s=0.0, goodput_fraction=None, badput_s={}, other_s=0.0)
    for fig in (
        figures.goodput_headline(empty),
        figures.badput_breakdown(empty),
        figures.step_time_series([]),
    ):
        assert len(fig.data) == 0
        assert "no " in fig.layout.annotations[0].text


def test_the_ideal_step_time_is_a_line_not_a_trace() -> None:
    pts = [{"step": i, "attempt": 0, "step_time_s": 0.5, "loss": None} for i in range(3)]
    fig = figures.step_time_series(pts, "step", None, 0.25)
    assert len(fig.data) == 1
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(250.0, 250.0)]
    assert fig.layout.annotations[-1].text == "ideal 250.0 ms"


# -- cards and tables --


def test_cards_read_like_a_person_writes_them() -> None:
    texts = figures.cards(
        summary(
            steps=1_000_037,
            tokens=32_769_212_416,
            ideal_step_time_s=0.35,
            step_time_deviation_s=0.0197,
            rank=3,
            total_s=400_000.0,
        )
    )
    assert texts["card-goodput"] == "60.0 %"
    assert texts["card-total"] == "4.63 d"
    assert texts["card-steps"] == "1,000,037"
    assert texts["card-tokens"] == "32.8 G"
    assert texts["card-ideal"] == "350.0 ms"
    assert texts["card-deviation"] == "+19.7 ms"
    assert texts["card-rank"] == "3"
    none = figures.cards({"goodput_fraction": None})
    assert none["card-goodput"] == none["card-ideal"] == none["card-steps"] == "–"


def test_durations_pick_their_unit() -> None:
    assert [figures.duration(x) for x in (0.0123, 12.345, 300, 9000, 400_000, -0.5)] == [
        "12.3 ms",
        "12.35 s",
        "5.0 min",
        "2.50 h",
        "4.63 d",
        "-500.0 ms",
    ]


def test_the_disruption_table_has_a_row_per_failed_attempt() -> None:
    t = figures.disruption_table(
        [{"attempt": 0, "time": 1_790_000_000.0, "cause": "oom", "wasted_steps": 37}]
    )
    assert t["rows"] == [[0, "2026-09-21 14:13:20", "oom", 37]]
    assert "no disruption" in figures.disruption_table([])["empty"]


def test_stragglers_are_flagged_and_an_empty_table_says_why() -> None:
    t = figures.straggler_table([{"rank": 3, "median_step_time_s": 0.5, "slower_by": 0.25}], 8)
    assert t["rows"] == [[3, {"text": "500.0 ms", "sort": 0.5}, {"text": "25.0 %", "sort": 0.25}]]
    assert t["flags"] == [True]
    assert "one rank" in figures.straggler_table([], 1)["empty"]
    assert "8 ranks" in figures.straggler_table([], 8)["empty"]


# -- rolling goodput --


def window(i: int, fraction: float | None, total: float = 10.0) -> dict[str, Any]:
    good = 0.0 if fraction is None else fraction * total
    return {
        "start": 1e9 + 10 * i,
        "end": 1e9 + 10 * (i + 1),
        "total_s": total,
        "goodput_s": good,
        "goodput_fraction": fraction,
        "steps": 3,
    }


def test_rolling_goodput_draws_each_window_and_marks_the_restart() -> None:
    fig = figures.rolling_goodput(
        [window(0, 0.5), window(1, 1.0), window(2, 0.25)],
        10.0,
        {0: 1e9, 1: 1e9 + 17},
        {0: "failed: oom"},
        0.6,
    )
    assert list(fig.data[0].y) == [50.0, 100.0, 25.0]
    assert fig.data[0].x[0].timestamp() == 1e9 + 5  # the middle of the window
    assert [s.x0.timestamp() for s in fig.layout.shapes if s.type == "line" and s.x0] == [1e9 + 17]
    texts = [a.text for a in fig.layout.annotations]
    assert "attempt 1 (after: failed: oom)" in texts and "whole run 60.0 %" in texts
    assert "10.00 s windows" in fig.layout.title.text


def test_rolling_goodput_without_time_says_so() -> None:
    for windows in ([], [window(0, None, total=0.0)]):
        fig = figures.rolling_goodput(windows, 10.0)
        assert len(fig.data) == 0 and "no time" in fig.layout.annotations[0].text


# -- the timeline --

T = 1_790_000_000.0


def two_attempts() -> dict[str, Any]:
    """Attempt 0 crashed (oom, with markup in its cause), attempt 1 completed, one rank."""
    bar = lambda row, cat, a, b, covered, n=1: {  # noqa: E731
        "row": row,
        "category": cat,
        "start": T + a,
        "end": T + b,
        "covered_s": covered,
        "n": n,
    }
    return {
        "extent": [T, T + 100],
        "resolution_s": 0.5,
        "rows": [
            {
                "attempt": 0,
                "rank": 0,
                "start": T,
                "end": T + 40,
                "status": "failed",
                "cause": "<b>oom</b>",
            },
            {
                "attempt": 1,
                "rank": 0,
                "start": T + 50,
                "end": T + 100,
                "status": "completed",
                "cause": None,
            },
        ],
        "bars": [
            bar(0, "goodput", 10, 30, 18.0),
            bar(0, "data_stall", 10, 30, 2.0, 20),
            bar(0, "startup", 0, 10, 10.0),
            bar(0, "wasted_progress", 30, 40, 10.0, 5),
            bar(0, "infra_recovery", 40, 50, 10.0),
            bar(1, "goodput", 60, 100, 40.0),
            bar(1, "compile", 55, 55.1, 0.1),
            bar(1, "custom:<x>", 50, 55, 5.0),
        ],
        "crashes": [{"row": 0, "time": T + 40, "cause": "failed: <b>oom</b>"}],
        "excluded": [[T + 90, T + 95]],
        "ranks_shown": [0],
        "ranks_total": 1,
    }


def test_the_timeline_has_a_row_per_attempt_rank_and_marks_the_crash() -> None:
    fig = gantt.goodput_timeline(two_attempts())
    extents = fig.data[0]
    assert list(extents.y) == ["attempt 0 · rank 0", "attempt 1 · rank 0"]
    assert list(extents.x) == [40_000.0, 50_000.0]  # ms, from each row's start (its base)
    names = [t.name for t in fig.data]
    assert names[1:] == [
        "goodput",
        "startup",
        "compile",
        "data stall",
        "wasted progress",
        "recovery gap",
        "custom:&lt;x&gt;",
        "crash",
    ]
    crash = fig.data[-1]
    assert list(crash.y) == ["attempt 0 · rank 0"] and crash.x[0].timestamp() == T + 40
    assert list(crash.text) == ["failed: &lt;b&gt;oom&lt;/b&gt;"]  # a run's string, escaped
    recovery = next(t for t in fig.data if t.name == "recovery gap")
    assert recovery.marker.pattern.shape == "/"
    assert [v.x0.timestamp() for v in fig.layout.shapes] == [T + 90]  # the excluded window


def test_timeline_bars_are_shaded_by_density_and_drawn_at_least_two_resolutions_wide() -> None:
    fig = gantt.goodput_timeline(two_attempts())
    by_name = {t.name: t for t in fig.data}
    stall = by_name["data stall"]
    assert list(stall.marker.opacity) == [gantt.MIN_OPACITY]  # 2 s of 20: paler than 0.45
    assert list(by_name["goodput"].marker.opacity) == [0.9, 1.0]
    assert list(by_name["compile"].x) == [1000.0]  # 0.1 s drawn as 2 resolutions of 0.5 s
    assert list(stall.customdata[0][:2]) == [2.0, 20]  # the exact seconds and count, on hover
    bars = gantt.timeline_bars(two_attempts())
    assert bars[3] == gantt.TimelineBar(
        "attempt 0 · rank 0", "wasted_progress", T + 30, T + 40, 10.0, 5
    )


def test_an_empty_timeline_says_what_to_do() -> None:
    fig = gantt.goodput_timeline({"rows": [], "bars": []})
    assert len(fig.data) == 0 and "no attempts" in fig.layout.annotations[0].text
