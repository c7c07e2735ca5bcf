"""The compare page in Chromium: the site's pair, refused for its lane mismatch until the
differing field's knob is declared by clicking the refusal's link, then a verdict with every
axis and chart drawn."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest

from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

FIELD = "runtime_policy.dispatch_requested"  # what the site's pair differs in (lane_diff)
KNOB = "dispatch"  # the knob whose value that field is
CHARTS = ("ratios", "badput", "step_time", "loss", "drop_rate")


def _drawn(page: Any, chart: str) -> int:
    """Traces Plotly drew in the chart (bars and lines)."""
    return int(page.locator(f"#{chart} .scatterlayer .trace, #{chart} .barlayer .trace").count())


def test_a_lane_mismatch_is_refused_with_a_link_that_declares_the_knob(
    site: Site, browser: Any
) -> None:
    query = urlencode({"baseline": site.baseline, "candidate": site.candidate})
    opened = open_page(browser, site.base, f"/compare?{query}")
    opened.ready()
    page = opened.page
    assert page.locator("#refusal").is_visible() and page.locator("#verdict-panel").is_hidden()
    assert "sides differ" in page.inner_text("#refusal-title")
    assert page.locator("#refusal-table td").all_inner_texts() == [FIELD, "grouped", "padded"]
    opened.shoot("compare-refused")
    page.click(f"#refusal-fixes a:has-text('declared: {KNOB}')")
    opened.ready()
    assert f"knob={KNOB}" in page.url
    assert page.locator("#refusal").is_hidden()
    assert page.inner_text("#verdict") in ("keep", "tax", "drop", "inconclusive")
    assert page.locator("#reasons li").count() >= 1
    assert page.locator("#lane_diff td").all_inner_texts()[:4] == [
        FIELD,
        "grouped",
        "padded",
        "declared knob",
    ]
    opened.clean()
    page.close()


def test_the_pair_with_its_knob_shows_a_verdict_and_draws_every_chart(
    site: Site, browser: Any
) -> None:
    query = urlencode({"baseline": site.baseline, "candidate": site.candidate, "knob": KNOB})
    opened = open_page(browser, site.base, f"/compare?{query}")
    opened.ready()
    page = opened.page
    verdict = site.get(
        "/api/v1/compare", baseline=site.baseline, candidate=site.candidate, knob=KNOB
    ).json()
    assert page.inner_text("#verdict") == verdict["verdict"]
    assert page.get_attribute("#verdict", "class") == f"verdict verdict-{verdict['verdict']}"
    assert page.locator("#reasons li").all_inner_texts() == verdict["reasons"]
    # every axis with its interval: the first is the step time, its finding a badge
    axes = page.locator("#axes tbody tr")
    assert axes.first.locator("td").first.inner_text() == "step time"
    step = next(a for a in verdict["axes"] if a["name"] == "step_time")
    assert axes.first.locator("td .badge").inner_text() == step["finding"]
    assert page.inner_text("#replicates") == "1 vs 1"
    assert page.inner_text("#ratio-step_time").startswith(
        f"{verdict['step_time_ratio']['value']:.3f}"
    )
    # every chart holds data: two ratios; the pair's badput, step time, loss and drop rate
    # one trace per run (each run is one attempt)
    assert {c: _drawn(page, c) for c in CHARTS} == {
        "ratios": 2,
        "badput": 2,
        "step_time": 2,
        "loss": 2,
        "drop_rate": 2,
    }
    assert page.locator("#knobs").inner_text() == KNOB
    opened.shoot("compare")
    # the picker keeps the pair and the knob, so changing one choice keeps the rest
    assert page.locator("#pick-baseline").input_value() == site.baseline
    assert page.locator("#pick-candidate").input_value() == site.candidate
    opened.clean()
    page.close()
