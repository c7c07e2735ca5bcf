"""Pure figure builders: plain data in, `plotly.graph_objects.Figure` out.

Each builder validates its input, extracts plain rows, and builds the figure from those rows
only. Empty data gives an empty figure with a note, never an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

GOOD = "#2a9d8f"
BAD = "#e76f51"
OTHER = "#8d99ae"


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[{"text": note, "showarrow": False, "font": {"size": 16}}],
    )
    return fig


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


def step_time_series(points: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Step time (and loss on a second axis) over steps."""
    if not points:
        return _empty("Step time", "no steps recorded yet")
    steps = [int(p["step"]) for p in points]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[1000.0 * float(p["step_time_s"]) for p in points],
            mode="lines+markers",
            name="step time (ms)",
            line={"color": GOOD},
        )
    )
    losses = [p.get("loss") for p in points]
    if any(v is not None for v in losses):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=losses,
                mode="lines",
                name="loss",
                yaxis="y2",
                line={"color": OTHER, "dash": "dot"},
            )
        )
    fig.update_layout(
        title="Step time",
        xaxis_title="step",
        yaxis={"title": "ms", "rangemode": "tozero"},
        yaxis2={"title": "loss", "overlaying": "y", "side": "right", "showgrid": False},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
