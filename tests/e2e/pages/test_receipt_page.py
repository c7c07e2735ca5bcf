"""The receipt page in Chromium: observed backends with fallbacks flagged, completeness with
how to supply each missing part, the receipt's parts, attempts and export links."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

HOSTILE = "receipt <img src=x onerror=alert(1)>"


def _flagged_run(run_id: str) -> list[dict[str, Any]]:
    """Two E layers, one dispatch observed (falling back), SDPA other than requested, the
    compile seam seen twice; no top_k, no dtype; the attempt still running."""
    plan = f.loop_plan("AEME")
    del plan["top_k"]
    policy = f.loop_policy(dispatch_requested="grouped")
    del policy["dtype"]
    return [
        f.run(
            run_id,
            HOSTILE,
            model_plan=plan,
            runtime_policy=policy,
            environment=f.loop_environment(),
        ),
        f.attempt_start(run_id),
        *[f.step(i, run_id) for i in range(3)],
        f.observation(
            "moe_dispatch.layer0",
            "padded",
            run_id,
            requested="grouped",
            reason="grouped kernel needs CUDA",
            step=0,
        ),
        f.observation("sdpa", "math", run_id, requested="flash", step=0),
        f.observation("compile", "eager", run_id),
        f.observation("compile", "inductor", run_id, time=f.T0 + 5),
        f.observation("dtype.attention", "float32", run_id, step=0),
    ]


def test_fallbacks_are_flagged_and_missing_parts_say_how(site: Site, browser: Any) -> None:
    run_id = "receipt-flagged"
    r = httpx.post(f"{site.base}/api/v1/ingest", json={"records": _flagged_run(run_id)})
    r.raise_for_status()
    opened = open_page(browser, site.base, f"/runs/{run_id}/receipt")
    dialogs: list[str] = []
    opened.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    opened.ready()
    page = opened.page
    assert page.inner_text("#run-name") == HOSTILE
    summary = page.inner_text("#seams-summary")
    assert summary.startswith("2 seams fell back: moe_dispatch.layer0 (grouped → padded: grouped")
    assert "sdpa (flash → math)" in summary and "observed several backends: compile" in summary
    flagged = page.locator("#seams-table tr.flag td:first-child").all_inner_texts()
    assert sorted(flagged) == ["compile", "moe_dispatch.layer0", "sdpa"]
    assert page.locator("details.observations").get_attribute("open") is not None
    missing = {
        row.locator("td").nth(0).inner_text(): row.locator("td").nth(2).inner_text()
        for row in page.locator("#missing-table tbody tr").all()
    }
    assert set(missing) == {
        "model_plan.top_k",
        "runtime_policy.dtype",
        "observed.moe_dispatch.layer1",
        "attempt_end",
    }
    assert "recorder.watch(model)" in missing["observed.moe_dispatch.layer1"]
    assert page.inner_text("#completeness").startswith("Incomplete: 4 part(s) missing")
    assert page.inner_text("#card-steps") == "3"
    assert page.evaluate("document.body.dataset.live") == "1"  # no attempt_end: it refreshes
    opened.shoot("receipt-flagged")
    assert dialogs == []
    opened.clean()
    page.close()


def test_a_complete_receipt_with_its_parts_and_exports(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, f"/runs/{site.dropping}/receipt")
    opened.ready()
    page = opened.page
    assert page.inner_text("#completeness").startswith("Complete")
    assert page.locator("#missing-table tbody tr td.empty-row").count() == 1
    assert page.inner_text("#seams-summary") == "All 5 seams ran what was requested (no fallback)."
    assert page.locator("#seams-table tbody tr").count() == 5
    plan = page.locator("#plan-table").inner_text()
    assert "family_counts.E" in plan and "ssm.d_state" in plan  # nested keys, dotted
    assert page.inner_text("#card-steps") == "24"
    assert page.locator("#attempts-table tbody tr").count() == 1
    for link in page.locator(".links a").all():
        href = link.get_attribute("href")
        assert href is not None
        assert httpx.get(site.base + href, timeout=30).status_code == 200, href
    opened.shoot("receipt-dropping")
    opened.clean()
    page.close()
