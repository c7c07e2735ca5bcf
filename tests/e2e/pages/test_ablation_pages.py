"""The ablation and ledger pages in Chromium, on ablations built by ingest through the API (no
training: tests/dashboards/ablation_records.py), on a server of their own:

- `sweep` (torch 2.13): dispatch grouped (the baseline), padded (20% slower: drop), loop (15%
  faster: keep) and auto (its runs still running: waiting), 3 runs a cell;
- `again` (a week later, torch 2.14): grouped against padded once more, as fast.

The ablation's page is watched live until its last runs end; the ledger then holds every
knob value, `loop` flagged for re-review (its verdict ran on torch 2.13)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.dashboards import ablation_records as ar
from tests.e2e.pages.conftest import open_page
from tests.factories import T0

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

SWEEP = {"grouped": 0.10, "padded": 0.12, "loop": 0.085, "auto": 0.10}
HOSTILE = "dispatch sweep <img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    db: Path = tmp_path_factory.mktemp("ablations") / "ablations.db"
    live = LiveServer(f"sqlite:///{db}", page_refresh_s=1.0)
    live.start()
    with httpx.Client(base_url=live.base, timeout=30) as client:
        ar.ablate(client, "sweep", SWEEP, repeats=3, running={"auto": 3}, name=HOSTILE)
        ar.ablate(
            client, "again", {"grouped": 0.10, "padded": 0.10}, repeats=2,
            created_at=T0 + 7 * ar.DAY, torch="2.14.0",
        )  # fmt: skip
    yield live
    live.stop()


def _finish(base: str, cell_runs: list[str], value: str, secs: float) -> None:
    """End the runs of a cell that were still running (their attempt_end, completed)."""
    with httpx.Client(base_url=base, timeout=30) as client:
        for run_id in cell_runs:
            i = int(run_id.rsplit("-", 1)[1])
            seed = 1 + i * len(SWEEP) + list(SWEEP).index(value)
            whole = ar.timed_run(
                run_id, secs, seed, dispatch=value, ablation="sweep",
                cell=f"dispatch={value}", created_at=T0 + 60 * seed,
            )  # fmt: skip
            ar.post(client, [whole[0], whole[-1]])  # the run record again, and its end


def _traces(page: Any, chart: str) -> int:
    return int(page.locator(f"#{chart} .scatterlayer .trace").count())


def test_an_ablation_is_listed_then_watched_live_until_its_runs_end(
    server: LiveServer, browser: Any
) -> None:
    listing = open_page(browser, server.base, "/ablations")
    listing.ready()
    page = listing.page
    names = page.locator("#ablation-list tbody tr td:first-child").all_inner_texts()
    assert names == ["again", HOSTILE]  # newest first; a name is text, never markup
    assert page.locator("img").count() == 0
    assert page.locator("#no-ablations").is_hidden()
    listing.shoot("ablations")
    page.click("#ablation-list td[title='sweep'] a")
    page.wait_for_url("**/ablations/sweep")
    watched = listing  # the same tab, now on the ablation's page
    watched.ready()
    assert page.inner_text("#ablation-name") == HOSTILE and page.locator("img").count() == 0
    assert page.inner_text("#progress-text") == "9 of 12 runs ended (3 running)"
    assert page.get_attribute("body", "data-live") == "1"
    cells = page.locator("section.cell")
    assert cells.locator("h2 .name").all_inner_texts() == [f"dispatch={v}" for v in SWEEP]
    badges = cells.locator("h2 .badge").all_inner_texts()
    assert badges == ["baseline", "drop", "keep", "no verdict yet"]
    auto = page.locator("section.cell[data-cell='dispatch=auto']")
    assert auto.locator(".refusal strong").inner_text() == "Waiting for runs"
    padded = page.locator("section.cell[data-cell='dispatch=padded']")
    axes = padded.locator("table").nth(1).locator("tbody tr")
    assert axes.first.locator("td").first.inner_text() == "step time"
    assert axes.first.locator("td .badge").inner_text() == "worse"
    assert padded.locator("ul.reasons li").first.inner_text().startswith("drop")
    # the forest: one trace per verdict (drop, keep) and the row saying auto has none yet
    assert _traces(page, "forest") == 3
    watched.shoot("ablation-running")
    drawn = int(page.get_attribute("body", "data-draws") or 0)
    _finish(server.base, [f"sweep-auto-{i}" for i in range(3)], "auto", SWEEP["auto"])
    page.wait_for_function(
        f"Number(document.body.dataset.draws) > {drawn} && document.body.dataset.live === '0'",
        timeout=20_000,
    )
    assert page.inner_text("#progress-text") == "12 of 12 runs ended"
    assert auto.locator("h2 .badge").inner_text() in ("inconclusive", "keep", "drop")
    assert "not refreshing" in page.inner_text("#status")
    assert _traces(page, "forest") >= 2
    watched.shoot("ablation")
    watched.clean()
    page.close()


def test_the_ledger_lists_each_knob_value_its_history_and_what_needs_re_review(
    server: LiveServer, browser: Any
) -> None:
    opened = open_page(browser, server.base, "/ledger")
    opened.ready()
    page = opened.page
    api = httpx.get(server.base + "/api/v1/ledger", timeout=30).json()
    rows = page.locator("#standings tbody tr")
    values = [f"{e['knob']}={e['value']}" for e in api["entries"]]
    assert rows.locator("td:first-child").all_inner_texts() == values
    assert set(values) == {"dispatch=padded", "dispatch=loop", "dispatch=auto"}
    loop = page.locator("#standings tbody tr", has_text="dispatch=loop")
    assert loop.locator("td .badge").first.inner_text() == "default-on win"
    assert loop.locator("td .badge-rereview").inner_text() == "needs re-review"
    assert "torch 2.13.0 -> 2.14.0" in (
        loop.locator("td .badge-rereview").locator("..").get_attribute("title") or ""
    )
    assert "need re-review" in page.inner_text("#rereview-note")
    # padded: dropped in the sweep, then inconclusive a week later, on torch 2.14
    padded = [e for e in api["entries"] if e["value"] == "padded"][0]
    assert [v["verdict"] for v in padded["verdicts"]][0] == "drop"
    history = page.locator("#history tbody tr")
    assert history.count() == sum(len(e["verdicts"]) for e in api["entries"]) == 4
    # the trend: one line per knob value
    assert _traces(page, "ledger-trend") == 3
    opened.shoot("ledger")
    opened.clean()
    page.close()
