"""Every page answers a browser's GET and HEAD with HTML, a run's address opens its goodput
page, and what does not exist is an HTML 404 for a browser and JSON for the API."""

from __future__ import annotations

from typing import Any

import pytest

from tests import factories as f

PAGES = (
    "/",
    "/trends",
    "/compare",
    "/runs/run-a/goodput",
    "/runs/run-a/performance",
    "/runs/run-a/routing",
    "/runs/run-a/receipt",
    "/ablations",
    "/ablations/abl-a",
    "/ledger",
)
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def stored(client: Any) -> Any:
    assert client.post("/api/v1/ingest", json={"records": f.full_run("run-a")}).status_code == 200
    named = f.run("run-b", ablation_id="abl-a", ablation_cell="lr=0.01")
    assert client.post("/api/v1/ingest", json={"records": [named]}).status_code == 200
    return client


@pytest.mark.parametrize("path", PAGES)
def test_each_page_answers_get_and_head_with_html(stored: Any, path: str) -> None:
    got, head = stored.get(path), stored.head(path)
    assert got.status_code == head.status_code == 200, path
    assert got.headers["content-type"].startswith("text/html") and head.content == b""
    assert '<header class="top">' in got.text


def test_a_runs_address_opens_its_goodput_page(stored: Any) -> None:
    moved = stored.get("/runs/run-a", follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == "/runs/run-a/goodput"
    assert stored.get("/runs", follow_redirects=False).headers["location"] == "/"


def test_an_unknown_run_is_an_html_404_for_a_browser_and_json_for_the_api(stored: Any) -> None:
    page = stored.get("/runs/nope/receipt", headers=BROWSER)
    assert page.status_code == 404 and "run_id &#39;nope&#39; not found" in page.text
    data = stored.get("/ui/data/runs/nope/receipt", headers=BROWSER)
    assert data.status_code == 404 and data.json() == {"detail": "run_id 'nope' not found"}
    api = stored.get("/api/v1/runs/nope", headers=BROWSER)
    assert api.status_code == 404 and api.headers["content-type"] == "application/json"
    assert (
        stored.get("/no/such/page", headers=BROWSER).headers["content-type"].startswith("text/html")
    )
    assert stored.get("/no/such/page").json() == {"detail": "Not Found"}


def test_a_bad_parameter_on_a_page_names_it(stored: Any) -> None:
    page = stored.get("/runs/run-a/goodput", params={"x": "sideways"}, headers=BROWSER)
    assert page.status_code == 422 and "x: Input should be" in page.text
    data = stored.get("/ui/data/runs/run-a/goodput", params={"x": "sideways"})
    assert data.status_code == 422 and data.json()["detail"][0]["field"] == "x"


def test_a_long_runs_device_line_holds_its_timed_steps_not_the_step_time_picks(
    client: Any,
) -> None:
    """4,500 steps, one in ten timed on the device: the host line is downsampled on step
    time (its picks rarely timed ones), the device line on the timed steps' own device times,
    so all 450 of them are drawn."""
    records = [f.run(), f.attempt_start()]
    for n in range(4500):
        timed = {"device_time_s": 0.2 + (n % 7) / 100} if n % 10 == 9 else {}
        records.append(f.step(n, dur=0.3 + (n % 13) / 100, **timed))
    for i in range(0, len(records), 2000):
        got = client.post("/api/v1/ingest", json={"records": records[i : i + 2000]})
        assert got.status_code == 200
    body = client.get("/ui/data/runs/run-a/performance").json()
    traces = body["figures"]["device_host"]["data"]
    host = [t for t in traces if t["name"].startswith("host")]
    device = [t for t in traces if t["name"].startswith("device")]
    assert len(host[0]["x"]) <= 2000
    assert device[0]["x"] == list(range(9, 4500, 10))
    assert device[0]["y"] == [1000 * (0.2 + (n % 7) / 100) for n in range(9, 4500, 10)]
