"""What every page shares, in Chromium: the layout, the HTML error pages, escaping."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def test_an_unknown_run_is_a_readable_404_page_with_a_link_home(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, "/runs/no-such-run/goodput")
    assert opened.page.locator("h1").inner_text().startswith("404")
    assert "no-such-run" in opened.page.inner_text("#error-detail")
    opened.shoot("error-404")
    opened.page.click("text=Back to the runs")
    assert opened.page.url == site.base + "/"
    opened.page.close()


def test_the_api_keeps_its_json_errors(site: Site) -> None:
    r = site.get("/api/v1/runs/no-such-run")
    assert r.status_code == 404 and r.json() == {"detail": "run_id 'no-such-run' not found"}
    browserish = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    r = httpx.get(site.base + "/nowhere", headers=browserish)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert httpx.get(site.base + "/nowhere").json() == {"detail": "Not Found"}


def test_the_goodput_page_draws_each_attempt_apart(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.crashed}/goodput")
    opened.ready()
    # step time and loss, one trace per attempt each
    assert opened.page.locator("#step_time .scatterlayer .trace").count() == 4
    opened.shoot("goodput-crashed")
    opened.clean()
    opened.page.close()


def test_a_live_page_follows_the_run_and_stops_once_it_ends(site: Site, browser: Any) -> None:
    """The site serves with page_refresh_s=1: the page fetches again each second while the
    run runs, draws what arrived, and stops fetching once the run has ended."""
    run_id = "live-follow"

    def post(*records: dict[str, Any]) -> None:
        r = httpx.post(f"{site.base}/api/v1/ingest", json={"records": list(records)})
        r.raise_for_status()

    post(f.run(run_id, "live"), f.attempt_start(run_id), *[f.step(i, run_id) for i in range(5)])
    opened = open_page(browser, site.base, f"/runs/{run_id}/goodput")
    opened.ready()
    page = opened.page
    steps_drawn = "document.getElementById('step_time').data[0].x.length"
    assert page.evaluate("document.body.dataset.live") == "1"
    assert page.evaluate(steps_drawn) == 5
    assert page.inner_text("#run-status") == "running"
    post(*[f.step(i, run_id) for i in range(5, 9)])
    page.wait_for_function(f"{steps_drawn} === 9", timeout=15_000)
    post(f.attempt_end(run_id, f.T0 + 10 + 2 * 9))
    page.wait_for_function("document.body.dataset.live === '0'", timeout=15_000)
    assert page.inner_text("#run-status") == "completed"
    assert "not refreshing" in page.inner_text("#status")
    draws = page.evaluate("document.body.dataset.draws")
    page.wait_for_timeout(2500)  # more than two refresh periods
    assert page.evaluate("document.body.dataset.draws") == draws
    opened.shoot("live-ended")
    opened.clean()
    page.close()
