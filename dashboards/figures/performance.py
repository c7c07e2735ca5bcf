"""The performance page's figures: step time against the ideal with its deviation band,
tokens/s, TFLOP/s, MFU, device against host time, peak memory, step time per rank as a
heatmap, and the recompiles table. Each series is drawn one trace per attempt, restarts
marked; an absent measure (no peak FLOP/s, no CUDA events on a CPU) is said, not drawn
as zeros."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go

from dashboards.figures.common import (
    INK,
    WARN,
    Boundary,
    XAxis,
    attempt_traces,
    by_attempt,
    mark_boundaries,
    wall,
    x_of,
    x_title,
)
from dashboards.figures.common import empty as _empty

Point = Mapping[str, Any]
Ends = Mapping[int, str | None] | None
GIB = float(2**30)
STRAGGLER_SPAN = 0.05  # the stragglers' margin (service/calc/step_stats.py STRAGGLER_MARGIN)
# Below the plot, under the axis' ticks and title whatever their height (dates take two lines)
LEGEND = {"orientation": "h", "yref": "container", "y": 0.0, "yanchor": "bottom"}
MARGIN = {"b": 100}


def empty(title: str, note: str) -> go.Figure:
    """common.empty, its note wrapped to fit half a page's width."""
    return _empty(title, note, wrap=60)


def _series(
    title: str,
    points: Sequence[Point],
    y: Callable[[Point], float | None],
    name: str,
    unit: str,
    axis: XAxis,
    ends: Ends,
    none_note: str,
) -> go.Figure:
    """One measure of the steps, one trace per attempt; `none_note` when no step has it."""
    if not points:
        return empty(title, "no steps recorded yet")
    if all(y(p) is None for p in points):
        return empty(title, none_note)
    fig = go.Figure()
    mark_boundaries(fig, attempt_traces(fig, points, y, name, axis), ends)
    frame(fig, title, unit, axis, [x_of(p, axis) for p in points], [y(p) for p in points])
    return fig


def frame(
    fig: go.Figure,
    title: str,
    unit: str,
    axis: XAxis,
    xs: Sequence[Any],
    ys: Sequence[float | None],
) -> None:
    """Title, axes and legend of a series: x spans the data (a restart's label does not widen
    it), y from zero with room above the data for the labels drawn along the top."""
    top = max((v for v in ys if v is not None), default=0.0)
    yaxis: dict[str, Any] = {"title": unit, "rangemode": "tozero"}
    if top > 0 and min((v for v in ys if v is not None), default=0.0) >= 0:
        yaxis["range"] = [0, 1.18 * top]
    fig.update_layout(
        title=title,
        xaxis={"title": x_title(axis), "range": [min(xs), max(xs)] if xs else None},
        yaxis=yaxis,
        legend=LEGEND,
        margin=MARGIN,
    )


def _ms(key: str) -> Callable[[Point], float | None]:
    def get(p: Point) -> float | None:
        v = p.get(key)
        return None if v is None else 1000.0 * float(v)

    return get


def step_time_band(
    points: Sequence[Point],
    axis: XAxis = "step",
    ends: Ends = None,
    ideal_s: float | None = None,
    deviation_s: float | None = None,
) -> go.Figure:
    """Step time per attempt, the ideal step time as a line and, from it, the recent
    deviation (p90 of the last 20 steps minus the median of the 100 before) as a band."""
    fig = _series(
        "Step time", points, _ms("step_time_s"), "step time", "ms", axis, ends, "no step times"
    )
    if not points or ideal_s is None:
        return fig
    ideal = 1000.0 * ideal_s
    top = max(ideal, ideal + 1000.0 * (deviation_s or 0.0))
    current = fig.layout.yaxis.range
    if current is not None and top * 1.18 > current[1]:
        fig.update_layout(yaxis_range=[0, 1.18 * top])
    if deviation_s is not None and deviation_s != 0:
        top = ideal + 1000.0 * deviation_s
        fig.add_hrect(
            y0=min(ideal, top),
            y1=max(ideal, top),
            fillcolor=WARN if deviation_s > 0 else "#a8dadc",
            opacity=0.35,
            line_width=0,
            annotation_text=f"deviation {1000.0 * deviation_s:+.1f} ms",
            annotation_position="top left",
            annotation_font={"size": 11, "color": INK},
        )
    fig.add_hline(
        y=ideal,
        line={"color": INK, "dash": "dot", "width": 1.5},
        annotation_text=f"ideal {ideal:.1f} ms",
        annotation_position="bottom right",
        annotation_font={"size": 11, "color": INK},
    )
    return fig


def tokens_per_s(points: Sequence[Point], axis: XAxis = "step", ends: Ends = None) -> go.Figure:
    return _series(
        "Tokens per second",
        points,
        lambda p: p.get("tokens_per_s"),
        "tokens/s",
        "tokens/s",
        axis,
        ends,
        "no throughput: the steps' wall times are zero",
    )


