"""The runs page (`/`) in Chromium: the site's runs with their figures, sorting by a click on
a header, filtering through the form, two runs compared, a hostile name shown as text."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.e2e.pages.conftest import Site, open_page

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def column(page: Any, label: str) -> list[str]:
    """The cells of a column of the runs table, top to bottom."""
    labels = page.eval_on_selector_all("#runs thead th", "ths => ths.map(t => t.textContent)")
    index = labels.index(label) + 1  # nth-child counts from 1
    return list(
        page.eval_on_selector_all(
            f"#runs tbody td:nth-child({index})", "tds => tds.map(t => t.textContent)"
        )
    )


def percent(text: str) -> float:
    return float(text.rstrip("%"))


def test_the_runs_page_lists_sorts_and_compares_runs(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, "/")
    dialogs: list[str] = []
    opened.page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    opened.ready()
    page = opened.page
    names = column(page, "name")
    for name in ("crash and resume", site.hostile_name, "ab grouped", "ab padded"):
        assert name in names  # the hostile name as text, never as markup
    assert site.hostile_name in page.inner_text("#runs")
    row = dict(zip(column(page, "name"), column(page, "attempts"), strict=True))
    assert row["crash and resume"] == "2" and row["ab grouped"] == "1"
    drops = dict(zip(column(page, "name"), column(page, "drop rate"), strict=True))
    assert percent(drops[site.hostile_name]) > 0  # capacity factor 1.0 drops tokens
    assert percent(drops["ab grouped"]) == 0.0
    # other tests post runs of their own to this server: check the site's four
    goodput = dict(zip(column(page, "name"), column(page, "goodput"), strict=True))
    site_runs = ("crash and resume", site.hostile_name, "ab grouped", "ab padded")
    assert all(goodput[name].endswith("%") for name in site_runs)
    assert "mean over" in page.get_attribute("#runs th:text-is('MaxVio')", "title")
    opened.shoot("runs")

    def sorted_goodput() -> list[float]:
        """The column's percentages in order; runs without one (–) come last either way."""
        cells = column(page, "goodput")
        known = [c for c in cells if c.endswith("%")]
        assert cells[: len(known)] == known
        return [percent(c) for c in known]

    page.click("#runs th:text-is('goodput')")
    ascending = sorted_goodput()
    assert ascending == sorted(ascending)
    page.click("#runs th:text-is('goodput')")  # again: the other way
    descending = sorted_goodput()
    assert descending == sorted(ascending, reverse=True)
    assert page.get_attribute("#runs th[aria-sort]", "aria-sort") == "descending"

    button = page.locator("#compare")
    assert button.is_disabled()
    page.check(f"#runs input[value='{site.candidate}']")  # ticked first: the baseline
    assert button.is_disabled()
    page.check(f"#runs input[value='{site.baseline}']")
    assert button.is_enabled()
    assert page.inner_text("#compare-hint") == "baseline ab padded · candidate ab grouped"
    page.check(f"#runs input[value='{site.crashed}']")
    assert button.is_disabled()  # three ticked
    page.uncheck(f"#runs input[value='{site.crashed}']")
    assert dialogs == []
    opened.clean()
    button.click()
    page.wait_for_url("**/compare?*")
    query = parse_qs(urlsplit(page.url).query)
    assert query == {"baseline": [site.candidate], "candidate": [site.baseline]}
    page.close()


def test_the_filter_form_narrows_the_list_and_keeps_it_in_the_url(site: Site, browser: Any) -> None:
    opened = open_page(browser, site.base, "/")
    opened.ready()
    page = opened.page
    page.fill("form.filters input[name=project]", "ab")
    page.select_option("form.filters select[name=status]", "completed")
    page.fill("form.filters input[name=lane]", "padded")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/?*")
    # the filters set, and only they, in the address to share
    assert parse_qs(urlsplit(page.url).query) == {
        "project": ["ab"],
        "status": ["completed"],
        "lane": ["padded"],
    }
    opened.ready()
    assert column(page, "name") == ["ab padded"]
    assert page.input_value("form.filters input[name=lane]") == "padded"
    opened.shoot("runs-filtered")
    page.fill("form.filters input[name=lane]", "no-such-lane")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**lane=no-such-lane*")
    opened.ready()
    assert page.inner_text("#runs tbody").startswith("No runs match these filters")
    opened.clean()
    page.close()
