"""The ablation pages' builders (dashboards/figures/ablations.py) on hand-built AblationRead
dicts: the forest of the cells' step-time ratios, the cells' views (runs, verdicts, why there
is none), progress, the list; and the verdicts' colors the same in the figures and the CSS."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from dashboards.figures import ablations as fa
from dashboards.figures.compare import VERDICT_COLORS

T = 1_790_000_000.0


def run(run_id: str, status: str = "completed", seed: Any = 1) -> dict[str, Any]:
    return {"run_id": run_id, "name": f"{run_id} <i>", "status": status, "seed": seed,
            "created_at": T}  # fmt: skip


def comparison(verdict: str, value: float | None, low: float | None, high: float | None) -> Any:
    axis = {"name": "step_time", "kind": "ratio", "value": value, "low": low, "high": high,
            "baseline": 0.1, "candidate": 0.1 * (value or 1), "better": "lower",
            "finding": "worse", "reason": "r"}  # fmt: skip
    return {
        "verdict": verdict,
        "reasons": [f"{verdict}: because"],
        "axes": [axis],
        "step_time_ratio": {"value": value, "low": low, "high": high},
        "runs": {"baseline": 3, "candidate": 2},
    }


def cell(name: str, baseline: bool = False, comp: Any = None, refusal: Any = None) -> Any:
    value = name.partition("=")[2]
    return {"cell": name, "knobs": {"dispatch": value}, "baseline": baseline,
            "runs": [run(f"{value}-0"), run(f"{value}-1", "running", None)],
            "comparison": comp, "refusal": refusal}  # fmt: skip


def ablation(*cells: Any) -> dict[str, Any]:
    return {"ablation_id": "ab 1", "name": "sweep", "project": "p", "created_at": T,
            "baseline_cell": "dispatch=grouped", "cells": list(cells)}  # fmt: skip


SWEEP = ablation(
    cell("dispatch=grouped", baseline=True),
    cell("dispatch=padded", comp=comparison("drop", 1.2, 1.1, 1.3)),
    cell("dispatch=loop", comp=comparison("keep", 0.8, 0.75, 0.86)),
    cell("dispatch=<b>x</b>", comp=comparison("drop", 1.05, 1.03, 1.07)),
    cell("dispatch=auto", refusal={"error": "waiting", "message": "no completed run"}),
)


def test_the_forest_has_a_row_a_cell_its_interval_and_its_verdicts_color() -> None:
    fig = fa.cell_forest(SWEEP, margin=0.05)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name) == ["keep", "drop", "no verdict yet"]  # verdicts in their order
    drop = by_name["drop"]
    assert drop.y == ("dispatch=padded", "dispatch=&lt;b&gt;x&lt;/b&gt;")  # escaped
    assert drop.x == (1.2, 1.05) and drop.marker.color == VERDICT_COLORS["drop"]
    # brute force: each bar reaches from the interval's low to its high end
    for t in (by_name["drop"], by_name["keep"]):
        bars = zip(t.x, t.error_x.arrayminus, t.error_x.array, strict=True)
        ends = [(x - m, x + p) for x, m, p in bars]
        want = {"drop": [(1.1, 1.3), (1.03, 1.07)], "keep": [(0.75, 0.86)]}[t.name]
        assert ends == [pytest.approx(w) for w in want]
    waiting = by_name["no verdict yet"]
    assert waiting.y == ("dispatch=auto",) and waiting.x == (1.0,) and waiting.mode == "text"
    band, one = fig.layout.shapes
    assert (band.x0, band.x1) == pytest.approx((0.95, 1.05)) and one.x0 == one.x1 == 1.0
    # the first cell on top (a category axis counts from the bottom)
    assert fig.layout.yaxis.categoryarray[-1] == "dispatch=padded"
    assert fig.layout.yaxis.categoryarray[0] == "dispatch=auto"
    lo, hi = 10 ** fig.layout.xaxis.range[0], 10 ** fig.layout.xaxis.range[1]
    assert lo < 0.75 and hi > 1.3  # every interval inside


def test_without_another_cell_the_forest_says_so() -> None:
    fig = fa.cell_forest(ablation(cell("dispatch=grouped", baseline=True)))
    assert fig.data == () and "only the baseline cell" in fig.layout.annotations[0].text


def test_each_cell_shows_its_runs_and_its_verdict_or_why_there_is_none() -> None:
    views = fa.cell_views(SWEEP, base="/gp")
    assert [v["cell"] for v in views][:2] == ["dispatch=grouped", "dispatch=padded"]
    base, padded, auto = views[0], views[1], views[-1]
    assert base["baseline"] and base["verdict"] is None and "compare_href" not in base
    assert base["values"] == "dispatch=grouped" and base["progress"] == "1 of 2 runs ended"
    runs = base["runs"]["rows"]
    assert runs[0][0] == {"text": "grouped-0 <i>", "href": "/gp/runs/grouped-0/goodput",
                          "title": "grouped-0"}  # fmt: skip
    assert runs[1][1] == {"text": "running", "badge": "running"} and runs[1][2] is None
    verdict = padded["verdict"]
    assert verdict["verdict"] == "drop" and verdict["reasons"] == ["drop: because"]
    assert verdict["meaning"].startswith("worse quality")
    assert verdict["runs"] == "2 run(s) against 3 of the baseline"
    assert verdict["axes"]["rows"][0][3] == "1.200×"
    href = urlsplit(padded["compare_href"])
    assert href.path == "/gp/compare" and parse_qs(href.query) == {
        "ablation": ["ab 1"],
        "baseline": ["dispatch=grouped"],
        "candidate": ["dispatch=padded"],
    }
    assert auto["verdict"] is None
    assert auto["refusal"] == {"title": "Waiting for runs", "message": "no completed run"}


@pytest.mark.parametrize(
    ("refusal", "title", "message"),
    [
        ({"error": "incomplete_receipt", "message": "m", "missing": {"r": ["attempt_end"]}},
         "Waiting for runs to finish", "m"),
        ({"error": "incomplete_receipt", "message": "m",
          "missing": {"r": ["runtime_policy.dtype"], "s": ["attempt_end"]}},
         "No verdict: a receipt is incomplete", "m (missing: attempt_end, runtime_policy.dtype)"),
        ({"error": "lane_mismatch", "message": "m", "fields": ["model_plan.top_k"]},
         "No verdict: the cells differ beyond the ablation's knobs",
         "m (fields: model_plan.top_k)"),
        ({"error": "replicates_differ", "message": "m"},
         "No verdict: a cell's runs are not replicates of one lane", "m"),
        ({"error": "invalid", "message": "m"}, "No verdict", "m"),
    ],
)  # fmt: skip
def test_why_a_cell_has_no_verdict_in_plain_words(refusal: Any, title: str, message: str) -> None:
    assert fa.refusal_words(refusal) == {"title": title, "message": message}


def test_progress_counts_ended_running_and_runs_still_to_start() -> None:
    assert fa.progress_text(runs=4, ended=3, expected=6) == (
        "3 of 6 runs ended (1 running, 2 not started)"
    )
    assert fa.progress_text(runs=6, ended=6, expected=6) == "6 of 6 runs ended"
    assert fa.progress_text(runs=7, ended=6, expected=6) == "6 of 7 runs ended (1 running)"
    assert fa.progress_text(runs=2, ended=2, expected=None).startswith("2 of 2 runs ended (not")


def test_the_list_links_each_ablation_with_its_knobs_and_progress() -> None:
    summary = {"ablation_id": "ab 1", "name": "sweep <x>", "project": "p", "created_at": T,
               "knobs": {"dispatch": ["grouped", "padded"], "compile": [False, True]},
               "baseline_cell": "dispatch=grouped,compile=false", "runs": 5, "runs_ended": 4,
               "expected_runs": 8}  # fmt: skip
    undeclared = {**summary, "ablation_id": "b", "expected_runs": None, "runs": 2,
                  "runs_ended": 2}  # fmt: skip
    table = fa.ablation_table([summary, undeclared], base="/gp")
    first, second = table["rows"]
    assert first[0] == {"text": "sweep <x>", "href": "/gp/ablations/ab%201", "title": "ab 1"}
    assert first[2] == "dispatch: grouped, padded · compile: false, true"
    assert first[4]["text"] == "4 / 8" and first[4]["sort"] == 0.5
    assert first[4]["title"] == "4 of 8 runs ended (1 running, 3 not started)"
    assert first[5] == {"text": "2026-09-21 14:13", "sort": T}
    assert second[4]["text"] == "2 / ?" and second[4]["sort"] is None
    assert table["sortable"] is True


def test_a_verdicts_color_is_the_same_in_the_figures_and_the_badges() -> None:
    css = Path(fa.__file__).parents[1].joinpath("static", "dashboard.css").read_text()
    for verdict, color in VERDICT_COLORS.items():
        rule = re.search(rf"\.badge-{verdict} \{{ background: (#[0-9a-f]{{6}});", css)
        assert rule is not None and rule.group(1) == color.lower(), verdict
