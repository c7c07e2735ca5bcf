"""The goodput page's timeline of attempts and ranks, like a Gantt chart: a row per
(attempt, rank) over wall clock, bars of where its time went (services/timeline.py merges
them and says what a bar's seconds are), each crash marked with its cause, each recovery gap
hatched, excluded windows shaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

from dashboards.figures.common import (
    BAD,
    CATEGORY_COLORS,
    GOOD,
    INK,
    OTHER,
    wall,
)
from dashboards.figures.common import empty as _empty
from dashboards.figures.goodput import duration, escape

# The categories in the legend's order; each drawn over the attempt's extent. Custom
# categories (custom:<name>) come after the named ones, in name order.
TIMELINE_ORDER = (
    "goodput",
    "startup",
    "compile",
    "data_stall",
    "checkpoint_restore",
    "checkpoint_save",
    "eval",
    "profiling",
    "observability",
    "wasted_progress",
    "infra_recovery",
)
TIMELINE_COLORS = {"goodput": GOOD, **CATEGORY_COLORS}
TIMELINE_LABELS = {
    "data_stall": "data stall",
    "checkpoint_restore": "checkpoint restore",
    "checkpoint_save": "checkpoint save",
    "wasted_progress": "wasted progress",
    "infra_recovery": "recovery gap",
}
EXTENT_COLOR = "#e3e7ea"
MIN_OPACITY = 0.45
MIN_WIDTH = 2  # resolutions: the narrowest a bar is drawn (its hover tells its true extent)
# Each row is a band of the category axis, [-HALF, HALF] around its label: its top half holds
# the steps' parts (goodput, wasted progress) and the recovery gap, its bottom half one lane
# per badput category drawn, so that categories that span the same time never hide each other.
HALF = 0.45
MAIN_LANE = ("goodput", "wasted_progress", "infra_recovery")


class TimelineBar(NamedTuple):
    row: str  # the row's label
    category: str
    start: float
    end: float
    covered_s: float
    n: int


def row_label(row: Mapping[str, Any]) -> str:
    return f"attempt {int(row['attempt'])} · rank {int(row['rank'])}"


def timeline_bars(timeline: Mapping[str, Any]) -> list[TimelineBar]:
    """The bars as plain rows, each named by its row's label."""
    labels = [row_label(r) for r in timeline.get("rows", [])]
    return [
        TimelineBar(
            labels[int(b["row"])],
            str(b["category"]),
            float(b["start"]),
            float(b["end"]),
            float(b["covered_s"]),
            int(b["n"]),
        )
        for b in timeline.get("bars", [])
    ]


def _category_key(category: str) -> tuple[int, str]:
    if category in TIMELINE_ORDER:
        return TIMELINE_ORDER.index(category), ""
    return len(TIMELINE_ORDER), category


def _clock(t: float) -> str:
    return f"{wall(t):%Y-%m-%d %H:%M:%S}"


def _lane(category: str, lanes: Sequence[str]) -> tuple[float, float]:
    """(offset, width) of the category's bars in its row's band."""
    if category in MAIN_LANE:
        return -HALF, HALF
    step = HALF / max(1, len(lanes))
    return lanes.index(category) * step, 0.85 * step


def _bar_trace(
    category: str, bars: Sequence[TimelineBar], min_s: float, lanes: Sequence[str]
) -> go.Bar:
    """One category's bars, in its lane: drawn at least `min_s` wide, shaded by their
    density (the seconds charged inside over the seconds they span); the hover tells both."""
    offset, width = _lane(category, lanes)
    spans = [b.end - b.start for b in bars]
    density = [
        min(1.0, b.covered_s / s) if s > 0 else 1.0 for b, s in zip(bars, spans, strict=True)
    ]
    label = TIMELINE_LABELS.get(category, category)
    pattern = {"shape": "/", "fgcolor": "#6d4c57", "solidity": 0.3}
    return go.Bar(
        orientation="h",
        y=[b.row for b in bars],
        base=[wall(b.start) for b in bars],
        x=[1000.0 * max(s, min_s) for s in spans],
        offset=offset,
        width=width,
        marker={
            "color": TIMELINE_COLORS.get(category, OTHER),
            "opacity": [max(MIN_OPACITY, d) for d in density],
            **({"pattern": pattern} if category == "infra_recovery" else {}),
        },
        name=escape(label),
        customdata=[
            [round(b.covered_s, 6), b.n, duration(s), _clock(b.start), _clock(b.end)]
            for b, s in zip(bars, spans, strict=True)
        ],
        hovertemplate="%{y}<br><b>"
        + escape(label)
        + "</b>: %{customdata[0]:,.3f} s charged<br>%{customdata[1]:,} merged over "
        "%{customdata[2]}<br>%{customdata[3]} → %{customdata[4]}<extra></extra>",
    )


