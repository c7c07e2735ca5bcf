"""The ablation pages' figures and tables: the list of ablations, and one ablation as a user
watches it run (progress, each cell's knob values and runs, each non-baseline cell's verdict
against the baseline cell with its axes, and a forest plot of the cells' step-time ratios).

Each builder takes plain dicts (an AblationSummary / AblationRead as the service answers
them) and returns a figure or dashboard.js table specs. Strings from runs (cell names, run
names) are escaped where Plotly draws them; tables place them with textContent."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import plotly.graph_objects as go

from dashboards.figures.common import INK, OTHER, wall
from dashboards.figures.common import empty as _empty
from dashboards.figures.compare import (
    DEFAULT_MARGIN,
    VERDICT_COLORS,
    VERDICT_MEANINGS,
    log_ticks,
    no_change_band,
)
from dashboards.figures.compare_tables import axes_table, compare_url, shown

ENDED = ("completed", "failed")
VERDICT_ORDER = ("keep", "tax", "drop", "inconclusive")
PLOT_CELL_CHARS = 40  # a cell's name on the forest plot's axis, at most


def when(t: float | None) -> str | None:
    """A stored time as UTC date and minute."""
    return None if t is None else wall(float(t)).strftime("%Y-%m-%d %H:%M")


def knobs_text(knobs: Mapping[str, Sequence[Any]]) -> str:
    """{"dispatch": ["grouped", "padded"]} -> "dispatch: grouped, padded"."""
    return " · ".join(f"{k}: {', '.join(_value(v) for v in vs)}" for k, vs in knobs.items())


def _value(v: Any) -> str:
    return str(shown(v)) if v is not None else "none"


def cell_values(values: Mapping[str, Any]) -> str:
    """A cell's knob values: "dispatch=padded, compile=on"."""
    return ", ".join(f"{k}={_value(v)}" for k, v in values.items()) or "(no knob set)"


def ablation_href(base: str, ablation_id: str) -> str:
    return f"{base}/ablations/{quote(ablation_id, safe='')}"


def run_href(base: str, run_id: str) -> str:
    return f"{base}/runs/{quote(run_id, safe='')}/goodput"


# -- the list --


def progress_text(runs: int, ended: int, expected: int | None) -> str:
    """How far an ablation got: "4 of 6 runs ended (1 running)"."""
    if expected:
        text = f"{ended} of {max(expected, runs)} runs ended"
        waiting = expected - runs
        extra = [f"{runs - ended} running"] if runs > ended else []
        extra += [f"{waiting} not started"] if waiting > 0 else []
        return text + (f" ({', '.join(extra)})" if extra else "")
    text = f"{ended} of {runs} runs ended"
    return text + " (not declared: how many will come is unknown)"


def ablation_table(ablations: Sequence[Mapping[str, Any]], base: str = "") -> dict[str, Any]:
    """The ablations, newest first: name (a link), project, knobs, cells, runs ended of
    expected, created."""
    rows = []
    for a in ablations:
        cells = 1
        for values in (a.get("knobs") or {}).values():
            cells *= max(1, len(values))
        expected = a.get("expected_runs")
        rows.append(
            [
                {"text": a["name"], "href": ablation_href(base, a["ablation_id"]),
                 "title": a["ablation_id"]},
                a["project"],
                knobs_text(a.get("knobs") or {}),
                a.get("baseline_cell"),
                {"text": f"{a['runs_ended']} / {expected if expected else '?'}",
                 "sort": a["runs_ended"] / expected if expected else None,
                 "title": progress_text(a["runs"], a["runs_ended"], expected)},
                {"text": when(a["created_at"]), "sort": a["created_at"]},
            ]
        )  # fmt: skip
    return {
        "columns": [
            {"label": "ablation", "num": False},
            {"label": "project", "num": False},
            {"label": "knobs", "num": False},
            {"label": "baseline cell", "num": False},
            {"label": "runs ended / expected", "num": True},
            {"label": "created (UTC)", "num": False},
        ],
        "rows": rows,
        "sortable": True,
        "empty": "no ablation matches",
    }


