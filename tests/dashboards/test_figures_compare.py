"""The compare page's figure and table builders (dashboards/figures/compare.py) on hand-built
data: the ratios around 1.0, badput side by side, overlays by step with attempts apart, the
drop rate over E layers against a brute-force reference, the lane diff, the refusals."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from dashboards.figures import compare as fc
from dashboards.figures import compare_tables as ft
from dashboards.figures.common import BAD, GOOD, OTHER


def result(**kw: Any) -> dict[str, Any]:
    """A CompareRead as the service answers it."""
    pair = lambda b, c: {"baseline": b, "candidate": c}  # noqa: E731
    base = {
        "baseline": "b",
        "candidate": "c",
        "verdict": "keep",
        "reasons": ["step time ratio 0.800 ..."],
        "step_time_ratio": {"value": 0.8, "low": 0.75, "high": 0.85},
        "tokens_per_s_ratio": {"value": 1.25, "low": 1.18, "high": 1.33},
        "steady_steps": pair(35, 36),
        "goodput_fraction": pair(0.5, 0.625),
        "badput_s": {
            "startup": pair(4.0, 6.0),
            "eval": pair(0.0, 0.5),
            "profiling": pair(0.0, 0.0),
            "compile": pair(1.0, None),
        },
        "peak_memory_bytes": pair(2 * 2**30, None),
        "final_loss": pair(2.5, 2.4),
        "eval_loss": pair(2.25, 2.2),
        "runs": pair(3, 2),
        "lane_diff": {"runtime_policy.dispatch_requested": pair("grouped", "padded")},
        "knobs": ["dispatch"],
        "knob_fields": ["runtime_policy.dispatch_requested"],
    }
    return {**base, **kw}


# -- ratios --


def test_each_ratio_is_a_point_with_its_interval_around_one_with_the_margin_band() -> None:
    fig = fc.ratio_forest(result(), margin=0.05)
    step, tokens = fig.data
    assert step.x == (0.8,) and step.y[0].startswith("step time<br>0.800 (95%: 0.750–0.850)")
    assert step.error_x.array == pytest.approx([0.05]) and step.error_x.arrayminus == pytest.approx(
        [0.05]
    )
    assert tokens.x == (1.25,) and tokens.error_x.array == pytest.approx([0.08])
    # faster step time and more tokens/s are both better: green
    assert step.marker.color == GOOD and tokens.marker.color == GOOD
    band, one = fig.layout.shapes
    assert (band.x0, band.x1) == pytest.approx((0.95, 1.05)) and one.x0 == one.x1 == 1.0
    assert fig.layout.xaxis.type == "log"
    lo, hi = fig.layout.xaxis.range  # the axis holds the band and both intervals
    assert 10**lo < 0.75 and 10**hi > 1.33
    assert 1.0 in fig.layout.xaxis.tickvals


def test_log_axis_ticks_are_round_ratios_spread_apart() -> None:
    ticks = fc.log_ticks(0.5, 2.0)["tickvals"]
    assert 1.0 in ticks and min(ticks) >= 0.5 and max(ticks) <= 2.0
    logs = [math.log10(t) for t in ticks]
    assert min(b - a for a, b in zip(logs, logs[1:], strict=False)) >= math.log10(4) / 9
    assert fc.log_ticks(0.999, 1.001) == {}  # too narrow for round ratios: Plotly's own


@pytest.mark.parametrize(
    ("low", "high", "lower_is_better", "expected"),
    [
        (0.90, 0.97, True, "better"),  # wholly below 1 - margin
        (1.03, 1.10, True, "worse"),
        (0.97, 1.03, True, "unclear"),  # straddles the band
        (0.90, 0.99, True, "unclear"),  # ends inside the band
        (1.03, 1.10, False, "better"),
        (0.90, 0.97, False, "worse"),
        (None, None, True, "unclear"),
    ],
)
def test_a_ratio_is_better_or_worse_only_when_its_interval_clears_the_margin(
    low: float | None, high: float | None, lower_is_better: bool, expected: str
) -> None:
    row = fc.RatioRow("r", 1.0, low, high, lower_is_better)
    assert fc.outcome(row, margin=0.02) == expected


def test_a_slower_candidate_is_drawn_red_and_an_unclear_one_grey() -> None:
    fig = fc.ratio_forest(
        result(
            step_time_ratio={"value": 1.2, "low": 1.1, "high": 1.3},
            tokens_per_s_ratio={"value": 1.0, "low": 0.9, "high": 1.1},
        )
    )
    assert [t.marker.color for t in fig.data] == [BAD, OTHER]


def test_without_an_interval_the_ratio_figure_says_why() -> None:
    none = {"value": None, "low": None, "high": None}
    fig = fc.ratio_forest(result(step_time_ratio=none, tokens_per_s_ratio=none))
    assert fig.data == () and "fewer than 8 steady steps" in fig.layout.annotations[0].text


# -- badput --


def test_badput_categories_side_by_side_largest_first_zero_ones_left_out() -> None:
    rows = fc.badput_rows(result())
    assert rows == [
        fc.BadputRow("startup", 4.0, 6.0),
        fc.BadputRow("compile", 1.0, 0.0),  # a side without the category counts 0
        fc.BadputRow("eval", 0.0, 0.5),
    ]
    fig = fc.badput_bars(result())
    assert [t.name for t in fig.data] == ["baseline", "candidate"]
    assert fig.data[1].y == ("startup", "compile", "eval") and fig.data[1].x == (6.0, 0.0, 0.5)
    assert fig.layout.barmode == "group"


def test_no_badput_on_either_run_is_an_empty_figure() -> None:
    fig = fc.badput_bars(result(badput_s={"eval": {"baseline": 0.0, "candidate": 0.0}}))
    assert fig.data == () and fig.layout.annotations[0].text == "no badput on either run"


# -- overlays --


def steps(attempts: dict[int, range], t: float = 0.1) -> list[dict[str, Any]]:
    return [
        {"step": s, "attempt": a, "step_time_s": t, "loss": 3.0 - s / 100}
        for a, rng in attempts.items()
        for s in rng
    ]


def one(role: str, points: list[dict[str, Any]], ends: Any = None) -> list[fc.RunSeries]:
    return [fc.RunSeries(f"{role}-1", f"{role} run", points, ends)]


def test_overlay_draws_each_run_and_attempt_apart_and_marks_the_restart() -> None:
    sides = {
        "baseline": one("baseline", steps({0: range(0, 18), 1: range(15, 30)}), {0: "failed"}),
        "candidate": one("candidate", steps({0: range(30)}), {0: "completed"}),
    }
    fig = fc.overlay("Step time", sides, lambda p: 1000 * p["step_time_s"], "ms")
    assert [t.name for t in fig.data] == [
        "baseline · attempt 0",
        "baseline · attempt 1",
        "candidate",
    ]
    assert fig.data[1].x[0] == 15 and fig.data[1].line.dash != fig.data[0].line.dash
    assert fig.data[0].line.color == fig.data[1].line.color != fig.data[2].line.color
    assert [s.x0 for s in fig.layout.shapes] == [15]
    assert [a.text for a in fig.layout.annotations] == ["baseline: attempt 1 (after: failed)"]
    assert fig.data[2].y[0] == pytest.approx(100.0)
    assert fig.layout.xaxis.range == (0, 29)  # the steps drawn, not stretched by a label


def test_replicates_are_each_their_own_trace_in_their_sides_color_named_escaped() -> None:
    sides = {
        "baseline": [
            fc.RunSeries(f"b{i}", f"base <{i}>", steps({0: range(10)}, t=0.1 + i / 100))
            for i in range(3)
        ],
        "candidate": [
            fc.RunSeries("c0", "cand 0", steps({0: range(10)}, t=0.2)),
            fc.RunSeries("c1", "cand 1", steps({0: range(4), 1: range(3, 10)}, t=0.2), {0: "x"}),
        ],
    }
    fig = fc.overlay("Step time", sides, lambda p: 1000 * p["step_time_s"], "ms")
    assert [t.name for t in fig.data] == [
        "baseline · base &lt;0&gt;",
        "baseline · base &lt;1&gt;",
        "baseline · base &lt;2&gt;",
        "candidate · cand 0",
        "candidate · cand 1 · attempt 0",
        "candidate · cand 1 · attempt 1",
    ]
    colors = [t.line.color for t in fig.data]
    assert colors[:3] == [fc.ROLE_COLORS["baseline"]] * 3
    assert colors[3:] == [fc.ROLE_COLORS["candidate"]] * 3
    assert [t.legendgroup for t in fig.data] == ["baseline"] * 3 + ["candidate"] * 3
    # each trace is its own run's values, not a mix
    assert [t.y[0] for t in fig.data[:3]] == pytest.approx([100.0, 110.0, 120.0])
    assert [a.text for a in fig.layout.annotations] == ["candidate · cand 1: attempt 1 (after: x)"]


def test_overlay_with_one_side_lacking_data_says_so_and_with_none_is_empty() -> None:
    sides = {"baseline": one("baseline", steps({0: range(5)})), "candidate": []}
    fig = fc.overlay("Loss", sides, lambda p: p["loss"], "loss")
    assert [t.name for t in fig.data] == ["baseline"]
    assert "candidate: none recorded" in fig.layout.title.text
    nothing = fc.overlay("Loss", {"baseline": [], "candidate": []}, lambda p: p["loss"], "loss")
    assert nothing.data == () and "neither side recorded loss" in nothing.layout.annotations[0].text
    no_loss = [{**p, "loss": None} for p in steps({0: range(3)})]
    assert fc.overlay("Loss", {"baseline": one("b", no_loss)}, lambda p: p["loss"], "l").data == ()


# -- drop rate over E layers: against a brute-force reference --


def raw_records(
    rng: np.random.Generator, layers: int, attempts: dict[int, range], top_k: int
) -> list[dict[str, Any]]:
    """Routing records as the hooks send them: per layer and step, tokens and drops per
    expert (drops at most the tokens), `num_tokens` tokens routed `top_k` times each."""
    out = []
    for a, rng_steps in attempts.items():
        for s in rng_steps:
            for layer in range(layers):
                num_tokens = int(rng.integers(64, 512))
                tokens = rng.multinomial(num_tokens * top_k, np.ones(8) / 8)
                dropped = rng.binomial(tokens, rng.uniform(0, 0.3))
                out.append(
                    {"layer": layer, "step": s, "attempt": a, "num_tokens": num_tokens,
                     "top_k": top_k, "tokens": tokens.tolist(), "dropped": dropped.tolist()}
                )  # fmt: skip
    return out


def as_series(records: list[dict[str, Any]], keep: Any = None) -> dict[str, Any]:
    """A routing series of these records: each point's drop rate as calc/routing_stats.py
    defines it (dropped over num_tokens * top_k); `keep` picks the points a downsampled
    series kept (each layer's `total` stays the number of its records)."""
    layers: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        layers[r["layer"]].append(r)
    out = []
    for n, rs in sorted(layers.items()):
        kept = [r for r in rs if keep is None or keep(r)]
        points = [
            {"step": r["step"], "attempt": r["attempt"], "num_steps": 1,
             "num_tokens": r["num_tokens"], "max_vio": 0.0,
             "drop_rate": sum(r["dropped"]) / (r["num_tokens"] * r["top_k"]),
             "null_fraction": 0.0, "shared_only_fraction": None, "aux_loss": None, "z_loss": None}
            for r in kept
        ]  # fmt: skip
        out.append({"layer": n, "total": len(rs), "points": points, "histogram": None})
    return {"run_id": "r", "rank": 0, "layers": out}


def reference(
    records: list[dict[str, Any]], key: Any
) -> dict[tuple[int, int], tuple[float, float]]:
    """Per (attempt, key(step)): (mean step, sum of dropped / sum of routed assignments)."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["attempt"], key(r["step"])].append(r)
    return {
        k: (
            sum(r["step"] for r in rs) / len(rs),
            sum(sum(r["dropped"]) for r in rs) / sum(r["num_tokens"] * r["top_k"] for r in rs),
        )
        for k, rs in groups.items()
    }


def test_drop_rate_of_each_step_is_dropped_over_routed_assignments_of_every_layer() -> None:
    records = raw_records(
        np.random.default_rng(7), layers=3, attempts={0: range(0, 12), 1: range(8, 20)}, top_k=2
    )
    points, sampled = fc.drop_rate_series(as_series(records))
    assert not sampled
    want = reference(records, key=lambda s: s)
    got = {(p["attempt"], p["step"]): p["drop_rate"] for p in points}
    assert got.keys() == want.keys()
    for k, (_, rate) in want.items():
        assert got[k] == pytest.approx(rate, rel=1e-12)
    # attempts apart, each in step order (attempt 1 redoes steps 8..11)
    assert [(p["attempt"], p["step"]) for p in points] == sorted(want)


def test_a_downsampled_drop_rate_pools_the_kept_records_per_bin() -> None:
    records = raw_records(np.random.default_rng(3), layers=4, attempts={0: range(1000)}, top_k=4)
    keep = lambda r: (r["step"] * 7 + r["layer"] * 3) % 5 == 0  # noqa: E731  layers keep different steps
    points, sampled = fc.drop_rate_series(as_series(records, keep), bins=50)
    assert sampled
    kept = [r for r in records if keep(r)]
    lo, hi = min(r["step"] for r in kept), max(r["step"] for r in kept)
    width = math.ceil((hi - lo + 1) / 50)
    want = reference(kept, key=lambda s: (s - lo) // width)
    assert len(points) == len(want) <= 50
    for p, (_, (mean_step, rate)) in zip(points, sorted(want.items()), strict=True):
        assert p["step"] == pytest.approx(mean_step) and p["drop_rate"] == pytest.approx(
            rate, rel=1e-12
        )


def test_records_without_a_drop_rate_are_left_out_and_no_routing_is_empty() -> None:
    series = as_series(raw_records(np.random.default_rng(1), 2, {0: range(3)}, 2))
    series["layers"][0]["points"][0]["drop_rate"] = None
    points, _ = fc.drop_rate_series(series)
    first = series["layers"][1]["points"][0]
    assert points[0]["drop_rate"] == pytest.approx(first["drop_rate"])  # layer 1 alone at step 0
    assert fc.drop_rate_series({"run_id": "r", "rank": 0, "layers": []}) == ([], False)


# -- tables --


def test_the_lane_table_flags_fields_outside_the_knobs() -> None:
    diff = {
        "runtime_policy.dispatch_requested": {"baseline": "grouped", "candidate": "padded"},
        "model_plan.capacity.factor": {"baseline": 1.0, "candidate": None},
        "environment.host": {"baseline": {"a": [1]}, "candidate": True},
    }
    table = ft.lane_table(diff, knob_fields=["runtime_policy", "model_plan.capacity"])
    assert table["rows"] == [
        [
            "environment.host",
            '{"a": [1]}',
            "true",
            "differs outside the knobs (allow_lane_mismatch)",
        ],
        ["model_plan.capacity.factor", "1.0", None, "declared knob"],
        ["runtime_policy.dispatch_requested", "grouped", "padded", "declared knob"],
    ]
    assert table["flags"] == [True, False, False]
    assert ft.lane_table({}, [])["rows"] == []
    assert not ft.covered("runtime_policy.dtype2", ["runtime_policy.dtype"])


def test_the_summary_table_formats_each_run_side_by_side() -> None:
    rows = ft.summary_table(result())["rows"]
    assert rows == [
        ["runs (replicates)", "3", "2"],
        ["goodput fraction (mean)", "50.0%", "62.5%"],
        ["badput, all categories (mean)", "5 s", "6.5 s"],
        ["eval loss (matched steps)", "2.25", "2.2"],
        ["final training loss (mean)", "2.5", "2.4"],
        ["peak memory (highest)", "2.00 GiB", None],
        ["steady steps compared (all runs)", "35", "36"],
    ]


def axis(name: str, kind: str, value: Any, low: Any, high: Any, b: Any, c: Any, **kw: Any) -> Any:
    """An AxisRead as the service answers it."""
    base = {"name": name, "kind": kind, "value": value, "low": low, "high": high,
            "baseline": b, "candidate": c, "better": "lower", "finding": "unclear",
            "reason": f"{name}: why"}  # fmt: skip
    return {**base, **kw}


def test_the_axes_table_gives_each_axis_in_its_unit_with_its_interval_and_finding() -> None:
    axes = [
        axis("step_time", "ratio", 1.2, 1.1, 1.3, 0.1, 0.12, finding="worse"),
        axis("tokens_per_s", "ratio", 0.833, 0.8, 0.87, 5120.4, 4266.0, better="higher"),
        axis("eval_loss", "ratio", 1.0, 0.99, 1.01, 2.5, 2.5, reason="eval loss at step 39"),
        axis("peak_memory", "ratio", None, None, None, None, None, finding="no data"),
        axis("goodput_fraction", "difference", 0.032, 0.031, 0.033, 0.2, 0.232),
        axis("badput.startup", "difference", -0.0257, -0.03, -0.02, 0.63, 0.6043),
        axis("badput.eval", "difference", 0.0, 0.0, 0.0, 0.0, 0.0, finding="same"),
        axis("badput.profiling", "difference", 0.0, 0.0, 0.0, 0.0, None, finding="same"),
        axis("max_vio", "difference", 0.012, -0.01, 0.03, 0.2, 0.212),
    ]
    table = ft.axes_table(axes)
    rows = [[c["text"] if isinstance(c, dict) else c for c in r] for r in table["rows"]]
    assert rows == [
        ["step time", "100 ms", "120 ms", "1.200×", "1.100× to 1.300×", "worse"],
        ["tokens/s", "5,120", "4,266", "0.833×", "0.800× to 0.870×", "unclear"],
        ["eval loss", "2.5", "2.5", "1.000×", "0.990× to 1.010×", "unclear"],
        ["peak memory", None, None, None, None, "no data"],
        ["goodput fraction", "20.0%", "23.2%", "+3.20 pp", "+3.10 pp to +3.30 pp", "unclear"],
        ["badput: startup (share of wall time)", "63.0%", "60.4%", "-2.57 pp",
         "-3.00 pp to -2.00 pp", "unclear"],
        ["MaxVio", "0.2", "0.212", "+0.012", "-0.01 to +0.03", "unclear"],
        ["badput, none on either side: eval, profiling", None, None, None, None, None],
    ]  # fmt: skip
    assert table["flags"] == [True] + [False] * 7
    finding = table["rows"][0][-1]
    assert finding["badge"] == "worse" and finding["title"] == "step_time: why"
    assert table["rows"][3][-1]["badge"] == "nodata"
    # quality judged on the final training loss (no eval step common to all runs) says so
    fallback = axis("eval_loss", "ratio", 1.0, 0.9, 1.1, 2.0, 2.0, reason="final training loss")
    assert ft.axes_table([fallback])["rows"][0][0]["text"] == "final training loss"


def test_seconds_read_plainly_at_any_size() -> None:
    assert [fc.seconds(v) for v in (0.00709, 4.0, 171.5, 25_100.4)] == [
        "0.00709 s",
        "4 s",
        "172 s",
        "25,100 s",
    ]


def test_compare_urls_leave_the_defaults_out_and_encode_every_value() -> None:
    assert ft.compare_url("", "a", "b") == "/compare?baseline=a&candidate=b"
    cells = ft.compare_url("", "dispatch=grouped", "dispatch=padded", ablation="ab 1")
    assert parse_qs(urlsplit(cells).query) == {
        "ablation": ["ab 1"],
        "baseline": ["dispatch=grouped"],
        "candidate": ["dispatch=padded"],
    }
    assert ft.compare_url("", "a,b", "c").endswith("?baseline=a%2Cb&candidate=c")
    url = ft.compare_url("/gp", "a", "b", ["x.y", "x&z=1", "x.y"], True, margin=0.05)
    parts = urlsplit(url)
    assert parts.path == "/gp/compare"
    assert parse_qs(parts.query) == {
        "baseline": ["a"],
        "candidate": ["b"],
        "knob": ["x.y", "x&z=1"],
        "allow_lane_mismatch": ["true"],
        "margin": ["0.05"],
    }


RUNS = {
    "baseline": [
        {
            "run_id": "base-1",
            "name": "base <b>",
            "parts": {"runtime_policy": {"dispatch_requested": "grouped", "seed": 1}},
        },
        {
            "run_id": "base-2",
            "name": "base 2",
            "parts": {"runtime_policy": {"dispatch_requested": "grouped", "seed": 2, "lr": 0.1}},
        },
    ],
    "candidate": [
        {
            "run_id": "cand-1",
            "name": "cand",
            "parts": {"runtime_policy": {"dispatch_requested": "padded"}},
        }
    ],
}
SIDES = {"baseline": "base-1,base-2", "candidate": "cand-1"}


def test_a_lane_mismatch_lists_the_fields_and_links_to_them_as_knobs_or_to_allowing_it() -> None:
    detail = {
        "error": "lane_mismatch",
        "message": "the runs differ beyond the declared knob(s)",
        "fields": ["runtime_policy.dispatch_requested", "runtime_policy.seed"],
    }
    choice = {
        **SIDES,
        "knobs": ["model_plan.x"],
        "allow_lane_mismatch": False,
        "margin": 0.03,
        "loss_tolerance": 0.01,
    }
    knob_names = {"runtime_policy.dispatch_requested": "dispatch"}
    view = ft.refusal_view(detail, RUNS, choice, base="/gp", field_knobs=knob_names)
    assert view["error"] == "lane_mismatch" and "differ" in view["title"]
    assert view["table"]["rows"] == [  # each side's first run
        ["runtime_policy.dispatch_requested", "grouped", "padded"],
        ["runtime_policy.seed", "1", None],
    ]
    as_knobs, allowed = (parse_qs(urlsplit(f["href"]).query) for f in view["fixes"])
    # a field that is a knob's value is declared by the knob's name
    assert as_knobs["knob"] == ["model_plan.x", "dispatch", "runtime_policy.seed"]
    assert as_knobs["margin"] == ["0.03"] and "allow_lane_mismatch" not in as_knobs
    assert allowed["knob"] == ["model_plan.x"] and allowed["allow_lane_mismatch"] == ["true"]
    assert all(
        f["href"].startswith("/gp/compare?baseline=base-1%2Cbase-2&candidate=cand-1")
        for f in view["fixes"]
    )
    in_cells = ft.refusal_view(detail, RUNS, {**choice, "ablation": "ab"}, field_knobs=knob_names)
    assert all(parse_qs(urlsplit(f["href"]).query)["ablation"] == ["ab"] for f in in_cells["fixes"])


def test_an_incomplete_receipt_lists_what_each_run_lacks_and_what_would_supply_it() -> None:
    detail = {
        "error": "incomplete_receipt",
        "message": "a keep/drop verdict needs two complete receipts",
        "missing": {  # by run, as services/compare.py words it
            "base-2": [],
            "cand-1": ["runtime_policy.dtype", "observed.moe_dispatch.layer1", "attempt_end"],
        },
    }
    view = ft.refusal_view(detail, RUNS, {"knobs": []})
    rows = view["table"]["rows"]
    assert [r[1] for r in rows] == [
        "runtime_policy.dtype",
        "observed.moe_dispatch.layer1",
        "attempt_end",
    ]
    assert rows[0][0] == {"text": "candidate: cand", "href": "/runs/cand-1/receipt"}
    assert rows[0][2] == "declare `dtype` in the run record's `runtime_policy`"
    assert "moe_dispatch.layer1" in rows[1][2] and "wait for the run to finish" in rows[2][2]
    assert view["fixes"] == [
        {"text": "open the candidate's receipt (cand)", "href": "/runs/cand-1/receipt"}
    ]


def test_replicates_of_mixed_lanes_show_both_runs_values_and_how_to_split_them() -> None:
    detail = {
        "error": "replicates_differ",
        "message": "the baseline's runs are not replicates of one lane",
        "fields": ["runtime_policy.lr"],
        "runs": ["base-1", "base-2"],
    }
    choice = {**SIDES, "knobs": ["dispatch"], "margin": 0.02, "loss_tolerance": 0.01}
    view = ft.refusal_view(detail, RUNS, choice)
    assert view["error"] == "replicates_differ" and "not replicates" in view["title"]
    assert [c["label"] for c in view["table"]["columns"]] == ["field", "base <b>", "base 2"]
    assert view["table"]["rows"] == [["runtime_policy.lr", None, "0.1"]]
    without, apart = view["fixes"]
    assert without["text"] == "leave base 2 out of the baseline"
    assert parse_qs(urlsplit(without["href"]).query) == {
        "baseline": ["base-1"],
        "candidate": ["cand-1"],
        "knob": ["dispatch"],
    }
    assert parse_qs(urlsplit(apart["href"]).query) == {
        "baseline": ["base-1"],
        "candidate": ["base-2"],
        "knob": ["dispatch", "runtime_policy.lr"],
    }
    # two cells of an ablation cannot be split by hand: the table alone
    assert ft.refusal_view(detail, RUNS, {**choice, "ablation": "ab"})["fixes"] == []


def test_an_unknown_refusal_still_says_its_message() -> None:
    view = ft.refusal_view({"error": "other", "message": "m"}, RUNS, {"knobs": []})
    assert view == {
        "error": "other",
        "title": "No verdict",
        "message": "m",
        "table": None,
        "fixes": [],
    }
