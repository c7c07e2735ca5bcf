"""The compare page's figures (a candidate against a baseline, each side one run or several
replicates): the ratios with their intervals around 1.0, badput side by side, step time /
loss / drop rate of every run overlaid by step in its side's color. Its tables and refusals
are in compare_tables.py; the verdicts' colors are shared with the ablation and ledger pages.

Each builder takes plain dicts (a CompareRead, StepPoints, a routing series, as the service
answers them), extracts plain rows, then builds the figure."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import plotly.graph_objects as go

from dashboards.figures.common import BAD, GOOD, INK, OTHER, WARN, by_attempt
from dashboards.figures.common import empty as _empty

ROLES = ("baseline", "candidate")
ROLE_COLORS = {"baseline": "#457b9d", "candidate": "#f4a261"}
ROLE_WIDTHS = {"baseline": 4.0, "candidate": 2.0}
# a verdict's color, wherever one is drawn (badges: dashboard.css `.badge-<verdict>`, a test
# checks they agree), and what it means in plain words
VERDICT_COLORS = {"keep": GOOD, "tax": WARN, "drop": BAD, "inconclusive": OTHER}
VERDICT_MEANINGS = {
    "keep": "faster or leaner, quality not worse",
    "tax": "costs speed or memory, buys quality: keep only on purpose",
    "drop": "worse quality, or slower or heavier without better quality",
    "inconclusive": "the data cannot tell yet",
}
ATTEMPT_DASHES = ("solid", "dot", "dash", "longdash", "dashdot")  # attempt 0, 1, ...
DEFAULT_MARGIN = 0.02  # service/services/compare.py's defaults, left out of links
DEFAULT_LOSS_TOLERANCE = 0.01
DROP_BINS = 100  # bins of a downsampled drop-rate series
RESTART_CAUSE_CHARS = 24  # how an attempt ended, in a restart's label, at most

Points = Sequence[Mapping[str, Any]]


# -- ratios --


class RatioRow(NamedTuple):
    label: str
    value: float | None
    low: float | None
    high: float | None
    lower_is_better: bool


def ratio_rows(result: Mapping[str, Any]) -> list[RatioRow]:
    """Step time and tokens/s, candidate over baseline, with their 95% intervals."""
    rows = []
    for key, label, lower in (
        ("step_time_ratio", "step time", True),
        ("tokens_per_s_ratio", "tokens/s", False),
    ):
        r = result.get(key) or {}
        rows.append(RatioRow(label, r.get("value"), r.get("low"), r.get("high"), lower))
    return rows


def outcome(row: RatioRow, margin: float) -> str:
    """better / worse when the whole interval lies past the margin band, else unclear."""
    if row.low is None or row.high is None:
        return "unclear"
    if row.high < 1 - margin:
        return "better" if row.lower_is_better else "worse"
    if row.low > 1 + margin:
        return "worse" if row.lower_is_better else "better"
    return "unclear"


OUTCOME_COLORS = {"better": GOOD, "worse": BAD, "unclear": OTHER}


def ratio_text(row: RatioRow) -> str:
    if row.value is None:
        return "no interval"
    if row.low is None or row.high is None:
        return f"{row.value:.3f}"
    return f"{row.value:.3f} (95%: {row.low:.3f}–{row.high:.3f})"


def _interval(r: RatioRow) -> dict[str, Any] | None:
    """The 95% interval as asymmetric error bars around the ratio."""
    if r.value is None or r.low is None or r.high is None:
        return None
    return {
        "type": "data",
        "symmetric": False,
        "array": [r.high - r.value],
        "arrayminus": [r.value - r.low],
        "thickness": 2,
        "width": 8,
    }


def ratio_forest(result: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> go.Figure:
    """Each ratio as a point with its 95% interval, on a log axis around 1.0 (no change),
    the margin band shaded: green when the interval lies wholly on the better side of it."""
    rows = [r for r in ratio_rows(result) if r.value is not None]
    title = "Candidate / baseline, 95% intervals"
    if not rows:
        return _empty(title, "fewer than 8 steady steps on a side: no interval")
    fig = go.Figure()
    for r in rows:
        fig.add_trace(
            go.Scatter(
                x=[r.value],
                y=[f"{r.label}<br>{ratio_text(r)}"],
                mode="markers",
                marker={"size": 13, "color": OUTCOME_COLORS[outcome(r, margin)]},
                error_x=_interval(r),
                name=f"{r.label} ({'lower' if r.lower_is_better else 'higher'} is better)",
                hovertemplate=f"{r.label}: {ratio_text(r)}<extra></extra>",
            )
        )
    xs = [1 - margin, 1 + margin] + [v for r in rows for v in (r.value, r.low, r.high) if v]
    no_change_band(fig, margin, f"1.0 = no change; band ±{margin:.1%} (the margin)")
    fig.update_layout(
        title=title,
        xaxis={
            "type": "log",
            "title": "candidate / baseline (log scale)",
            "range": [math.log10(min(xs) / 1.25), math.log10(max(xs) * 1.25)],
            **log_ticks(min(xs) / 1.25, max(xs) * 1.25),
        },
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h", "y": -0.3},
        margin={"l": 170, "t": 70},
    )
    return fig


# ratios worth a tick on a log axis: 1-2-5 over the decades, and the steps near 1.0
TICKS = sorted(
    {m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5)}
    | {0.8, 0.9, 0.95, 0.98, 0.99, 1.01, 1.02, 1.05, 1.1, 1.25}
)


def no_change_band(fig: go.Figure, margin: float, note: str) -> None:
    """On a log x axis of ratios: the band of no real difference (1 +- margin), a dashed
    line at 1 and the note above the plot."""
    fig.add_vrect(x0=1 - margin, x1=1 + margin, fillcolor=WARN, opacity=0.3, line_width=0)
    fig.add_vline(x=1.0, line={"color": INK, "dash": "dash", "width": 1})
    fig.add_annotation(
        x=0.0,  # log10(1.0): annotations on a log axis take the exponent
        y=1.0,
        yref="paper",
        yanchor="bottom",
        text=note,
        showarrow=False,
        font={"size": 11, "color": INK},
    )


def log_ticks(lo: float, hi: float, most: int = 9) -> dict[str, Any]:
    """Labelled ticks at round ratios, 1.0 first, then outwards, each at least 1/most of
    the axis from the ticks kept (Plotly's own label a log axis's minor digits alone)."""
    gap = (math.log10(hi) - math.log10(lo)) / most
    kept = [1.0] if lo <= 1.0 <= hi else []
    for t in sorted((t for t in TICKS if lo <= t <= hi), key=lambda t: abs(math.log10(t))):
        if all(abs(math.log10(t / k)) >= gap for k in kept):
            kept.append(t)
    if len(kept) < 3:
        return {}
    vals = sorted(kept)
    return {"tickvals": vals, "ticktext": [f"{v:g}" for v in vals]}


# -- badput --


class BadputRow(NamedTuple):
    category: str
    baseline: float
    candidate: float


def badput_rows(result: Mapping[str, Any]) -> list[BadputRow]:
    """Categories with seconds on either side, largest first."""
    rows = []
    for name, pair in (result.get("badput_s") or {}).items():
        b, c = float(pair.get("baseline") or 0.0), float(pair.get("candidate") or 0.0)
        if b or c:
            rows.append(BadputRow(name, b, c))
    return sorted(rows, key=lambda r: (-max(r.baseline, r.candidate), r.category))


def badput_bars(result: Mapping[str, Any]) -> go.Figure:
    """Badput seconds per category, baseline and candidate side by side, largest on top."""
    rows = badput_rows(result)
    title = "Badput by category (seconds)"
    if not rows:
        return _empty(title, "no badput on either run")
    fig = go.Figure()
    for role in ROLES:
        values = [getattr(r, role) for r in rows]
        fig.add_trace(
            go.Bar(
                y=[r.category for r in rows],
                x=values,
                orientation="h",
                name=role,
                marker={"color": ROLE_COLORS[role]},
                text=[seconds(v) for v in values],
                textposition="outside",
                textfont={"size": 11},
                cliponaxis=False,
            )
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis={"title": "seconds", "rangemode": "tozero"},
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h", "y": -0.25, "traceorder": "normal"},
        margin={"l": 130, "r": 60},
        height=max(340, 150 + 46 * len(rows)),  # two readable bars a category
    )
    return fig


def seconds(v: float) -> str:
    """Seconds for a label: three significant digits, whole seconds with separators past
    a thousand (25,100 s, not 2.51e+04 s)."""
    return f"{v:,.0f} s" if abs(v) >= 1000 else f"{v:.3g} s"


# -- overlays by step --


class RunSeries(NamedTuple):
    """One run's points on an overlay: its id, its name (a run's text: escaped where drawn),
    its points by attempt then step, and how each of its attempts ended."""

    run_id: str
    name: str
    points: Points
    ends: Mapping[int, str | None] | None = None


def overlay(
    title: str,
    sides: Mapping[str, Sequence[RunSeries]],
    y: Callable[[Mapping[str, Any]], float | None],
    unit: str,
    note: str = "",
) -> go.Figure:
    """Baseline and candidate on one chart by step: one trace per run and attempt, in its
    side's color (replicates of a side share it, named by run), an attempt's dash; each
    restart marked with the side, the run where there are several, the attempt and how the
    attempt before it ended."""
    kept = {
        role: [
            s._replace(points=[p for p in s.points if y(p) is not None])
            for s in sides.get(role, ())
        ]
        for role in ROLES
    }
    drawn = {role: [s for s in runs if s.points] for role, runs in kept.items()}
    if not any(drawn.values()):
        return _empty(title, f"neither side recorded {title.lower()} yet")
    fig = go.Figure()
    for i, role in enumerate(ROLES):
        several = len(kept[role]) > 1
        for run in drawn[role]:
            who = f"{role} · {html.escape(run.name, quote=False)}" if several else role
            groups = by_attempt(run.points)
            for attempt, group in groups.items():
                fig.add_trace(
                    go.Scatter(
                        x=[p["step"] for p in group],
                        y=[y(p) for p in group],
                        mode="lines",
                        name=who if len(groups) == 1 else f"{who} · attempt {attempt}",
                        legendgroup=role,
                        line={
                            "color": ROLE_COLORS[role],
                            "dash": ATTEMPT_DASHES[attempt % len(ATTEMPT_DASHES)],
                            "width": ROLE_WIDTHS[role],  # a wider baseline shows under
                        },
                        opacity=0.75 if several else 1.0,
                    )
                )
                if attempt != min(groups):
                    _mark_restart(fig, who, attempt, group[0]["step"], run.ends or {}, i)
    lacking = [role for role in ROLES if not drawn[role]]
    subtitle = "; ".join([*(f"{r}: none recorded" for r in lacking), *([note] if note else [])])
    steps = [p["step"] for runs in drawn.values() for s in runs for p in s.points]
    fig.update_layout(
        title=title + (f"<br><sup>{subtitle}</sup>" if subtitle else ""),
        # the steps drawn, not stretched to hold a restart's label (autorange would)
        xaxis={"title": "step", "range": [min(steps), max(max(steps), min(steps) + 1)]},
        yaxis={"title": unit, "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 70},
    )
    return fig


def _mark_restart(
    fig: go.Figure, who: str, attempt: int, x: Any, ends: Mapping[int, str | None], i: int
) -> None:
    role = who.split(" · ")[0]
    before = ends.get(attempt - 1)
    if before and len(before) > RESTART_CAUSE_CHARS:
        before = before[: RESTART_CAUSE_CHARS - 1] + "…"
    after = f" (after: {html.escape(before, quote=False)})" if before else ""
    fig.add_vline(x=x, line={"color": ROLE_COLORS[role], "dash": "dash", "width": 1})
    fig.add_annotation(
        x=x,
        y=1.0 - 0.08 * i,
        yref="paper",
        text=f"{who}: attempt {attempt}{after}",
        showarrow=False,
        xanchor="left",
        font={"size": 11, "color": INK},
        bgcolor="rgba(255,255,255,0.7)",
    )


def drop_rate_series(routing: Mapping[str, Any], bins: int = DROP_BINS) -> tuple[Points, bool]:
    """A run's drop rate by step over all its E layers, from its routing series: at each
    step, the dropped assignments over the routed ones summed over the layers, i.e. the
    layers' drop rates weighted by their `num_tokens` (top_k is one per model).

    When a layer's series is downsampled (`total` above its points), layers keep different
    steps: the kept records are then pooled the same way per bin of `ceil(range / bins)`
    steps (x: the mean step of the bin's records), an estimate from a sample. Returns
    ({step, attempt, drop_rate} points by attempt then step, sampled)."""
    layers = routing.get("layers") or []
    sampled = any(int(s.get("total", 0)) > len(s.get("points") or ()) for s in layers)
    kept = [
        p
        for s in layers
        for p in s.get("points") or ()
        if p.get("drop_rate") is not None and (p.get("num_tokens") or 0) > 0
    ]
    if not kept:
        return [], sampled
    lo, hi = min(p["step"] for p in kept), max(p["step"] for p in kept)
    width = max(1, math.ceil((hi - lo + 1) / bins)) if sampled else 1
    pooled: dict[
        tuple[int, int], list[float]
    ] = {}  # (attempt, bin) -> [dropped, routed, sum of steps, n]
    for p in kept:
        acc = pooled.setdefault((int(p["attempt"]), (p["step"] - lo) // width), [0.0] * 4)
        acc[0] += float(p["drop_rate"]) * p["num_tokens"]
        acc[1] += p["num_tokens"]
        acc[2] += p["step"]
        acc[3] += 1
    points = [
        {"step": acc[2] / acc[3], "attempt": attempt, "drop_rate": acc[0] / acc[1]}
        for (attempt, _), acc in sorted(pooled.items())
    ]
    return points, sampled
