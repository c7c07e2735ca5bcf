"""The trends page's figures: one point per run at its start (calendar time), so that a
drift over days or weeks shows: goodput, where the time went, tokens/s, MFU, peak memory,
drop rate and MaxVio. Pure: plain dicts in (a RunSummary's fields and services/fleet.py's
figures), `go.Figure`s out.

Each builder validates nothing it cannot draw: a run without the figure is left out of that
chart; a chart with no run says why (`empty`)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

from dashboards.figures.common import CATEGORY_COLORS, GOOD, INK, OTHER, empty, wall
from dashboards.figures.runs import run_href

X_TITLE = "run start (UTC)"
GIB = 2.0**30
_EXTRA = ("#b8b8ff", "#90be6d", "#f9844a", "#577590", "#f94144", "#43aa8b")


def category_color(category: str, index: int = 0) -> str:
    """CATEGORY_COLORS' color of a badput category (custom ones cycle through others)."""
    if category in CATEGORY_COLORS:
        return CATEGORY_COLORS[category]
    return _EXTRA[index % len(_EXTRA)]


class Point(NamedTuple):
    """One run on a trend chart."""

    x: Any  # its start, a UTC datetime
    y: float
    label: str  # its name, escaped for Plotly's hover text
    href: str


def points(
    runs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any]], float | None], base: str
) -> list[Point]:
    """The runs that have the figure, oldest first."""
    out = []
    for r in sorted(runs, key=lambda r: (r["created_at"], r["run_id"])):
        v = value(r)
        if v is not None:
            out.append(
                Point(
                    wall(r["created_at"]),
                    float(v),
                    html.escape(r["name"]),
                    run_href(base, r["run_id"]),
                )
            )
    return out


def day(t: float) -> str:
    """A stored time as its UTC date."""
    return wall(t).strftime("%Y-%m-%d")


def _layout(fig: go.Figure, title: str, y_title: str, **yaxis: Any) -> go.Figure:
    fig.update_layout(
        title=title,
        height=300,
        margin={"l": 60, "r": 20, "t": 45, "b": 50},
        xaxis={"title": X_TITLE},
        yaxis={"title": y_title, **yaxis},
        showlegend=False,
        hovermode="closest",
    )
    return fig


def trend(
    runs: Sequence[Mapping[str, Any]],
    value: Callable[[Mapping[str, Any]], float | None],
    *,
    title: str,
    y_title: str,
    y_format: str,
    none: str,
    base: str = "",
    color: str = INK,
    **yaxis: Any,
) -> go.Figure:
    """One figure per run over calendar time, a marker per run at its start; the hover
    names the run, a click opens it (customdata: the run's goodput page)."""
    pts = points(runs, value, base)
    if not pts:
        # A third of the page wide: short lines, or the note runs off both sides.
        return empty(title, none if runs else "no runs match", wrap=36)
    fig = go.Figure(
        go.Scatter(
            x=[p.x for p in pts],
            y=[p.y for p in pts],
            text=[p.label for p in pts],
            customdata=[p.href for p in pts],
            mode="markers",
            marker={"color": color, "size": 9, "line": {"color": "#fff", "width": 1}},
            hovertemplate=f"%{{text}}<br>%{{x|%Y-%m-%d %H:%M:%S}}<br>%{{y:{y_format}}}"
            "<extra></extra>",
        )
    )
    return _layout(fig, title, y_title, **yaxis)


