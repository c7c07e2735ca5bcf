"""The goodput page's figures: the headline and its cards, where the time went, rolling
goodput, step time, the disruption and straggler tables (the timeline of attempts and ranks:
timeline.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape as _escape
from typing import Any, NamedTuple

import plotly.graph_objects as go

from dashboards.figures.common import (
    BAD,
    CATEGORY_COLORS,
    GOOD,
    INK,
    OTHER,
    Boundary,
    XAxis,
    attempt_traces,
    mark_boundaries,
    wall,
    x_title,
)
from dashboards.figures.common import empty as _empty


def escape(text: str) -> str:
    """A string from a run, for a Plotly text (which reads a few HTML tags and entities)."""
    return _escape(text, quote=False)


class BarRow(NamedTuple):
    label: str
    seconds: float
    color: str


def badput_rows(summary: Mapping[str, Any]) -> list[BarRow]:
    """Goodput, each non-zero badput category (largest first), then the residual."""
    rows = [BarRow("goodput", float(summary.get("goodput_s", 0.0)), GOOD)]
    badput = summary.get("badput_s", {}) or {}
    for name, secs in sorted(badput.items(), key=lambda kv: -kv[1]):
        if secs:
            rows.append(BarRow(name, float(secs), CATEGORY_COLORS.get(name, BAD)))
    other = float(summary.get("other_s", 0.0))
    if other:
        rows.append(BarRow("other (unattributed)", other, OTHER))
    return rows


def goodput_headline(summary: Mapping[str, Any]) -> go.Figure:
    """The goodput fraction as one bar of the whole wall time: goodput, then each badput
    category and the unattributed rest, stacked in percent, the seconds on hover."""
    fraction = summary.get("goodput_fraction")
    total = float(summary.get("total_s") or 0.0)
    if fraction is None or total <= 0:
        return _empty("Goodput", "no time recorded yet")
    fig = go.Figure()
    shown = [r for r in badput_rows(summary) if r.seconds > 0]
    for r in shown:
        fig.add_trace(
            go.Bar(
                x=[100.0 * r.seconds / total],
                y=["wall time"],
                orientation="h",
                name=r.label,
                marker={"color": r.color},
                customdata=[[r.seconds]],
                hovertemplate=f"{r.label}: %{{x:.1f}}% (%{{customdata[0]:.3f}} s)<extra></extra>",
                text=[f"{100.0 * r.seconds / total:.1f}%"] if r.label == "goodput" else None,
                textposition="inside",
            )
        )
    goodput_s, total_s = float(summary["goodput_s"]), float(summary["total_s"])
    fig.update_layout(
        title=f"Goodput {100.0 * float(fraction):.1f}% · {goodput_s:.2f} s of {total_s:.2f} s",
        barmode="stack",
        xaxis={"range": [0, 100], "ticksuffix": "%", "title": "share of the wall time"},
        yaxis={"visible": False},
        legend={"orientation": "h", "y": -0.35, "traceorder": "normal"},
        margin={"t": 60, "b": 20, "l": 20, "r": 20},
    )
    other = float(summary.get("other_s", 0.0))
    if other < 0:
        fig.add_annotation(
            text=f"other: {other:.3f} s (parts overlap: see ACCOUNTING.md)",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=1,
            y=1.08,
            xanchor="right",
        )
    return fig


def badput_breakdown(summary: Mapping[str, Any]) -> go.Figure:
    """Where the wall time went, in seconds."""
    rows = badput_rows(summary)
    if not summary.get("total_s"):
        return _empty("Where the time went", "no time recorded yet")
    fig = go.Figure(
        go.Bar(
            x=[r.seconds for r in rows],
            y=[r.label for r in rows],
            orientation="h",
            marker={"color": [r.color for r in rows]},
            text=[f"{r.seconds:.3f} s" for r in rows],
            textposition="auto",
        )
    )
    fig.update_layout(
        title="Where the time went",
        xaxis_title="seconds",
        yaxis={"autorange": "reversed"},
        margin={"l": 160},
    )
    return fig


def step_time_series(
    points: Sequence[Mapping[str, Any]],
    axis: XAxis = "step",
    ends: Mapping[int, str | None] | None = None,
    ideal_s: float | None = None,
) -> go.Figure:
    """Step time (and loss on a second axis) over steps or wall clock, one trace per
    attempt, each restart marked with how the attempt before it ended (`ends`), the ideal
    step time (`ideal_s`) as a horizontal line."""
    if not points:
        return _empty("Step time", "no steps recorded yet")
    fig = go.Figure()
    bounds = attempt_traces(
        fig, points, lambda p: 1000.0 * float(p["step_time_s"]), "step time (ms)", axis
    )
    if any(p.get("loss") is not None for p in points):
        attempt_traces(fig, points, lambda p: p.get("loss"), "loss", axis, yaxis="y2", dash="dot")
    mark_boundaries(fig, bounds, ends)
    if ideal_s is not None:
        ideal_line(fig, ideal_s)
    fig.update_layout(
        title="Step time",
        xaxis_title=x_title(axis),
        yaxis={"title": "ms", "rangemode": "tozero"},
        yaxis2={"title": "loss", "overlaying": "y", "side": "right", "showgrid": False},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def ideal_line(fig: go.Figure, ideal_s: float) -> None:
    """The ideal step time as a horizontal line (a shape: no trace), in ms."""
    fig.add_hline(
        y=1000.0 * ideal_s,
        line={"color": INK, "dash": "dot", "width": 1.5},
        annotation_text=f"ideal {1000.0 * ideal_s:.1f} ms",
        annotation_position="bottom right",
        annotation_font={"size": 11, "color": INK},
    )


# -- cards and tables --


def duration(seconds: float | None) -> str:
    """Seconds as a person reads them: 850 ms, 12.3 s, 4.5 min, 2.25 h, 3.1 d."""
    if seconds is None:
        return "–"
    x = abs(seconds)
    sign = "-" if seconds < 0 else ""
    if x < 1:
        return f"{sign}{1000 * x:.1f} ms"
    if x < 120:
        return f"{sign}{x:.2f} s"
    if x < 7200:
        return f"{sign}{x / 60:.1f} min"
    if x < 3 * 86_400:
        return f"{sign}{x / 3600:.2f} h"
    return f"{sign}{x / 86_400:.2f} d"


def count(n: float | None) -> str:
    """A count with an SI suffix past a million: 1,234 / 3.28 M / 32.8 G."""
    if n is None:
        return "–"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}"
    return f"{n:,.0f}"


def cards(summary: Mapping[str, Any]) -> dict[str, str]:
    """The headline numbers, by the id of the card's value element."""
    fraction = summary.get("goodput_fraction")
    ideal = summary.get("ideal_step_time_s")
    deviation = summary.get("step_time_deviation_s")
    return {
        "card-goodput": "–" if fraction is None else f"{100 * fraction:.1f} %",
        "card-total": duration(summary.get("total_s")),
        "card-goodput-s": duration(summary.get("goodput_s")),
        "card-steps": "–" if summary.get("steps") is None else f"{int(summary['steps']):,}",
        "card-tokens": count(summary.get("tokens")),
        "card-ideal": duration(ideal),
        "card-deviation": "–"
        if deviation is None
        else ("+" if deviation >= 0 else "") + duration(deviation),
        "card-rank": "–" if summary.get("rank") is None else str(summary["rank"]),
    }