def tflops(points: Sequence[Point], axis: XAxis = "step", ends: Ends = None) -> go.Figure:
    return _series(
        "Model TFLOP/s",
        points,
        lambda p: p.get("tflops_per_s"),
        "TFLOP/s",
        "TFLOP/s",
        axis,
        ends,
        "no FLOPs recorded: the hooks count a step's FLOPs when the loop gives a flops_key",
    )


def mfu(
    points: Sequence[Point], axis: XAxis = "step", ends: Ends = None, peak_note: str | None = None
) -> go.Figure:
    """MFU in %; `peak_note` (why the device's peak is unknown) replaces the chart."""
    if points and peak_note:
        return empty("MFU", escape(peak_note))
    return _series(
        "MFU",
        points,
        lambda p: None if p.get("mfu") is None else 100.0 * float(p["mfu"]),
        "MFU",
        "% of peak",
        axis,
        ends,
        "no MFU: no FLOPs recorded",
    )


def device_vs_host(
    points: Sequence[Point],
    axis: XAxis = "step",
    ends: Ends = None,
    device: str | None = None,
    timed: Sequence[Point] | None = None,
) -> go.Figure:
    """The step's device time (CUDA events) beside its wall time on the host. The hooks time
    one step in `device_every` (10 by default) on the device: the device line joins those
    steps, a marker on each, and leaves the others out rather than drawing them as zero.
    `timed`: those steps, downsampled on their own device times (a long run's `points`,
    downsampled on step time, keep few of them); by default the timed ones of `points`."""
    title = "Device vs host time"
    if not points:
        return empty(title, "no steps recorded yet")
    if timed is None:
        timed = [p for p in points if p.get("device_time_s") is not None]
    if not timed:
        where = f"this run ran on {escape(device)}" if device else "none was recorded"
        return empty(title, f"no device time: it is measured with CUDA events, and {where}")
    fig = go.Figure()
    bounds = attempt_traces(fig, points, _ms("step_time_s"), "host (wall)", axis)
    attempt_traces(
        fig, timed, _ms("device_time_s"), "device", axis, mode="lines+markers", dash="dot"
    )
    mark_boundaries(fig, bounds, ends)
    ys = [_ms("step_time_s")(p) for p in points] + [_ms("device_time_s")(p) for p in timed]
    frame(fig, title, "ms", axis, [x_of(p, axis) for p in [*points, *timed]], ys)
    return fig


# -- from the step grid (services/performance.py): buckets of steps per rank and attempt --


def grid_x(grid: Mapping[str, Any], bucket: int) -> Any:
    """The middle of a bucket on the grid's axis: a step number, or a wall-clock time."""
    mid = (bucket + 0.5) * float(grid["width"])
    return mid if grid["axis"] == "step" else wall(float(grid["origin"]) + mid)


def memory(
    grid: Mapping[str, Any], rank: int, ends: Ends = None, device: str | None = None
) -> go.Figure:
    """The rank's peak allocated memory per bucket (the largest step's), per attempt.

    The hooks read the peak every few steps (each read covers the steps since the last), so
    steps without a read are left out rather than drawn as gaps: lines join the reads, and
    markers show a read with no neighbour."""
    title = f"Peak memory (rank {rank})"
    cells = [c for c in grid.get("cells", []) if c["rank"] == rank]
    if not cells:
        return empty(title, "no steps recorded yet")
    if all(c.get("mem_peak") is None for c in cells):
        on = f" (this run: {escape(device)})" if device else ""
        return empty(
            title,
            f"no peak memory recorded: the hooks read the CUDA allocator's peak, on GPUs only{on}",
        )
    axis: XAxis = grid["axis"]
    points = sorted(
        (
            {
                "attempt": c["attempt"],
                "step": c["first_step"],
                "start": c["first_start"],
                "mem": c["mem_peak"] / GIB,
            }
            for c in cells
            if c.get("mem_peak") is not None
        ),
        key=lambda p: (p["attempt"], p["start"] if axis == "time" else p["step"]),
    )
    fig = go.Figure()
    bounds = attempt_traces(
        fig, points, lambda p: p["mem"], "peak allocated", axis, mode="lines+markers"
    )
    mark_boundaries(fig, bounds, ends)
    frame(fig, title, "GiB", axis, [x_of(p, axis) for p in points], [p["mem"] for p in points])
    return fig


class HeatCell(NamedTuple):
    rank: int
    bucket: int
    n: int
    mean_ms: float


def heat_cells(grid: Mapping[str, Any]) -> list[HeatCell]:
    """Each (rank, bucket)'s mean step time over its steps of every attempt."""
    sums: dict[tuple[int, int], tuple[int, float]] = {}
    for c in grid.get("cells", []):
        key = (int(c["rank"]), int(c["bucket"]))
        n, busy = sums.get(key, (0, 0.0))
        sums[key] = (n + int(c["n"]), busy + float(c["busy_s"]))
    return [HeatCell(r, b, n, 1000.0 * busy / n) for (r, b), (n, busy) in sorted(sums.items()) if n]


