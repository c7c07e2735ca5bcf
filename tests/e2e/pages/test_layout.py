"""What every page shares, in Chromium: the layout, the HTML error pages, escaping."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

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
