"""The goodput dashboard in headless Debian Chromium, against a real server on loopback."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.goto(url)
    return page, problems


def test_home_with_no_runs_says_how_to_start_one(live_server: LiveServer, browser: Any) -> None:
    page, problems = open_page(browser, f"{live_server.base}/dashboards/goodput")
    assert page.url == f"{live_server.base}/"
    page.wait_for_selector("text=No runs yet")
    assert f"goodput train --server {live_server.base}" in page.inner_text("main")
    assert problems == []
    page.close()


def offline_page(browser: Any, live_server: LiveServer) -> tuple[Any, list[str], list[str]]:
    """A page that can reach nothing but this server: (page, problems, other sites asked)."""
    page = browser.new_page()
    problems: list[str] = []
    elsewhere: list[str] = []

    def only_here(route: Any) -> None:
        if route.request.url.startswith(live_server.base + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    return page, problems, elsewhere


def test_swagger_ui_draws_the_api_with_no_other_site(live_server: LiveServer, browser: Any) -> None:
    """/docs offline: Swagger UI draws every operation from files the server has (it was a
    blank page, loaded from a CDN)."""
    page, problems, elsewhere = offline_page(browser, live_server)
    page.goto(f"{live_server.base}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
    assert page.locator(".swagger-ui .opblock").count() == operations(live_server)
    assert page.get_by_text("/api/v1/ingest", exact=True).count() == 1
    assert elsewhere == [] and problems == []
    page.close()


def test_redoc_draws_the_api_with_no_other_site(live_server: LiveServer, browser: Any) -> None:
    """/redoc offline: ReDoc draws the API, its logo ours (the bundle's is on a CDN)."""
    page, problems, elsewhere = offline_page(browser, live_server)
    page.goto(f"{live_server.base}/redoc")
    page.wait_for_selector("h1", timeout=20_000)  # the API's title, drawn by ReDoc
    assert "goodput" in page.inner_text("h1")
    page.wait_for_selector("img[alt='redocly logo']", timeout=20_000)
    assert page.get_by_text("/api/v1/ingest").count() >= 1
    assert elsewhere == [] and problems == []
    page.close()


def operations(live_server: LiveServer) -> int:
    doc = httpx.get(f"{live_server.base}/openapi.json").json()
    return sum(len(item) for item in doc["paths"].values())
