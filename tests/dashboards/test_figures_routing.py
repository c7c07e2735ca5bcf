"""The routing page's builders (dashboards/figures/routing.py) on hand-built views."""

from __future__ import annotations

from typing import Any

from dashboards.figures import routing as fig


def column(attempt: int, first: int, last: int, **kw: Any) -> dict[str, Any]:
    base = {
        "attempt": attempt,
        "first": first,
        "last": last,
        "records": last - first + 1,
        "step": first,
        "drop_rate": 0.1,
        "null_fraction": 0.05,
        "shared_only_fraction": None,
        "max_vio": 0.5,
        "max_vio_mean": 0.3,
        "aux_loss": 0.01,
        "z_loss": None,
    }
    return {**base, **kw}


def layer_view(**kw: Any) -> dict[str, Any]:
    base = {
        "layer": 1,
        "rank": 0,
        "width": 64,
        "records": 300,
        "experts": 2,
        "null_slot": True,
        "rows": [
            {"label": "expert 0", "z": [10, 20, 30], "dead": False},
            {"label": "expert 1", "z": [5, 0, 0], "dead": True},
            {"label": "null slot", "z": [1, 2, 3], "dead": False},
        ],
        "columns": [column(0, 0, 63), column(0, 64, 100), column(1, 90, 127)],
        "experts_table": [
            {"expert": 0, "tokens": 60, "dropped": 6, "dead": False, "last_step": 127},
            {"expert": 1, "tokens": 5, "dropped": 0, "dead": True, "last_step": 63},
        ],
        "dead": [1],
        "dead_window": 100,
        "totals": {
            "assignments": 80,
            "drop_rate": 0.075,
            "null_fraction": 0.075,
            "shared_only_fraction": None,
        },
    }
    return {**base, **kw}


def test_the_heatmap_has_a_trace_per_attempt_the_null_slot_row_and_dead_marks() -> None:
    f = fig.tokens_heatmap(layer_view(), {0: "failed"})
    assert [t.type for t in f.data] == ["heatmap", "heatmap"]
    first, second = f.data
    assert list(first.y) == ["expert 0", "expert 1 (dead)", "null slot"]
    assert list(first.x) == ["0–63", "64–100"] and list(second.x) == ["90–127 · a1"]
    assert [list(r) for r in first.z] == [[10, 20], [5, 0], [1, 2]]
    assert [list(r) for r in second.z] == [[30], [0], [3]]
    assert first.coloraxis == second.coloraxis == "coloraxis"  # one color scale
    assert f.layout.shapes[0].x0 == 1.5  # the restart, between the columns
    assert f.layout.annotations[0].text == "attempt 1 (after: failed)"
    assert "per bucket of 64 steps" in f.layout.title.text


def test_unbucketed_columns_are_records_not_steps() -> None:
    """A record can sum a window of several steps (routing_every): an unbucketed column
    is called a record, never a step."""
    view = {"layer": 0, "width": 1, "rows": [{"label": "expert 0", "z": [5], "dead": False}]}
    view["columns"] = [column(0, 9, 9)]
    f = fig.tokens_heatmap(view)
    assert "(per record)" in f.layout.title.text and "per step" not in f.layout.title.text


def test_column_labels_of_one_attempt_per_step() -> None:
    cols = [column(0, 3, 3), column(0, 4, 4)]
    assert fig.column_labels(cols) == ["3", "4"]


def test_rates_are_percent_of_assignments_one_trace_per_attempt() -> None:
    f = fig.rates_figure(layer_view())
    names = [t.name for t in f.data]
    assert names == [
        "drop rate · attempt 0",
        "drop rate · attempt 1",
        "null slot · attempt 0",
        "null slot · attempt 1",
    ]  # no shared-only trace: no record reported it
    assert list(f.data[0].y) == [10.0, 10.0] and list(f.data[0].x) == [0, 64]
    assert list(f.data[2].y) == [5.0, 5.0]


