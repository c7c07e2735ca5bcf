"""The goodput page's figures: the headline, where the time went, step time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

from dashboards.figures.common import (
    BAD,
    GOOD,
    OTHER,
    XAxis,
    attempt_traces,
    mark_boundaries,
    x_title,
)
from dashboards.figures.common import empty as _empty


def goodput_headline(summary: Mapping[str, Any]) -> go.Figure:
    """Goodput fraction as a gauge, with the seconds behind it."""
    fraction = summary.get("goodput_fraction")
    if fraction is None:
        return _empty("Goodput", "no time recorded yet")
    fig = go.Figure(
        go.Indicator(
            mode="gauge+number",
            value=100.0 * float(fraction),
            number={"suffix": "%", "valueformat": ".1f"},
            gauge={"axis": {"range": [0, 100]}, "bar": {"color": GOOD}},
            title={"text": f"goodput {summary['goodput_s']:.2f} s of {summary['total_s']:.2f} s"},
        )
    )
    fig.update_layout(title="Goodput", margin={"t": 60, "b": 10})
    return fig


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
            rows.append(BarRow(name, float(secs), BAD))
    other = float(summary.get("other_s", 0.0))
    if other:
        rows.append(BarRow("other (unattributed)", other, OTHER))
    return rows


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
) -> go.Figure:
    """Step time (and loss on a second axis) over steps or wall clock, one trace per
    attempt, each restart marked with how the attempt before it ended (`ends`)."""
    if not points:
        return _empty("Step time", "no steps recorded yet")
    fig = go.Figure()
    bounds = attempt_traces(
        fig, points, lambda p: 1000.0 * float(p["step_time_s"]), "step time (ms)", axis
    )
    if any(p.get("loss") is not None for p in points):
        attempt_traces(fig, points, lambda p: p.get("loss"), "loss", axis, yaxis="y2", dash="dot")
    mark_boundaries(fig, bounds, ends)
    fig.update_layout(
        title="Step time",
        xaxis_title=x_title(axis),
        yaxis={"title": "ms", "rangemode": "tozero"},
        yaxis2={"title": "loss", "overlaying": "y", "side": "right", "showgrid": False},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