# -- one ablation --


def runs_table(runs: Sequence[Mapping[str, Any]], base: str = "") -> dict[str, Any]:
    """A cell's runs: name (a link to its pages), status (a badge), seed, started."""
    rows = [
        [
            {"text": r["name"], "href": run_href(base, r["run_id"]), "title": r["run_id"]},
            {"text": r["status"], "badge": r["status"]},
            shown(r.get("seed")),
            when(r.get("created_at")),
        ]
        for r in runs
    ]
    return {
        "columns": [
            {"label": "run", "num": False},
            {"label": "status", "num": False},
            {"label": "seed", "num": True},
            {"label": "started (UTC)", "num": False},
        ],
        "rows": rows,
        "empty": "no run of this cell yet",
    }


def refusal_words(refusal: Mapping[str, Any]) -> dict[str, str]:
    """Why a cell has no verdict yet, in plain words: {title, message}."""
    error = str(refusal.get("error", ""))
    message = str(refusal.get("message", ""))
    if error == "waiting":
        return {"title": "Waiting for runs", "message": message}
    if error == "incomplete_receipt":
        missing = refusal.get("missing") or {}
        items = sorted({str(i) for got in missing.values() for i in got or ()})
        if items == ["attempt_end"]:
            return {"title": "Waiting for runs to finish", "message": message}
        lacking = f" (missing: {', '.join(items)})" if items else ""
        return {"title": "No verdict: a receipt is incomplete", "message": message + lacking}
    if error == "lane_mismatch":
        fields = ", ".join(str(f) for f in refusal.get("fields") or ())
        return {
            "title": "No verdict: the cells differ beyond the ablation's knobs",
            "message": f"{message} (fields: {fields})" if fields else message,
        }
    if error == "replicates_differ":
        return {"title": "No verdict: a cell's runs are not replicates of one lane",
                "message": message}  # fmt: skip
    return {"title": "No verdict", "message": message}


def cell_views(ablation: Mapping[str, Any], base: str = "") -> list[dict[str, Any]]:
    """What the page shows of each cell, baseline first: its knob values, its runs, and its
    verdict against the baseline cell (badge, meaning, reasons, axes) or why there is none."""
    ablation_id = str(ablation["ablation_id"])
    base_cell = ablation.get("baseline_cell")
    cells = sorted(ablation.get("cells") or (), key=lambda c: not c.get("baseline"))
    views = []
    for c in cells:
        comparison = c.get("comparison")
        refusal = c.get("refusal")
        view: dict[str, Any] = {
            "cell": c["cell"],
            "values": cell_values(c.get("knobs") or {}),
            "baseline": bool(c.get("baseline")),
            "runs": runs_table(c.get("runs") or (), base),
            "progress": _cell_progress(c.get("runs") or ()),
            "verdict": None,
            "refusal": None,
        }
        if comparison is not None:
            verdict = str(comparison["verdict"])
            view["verdict"] = {
                "verdict": verdict,
                "meaning": VERDICT_MEANINGS.get(verdict, ""),
                "reasons": list(comparison.get("reasons") or ()),
                "axes": axes_table(comparison.get("axes") or ()),
                "runs": f"{_count(comparison, 'candidate')} run(s) against "
                f"{_count(comparison, 'baseline')} of the baseline",
            }
        elif refusal is not None:
            view["refusal"] = refusal_words(refusal)
        if not view["baseline"] and base_cell:
            view["compare_href"] = compare_url(
                base, str(base_cell), str(c["cell"]), ablation=ablation_id
            )
        views.append(view)
    return views


def _count(comparison: Mapping[str, Any], role: str) -> int:
    return int((comparison.get("runs") or {}).get(role) or 0)


def _cell_progress(runs: Sequence[Mapping[str, Any]]) -> str:
    ended = sum(r["status"] in ENDED for r in runs)
    return f"{ended} of {len(runs)} run{'s' * (len(runs) != 1)} ended"


