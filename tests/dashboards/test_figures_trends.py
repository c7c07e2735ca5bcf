"""The trends page's figures and the runs page's table (dashboards/figures/trends.py and
runs.py), on hand-built rows, the empty cases included."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dashboards.figures import runs as table
from dashboards.figures import trends
from dashboards.figures.common import CATEGORY_COLORS, GOOD, OTHER

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def row(run_id: str, created_at: float, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run_id": run_id,
        "name": run_id,
        "project": "p",
        "status": "completed",
        "created_at": created_at,
        "tags": [],
        "total_s": 100.0,
        "goodput_s": 60.0,
        "goodput_fraction": 0.6,
        "badput_s": {"startup": 10.0, "data_stall": 20.0, "eval": 0.0},
        "other_s": 10.0,
        "tokens_per_s": 1234.5,
        "mfu": 0.41,
        "peak_memory_bytes": 3 * 2**30,
        "drop_rate": 0.0125,
        "max_vio": 0.5,
        "routing_records": 10,
        "attempts": 1,
        "lane": "grouped",
        "pattern": "AEME",
    }
    return {**base, **kw}


RUNS = [row("late", T0 + 7 * 86_400, goodput_fraction=0.5), row("early", T0)]


def test_a_trend_puts_each_run_at_its_start_oldest_first_and_names_it() -> None:
    fig = trends.goodput_trend(RUNS, base="/gp")
    (trace,) = fig.data
    assert list(trace.y) == [60.0, 50.0]
    assert list(trace.x) == [
        datetime.fromtimestamp(T0, UTC),
        datetime.fromtimestamp(T0 + 7 * 86_400, UTC),
    ]
    assert list(trace.text) == ["early", "late"]
    assert list(trace.customdata) == ["/gp/runs/early/goodput", "/gp/runs/late/goodput"]
    assert "%{text}" in trace.hovertemplate
    assert fig.layout.xaxis.title.text == "run start (UTC)"


def test_hover_text_shows_a_hostile_name_as_text() -> None:
    fig = trends.goodput_trend([row("r/1", T0, name="<script>alert(1)</script>")])
    assert fig.data[0].text[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert fig.data[0].customdata[0] == "/runs/r%2F1/goodput"


def test_runs_without_the_figure_are_left_out_and_none_says_why() -> None:
    fig = trends.trend_figures([row("a", T0, mfu=None), row("b", T0 + 1, mfu=0.5)])["mfu"]
    assert list(fig.data[0].y) == [50.0]
    none = trends.trend_figures([row("a", T0, mfu=None)])["mfu"]
    assert none.data == () and "peak_flops_per_s" in none.layout.annotations[0].text
    # A third of the page wide, the note is wrapped (Plotly does not wrap annotations).
    lines = none.layout.annotations[0].text.split("<br>")
    assert len(lines) > 1 and max(len(line) for line in lines) <= 36


def test_every_chart_of_no_runs_says_no_runs_match() -> None:
    figs = trends.trend_figures([])
    assert set(figs) == {"goodput", "mix", "tokens", "mfu", "memory", "drop_rate", "max_vio"}
    for fig in figs.values():
        assert fig.data == () and fig.layout.annotations[0].text == "no runs match"


def test_every_chart_shares_one_calendar_range_over_all_the_runs() -> None:
    figs = trends.trend_figures([row("a", T0, mfu=None), row("b", T0 + 100 * 3600)])
    lo, hi = figs["goodput"].layout.xaxis.range
    assert figs["mfu"].layout.xaxis.range == (lo, hi)  # though only b has an MFU
    assert lo == datetime.fromtimestamp(T0 - 4 * 3600, UTC)  # padded by 4% of the span
    assert hi == datetime.fromtimestamp(T0 + 104 * 3600, UTC)
    assert trends.x_range([row("a", T0)]) == [
        datetime.fromtimestamp(T0 - 3600, UTC),
        datetime.fromtimestamp(T0 + 3600, UTC),
    ]


def test_units_percent_and_gib() -> None:
    figs = trends.trend_figures([row("a", T0)])
    assert figs["drop_rate"].data[0].y[0] == pytest.approx(1.25)
    assert figs["mfu"].data[0].y[0] == pytest.approx(41.0)
    assert figs["memory"].data[0].y[0] == pytest.approx(3.0)
    assert figs["tokens"].data[0].y[0] == 1234.5
    assert figs["max_vio"].data[0].y[0] == 0.5


def test_the_badput_mix_stacks_to_the_whole_of_each_run() -> None:
    runs = [
        row("a", T0),
        row(
            "b",
            T0 + 60,
            goodput_s=50.0,
            badput_s={"checkpoint_save": 30.0},
            other_s=-5.0,
            total_s=75.0,
        ),
        row("idle", T0 + 120, total_s=0.0, goodput_s=0.0, badput_s={}, other_s=0.0),
    ]
    fig = trends.badput_mix(runs)
    labels = [t.name for t in fig.data]
    # goodput first, the categories any run has (largest share first), the rest last
    assert labels == ["goodput", "checkpoint_save", "data_stall", "startup", "other (unattributed)"]
    assert all(t.stackgroup == "mix" for t in fig.data)
    for i in range(2):  # the idle run (no time) is left out
        assert sum(t.y[i] for t in fig.data) == pytest.approx(100.0)
    assert [t.y[1] for t in fig.data] == pytest.approx([50 / 0.75, 40.0, 0.0, 0.0, -5 / 0.75])
    colors = {t.name: t.line.color for t in fig.data}
    assert colors["goodput"] == GOOD and colors["other (unattributed)"] == OTHER
    assert colors["startup"] == CATEGORY_COLORS["startup"]
    assert colors["checkpoint_save"] == CATEGORY_COLORS["checkpoint_save"]


def test_the_badput_mix_of_runs_without_time_says_so() -> None:
    fig = trends.badput_mix([row("idle", T0, total_s=0.0)])
    assert fig.data == () and "no run has recorded time" in fig.layout.annotations[0].text


def test_custom_categories_get_colors_of_their_own() -> None:
    assert trends.category_color("custom:a", 0) != trends.category_color("custom:b", 1)
    assert trends.category_color("infra_recovery") == CATEGORY_COLORS["infra_recovery"]


# -- the runs table --


def test_a_runs_row_links_its_pages_and_sorts_by_the_numbers() -> None:
    r = row("a b", T0, total_s=3725.0, goodput_s=2235.0)
    cells = dict(zip([c for c, _ in table.COLUMNS], table.run_row(r, "/gp"), strict=False))
    assert cells["name"] == {"text": "a b", "href": "/gp/runs/a%20b/goodput", "title": "a b"}
    assert cells["started (UTC)"] == {
        "text": "2026-09-21 14:13",
        "sort": T0,
        "title": "2026-09-21 14:13:20 UTC",
    }
    assert cells["duration"] == {"text": "1 h 02 min", "sort": 3725.0}
    assert cells["goodput"]["text"] == "60.0%" and cells["goodput"]["sort"] == 0.6
    assert cells["tokens/s"] == {"text": "1,234", "sort": 1234.5}  # rounds half to even
    assert cells["drop rate"]["text"] == "1.25%" and cells["MaxVio"]["text"] == "0.500"
    links = table.run_row(r, "/gp")[-1]  # one cell, three links
    assert [c["href"] for c in links] == [
        "/gp/runs/a%20b/performance",
        "/gp/runs/a%20b/routing",
        "/gp/runs/a%20b/receipt",
    ]


def test_missing_figures_are_blank_cells_not_zeros() -> None:
    r = row(
        "a",
        T0,
        total_s=0.0,
        goodput_fraction=None,
        tokens_per_s=None,
        drop_rate=None,
        max_vio=None,
        lane=None,
    )
    cells = dict(zip([c for c, _ in table.COLUMNS], table.run_row(r, ""), strict=False))
    for label in ("duration", "goodput", "tokens/s", "drop rate", "MaxVio", "lane"):
        assert cells[label] is None, label


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.04, "0.0 s"),
        (59.94, "59.9 s"),
        (61, "1 min 01 s"),
        (7322, "2 h 02 min"),
        (2 * 86_400 + 4 * 3600 + 5, "2 d 04 h"),
    ],
)
def test_durations_read_as_a_person_would_say_them(seconds: float, text: str) -> None:
    assert table.duration_text(seconds) == text


def test_the_table_selects_runs_by_id_and_words_its_empty_cases() -> None:
    spec = table.runs_table(RUNS, "", filtered=False)
    assert spec["select"] == ["late", "early"] and spec["sortable"] is True
    assert len(spec["columns"]) == len(spec["rows"][0])
    assert table.runs_table([], "", filtered=True)["empty"].startswith("No runs match")
    assert table.runs_table([], "", filtered=False)["empty"] == "No runs yet."
    flagged = table.runs_table([row("f", T0, status="failed")], "", filtered=False)
    assert flagged["flags"] == [True]
