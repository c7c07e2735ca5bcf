"""The ablation, ledger and compare-cells pages' routes (service/api/routes/page_ablations.py,
page_ledger.py, page_compare.py) over ablations stored by ingest: HTML for a browser, the
data their scripts draw, the live flag while runs run, the empty states, the errors."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from dashboards import pages
from tests.dashboards import ablation_records as ar
from tests.factories import T0

# The pages read through the services the API's tests run on both databases; on SQLite alone
# here, for CI's time.
pytestmark = pytest.mark.parametrize("db_kind", ["sqlite"])

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
SWEEP = {"grouped": 0.10, "padded": 0.12, "loop": 0.10}
CURRENT = {  # the navigation's entry each page marks
    "/ablations": "Ablations",
    "/ablations/ab": "Ablations",
    "/ledger": "Ledger",
    "/compare": "Compare",
}


def data(client: Any, path: str, **params: Any) -> dict[str, Any]:
    got = client.get("/ui/data" + path, params=params)
    assert got.status_code == 200, got.text
    return dict(got.json())


def test_the_pages_answer_html_with_the_navigation_in_its_order(client: Any) -> None:
    ar.ablate(client, "ab", SWEEP)
    for path in ("/ablations", "/ablations/ab", "/ledger", "/compare"):
        got, head = client.get(path, headers=HTML), client.head(path, headers=HTML)
        assert got.status_code == head.status_code == 200, path
        assert got.headers["content-type"].startswith("text/html") and head.content == b""
        nav = re.search(r'<nav class="main">(.*?)</nav>', got.text, re.S)
        assert nav is not None
        links = re.findall(r'<a href="([^"]+)"( aria-current="page")?>([^<]+)</a>', nav.group(1))
        assert [(href, label) for href, _, label in links] == [
            ("/", "Runs"),
            ("/ablations", "Ablations"),
            ("/ledger", "Ledger"),
            ("/compare", "Compare"),
            ("/trends", "Trends"),
            ("/docs", "API"),
        ]
        current = [label for _, mark, label in links if mark]
        assert current == [CURRENT[path]]
    assert len(pages.NAV) == 5


def test_with_nothing_stored_each_page_says_what_to_do(client: Any) -> None:
    listing = client.get("/ablations", headers=HTML).text
    assert "goodput ablate --knob dispatch=grouped,padded --repeats 3 --steps 60" in listing
    empty = data(client, "/ablations")
    assert empty["any"] is False and empty["live"] is False
    assert empty["tables"]["ablation-list"]["rows"] == []
    ledger = client.get("/ledger", headers=HTML).text
    assert "The ledger is empty" in ledger and "goodput ablate --knob" in ledger
    got = data(client, "/ledger")
    assert got["any"] is False and got["tables"]["standings"]["rows"] == []
    assert "no verdict yet" in got["figures"]["ledger-trend"]["layout"]["annotations"][0]["text"]


def test_an_ablations_data_is_the_apis_read_with_each_cells_verdict(client: Any) -> None:
    ar.ablate(client, "ab", SWEEP, repeats=2, name="sweep <b>1</b>")
    page = client.get("/ablations/ab", headers=HTML)
    assert "sweep &lt;b&gt;1&lt;/b&gt;" in page.text and "<b>1" not in page.text
    assert 'data-data-url="/ui/data/ablations/ab"' in page.text
    api = client.get("/api/v1/ablations/ab").json()
    got = data(client, "/ablations/ab")
    assert got["live"] is False and got["ended"] == "every run ended: not refreshing"
    assert got["texts"]["progress-text"] == "6 of 6 runs ended"
    assert got["progress"] == {"ended": 6, "of": 6}
    cells = {c["cell"]: c for c in got["cells"]}
    assert list(cells) == ["dispatch=grouped", "dispatch=padded", "dispatch=loop"]
    for c in api["cells"]:
        view = cells[c["cell"]]
        assert view["baseline"] == c["baseline"]
        assert [r[0]["href"] for r in view["runs"]["rows"]] == [
            f"/runs/{r['run_id']}/goodput" for r in c["runs"]
        ]
        if not c["baseline"]:
            assert view["verdict"]["verdict"] == c["comparison"]["verdict"]
            assert view["verdict"]["reasons"] == c["comparison"]["reasons"]
    assert cells["dispatch=padded"]["verdict"]["verdict"] == "drop"
    assert "ablation=ab" in cells["dispatch=padded"]["compare_href"]
    forest = got["figures"]["forest"]["data"]
    assert [t["name"] for t in forest] == ["drop", "inconclusive"]
    padded = next(c for c in api["cells"] if c["cell"] == "dispatch=padded")
    assert forest[0]["x"] == [padded["comparison"]["step_time_ratio"]["value"]]
    listed = data(client, "/ablations")["tables"]["ablation-list"]["rows"]
    assert [r[0]["text"] for r in listed] == ["sweep <b>1</b>"]  # text: dashboard.js escapes
    assert listed[0][4]["text"] == "6 / 6"


def test_the_page_is_live_while_runs_run_or_are_still_to_start(client: Any) -> None:
    ar.ablate(client, "ab", SWEEP, repeats=2, running={"loop": 1})
    got = data(client, "/ablations", project="default")
    assert got["live"] is True and got["texts"]["ablation-note"].endswith("1 run not ended yet")
    running = data(client, "/ablations/ab")
    assert running["live"] is True and running["texts"]["progress-text"] == (
        "5 of 6 runs ended (1 running)"
    )
    loop = next(c for c in running["cells"] if c["cell"] == "dispatch=loop")
    assert loop["verdict"] is not None  # its completed run is judged meanwhile
    # declared for 4 runs a cell, 1 started: live while the newest started a moment ago ...
    now = time.time()
    body = ar.declaration("fresh", ["grouped", "padded"], repeats=4, created_at=now - 120)
    assert client.post("/api/v1/ablations", json=body).status_code == 200
    ar.post(client, ar.timed_run("fresh-0", 0.1, 1, ablation="fresh", cell="dispatch=grouped",
                                 created_at=now - 60))  # fmt: skip
    fresh = data(client, "/ablations/fresh")
    assert fresh["live"] is True and fresh["texts"]["progress-text"] == (
        "1 of 8 runs ended (7 not started)"
    )
    assert next(c for c in fresh["cells"] if c["cell"] == "dispatch=padded")["refusal"] == {
        "title": "Waiting for runs",
        "message": "no completed run in cell 'dispatch=padded' yet",
    }
    # ... and not once it waited WAIT_S for the next
    body = ar.declaration("stale", ["grouped", "padded"], repeats=4, created_at=T0)
    assert client.post("/api/v1/ablations", json=body).status_code == 200
    stale = data(client, "/ablations/stale")
    assert stale["live"] is False and "none in the last 15 min" in stale["ended"]
    assert stale["any_runs"] is False


def test_two_cells_of_an_ablation_on_the_compare_page(client: Any) -> None:
    ar.ablate(client, "ab", SWEEP, repeats=2)
    cells = {"ablation": "ab", "baseline": "dispatch=grouped", "candidate": "dispatch=padded"}
    picker = client.get("/compare", params={"ablation": "ab"}, headers=HTML)
    assert picker.status_code == 200 and "Pick two cells of this ablation" in picker.text
    assert '<option value="dispatch=padded"></option>' in picker.text
    page = client.get("/compare", params=cells, headers=HTML)
    assert page.status_code == 200 and page.text.count("data-run-status=") == 4
    got = data(client, "/compare", **cells)
    api = client.get("/api/v1/compare", params=cells).json()
    assert got["verdict"]["verdict"] == api["verdict"] == "drop"
    assert got["texts"]["knobs"] == "dispatch" and got["texts"]["replicates"] == "2 vs 2"
    assert len(got["figures"]["step_time"]["data"]) == 4
    unknown = client.get("/compare", params={**cells, "candidate": "dispatch=nope"}, headers=HTML)
    assert unknown.status_code == 404 and "no cell" in unknown.text


def test_the_ledger_lists_each_knob_value_and_flags_a_changed_environment(client: Any) -> None:
    ar.ablate(client, "old", SWEEP, repeats=2)
    ar.ablate(client, "new", {"grouped": 0.1, "padded": 0.1}, repeats=2,
              created_at=T0 + 7 * ar.DAY, torch="2.14.0")  # fmt: skip
    page = client.get("/ledger", params={"project": "default"}, headers=HTML)
    assert page.status_code == 200 and 'data-data-url="/ui/data/ledger?project=default"' in (
        page.text
    )
    api = client.get("/api/v1/ledger").json()
    got = data(client, "/ledger")
    rows = got["tables"]["standings"]["rows"]
    assert [r[0]["text"] for r in rows] == [f"{e['knob']}={e['value']}" for e in api["entries"]]
    loop = next(r for r in rows if r[0]["text"] == "dispatch=loop")
    assert loop[2]["text"] == "needs re-review" and "torch 2.13.0 -> 2.14.0" in loop[2]["title"]
    assert got["rereview"] == 1 and got["texts"]["rereview-note"].startswith("1 knob value needs")
    padded = next(e for e in api["entries"] if e["value"] == "padded")
    assert len(padded["verdicts"]) == 2
    history = got["tables"]["history"]["rows"]
    assert len(history) == sum(len(e["verdicts"]) for e in api["entries"]) == 3
    assert [t["name"] for t in got["figures"]["ledger-trend"]["data"]] == [
        "dispatch=loop",
        "dispatch=padded",
    ]
    assert data(client, "/ledger", project="elsewhere")["any"] is False


def test_unknown_ablations_are_html_404s_for_a_browser_and_json_for_data(client: Any) -> None:
    page = client.get("/ablations/nope", headers=HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert client.get("/ui/data/ablations/nope").json() == {"detail": "ablation nope not found"}
    bad = client.get("/ablations/not%20an%20id", headers=HTML)
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("text/html")
