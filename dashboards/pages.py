"""Page rendering: Jinja2 templates (dashboards/templates) with autoescape on, so every
string from a run is HTML-escaped where it lands, on one shared layout (base.html: the
header, the navigation, a run's tabs). Pages hold no numbers: their script
(static/dashboard.js) fetches figure JSON from the page's data URL and draws it, and fetches
again while the run is live."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

# a run's pages, in the order of its tabs: (path segment, label)
RUN_TABS: tuple[tuple[str, str], ...] = (
    ("goodput", "Goodput"),
    ("performance", "Performance"),
    ("routing", "Routing"),
    ("receipt", "Receipt"),
)
# the main navigation, in order: (path under the root, label, the pages it marks as current)
NAV: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("/", "Runs", frozenset({"runs"})),
    ("/ablations", "Ablations", frozenset({"ablations", "ablation"})),
    ("/ledger", "Ledger", frozenset({"ledger"})),
    ("/compare", "Compare", frozenset({"compare"})),
    ("/trends", "Trends", frozenset({"trends"})),
)
REFRESH_S = 5.0  # how often a live page fetches its data again (the service's setting)
# the files under /static/ and their media types (nothing else there is served)
STATIC_FILES: dict[str, str] = {
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
    "favicon.svg": "image/svg+xml",
    # a page's own script, where it needs one (sorting, selection...): static/<page>.js
    **{
        f"{page}.js": "application/javascript"
        for page in (
            "runs",
            "goodput",
            "performance",
            "routing",
            "receipt",
            "compare",
            "trends",
            "ablations",
            "ablation",
            "ledger",
        )
    },
}


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Templates from the installed package; a name a template uses but is not given fails
    the render (StrictUndefined) instead of printing nothing."""
    return Environment(
        loader=PackageLoader("dashboards", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
    )


def render(
    template: str,
    *,
    page: str,
    title: str,
    base: str = "",
    data_url: str | None = None,
    run: Mapping[str, Any] | None = None,
    axis: str | None = None,
    refresh_s: float = REFRESH_S,
    charts: bool = True,
    **context: Any,
) -> str:
    """One page on the shared layout. `page` names it (the navigation marks it), `base` is
    the app's root path, `data_url` where its script fetches the figures (None: a page
    drawn from the template alone), `run` the run whose tabs the header shows, `axis` the x
    axis chosen ("step" or "time"; None: the page offers no choice), `refresh_s` how often
    a live page fetches its data again, `charts` whether it draws any (plotly.js, 4.6 MB, is
    loaded only then)."""
    return (
        environment()
        .get_template(template)
        .render(
            page=page,
            title=title,
            base=base,
            home=f"{base}/",
            data_url=data_url,
            refresh_s=f"{refresh_s:g}",
            run=run,
            run_tabs=RUN_TABS,
            nav=NAV,
            axis=axis,
            axis_choice=axis is not None,
            charts=charts,
            query_keep="?x=time" if axis == "time" else "",
            **context,
        )
    )


def error_page(status_code: int, heading: str, detail: str, base: str = "") -> str:
    """A readable error page for a browser, with a link home (the API keeps its JSON)."""
    return render(
        "error.html",
        page="error",
        title=f"{status_code} {heading}",
        base=base,
        status_code=status_code,
        heading=heading,
        detail=detail,
    )


@cache
def static_file(name: str) -> bytes:
    """A file of dashboards/static (one of STATIC_FILES), from the installed package."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    try:
        return resources.files("dashboards").joinpath("static", name).read_bytes()
    except FileNotFoundError:
        raise KeyError(name) from None


# plotly.js's cartesian bundle from the npm registry (make installs it: package.json), beside
# the project; it holds every trace type the figures use (TRACE_TYPES, a test checks)
CARTESIAN_BUNDLE = (
    Path(__file__).resolve().parents[1]
    / "node_modules"
    / "plotly.js-cartesian-dist-min"
    / "plotly-cartesian.min.js"
)
TRACE_TYPES = frozenset({"scatter", "bar", "heatmap"})


class Bundle(NamedTuple):
    name: str
    body: bytes


@lru_cache(maxsize=1)
def plotly_js() -> Bundle:
    """The plotly.js the pages load: the cartesian bundle where npm installed it (1.5 MB,
    parsed three times faster), else the plotly package's full one (4.8 MB). Both are the
    plotly.js version the plotly package writes figures for (package.json pins it)."""
    if CARTESIAN_BUNDLE.is_file():
        return Bundle("plotly.js-cartesian-dist-min", CARTESIAN_BUNDLE.read_bytes())
    full = resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()
    return Bundle("plotly", full)
