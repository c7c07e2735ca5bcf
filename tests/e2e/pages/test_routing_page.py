"""The routing page in Chromium: an E layer's heatmap of tokens per expert (the null slot its
own row), its drop rate, the layer selector, the overview of every layer, the empty state."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def _percent(text: str) -> float:
    return float(text.rstrip("%"))


def test_a_layer_heatmap_with_its_null_slot_and_the_selector(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.dropping}/routing")
    dialogs: list[str] = []
    opened.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    opened.ready()
    page = opened.page
    assert page.inner_text("#run-name") == site.hostile_name  # the name is text, not markup
    heat = "document.getElementById('heatmap')"
    assert page.evaluate(f"{heat}.data[0].type") == "heatmap"
    assert page.evaluate(f"{heat}.data[0].y").count("null slot") == 1
    assert page.evaluate(f"{heat}.data[0].z.flat().reduce((a, b) => a + b, 0)") > 0
    assert "layer 0" in page.evaluate(f"{heat}.layout.title.text")
    assert _percent(page.inner_text("#card-drop")) > 0  # capacity factor 1.0 drops tokens
    drop_rates = page.evaluate("document.getElementById('rates').data[0].y")
    assert max(drop_rates) > 0
    assert page.locator("#experts-table tbody tr").count() == 4
    opened.shoot("routing-dropping-layer0")

    page.select_option("#layer", "1")  # navigates to ?layer=1
    page.wait_for_url("**/routing?layer=1")
    opened.ready()
    assert "layer 1" in page.evaluate(f"{heat}.layout.title.text")
    assert page.evaluate(f"{heat}.data[0].y").count("null slot") == 1
    opened.shoot("routing-dropping-layer1")
    assert dialogs == []
    opened.clean()
    page.close()


def test_the_overview_every_layer_and_restarts_and_the_empty_state(
    site: Site, browser: Any
) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.crashed}/routing?layer=all")
    opened.ready()
    page = opened.page
    names = page.evaluate("document.getElementById('drop_all').data.map(t => t.name)")
    # two E layers, each attempt its own trace
    assert sorted(names) == [
        "layer 0 · attempt 0",
        "layer 0 · attempt 1",
        "layer 1 · attempt 0",
        "layer 1 · attempt 1",
    ]
    assert page.locator("#layers-table tbody tr").count() == 2
    opened.shoot("routing-overview-crashed")
    page.click("#layers-table a:text('layer 1')")
    page.wait_for_url("**/routing?layer=1")
    opened.ready()
    heat = page.evaluate("document.getElementById('heatmap').data.map(t => t.name)")
    assert heat == ["attempt 0", "attempt 1"]  # the restart: one trace per attempt
    assert page.evaluate("document.getElementById('heatmap').layout.shapes.length") == 1
    opened.shoot("routing-crashed-layer1")
    opened.clean()
    page.close()

    run_id = "routing-dense"  # a model without E layers: nothing to route
    records = [f.run(run_id, "dense", model_plan={"pattern": "AAM"}), f.attempt_start(run_id)]
    r = httpx.post(f"{site.base}/api/v1/ingest", json={"records": records})
    r.raise_for_status()
    opened = open_page(browser, site.base, f"/runs/{run_id}/routing")
    opened.ready()
    assert "no E (routed-expert) layer" in opened.page.inner_text("#routing-empty")
    opened.shoot("routing-empty")
    opened.clean()
    opened.page.close()
