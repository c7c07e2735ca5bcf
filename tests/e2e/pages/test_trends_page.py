"""The trends page (`/trends`) in Chromium: one chart per figure, each run a point at its
start, and the filter form."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]
CHARTS = ("goodput", "mix", "tokens", "mfu", "memory", "drop_rate", "max_vio")


def gpu_like_run(run_id: str, created_at: float, mfu_flops: int) -> list[dict[str, Any]]:
    """A run as a GPU would send it: a device peak, FLOPs and memory per step, routing."""
    records = f.loop_run(run_id, steps=6, name=f"trend {run_id}", created_at=created_at)
    records[0]["environment"]["peak_flops_per_s"] = 1e12
    records[0]["project"] = "trends-e2e"
    for r in records:
        if r["kind"] == "step":
            r.update(flops=mfu_flops, mem_allocated_peak=(2 + r["step"]) * 2**30)
    return records


def test_the_trends_page_draws_every_figure_of_each_run(site: Site, browser: Any) -> None:
    for i, run_id in enumerate(("trend-gpu-1", "trend-gpu-2")):
        records = gpu_like_run(run_id, f.T0 + 14 * 86_400 * i, (3 + i) * 10**11)
        httpx.post(f"{site.base}/api/v1/ingest", json={"records": records}).raise_for_status()
    opened = open_page(browser, site.base, "/trends")
    opened.ready()
    page = opened.page
    for chart in CHARTS:
        points = page.evaluate(f"document.getElementById('{chart}').data[0].x.length")
        assert points >= 2, chart
    assert page.evaluate("document.getElementById('goodput').data[0].x.length") >= 6
    # the hostile run is named in the hover text as text
    assert "&lt;script&gt;" in " ".join(
        page.evaluate("document.getElementById('goodput').data[0].text")
    )
    assert "runs (started 2026-09-21 to" in page.inner_text("#trend-note")
    opened.shoot("trends")

    page.fill("form.filters input[name=project]", "trends-e2e")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/trends?project=trends-e2e")
    opened.ready()
    mfu = page.evaluate("document.getElementById('mfu').data[0].y")
    assert mfu == pytest.approx([30.0, 40.0])  # 3e11 and 4e11 FLOPs in 1 s steps, peak 1e12
    assert page.inner_text("#trend-note").startswith("2 runs")
    opened.clean()
    page.close()
