"""Page rendering. Pages hold no numbers: they fetch figure JSON from the service and draw it,
so a refresh redraws live data. Every string from a run is HTML-escaped here."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from string import Template
from typing import Any

PLOTLY_JS_URL = "/static/plotly.min.js"


def _template(name: str) -> Template:
    return Template(resources.files("dashboards").joinpath("templates", name).read_text())


def goodput_page(run: Mapping[str, Any] | None, runs: Sequence[Mapping[str, Any]]) -> str:
    """The goodput dashboard for `run` (None: no runs yet), with a picker over `runs`."""
    options = "\n".join(
        '<option value="{}"{}>{} ({})</option>'.format(
            html.escape(r["run_id"]),
            " selected" if run and r["run_id"] == run["run_id"] else "",
            html.escape(r["name"]),
            html.escape(r["run_id"][:8]),
        )
        for r in runs
    )
    return _template("goodput.html").substitute(
        title=html.escape(f"goodput: {run['name']}" if run else "goodput: no runs yet"),
        run_name=html.escape(run["name"]) if run else "no runs yet",
        run_id=html.escape(run["run_id"]) if run else "",
        run_status=html.escape(run.get("status", "")) if run else "",
        options=options,
        plotly_js=PLOTLY_JS_URL,
        run_id_json=html.escape(json.dumps(run["run_id"] if run else None)),
    )
