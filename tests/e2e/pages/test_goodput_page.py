"""The goodput page in Chromium, on the crashed-and-resumed run: every chart and table holds
data, the timeline shows both attempts and the crash, the wall-clock link redraws."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHARTS = ("headline", "badput", "timeline", "rolling", "step_time")


def drawn(page: Any, element_id: str) -> int:
    """How many data points (or bars, or an indicator) the element's Plotly figure holds."""
    return int(
        page.evaluate(
            """id => (document.getElementById(id).data || []).reduce(
                 (n, t) => n + (t.type === 'indicator' ? 1 : (t.x || []).length), 0)""",
            element_id,
        )
    )


def test_the_crashed_runs_goodput_page_draws_everything(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.crashed}/goodput")
    opened.ready()
    page = opened.page
    for chart in CHARTS:
        assert drawn(page, chart) > 0, f"{chart} drew nothing"
    # the timeline: a row per (attempt, rank), both attempts, one crash marked with its cause
    rows = page.evaluate("[...new Set(document.getElementById('timeline').data[0].y)]")
    assert rows == ["attempt 0 · rank 0", "attempt 1 · rank 0"]
    crash = page.evaluate("document.getElementById('timeline').data.find(t => t.name === 'crash')")
    assert crash["y"] == ["attempt 0 · rank 0"] and "failed" in crash["text"][0]
    names = page.evaluate("document.getElementById('timeline').data.map(t => t.name)")
    assert {"goodput", "startup", "wasted progress", "recovery gap"} <= set(names)
    # the restart on the step-time chart says how attempt 0 ended, as the accounting decided
    labels = page.evaluate(
        "[...document.querySelectorAll('#step_time .annotation-text')].map(e => e.textContent)"
    )
    assert any(t.startswith("attempt 1 (after: failed") for t in labels), labels
    assert page.inner_text("#card-goodput").endswith("%")
    assert page.locator("#disruptions tbody tr").count() == 1
    assert "restarted" in page.inner_text("#disruptions tbody")
    opened.shoot("goodput-crashed-page")

    page.click("nav.axis >> text=wall clock")
    page.wait_for_url("**x=time")
    opened.ready()
    assert page.evaluate("document.getElementById('step_time').layout.xaxis.type") == "date"
    first_x = page.evaluate("document.getElementById('step_time').data[0].x[0]")
    assert str(first_x).startswith("20"), first_x  # a date, not a step number
    opened.shoot("goodput-crashed-wall-clock")
    opened.clean()
    page.close()
