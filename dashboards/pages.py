"""Page rendering: Jinja2 templates (dashboards/templates) with autoescape on, so every
string from a run is HTML-escaped where it lands. Pages hold no numbers: they fetch figure
JSON from the service and draw it, so a refresh redraws live data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

PLOTLY_JS_URL = "/static/plotly.min.js"


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Templates from the installed package; a name a template uses but is not given fails
    the render (StrictUndefined) instead of printing nothing."""
    return Environment(
        loader=PackageLoader("dashboards", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
    )


def goodput_page(
    run: Mapping[str, Any] | None,
    runs: Sequence[Mapping[str, Any]],
    server: str = "http://127.0.0.1:8787",
) -> str:
    """The goodput dashboard for `run` (None: no runs yet, and how to start one against
    `server`, this service's address), with a picker over `runs`."""
    return (
        environment()
        .get_template("goodput.html")
        .render(
            title=f"goodput: {run['name']}" if run else "goodput: no runs yet",
            run_name=run["name"] if run else "no runs yet",
            run_id=run["run_id"] if run else None,
            run_status=run.get("status", "") if run else "",
            runs=runs,
            plotly_js=PLOTLY_JS_URL,
            server=server,
        )
    )