def disruption_table(disruptions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row per attempt that ended failed or stalled: when, why, the steps it lost."""
    return {
        "columns": [
            {"label": "attempt", "num": True},
            {"label": "ended (UTC)", "num": False},
            {"label": "cause", "num": False},
            {"label": "wasted steps", "num": True},
        ],
        "rows": [
            [
                int(d["attempt"]),
                f"{wall(float(d['time'])):%Y-%m-%d %H:%M:%S}",
                str(d["cause"]),
                int(d["wasted_steps"]),
            ]
            for d in disruptions
        ],
        "empty": "no disruption: no attempt of this run failed or stalled",
    }


def straggler_table(stragglers: Sequence[Mapping[str, Any]], ranks: int) -> dict[str, Any]:
    """Ranks whose median step time is above the ranks' median by more than the margin."""
    empty = (
        "one rank: nothing to compare"
        if ranks < 2
        else f"no straggler among {ranks} ranks: every median is within 5% of theirs"
    )
    return {
        "columns": [
            {"label": "rank", "num": True},
            {"label": "median step time", "num": True},
            {"label": "slower by", "num": True},
        ],
        "rows": [
            [
                int(s["rank"]),
                {"text": duration(s["median_step_time_s"]), "sort": s["median_step_time_s"]},
                {"text": f"{100 * s['slower_by']:.1f} %", "sort": s["slower_by"]},
            ]
            for s in stragglers
        ],
        "flags": [True for _ in stragglers],
        "empty": empty,
    }


# -- rolling goodput --


def rolling_goodput(
    windows: Sequence[Mapping[str, Any]],
    window_s: float,
    starts: Mapping[int, float] | None = None,
    ends: Mapping[int, str | None] | None = None,
    whole: float | None = None,
) -> go.Figure:
    """Goodput of back-to-back windows of `window_s` over wall clock, each restart marked
    (`starts`: attempt -> its start), the whole run's goodput (`whole`) as a line."""
    kept = [w for w in windows if w.get("total_s")]
    if not kept:
        return _empty("Rolling goodput", "no time recorded yet")
    fig = go.Figure(
        go.Scatter(
            x=[wall((float(w["start"]) + float(w["end"])) / 2) for w in kept],
            y=[
                None if w.get("goodput_fraction") is None else 100 * w["goodput_fraction"]
                for w in kept
            ],
            customdata=[
                [duration(w["goodput_s"]), duration(w["total_s"]), int(w.get("steps", 0))]
                for w in kept
            ],
            mode="lines+markers",
            line={"color": GOOD, "shape": "hv"},
            marker={"size": 4},
            name=f"goodput per {duration(window_s)} window",
            hovertemplate="%{x}<br>goodput %{y:.1f} %: %{customdata[0]} of %{customdata[1]}"
            "<br>%{customdata[2]} steps<extra></extra>",
        )
    )
    bounds = [Boundary(a, wall(t), None) for a, t in sorted((starts or {}).items())]
    mark_boundaries(fig, bounds, ends)
    if whole is not None:
        fig.add_hline(
            y=100 * whole,
            line={"color": INK, "dash": "dot", "width": 1},
            annotation_text=f"whole run {100 * whole:.1f} %",
            annotation_position="bottom right",
            annotation_font={"size": 11, "color": INK},
        )
    fig.update_layout(
        title=f"Rolling goodput ({duration(window_s)} windows)",
        xaxis_title=x_title("time"),
        yaxis={"title": "goodput %", "range": [0, 105]},
        showlegend=False,
    )
    return fig
