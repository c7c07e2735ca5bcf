"""What every page draws alike: colors, the empty figure, attempts as separate traces with
their boundaries marked, and the x axis (step or wall clock)."""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import plotly.graph_objects as go

GOOD = "#2a9d8f"
BAD = "#e76f51"
OTHER = "#8d99ae"
WARN = "#e9c46a"
INK = "#264653"
# one color per attempt, in order (attempt 0 first); cycles past the end
ATTEMPT_COLORS = ("#2a9d8f", "#e76f51", "#457b9d", "#f4a261", "#6a4c93", "#8ab17d")
# each badput category's color, on every page (the wire contract's categories:
# trainer_hooks.records.BADPUT_CATEGORIES; a test checks each has one); custom ones get OTHER
CATEGORY_COLORS = {
    "startup": "#457b9d",
    "compile": "#6a4c93",
    "data_stall": "#f4a261",
    "checkpoint_save": "#8ab17d",
    "checkpoint_restore": "#5a7d4f",
    "eval": "#4ba3c3",
    "wasted_progress": BAD,
    "infra_recovery": "#b5838d",
    "observability": WARN,
    "profiling": "#ffb4a2",
}

XAxis = Literal["step", "time"]
X_AXES: tuple[XAxis, ...] = ("step", "time")


def empty(title: str, note: str, wrap: int | None = None) -> go.Figure:
    """A figure with no data that says why (and, where it helps, what to do). Plotly never
    wraps an annotation: `wrap` breaks the note into lines of at most that many characters
    (at spaces; the note is already HTML-escaped, and an entity holds no space)."""
    if wrap is not None:
        note = "<br>".join(textwrap.wrap(note, wrap))
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis={"visible": False},
        yaxis={"visible": False},
        annotations=[{"text": note, "showarrow": False, "font": {"size": 15}}],
    )
    return fig


def attempt_color(attempt: int) -> str:
    return ATTEMPT_COLORS[attempt % len(ATTEMPT_COLORS)]


def wall(t: float) -> datetime:
    """A stored time (seconds since the epoch) as the UTC datetime Plotly draws."""
    return datetime.fromtimestamp(t, tz=UTC)


class Boundary(NamedTuple):
    """Where attempt `attempt` starts on the x axis, and how the one before it ended."""

    attempt: int
    x: Any
    previous_end: str | None  # e.g. "crashed: oom", "completed"; None for the first attempt


def by_attempt(points: Sequence[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    """Points grouped by their `attempt`, each group in the order given, groups by attempt."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(int(p.get("attempt", 0)), []).append(p)
    return dict(sorted(groups.items()))


def x_of(point: Mapping[str, Any], axis: XAxis) -> Any:
    """The point's x: its step, or its wall-clock start (`start`, seconds since the epoch)."""
    return int(point["step"]) if axis == "step" else wall(float(point["start"]))


def attempt_traces(
    fig: go.Figure,
    points: Sequence[Mapping[str, Any]],
    y: Callable[[Mapping[str, Any]], float | None],
    name: str,
    axis: XAxis = "step",
    *,
    mode: str = "lines",
    yaxis: str = "y",
    dash: str | None = None,
    showlegend: bool = True,
) -> list[Boundary]:
    """One trace per attempt (never one line zig-zagging across a restart); returns each
    attempt's first x, for `mark_boundaries`."""
    boundaries = []
    groups = by_attempt(points)
    for attempt, group in groups.items():
        xs = [x_of(p, axis) for p in group]
        label = name if len(groups) == 1 else f"{name} · attempt {attempt}"
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=[y(p) for p in group],
                mode=mode,
                name=label,
                legendgroup=f"attempt {attempt}",
                yaxis=yaxis,
                line={"color": attempt_color(attempt), "dash": dash},
                showlegend=showlegend,
            )
        )
        boundaries.append(Boundary(attempt, xs[0], None))
    return boundaries


def mark_boundaries(
    fig: go.Figure,
    boundaries: Sequence[Boundary],
    ends: Mapping[int, str | None] | None = None,
) -> None:
    """A dashed vertical line where each attempt after the first starts, labelled above the
    plot (never over the data) with the attempt and how the one before it ended (`ends`:
    attempt -> its end, e.g. "crashed")."""
    ends = ends or {}
    for b in boundaries[1:]:
        before = ends.get(b.attempt - 1)
        # an end's cause is a run's text: escaped, as Plotly reads a few tags in a text
        after = f" (after: {html.escape(before, quote=False)})" if before else ""
        text = f"attempt {b.attempt}{after}"
        fig.add_vline(x=b.x, line={"color": INK, "dash": "dash", "width": 1})
        fig.add_annotation(
            x=b.x,
            y=1.0,
            yref="paper",
            yanchor="bottom",
            xanchor="center",
            text=text,
            showarrow=False,
            font={"size": 11, "color": INK},
        )


def x_title(axis: XAxis) -> str:
    return "step" if axis == "step" else "wall clock (UTC)"