def _plot_label(cell: str) -> str:
    """A cell's name for the plot's axis: cut to PLOT_CELL_CHARS and escaped (Plotly reads a
    few tags in a label)."""
    if len(cell) > PLOT_CELL_CHARS:
        cell = cell[: PLOT_CELL_CHARS - 1] + "…"
    return html.escape(cell, quote=False)


def cell_forest(ablation: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> go.Figure:
    """Each non-baseline cell's step-time ratio to the baseline cell with its 95% interval,
    one row a cell, colored by the cell's verdict, on a log axis around 1.0 (no change) with
    the ±margin band; cells without a verdict yet say so on their row."""
    title = "Step time, cell / baseline cell, 95% intervals"
    cells = [c for c in ablation.get("cells") or () if not c.get("baseline")]
    if not cells:
        return _empty(title, "only the baseline cell so far: nothing to compare it with")
    rows: dict[str, list[tuple[str, Mapping[str, Any], str]]] = {}
    pending: list[str] = []
    for c in cells:
        comparison = c.get("comparison") or {}
        ratio = comparison.get("step_time_ratio") or {}
        label = _plot_label(str(c["cell"]))
        if ratio.get("value") is None:
            pending.append(label)
            continue
        rows.setdefault(str(comparison["verdict"]), []).append((label, ratio, str(c["cell"])))
    fig = go.Figure()
    xs = [1 - margin, 1 + margin]
    for verdict in sorted(rows, key=lambda v: VERDICT_ORDER.index(v) if v in VERDICT_ORDER else 9):
        got = rows[verdict]
        values = [float(r["value"]) for _, r, _ in got]
        lows = [_or(r.get("low"), float(r["value"])) for _, r, _ in got]
        highs = [_or(r.get("high"), float(r["value"])) for _, r, _ in got]
        xs += [*values, *lows, *highs]
        fig.add_trace(
            go.Scatter(
                x=values,
                y=[label for label, _, _ in got],
                mode="markers",
                name=verdict,
                marker={"size": 13, "color": VERDICT_COLORS.get(verdict, OTHER)},
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": [h - v for h, v in zip(highs, values, strict=True)],
                    "arrayminus": [v - lo for v, lo in zip(values, lows, strict=True)],
                    "thickness": 2,
                    "width": 8,
                },
                hovertext=[
                    f"{label}: {verdict}, ratio {v:.3f} (95%: {lo:.3f}–{hi:.3f})"
                    for (label, _, _), v, lo, hi in zip(got, values, lows, highs, strict=True)
                ],
                hoverinfo="text",
            )
        )
    if pending:
        fig.add_trace(
            go.Scatter(
                x=[1.0] * len(pending),
                y=pending,
                mode="text",
                text=["no verdict yet"] * len(pending),
                textfont={"color": INK, "size": 12},
                name="no verdict yet",
                hoverinfo="skip",
            )
        )
    lo, hi = min(xs) / 1.25, max(xs) * 1.25
    no_change_band(fig, margin, f"1.0 = no change; band ±{margin:.1%}; left of it: faster")
    order = [_plot_label(str(c["cell"])) for c in cells]
    fig.update_layout(
        title=title,
        xaxis={
            "type": "log",
            "title": "step time ratio (log scale; lower is faster)",
            "range": [math.log10(lo), math.log10(hi)],
            **log_ticks(lo, hi),
        },
        yaxis={
            "type": "category",
            "categoryorder": "array",
            "categoryarray": order[::-1],
            "range": [-0.7, len(order) - 0.3],  # room above and below the end rows
        },
        legend={"orientation": "h", "y": -0.25, "title": {"text": "verdict"}},
        margin={"l": 190, "t": 70},
        height=max(300, 170 + 48 * len(order)),
    )
    return fig


def _or(v: Any, default: float) -> float:
    return default if v is None else float(v)
