from __future__ import annotations

from typing import Any

from dashboards.figures import goodput as figures


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


def test_headline_shows_the_goodput_percentage() -> None:
    fig = figures.goodput_headline(summary())
    assert fig.data[0].value == 60.0
    assert "6.00 s of 10.00 s" in fig.data[0].title.text


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
