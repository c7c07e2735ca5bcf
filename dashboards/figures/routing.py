"""The routing page's figures and tables, from the plain data of
service/services/routing_view.py: one E layer (tokens per expert over step buckets, the
buckets' rates, MaxVio, losses, each expert's totals) or every layer at once (the overview:
drop rate and MaxVio per layer over steps)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from dashboards.figures.common import (
    Boundary,
    attempt_traces,
    by_attempt,
    mark_boundaries,
)
from dashboards.figures.common import empty as _empty

Ends = Mapping[int, str | None] | None
# below the plot, clear of the x axis' title; the charts that carry it are LINE_HEIGHT tall
LEGEND_BELOW = {"orientation": "h", "y": -0.3, "yanchor": "top"}
LINE_HEIGHT = 400
LAYER_COLORS = (
    "#264653",
    "#2a9d8f",
    "#e76f51",
    "#457b9d",
    "#f4a261",
    "#6a4c93",
    "#8ab17d",
    "#b5838d",
    "#1d3557",
    "#e9c46a",
    "#9c6644",
    "#588157",
)


def _steps(col: Mapping[str, Any]) -> str:
    first, last = int(col["first"]), int(col["last"])
    return str(first) if first == last else f"{first}–{last}"


def column_labels(columns: Sequence[Mapping[str, Any]]) -> list[str]:
    """One x category per bucket, in time order: its steps, and its attempt after the first
    (a resumed attempt repeats step numbers, its buckets stay apart)."""
    multi = len({c["attempt"] for c in columns}) > 1
    return [
        f"{_steps(c)} · a{c['attempt']}" if multi and c["attempt"] else _steps(c) for c in columns
    ]


def _per_bucket(view: Mapping[str, Any]) -> str:
    """What a column holds: one record (a routing window of the hooks' `routing_every`
    steps, one step or several) or a bucket of step numbers summing records."""
    width = int(view.get("width", 1))
    return "per record" if width <= 1 else f"per bucket of {width:,} steps"


def row_labels(view: Mapping[str, Any]) -> list[str]:
    return [r["label"] + (" (dead)" if r.get("dead") else "") for r in view["rows"]]


def tokens_heatmap(view: Mapping[str, Any], ends: Ends = None) -> go.Figure:
    """Tokens per expert (rows, the null slot last) over step buckets (columns, summed over
    each bucket's records): one trace per attempt on one color scale, restarts marked."""
    columns = view.get("columns") or []
    if not columns or not view.get("rows"):
        return _empty("Tokens per expert", "no routing records for this layer yet")
    labels = column_labels(columns)
    ylabels = row_labels(view)
    fig = go.Figure()
    bounds = []
    start = 0
    for attempt, group in by_attempt(columns).items():
        idx = list(range(start, start + len(group)))
        start += len(group)
        fig.add_trace(
            go.Heatmap(
                x=[labels[i] for i in idx],
                y=ylabels,
                z=[[row["z"][i] for i in idx] for row in view["rows"]],
                coloraxis="coloraxis",
                name=f"attempt {attempt}",
                hovertemplate="steps %{x}<br>%{y}: %{z:,} tokens<extra>attempt "
                + str(attempt)
                + "</extra>",
            )
        )
        bounds.append(Boundary(attempt, idx[0] - 0.5, None))
    mark_boundaries(fig, bounds, ends)
    height = max(460, min(1100, 160 + 18 * len(ylabels)))
    fig.update_layout(
        title=f"Tokens per expert, layer {view['layer']} ({_per_bucket(view)})",
        height=height,
        coloraxis={"colorscale": "Blues", "colorbar": {"title": {"text": "tokens"}}},
        xaxis={"title": "steps", "type": "category", "nticks": 12, "tickangle": 0},
        yaxis={"autorange": "reversed", "type": "category"},
        margin={"l": 150},
    )
    return fig


def _pct(v: Any) -> float | None:
    return None if v is None else 100.0 * float(v)


def rates_figure(view: Mapping[str, Any], ends: Ends = None) -> go.Figure:
    """Drop rate, null-slot and shared-only fractions (%) of each bucket's assignments (and
    tokens, for shared-only) over steps, one trace per attempt."""
    columns = view.get("columns") or []
    if not columns:
        return _empty("Drop rate", "no routing records for this layer yet")
    fig = go.Figure()
    bounds = attempt_traces(fig, columns, lambda c: _pct(c["drop_rate"]), "drop rate")
    attempt_traces(fig, columns, lambda c: _pct(c["null_fraction"]), "null slot", dash="dot")
    if any(c.get("shared_only_fraction") is not None for c in columns):
        attempt_traces(
            fig, columns, lambda c: _pct(c["shared_only_fraction"]), "shared only", dash="dash"
        )
    mark_boundaries(fig, bounds, ends)
    fig.update_layout(
        title=f"Drop rate, null slot, shared only ({_per_bucket(view)})",
        xaxis_title="step",
        yaxis={"title": "% of assignments", "rangemode": "tozero"},
        legend=LEGEND_BELOW,
        height=LINE_HEIGHT,
    )
    return fig


def max_vio_figure(view: Mapping[str, Any], ends: Ends = None) -> go.Figure:
    """Each bucket's highest and mean MaxVio (max / mean - 1 of the routed experts'
    assignments, per record)."""
    columns = view.get("columns") or []
    if not any(c.get("max_vio") is not None for c in columns):
        return _empty("MaxVio", "no routing record with routed assignments yet")
    fig = go.Figure()
    bounds = attempt_traces(fig, columns, lambda c: c["max_vio"], "highest")
    if int(view.get("width", 1)) > 1:
        attempt_traces(fig, columns, lambda c: c["max_vio_mean"], "mean", dash="dot")
    mark_boundaries(fig, bounds, ends)
    fig.update_layout(
        title=f"MaxVio ({_per_bucket(view)})",
        xaxis_title="step",
        yaxis={"title": "max / mean − 1", "rangemode": "tozero"},
        legend=LEGEND_BELOW,
        height=LINE_HEIGHT,
    )
    return fig


def losses_figure(view: Mapping[str, Any], ends: Ends = None) -> go.Figure:
    """The router's aux loss and z loss (its own axis: they differ by orders), bucket
    means."""
    columns = view.get("columns") or []
    has_aux = any(c.get("aux_loss") is not None for c in columns)
    has_z = any(c.get("z_loss") is not None for c in columns)
    if not (has_aux or has_z):
        return _empty("Aux and z loss", "the routing records carry no aux or z loss")
    fig = go.Figure()
    bounds: list[Boundary] = []
    if has_aux:
        bounds = attempt_traces(fig, columns, lambda c: c["aux_loss"], "aux loss")
    if has_z:
        z = attempt_traces(fig, columns, lambda c: c["z_loss"], "z loss", yaxis="y2", dash="dot")
        bounds = bounds or z
    mark_boundaries(fig, bounds, ends)
    fig.update_layout(
        title=f"Aux loss and z loss ({_per_bucket(view)}: mean)",
        xaxis_title="step",
        yaxis={"title": "aux loss", "rangemode": "tozero"},
        yaxis2={
            "title": "z loss",
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
            "rangemode": "tozero",
        },
        legend=LEGEND_BELOW,
        height=LINE_HEIGHT,
    )
    return fig


def _share(part: int, whole: int) -> str | None:
    return None if whole <= 0 else f"{100.0 * part / whole:.1f}%"


def experts_table(view: Mapping[str, Any]) -> dict[str, Any]:
    """Each routed expert over the whole layer: tokens, share, dropped, the last step it
    was routed to; dead ones (DEAD_WINDOW) flagged."""
    experts = view.get("experts_table") or []
    whole = sum(int(e["tokens"]) for e in experts)
    rows, flags = [], []
    for e in experts:
        tokens, dropped = int(e["tokens"]), int(e["dropped"])
        status = "dead" if e["dead"] else ("never routed" if tokens == 0 else "")
        rows.append(
            [
                e["expert"],
                tokens,
                _share(tokens, whole),
                dropped,
                _share(dropped, tokens),
                e.get("last_step"),
                status,
            ]
        )
        flags.append(bool(e["dead"]) or tokens == 0)
    return {
        "columns": [
            {"label": "expert", "num": True},
            {"label": "tokens", "num": True},
            {"label": "share of routed", "num": True},
            {"label": "dropped", "num": True},
            {"label": "dropped of its tokens", "num": True},
            {"label": "last routed (step)", "num": True},
            {"label": "status", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "sortable": True,
        "empty": "no routing records for this layer yet",
    }


def _pct_text(v: Any) -> str:
    return "–" if v is None else f"{100.0 * float(v):.2f}%"


def layer_texts(view: Mapping[str, Any]) -> dict[str, str]:
    """The cards over the layer's charts and the dead experts' line."""
    totals = view.get("totals") or {}
    dead = view.get("dead") or []
    window = view.get("dead_window", 0)
    if not view.get("records"):
        dead_text = "No routing records yet."
    elif dead:
        names = ", ".join(str(e) for e in dead)
        dead_text = (
            f"{len(dead)} dead expert(s): {names} (no token in the layer's newest "
            f"{window} records)."
        )
    else:
        dead_text = f"No dead expert: every expert received tokens in the newest {window} records."
    return {
        "card-records": f"{int(view.get('records', 0)):,}",
        "card-experts": f"{view.get('experts', 0)}"
        + (" + null slot" if view.get("null_slot") else ""),
        "card-drop": _pct_text(totals.get("drop_rate")),
        "card-null": _pct_text(totals.get("null_fraction")),
        "card-shared": _pct_text(totals.get("shared_only_fraction")),
        "card-dead": str(len(dead)),
        "dead-experts": dead_text,
    }


# -- every layer at once --


def layer_color(layer: int) -> str:
    return LAYER_COLORS[layer % len(LAYER_COLORS)]


def _per_layer(
    layers: Sequence[Mapping[str, Any]], field: str, scale: float, ends: Ends
) -> tuple[go.Figure, bool]:
    fig = go.Figure()
    firsts: dict[int, Any] = {}
    drawn = False
    for layer in layers:
        n = int(layer["layer"])
        groups = by_attempt(layer.get("points") or [])
        for attempt, points in groups.items():
            ys = [None if p.get(field) is None else scale * float(p[field]) for p in points]
            drawn = drawn or any(y is not None for y in ys)
            xs = [int(p["step"]) for p in points]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    name=f"layer {n}" + (f" · attempt {attempt}" if len(groups) > 1 else ""),
                    legendgroup=f"layer {n}",
                    line={"color": layer_color(n), "dash": None if attempt == 0 else "dot"},
                )
            )
            firsts[attempt] = min(xs[0], firsts.get(attempt, xs[0]))
    bounds = [Boundary(a, x, None) for a, x in sorted(firsts.items())]
    mark_boundaries(fig, bounds, ends)
    return fig, drawn


def _downsampled(layers: Sequence[Mapping[str, Any]]) -> bool:
    return any(int(la["total"]) > len(la.get("points") or []) for la in layers)


def overview_figure(
    series: Mapping[str, Any], field: str, title: str, unit: str, ends: Ends = None
) -> go.Figure:
    """One E-layer figure (`field` of the routing series: drop_rate or max_vio) over steps,
    one trace per layer and attempt."""
    layers = series.get("layers") or []
    scale = 100.0 if unit == "%" else 1.0
    fig, drawn = _per_layer(layers, field, scale, ends)
    if not drawn:
        return _empty(title, "no routing records yet")
    note = (
        " (downsampled: each bucket's records of lowest and highest MaxVio)"
        if _downsampled(layers)
        else ""
    )
    fig.update_layout(
        title=title + note,
        xaxis_title="step",
        yaxis={"title": unit, "rangemode": "tozero"},
        legend={"title": {"text": "E layer"}},  # at the right: a dozen layers, their attempts
    )
    return fig


def overview_table(series: Mapping[str, Any], base_href: str) -> dict[str, Any]:
    """Per layer: its records, its newest record's step, drop rate, MaxVio and the experts
    that received no token in that record; each layer links to its own view."""
    rows, flags = [], []
    for layer in series.get("layers") or []:
        n = int(layer["layer"])
        hist = layer.get("histogram") or {}
        newest = layer.get("newest") or {}
        tokens = list(hist.get("tokens_per_expert") or [])
        routed = tokens[:-1] if hist.get("null_slot") else tokens
        idle = [i for i, t in enumerate(routed) if t == 0]
        rows.append(
            [
                {"text": f"layer {n}", "href": f"{base_href}?layer={n}", "sort": n},
                layer["total"],
                hist.get("step"),
                _pct_text(newest.get("drop_rate")) if newest else None,
                None if newest.get("max_vio") is None else round(float(newest["max_vio"]), 3),
                ", ".join(map(str, idle)) if idle else "none",
            ]
        )
        flags.append(bool(idle))
    return {
        "columns": [
            {"label": "E layer", "num": False},
            {"label": "records", "num": True},
            {"label": "newest step", "num": True},
            {"label": "drop rate (newest)", "num": True},
            {"label": "MaxVio (newest)", "num": True},
            {"label": "experts with no token (newest record)", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "sortable": True,
        "empty": "no routing records yet",
    }