def goodput_timeline(timeline: Mapping[str, Any]) -> go.Figure:
    """Attempts and ranks like a Gantt chart (services/timeline.py builds the bars): a row
    per (attempt, rank) over wall clock, bars of where its time went, each crash marked
    (its cause on hover), each recovery gap hatched, excluded windows shaded."""
    rows = list(timeline.get("rows", []))
    if not rows:
        return _empty("Timeline", "no attempts recorded yet: start the run with the hooks attached")
    labels = [row_label(r) for r in rows]
    bars = timeline_bars(timeline)
    min_s = float(timeline.get("resolution_s") or 0.0)
    fig = go.Figure(
        go.Bar(
            orientation="h",
            y=labels,
            base=[wall(float(r["start"])) for r in rows],
            x=[1000.0 * (float(r["end"]) - float(r["start"])) for r in rows],
            offset=-HALF,
            width=2 * HALF,
            marker={"color": EXTENT_COLOR},
            name="attempt (time no part explains)",
            customdata=[
                [escape(timeline_status(r)), duration(float(r["end"]) - float(r["start"]))]
                for r in rows
            ],
            hovertemplate="%{y}: %{customdata[0]}<br>%{customdata[1]}<extra></extra>",
        )
    )
    by_category: dict[str, list[TimelineBar]] = {}
    for b in bars:
        by_category.setdefault(b.category, []).append(b)
    drawn = sorted(by_category, key=_category_key)
    lanes = [c for c in drawn if c not in MAIN_LANE]
    for category in drawn:
        # drawn at least two resolutions wide: a 13 s crash tail in a 4-day run stays visible
        fig.add_trace(_bar_trace(category, by_category[category], MIN_WIDTH * min_s, lanes))
    crashes = list(timeline.get("crashes", []))
    if crashes:
        fig.add_trace(
            go.Scatter(
                x=[wall(float(c["time"])) for c in crashes],
                y=[labels[int(c["row"])] for c in crashes],
                mode="markers",
                marker={
                    "symbol": "x",
                    "size": 13,
                    "color": BAD,
                    "line": {"width": 1, "color": INK},
                },
                name="crash",
                text=[escape(str(c["cause"])) for c in crashes],
                hovertemplate="%{y}<br>ended at %{x}<br>%{text}<extra></extra>",
            )
        )
    for lo, hi in timeline.get("excluded", []):
        fig.add_vrect(x0=wall(lo), x1=wall(hi), fillcolor=OTHER, opacity=0.2, line_width=0)
    _timeline_layout(fig, timeline, len(rows), min_s, len(lanes))
    return fig


def timeline_status(row: Mapping[str, Any]) -> str:
    cause = row.get("cause")
    return f"{row['status']} ({cause})" if cause else str(row["status"])


def _timeline_layout(
    fig: go.Figure, timeline: Mapping[str, Any], rows: int, min_s: float, lanes: int
) -> None:
    shown, total = timeline.get("ranks_shown", []), int(timeline.get("ranks_total", 0))
    note = f"; {len(shown)} of {total} ranks shown" if total > len(shown) else ""
    fig.update_layout(
        title={
            "text": "Timeline of attempts and ranks (wall clock, UTC)"
            "<br><sup>a row's top half: its steps (goodput, wasted) and the recovery gap; "
            "below, a lane per badput category<br>bars merge what lies closer than "
            f"{duration(min_s)}; the paler a bar, the less of it its category fills{note}</sup>"
        },
        barmode="overlay",
        xaxis={"type": "date"},
        yaxis={"autorange": "reversed", "title": None},
        height=230 + rows * (40 + 9 * lanes),
        margin={"l": 130, "t": 90, "b": 90},
        legend={"orientation": "h", "yref": "container", "y": 0.01, "yanchor": "bottom"},
        hoverlabel={"align": "left"},
    )