def _pct(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def get(r: Mapping[str, Any]) -> float | None:
        v = r.get(key)
        return None if v is None else 100.0 * float(v)

    return get


def _memory(r: Mapping[str, Any]) -> float | None:
    v = r.get("peak_memory_bytes")
    return None if v is None else float(v) / GIB


def goodput_trend(runs: Sequence[Mapping[str, Any]], base: str = "") -> go.Figure:
    return trend(
        runs,
        _pct("goodput_fraction"),
        title="Goodput",
        y_title="% of wall time",
        y_format=".1f",
        none="no run has recorded time yet",
        base=base,
        color=GOOD,
        range=[0, 100],
    )


def mix_rows(runs: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The runs with recorded time, oldest first, and the badput categories any of them has
    (largest total first)."""
    timed = sorted(
        (r for r in runs if float(r.get("total_s") or 0.0) > 0),
        key=lambda r: (r["created_at"], r["run_id"]),
    )
    totals: dict[str, float] = {}
    for r in timed:
        for c, s in (r.get("badput_s") or {}).items():
            if s:
                totals[c] = totals.get(c, 0.0) + float(s) / float(r["total_s"])
    return timed, sorted(totals, key=lambda c: (-totals[c], c))


def _badput(category: str) -> Callable[[Mapping[str, Any]], float]:
    def get(r: Mapping[str, Any]) -> float:
        return float((r.get("badput_s") or {}).get(category, 0.0))

    return get


def badput_mix(runs: Sequence[Mapping[str, Any]], base: str = "") -> go.Figure:
    """Where each run's time went, in % of its duration, stacked: goodput, each badput
    category, then the unattributed rest."""
    title = "Where the time went"
    timed, categories = mix_rows(runs)
    if not timed:
        return empty(title, "no run has recorded time yet" if runs else "no runs match", wrap=36)
    xs = [wall(r["created_at"]) for r in timed]
    names = [html.escape(r["name"]) for r in timed]
    hrefs = [run_href(base, r["run_id"]) for r in timed]
    parts: list[tuple[str, str, Callable[[Mapping[str, Any]], float]]] = [
        ("goodput", GOOD, lambda r: float(r.get("goodput_s") or 0.0))
    ]
    for i, c in enumerate(categories):
        parts.append((c, category_color(c, i), _badput(c)))
    parts.append(("other (unattributed)", OTHER, lambda r: float(r.get("other_s") or 0.0)))
    fig = go.Figure()
    for label, color, seconds in parts:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[100.0 * seconds(r) / float(r["total_s"]) for r in timed],
                name=label,
                text=names,
                customdata=hrefs,
                stackgroup="mix",
                mode="lines+markers",
                line={"color": color, "width": 1},
                marker={"size": 5},
                hovertemplate=f"%{{text}}<br>{html.escape(label)} %{{y:.1f}}%<extra></extra>",
            )
        )
    _layout(fig, title, "% of wall time", range=[0, 100])
    fig.update_layout(
        height=360,
        margin={"l": 60, "r": 20, "t": 45, "b": 100},
        showlegend=True,
        legend={"orientation": "h", "y": -0.3, "x": 0, "traceorder": "normal"},
    )
    return fig


def x_range(runs: Sequence[Mapping[str, Any]]) -> list[Any] | None:
    """One calendar range for every chart (all the runs' starts, padded), so that charts
    above one another line up even where some runs lack a figure."""
    if not runs:
        return None
    lo = min(float(r["created_at"]) for r in runs)
    hi = max(float(r["created_at"]) for r in runs)
    pad = max(0.04 * (hi - lo), 3600.0)
    return [wall(lo - pad), wall(hi + pad)]


def trend_figures(runs: Sequence[Mapping[str, Any]], base: str = "") -> dict[str, go.Figure]:
    """Every chart of the page, by element id, on one calendar range."""
    figs = _figures(runs, base)
    shared = x_range(runs)
    for fig in figs.values():
        if fig.data and shared is not None:
            fig.update_xaxes(range=shared)
    return figs


def _figures(runs: Sequence[Mapping[str, Any]], base: str) -> dict[str, go.Figure]:
    return {
        "goodput": goodput_trend(runs, base),
        "mix": badput_mix(runs, base),
        "tokens": trend(
            runs,
            lambda r: r.get("tokens_per_s"),
            title="Tokens/s",
            y_title="tokens/s",
            y_format=",.0f",
            none="no run has steps yet",
            base=base,
            rangemode="tozero",
        ),
        "mfu": trend(
            runs,
            _pct("mfu"),
            title="MFU",
            y_title="% of device peak",
            y_format=".2f",
            none="no run recorded FLOPs with a device peak (environment.peak_flops_per_s)",
            base=base,
            rangemode="tozero",
        ),
        "memory": trend(
            runs,
            _memory,
            title="Peak memory",
            y_title="GiB allocated",
            y_format=".2f",
            none="no run recorded device memory (mem_allocated_peak)",
            base=base,
            rangemode="tozero",
        ),
        "drop_rate": trend(
            runs,
            _pct("drop_rate"),
            title="Drop rate",
            y_title="% of token-choices",
            y_format=".2f",
            none="no run sent routing records",
            base=base,
            rangemode="tozero",
        ),
        "max_vio": trend(
            runs,
            lambda r: r.get("max_vio"),
            title="MaxVio",
            y_title="max / mean - 1",
            y_format=".3f",
            none="no run sent routing records",
            base=base,
            rangemode="tozero",
        ),
    }
