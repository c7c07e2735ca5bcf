"""The performance page in Chromium: on a hand-built two-rank GPU-like run (posted here:
the site's runs have one rank and ran on a CPU) every chart holds data and the heatmap has a
row per rank, the slow one flagged; on the site's CPU run the absent measures are said."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.pages.conftest import Site, open_page
from tests.e2e.pages.test_goodput_page import drawn
from tests.service.test_performance_reads import GUARD, two_ranks

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHARTS = ("step_time", "tokens_per_s", "tflops", "mfu", "device_host", "memory", "heatmap")


def test_the_performance_page_draws_every_measure_and_a_row_per_rank(
    site: Site, browser: Any
) -> None:
    run_id = "perf-two-ranks"
    r = httpx.post(f"{site.base}/api/v1/ingest", json={"records": two_ranks(run_id)})
    r.raise_for_status()
    opened = open_page(browser, site.base, f"/runs/{run_id}/performance")
    opened.ready()
    page = opened.page
    for chart in CHARTS:
        assert drawn(page, chart) > 0, f"{chart} drew nothing"
    heat = page.evaluate("document.getElementById('heatmap').data[0]")
    assert heat["y"] == ["rank 0", "rank 1 (straggler)"]
    # rank 1's cells are its 1.3 s steps, rank 0's its 1.0 s ones
    assert {round(v) for v in heat["z"][0] if v is not None} == {1000}
    assert {round(v) for v in heat["z"][1] if v is not None} == {1300}
    assert page.locator("#recompiles tbody tr").count() == 1
    assert GUARD in page.inner_text("#recompiles tbody")
    labels = page.evaluate(
        "[...document.querySelectorAll('#step_time .annotation-text')].map(e => e.textContent)"
    )
    assert "attempt 1 (after: failed: oom)" in labels, labels
    opened.shoot("performance-two-ranks")
    opened.clean()
    page.close()


def test_a_cpu_run_says_what_it_could_not_measure(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.crashed}/performance?x=time")
    opened.ready()
    page = opened.page
    for chart in ("step_time", "tokens_per_s", "tflops", "heatmap"):
        assert drawn(page, chart) > 0, f"{chart} drew nothing"

    def note(chart: str) -> str:
        return str(page.evaluate(f"document.getElementById('{chart}').layout.annotations[0].text"))

    assert "peak FLOP/s is not known" in note("mfu")
    assert "CUDA events" in note("device_host") and "cpu" in note("device_host")
    assert "no peak memory" in note("memory")
    assert page.evaluate("document.getElementById('heatmap').layout.xaxis.type") == "date"
    opened.shoot("performance-crashed-cpu")
    opened.clean()
    page.close()
