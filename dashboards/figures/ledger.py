"""The feature ledger page's figures and tables: every knob value ever ablated with its
standing (a badge colored as the verdict it rests on) and whether it needs re-review, every
verdict it had, and the trend of each knob value's step-time ratio over time.

Each builder takes plain dicts (a LedgerRead's entries, as the service answers them).
Knob values and environments come from runs: escaped where Plotly draws them, placed with
textContent in tables."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from dashboards.figures.ablations import ablation_href, when
from dashboards.figures.common import INK, WARN, wall
from dashboards.figures.common import empty as _empty
from dashboards.figures.compare import DEFAULT_MARGIN, log_ticks
from dashboards.figures.compare_tables import shown

# a standing's badge: the verdict it comes from (dashboard.css `.badge-<verdict>`)
STANDING_VERDICTS = {
    "default-on win": "keep",
    "measured tax": "tax",
    "dropped": "drop",
    "unproven": "inconclusive",
}
# one color per knob value on the trend, none a verdict's (those mean keep / tax / drop)
VALUE_COLORS = ("#457b9d", "#6a4c93", "#f4a261", "#264653", "#b5838d", "#4ba3c3", "#8ab17d")
ENV_KEYS = ("torch", "cuda", "device", "git_sha")
LANE_KEYS = ("pattern", "world_size", "dtype")
SHA_CHARS = 10
# a verdict's label on the trend: its color, darkened where the badge's is too light for text
VERDICT_TEXT = {"keep": "#1f776c", "tax": "#9a7515", "drop": "#c4553a", "inconclusive": "#5c6b73"}


def knob_value(entry: Mapping[str, Any]) -> str:
    """`dispatch=padded`."""
    v = entry.get("value")
    return f"{entry['knob']}={'none' if v is None else shown(v)}"


def environment_text(env: Mapping[str, Any]) -> str:
    """torch 2.13.0 · CUDA 12.4 · cpu · git 0123456789."""
    parts = []
    for key in ENV_KEYS:
        v = env.get(key)
        if v is None:
            continue
        v = str(v)
        if key == "git_sha":
            parts.append(f"git {v[:SHA_CHARS]}")
        elif key == "torch":
            parts.append(f"torch {v}")
        elif key == "cuda":
            parts.append(f"CUDA {v}")
        else:
            parts.append(v)
    return " · ".join(parts) or "not recorded"


def lane_text(lane: Mapping[str, Any]) -> str:
    """pattern AEME · world 1 · float32."""
    words = {"pattern": "pattern ", "world_size": "world ", "dtype": ""}
    parts = [f"{words[k]}{shown(lane[k])}" for k in LANE_KEYS if lane.get(k) is not None]
    return " · ".join(parts) or "not recorded"


def ratio_text(ratio: Mapping[str, Any]) -> str | None:
    v, lo, hi = ratio.get("value"), ratio.get("low"), ratio.get("high")
    if v is None:
        return None
    if lo is None or hi is None:
        return f"{float(v):.3f}×"
    return f"{float(v):.3f}× ({float(lo):.3f}–{float(hi):.3f})"


def standing_table(entries: Sequence[Mapping[str, Any]], base: str = "") -> dict[str, Any]:
    """One row per knob value: its standing (why, as the cell's title), whether it needs
    re-review (flagged, why as the title), its newest verdict's date, environment and lane,
    how many verdicts it had, and the newest verdict's ablation."""
    rows, flags = [], []
    for e in entries:
        verdicts = list(e.get("verdicts") or ())
        last = verdicts[-1] if verdicts else {}
        review = bool(e.get("needs_rereview"))
        rows.append(
            [
                {"text": knob_value(e), "sort": knob_value(e)},
                {
                    "text": e["standing"],
                    "badge": STANDING_VERDICTS.get(e["standing"], "inconclusive"),
                    "title": e.get("standing_reason") or "",
                },
                {"text": "needs re-review", "badge": "rereview",
                 "title": e.get("rereview_reason") or ""} if review else None,
                {"text": when(last.get("date")), "sort": last.get("date")},
                ratio_text(last.get("step_time_ratio") or {}),
                environment_text(last.get("environment") or {}),
                lane_text(last.get("lane") or {}),
                len(verdicts),
                {"text": last["ablation_id"], "href": ablation_href(base, last["ablation_id"])}
                if last else None,
            ]
        )  # fmt: skip
        flags.append(review)
    return {
        "columns": [
            {"label": "knob value", "num": False},
            {"label": "standing", "num": False, "help": "hover for the verdict it rests on"},
            {"label": "re-review", "num": False, "help": "hover for what changed"},
            {"label": "newest verdict (UTC)", "num": False},
            {"label": "step time ×", "num": True, "help": "its ratio to the baseline, 95%"},
            {"label": "environment", "num": False},
            {"label": "lane", "num": False},
            {"label": "verdicts", "num": True},
            {"label": "newest ablation", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "sortable": True,
        "empty": "no knob value has a verdict yet",
    }


def history_table(entries: Sequence[Mapping[str, Any]], base: str = "") -> dict[str, Any]:
    """Every verdict of every knob value, newest first: its date, verdict (a badge, its
    reasons as the title), step-time ratio, runs, ablation and cells, environment, lane."""
    listed = [(e, v) for e in entries for v in e.get("verdicts") or ()]
    listed.sort(key=lambda ev: (-float(ev[1]["date"]), knob_value(ev[0])))
    rows = []
    for e, v in listed:
        runs = v.get("runs") or {}
        rows.append(
            [
                knob_value(e),
                {"text": when(v["date"]), "sort": v["date"]},
                {"text": v["verdict"], "badge": v["verdict"],
                 "title": "\n".join(v.get("reasons") or ())},
                ratio_text(v.get("step_time_ratio") or {}),
                f"{runs.get('candidate')} vs {runs.get('baseline')}",
                {"text": v["ablation_id"], "href": ablation_href(base, v["ablation_id"])},
                f"{v['cell']} vs {v['baseline_cell']}",
                environment_text(v.get("environment") or {}),
                lane_text(v.get("lane") or {}),
            ]
        )  # fmt: skip
    return {
        "columns": [
            {"label": "knob value", "num": False},
            {"label": "date (UTC)", "num": False},
            {"label": "verdict", "num": False, "help": "hover for its reasons"},
            {"label": "step time ×", "num": True},
            {"label": "runs", "num": True, "help": "the cell's runs vs the baseline's"},
            {"label": "ablation", "num": False},
            {"label": "cells", "num": False},
            {"label": "environment", "num": False},
            {"label": "lane", "num": False},
        ],
        "rows": rows,
        "sortable": True,
        "empty": "no verdict yet",
    }


def trend_figure(entries: Sequence[Mapping[str, Any]], margin: float = DEFAULT_MARGIN) -> go.Figure:
    """Each knob value's step-time ratio (with its 95% interval) at each verdict's date: one
    line per knob value, each point labelled with its verdict; 1.0 (no change) and the
    ±margin band drawn."""
    title = "Each knob value's step time over time (ratio to its baseline, 95% intervals)"
    fig = go.Figure()
    xs: list[float] = []
    for i, e in enumerate(entries):
        got = [v for v in e.get("verdicts") or () if (v.get("step_time_ratio") or {}).get("value")]
        if not got:
            continue
        color = VALUE_COLORS[i % len(VALUE_COLORS)]
        values = [float(v["step_time_ratio"]["value"]) for v in got]
        lows = [_or(v["step_time_ratio"].get("low"), x) for v, x in zip(got, values, strict=True)]
        highs = [_or(v["step_time_ratio"].get("high"), x) for v, x in zip(got, values, strict=True)]
        xs += [*values, *lows, *highs]
        name = html.escape(knob_value(e), quote=False)
        fig.add_trace(
            go.Scatter(
                x=[wall(float(v["date"])) for v in got],
                y=values,
                mode="lines+markers+text",
                name=name,
                line={"color": color, "width": 2},
                marker={"size": 10, "color": color},
                text=[str(v["verdict"]) for v in got],
                textposition="middle right",
                textfont={"size": 11, "color": [VERDICT_TEXT.get(v["verdict"], INK) for v in got]},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [h - x for h, x in zip(highs, values, strict=True)],
                    "arrayminus": [x - lo for x, lo in zip(values, lows, strict=True)],
                    "color": color,
                    "thickness": 1.5,
                    "width": 6,
                },
                hovertext=[
                    f"{name}: {v['verdict']} ({html.escape(str(v['ablation_id']), quote=False)})"
                    f", ratio {x:.3f}"
                    for v, x in zip(got, values, strict=True)
                ],
                hoverinfo="text+x",
            )
        )
    if not fig.data:
        return _empty(
            title, "no verdict yet: each ablation's cells land here once their runs completed"
        )
    lo, hi = min([*xs, 1 - margin]) / 1.15, max([*xs, 1 + margin]) * 1.15
    fig.add_hrect(y0=1 - margin, y1=1 + margin, fillcolor=WARN, opacity=0.3, line_width=0)
    fig.add_hline(y=1.0, line={"color": INK, "dash": "dash", "width": 1})
    fig.update_layout(
        title=title,
        xaxis={"title": "verdict date (its newest run's start, UTC)"},
        yaxis={
            "type": "log",
            "title": "step time ratio (lower is faster)",
            "range": [math.log10(lo), math.log10(hi)],
            **log_ticks(lo, hi),
        },
        legend={"orientation": "h", "y": -0.25},
        margin={"t": 70},
        height=420,
    )
    return fig


def _or(v: Any, default: float) -> float:
    return default if v is None else float(v)


def notes(
    entries: Sequence[Mapping[str, Any]], newest: Mapping[str, Any] | None
) -> tuple[str, str]:
    """The line above the standings (how many knob values, checked against what) and the
    re-review banner (empty when nothing needs it)."""
    note = ""
    if entries:
        note = f"{len(entries)} knob value{'s' * (len(entries) != 1)}"
        if newest:
            note += "; standings checked against the newest run's environment: " + (
                environment_text(newest)
            )
    review = sum(bool(e["needs_rereview"]) for e in entries)
    rereview = (
        f"{review} knob value{'s' * (review != 1)} need{'s' * (review == 1)} re-review: the "
        "newest run's torch, CUDA or device differs from the one its standing rests on "
        "(hover the flag for what changed); run its ablation again"
        if review
        else ""
    )
    return note, rereview
