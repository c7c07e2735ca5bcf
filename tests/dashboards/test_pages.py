"""The shared layout (dashboards/pages.py, templates/base.html): escaping, navigation, a
run's tabs, the error page."""

from __future__ import annotations

import re
from pathlib import Path

from dashboards import pages

HOSTILE = {
    "run_id": "r-1",
    "name": "<script>alert(1)</script>",
    "project": 'p"><img src=x onerror=alert(2)>',
    "status": "running",
    "tags": ["<b>t</b>"],
}


def test_every_string_from_a_run_is_escaped() -> None:
    html = pages.render("goodput.html", page="goodput", title=HOSTILE["name"], run=HOSTILE)
    assert "<script>alert(1)</script>" not in html and "<img" not in html and "<b>t" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script") == 2  # plotly.js and the page's script, nothing else


def test_a_run_page_links_the_runs_other_pages_and_marks_its_own() -> None:
    html = pages.render("goodput.html", page="goodput", title="t", run=HOSTILE, axis="time")
    tabs = re.findall(r'<a href="/runs/r-1/(\w+)\?x=time"( aria-current="page")?>', html)
    assert tabs == [
        ("goodput", ' aria-current="page"'),
        ("performance", ""),
        ("routing", ""),
        ("receipt", ""),
    ]
    assert 'href="/trends"' in html and 'href="/compare"' in html


def test_pages_behind_a_root_path_link_under_it() -> None:
    html = pages.render("goodput.html", page="goodput", title="t", run=HOSTILE, base="/gp")
    assert 'href="/gp/"' in html and 'href="/gp/runs/r-1/receipt"' in html


def test_the_error_page_says_what_happened_and_links_home() -> None:
    html = pages.error_page(404, "not found", "run_id '<x>' not found")
    assert "404 · not found" in html and "run_id &#39;&lt;x&gt;&#39; not found" in html
    assert '<a href="/">Back to the runs</a>' in html


def test_only_the_listed_static_files_are_served() -> None:
    assert pages.static_file("dashboard.js").startswith(b"/*")
    for name in ("../pages.py", "templates/base.html", "nope.js"):
        try:
            pages.static_file(name)
        except KeyError:
            continue
        raise AssertionError(name)


def test_every_badput_category_of_the_contract_has_its_own_color() -> None:
    from dashboards.figures.common import CATEGORY_COLORS
    from trainer_hooks.records import BADPUT_CATEGORIES

    assert set(CATEGORY_COLORS) == set(BADPUT_CATEGORIES)
    assert len(set(CATEGORY_COLORS.values())) == len(CATEGORY_COLORS)


def test_the_figures_draw_only_traces_of_the_bundle_served() -> None:
    """The pages are served plotly.js's cartesian bundle (pages.plotly_js) where npm
    installed it: every trace a figure builder makes must be one it holds."""
    import ast
    from pathlib import Path

    made = set()
    for module in Path(pages.__file__).parent.joinpath("figures").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "go"
                and node.func.attr != "Figure"
            ):
                made.add(node.func.attr.lower())
    assert made and made <= pages.TRACE_TYPES, made - pages.TRACE_TYPES


def test_the_cartesian_bundle_is_served_where_npm_installed_it() -> None:
    bundle = pages.plotly_js()
    if not pages.CARTESIAN_BUNDLE.is_file():
        assert bundle.name == "plotly"  # the plotly package's full bundle
        return
    assert bundle.name == "plotly.js-cartesian-dist-min"
    import plotly

    def version(head: bytes) -> str:
        return re.search(rb"plotly\.js[^\n]* v(\d+\.\d+\.\d+)", head).group(1).decode()  # type: ignore[union-attr]

    full = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    # the plotly.js version the plotly package writes figures for
    assert version(bundle.body[:200]) == version(full.read_bytes()[:200])
