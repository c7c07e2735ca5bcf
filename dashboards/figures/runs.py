"""The runs page's table: one row per run with its figures, as dashboard.js draws tables
(columns, rows of cells, one check box per run for compare). Pure: plain dicts in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

# What each figure is (services/fleet.py computes them): the columns' tooltips.
HELP = {
    "started (UTC)": "when the run was created (its run record's created_at), UTC",
    "duration": "accounted wall time of the run's rank: first attempt start to last attempt "
    "end (or last sign of life while it runs), less excluded windows",
    "goodput": "goodput seconds over the duration (docs/ACCOUNTING.md), slowest rank",
    "tokens/s": "whole run: each rank's tokens over its summed step time, summed over ranks "
    "(the receipt's figure)",
    "drop rate": "whole run, routing rank (0): dropped token-choices over routed "
    "token-choices (num_tokens x top_k), every E layer and step",
    "MaxVio": "mean over the routing rank's records (every E layer and step) of max/mean - 1 "
    "of the routed experts' assignments",
    "attempts": "attempts of the run (restarts + 1)",
    "lane": "the dispatch the run asked for (runtime_policy.dispatch_requested)",
    "pattern": "the model plan's layer pattern",
}
# label, numeric (right-aligned)
COLUMNS: tuple[tuple[str, bool], ...] = (
    ("name", False),
    ("project", False),
    ("status", False),
    ("started (UTC)", False),
    ("duration", True),
    ("goodput", True),
    ("tokens/s", True),
    ("drop rate", True),
    ("MaxVio", True),
    ("attempts", True),
    ("lane", False),
    ("pattern", False),
    ("pages", False),
)
OTHER_PAGES = (("performance", "perf"), ("routing", "routing"), ("receipt", "receipt"))


def started_text(t: float, seconds: bool = False) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime(
        "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    )


def duration_text(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 3 h 07 min, 2 d 04 h."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86_400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86_400} d {whole % 86_400 // 3600:02d} h"


def rate_text(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def percent_text(fraction: float, digits: int = 1) -> str:
    return f"{100.0 * fraction:.{digits}f}%"


def _num(value: float | None, text: str | None, title: str | None = None) -> Any:
    if value is None:
        return None
    cell: dict[str, Any] = {"text": text, "sort": value}
    if title:
        cell["title"] = title
    return cell


def run_href(base: str, run_id: str, page: str = "goodput") -> str:
    return f"{base}/runs/{quote(run_id, safe='')}/{page}"


def run_row(run: Mapping[str, Any], base: str) -> list[Any]:
    """One run's cells (`run`: a RunSummary's fields and services/fleet.py's figures)."""
    total = float(run.get("total_s") or 0.0)
    fraction, drop, vio = run.get("goodput_fraction"), run.get("drop_rate"), run.get("max_vio")
    tokens = run.get("tokens_per_s")
    records = int(run.get("routing_records") or 0)
    goodput_title = (
        f"{run.get('goodput_s', 0.0):.2f} s of {total:.2f} s" if fraction is not None else None
    )
    return [
        {"text": run["name"], "href": run_href(base, run["run_id"]), "title": run["run_id"]},
        run.get("project"),
        run.get("status"),
        {
            "text": started_text(run["created_at"]),
            "sort": run["created_at"],
            "title": started_text(run["created_at"], seconds=True) + " UTC",
        },
        _num(total, duration_text(total)) if total > 0 else None,
        _num(fraction, percent_text(fraction) if fraction is not None else None, goodput_title),
        _num(tokens, rate_text(tokens) if tokens is not None else None),
        _num(drop, percent_text(drop, 2) if drop is not None else None, f"{records} records"),
        _num(vio, f"{vio:.3f}" if vio is not None else None, f"{records} records"),
        int(run.get("attempts") or 0),
        run.get("lane"),
        run.get("pattern"),
        [
            {"text": label, "href": run_href(base, run["run_id"], page), "title": f"{page} page"}
            for page, label in OTHER_PAGES
        ],
    ]


def runs_table(runs: Sequence[Mapping[str, Any]], base: str, *, filtered: bool) -> dict[str, Any]:
    """The table spec: sortable, a check box per run (its id) for compare; `filtered` words
    the empty table (filters that match nothing)."""
    return {
        "columns": [
            {"label": label, "num": num, "help": HELP.get(label, "")} for label, num in COLUMNS
        ],
        "rows": [run_row(r, base) for r in runs],
        "select": [r["run_id"] for r in runs],
        "flags": [r.get("status") in ("failed", "stalled") for r in runs],
        "sortable": True,
        "empty": (
            "No runs match these filters: clear a filter or widen the dates."
            if filtered
            else "No runs yet."
        ),
    }