def rank_heatmap(
    grid: Mapping[str, Any], ends: Ends = None, stragglers: Sequence[int] = ()
) -> go.Figure:
    """Ranks x buckets of steps (or of wall time), each cell the mean step time; the color
    scale spans the 2nd to 98th percentile so that one slow compile step does not wash out a
    straggler. Straggler ranks are flagged in their label."""
    title = "Step time per rank"
    cells = heat_cells(grid)
    if not cells:
        return empty(title, "no steps recorded yet")
    ranks = list(grid.get("ranks") or sorted({c.rank for c in cells}))
    lo = min(c.bucket for c in cells)
    hi = max(c.bucket for c in cells)
    z = np.full((len(ranks), hi - lo + 1), np.nan)
    n = np.zeros_like(z)
    row_of = {r: i for i, r in enumerate(ranks)}
    for c in cells:
        z[row_of[c.rank], c.bucket - lo] = c.mean_ms
        n[row_of[c.rank], c.bucket - lo] = c.n
    zmin, zmax = color_range(z[~np.isnan(z)])
    labels = [f"rank {r}" + (" (straggler)" if r in stragglers else "") for r in ranks]
    axis: XAxis = grid["axis"]
    fig = go.Figure(
        go.Heatmap(
            z=[[None if np.isnan(v) else round(float(v), 3) for v in row] for row in z],
            x=[grid_x(grid, b) for b in range(lo, hi + 1)],
            y=labels,
            customdata=n.astype(int).tolist(),
            zmin=float(zmin),
            zmax=float(max(zmax, zmin + 1e-9)),
            colorscale="YlOrRd",
            colorbar={"title": {"text": "ms"}},
            hoverongaps=False,
            hovertemplate="%{y}<br>%{x}<br>mean %{z:.2f} ms over %{customdata} steps"
            "<extra></extra>",
        )
    )
    mark_boundaries(fig, _grid_boundaries(grid), ends)
    width = float(grid["width"])
    per = ("step" if width == 1 else f"{width:,.0f} steps") if axis == "step" else f"{width:,.3g} s"
    shown, total = len(ranks), int(grid.get("ranks_total") or len(ranks))
    more = f"; the lowest {shown} of {total} ranks" if total > shown else ""
    fig.update_layout(
        title={"text": f"{title}<br><sup>mean step time per {per}{more}</sup>"},
        xaxis_title=x_title(axis),
        yaxis={"autorange": "reversed", "type": "category"},
        height=max(320, 170 + 26 * len(ranks)),
        margin={"l": 130},
    )
    return fig


def color_range(values: np.ndarray[Any, Any]) -> tuple[float, float]:
    """The heatmap's color scale: the 2nd to 98th percentile of the cells (one slow compile
    step does not wash out the rest), at least STRAGGLER_SPAN around their median so that
    noise of a fraction of a percent does not look like a straggler."""
    if not values.size:
        return 0.0, 1.0
    low, mid, high = np.percentile(values, [2, 50, 98])
    return float(min(low, mid * (1 - STRAGGLER_SPAN))), float(max(high, mid * (1 + STRAGGLER_SPAN)))


def _grid_boundaries(grid: Mapping[str, Any]) -> list[Boundary]:
    """Where each attempt starts on the grid's axis: its earliest bucket's first step (or
    start) over every rank."""
    axis: XAxis = grid["axis"]
    firsts: dict[int, Mapping[str, Any]] = {}
    for a, cells in by_attempt(grid.get("cells", [])).items():
        firsts[a] = min(
            cells, key=lambda c: c["first_start"] if axis == "time" else c["first_step"]
        )
    return [
        Boundary(a, x_of({"step": c["first_step"], "start": c["first_start"]}, axis), None)
        for a, c in sorted(firsts.items())
    ]


def recompile_table(recompiles: Mapping[str, Any]) -> dict[str, Any]:
    """One row per recompile observed (the first ones, by time): where, when, and the guard
    that failed."""
    rows = [
        [
            int(r["attempt"]),
            int(r["rank"]),
            r.get("step"),
            f"{wall(float(r['time'])):%Y-%m-%d %H:%M:%S}",
            str(r["observed"]),
            r.get("reason") or "–",
        ]
        for r in recompiles.get("rows", [])
    ]
    return {
        "columns": [
            {"label": "attempt", "num": True},
            {"label": "rank", "num": True},
            {"label": "step", "num": True},
            {"label": "time (UTC)", "num": False},
            {"label": "compile id", "num": False},
            {"label": "reason (guard that failed)", "num": False},
        ],
        "rows": rows,
        "empty": "no recompile observed: each compiled frame kept its first graph",
        "sortable": True,
    }


def recompile_note(recompiles: Mapping[str, Any]) -> str:
    observed, counted = int(recompiles.get("observed", 0)), int(recompiles.get("counted", 0))
    shown = len(recompiles.get("rows", []))
    text = f"{observed} recompile{'s' if observed != 1 else ''} observed"
    if shown < observed:
        text += f" (the first {shown} listed)"
    if counted > observed:
        text += f"; the attempts' end counters say {counted} (some observations were dropped)"
    return text