def test_max_vio_and_losses() -> None:
    f = fig.max_vio_figure(layer_view())
    assert [t.name for t in f.data][:2] == ["highest · attempt 0", "highest · attempt 1"]
    assert "mean · attempt 0" in [t.name for t in f.data]
    per_step = fig.max_vio_figure(layer_view(width=1))
    assert all(not t.name.startswith("mean") for t in per_step.data)
    losses = fig.losses_figure(layer_view())
    assert [t.name for t in losses.data] == ["aux loss · attempt 0", "aux loss · attempt 1"]


def test_the_experts_table_flags_the_dead_and_the_never_routed() -> None:
    view = layer_view()
    view["experts_table"].append(
        {"expert": 2, "tokens": 0, "dropped": 0, "dead": False, "last_step": None}
    )
    table = fig.experts_table(view)
    assert table["rows"][0] == [0, 60, "92.3%", 6, "10.0%", 127, ""]
    assert table["rows"][1][-1] == "dead" and table["rows"][2][-1] == "never routed"
    assert table["rows"][2][4] is None  # no tokens: no share dropped
    assert table["flags"] == [False, True, True]


def test_the_cards_and_the_dead_line() -> None:
    texts = fig.layer_texts(layer_view())
    assert texts["card-drop"] == "7.50%" and texts["card-shared"] == "–"
    assert texts["card-experts"] == "2 + null slot" and texts["card-dead"] == "1"
    assert texts["dead-experts"].startswith(
        "1 dead expert(s): 1 (no token in the layer's newest 100"
    )


def test_empty_layer_figures_say_so() -> None:
    empty = layer_view(columns=[], rows=[], records=0, experts_table=[], dead=[], totals={})
    for build in (fig.tokens_heatmap, fig.rates_figure, fig.max_vio_figure, fig.losses_figure):
        f = build(empty)
        assert f.data == () and f.layout.annotations[0].text
    assert fig.experts_table(empty)["rows"] == []
    assert fig.layer_texts(empty)["dead-experts"] == "No routing records yet."


def series(points: list[dict[str, Any]], total: int | None = None, **kw: Any) -> dict[str, Any]:
    return {"layers": [{"layer": 0, "total": total or len(points), "points": points, **kw}]}


def point(step: int, attempt: int = 0, **kw: Any) -> dict[str, Any]:
    return {"step": step, "attempt": attempt, "drop_rate": 0.2, "max_vio": 1.5, **kw}


def test_the_overview_draws_a_trace_per_layer_and_attempt() -> None:
    data = series([point(0), point(1), point(2, 1)])
    data["layers"].append({"layer": 3, "total": 1, "points": [point(0, drop_rate=0.0)]})
    f = fig.overview_figure(data, "drop_rate", "Drop rate per E layer", "%", {0: "failed"})
    assert [t.name for t in f.data] == [
        "layer 0 · attempt 0",
        "layer 0 · attempt 1",
        "layer 3",
    ]
    assert list(f.data[0].y) == [20.0, 20.0]
    assert f.data[0].line.color == f.data[1].line.color != f.data[2].line.color
    assert f.layout.annotations[0].text == "attempt 1 (after: failed)"
    assert "downsampled" not in f.layout.title.text
    down = fig.overview_figure(series([point(0)], total=500), "max_vio", "MaxVio", "x")
    assert "downsampled" in down.layout.title.text and list(down.data[0].y) == [1.5]
    assert fig.overview_figure({"layers": []}, "max_vio", "MaxVio", "x").data == ()


def test_the_layers_table_links_each_layer_and_names_idle_experts() -> None:
    hist = {"step": 9, "tokens_per_expert": [5, 0, 4, 0, 7], "null_slot": True}
    data = series([point(9)], newest={"drop_rate": 0.25, "max_vio": 0.4444}, histogram=hist)
    table = fig.overview_table(data, "/runs/r/routing")
    assert table["rows"] == [
        [
            {"text": "layer 0", "href": "/runs/r/routing?layer=0", "sort": 0},
            1,
            9,
            "25.00%",
            0.444,
            "1, 3",
        ]
    ]
    assert table["flags"] == [True]
    assert fig.overview_table({"layers": []}, "")["rows"] == []
