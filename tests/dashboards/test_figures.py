from __future__ import annotations

from typing import Any

from dashboards import figures
from dashboards.pages import goodput_page


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


def test_page_escapes_run_names() -> None:
    run = {"run_id": "r1", "name": "<script>alert(1)</script>", "status": "running"}
    html = goodput_page(run, [run])
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_page_without_runs_says_so() -> None:
    assert "no runs yet" in goodput_page(None, [])
    page = goodput_page(None, [], "http://10.0.0.7:8787")
    assert "goodput train --server http://10.0.0.7:8787" in page  # what to do, and where
    assert 'id="step_time"' not in page and "<select" not in page  # no empty charts, no picker


def test_page_attributes_and_picker_escape_what_a_run_holds() -> None:
    import html as htmllib
    import json
    import re

    run = {"run_id": "r-1", "name": "a \"quoted\" <b>&'name'", "status": "running"}
    other = {"run_id": "r-2", "name": "</option><script>x()</script>", "status": "failed"}
    page = goodput_page(run, [run, other])
    assert "<script>x()</script>" not in page and "<b>" not in page
    attr = re.search(r'data-run-id="([^"]*)"', page)
    assert attr is not None and json.loads(htmllib.unescape(attr.group(1))) == "r-1"
    options = re.findall(r'<option value="([^"]*)"( selected)?>([^<]*)</option>', page)
    assert [(v, bool(s)) for v, s, _ in options] == [("r-1", True), ("r-2", False)]
    assert htmllib.unescape(options[1][2]) == "</option><script>x()</script> (r-2)"
