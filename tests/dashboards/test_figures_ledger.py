"""The ledger page's builders (dashboards/figures/ledger.py) on hand-built LedgerRead
entries: one row per knob value with its standing and re-review flag, every verdict newest
first, and each knob value's step-time ratio over time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dashboards.figures import ledger as fl

T = 1_790_000_000.0
DAY = 86_400.0
ENV = {"torch": "2.13.0", "cuda": "12.4", "device": "H100", "git_sha": "0123456789abcdef"}
LANE = {"pattern": "AEME", "world_size": 8, "dtype": "bfloat16"}


def verdict(ablation: str, cell: str, date: float, v: str, ratio: Any, **kw: Any) -> Any:
    value, low, high = ratio
    return {"ablation_id": ablation, "cell": cell, "baseline_cell": "dispatch=grouped",
            "date": date, "verdict": v, "reasons": [f"{v}: one", "two"],
            "step_time_ratio": {"value": value, "low": low, "high": high},
            "environment": kw.get("env", ENV), "lane": LANE,
            "runs": {"baseline": 3, "candidate": 3}}  # fmt: skip


ENTRIES: list[dict[str, Any]] = [
    {"knob": "dispatch", "value": "loop", "standing": "default-on win",
     "standing_reason": "the newest verdict (keep ...)", "needs_rereview": True,
     "rereview_reason": "torch 2.13.0 -> 2.14.0",
     "verdicts": [verdict("a1", "dispatch=loop", T, "keep", (0.8, 0.75, 0.86))]},
    {"knob": "dispatch", "value": "padded", "standing": "unproven",
     "standing_reason": "the newest verdict (inconclusive ...)", "needs_rereview": False,
     "rereview_reason": None,
     "verdicts": [verdict("a1", "dispatch=padded", T + DAY, "drop", (1.2, 1.1, 1.3)),
                  verdict("a2", "dispatch=padded", T + 7 * DAY, "inconclusive",
                          (1.0, 0.97, 1.03), env={**ENV, "torch": "2.14.0", "cuda": None})]},
    {"knob": "compile", "value": None, "standing": "measured tax", "standing_reason": "",
     "needs_rereview": False, "rereview_reason": None,
     "verdicts": [verdict("a3", "compile=none", T + 2 * DAY, "tax", (None, None, None))]},
]  # fmt: skip


def test_one_row_per_knob_value_with_its_standing_and_re_review_flag() -> None:
    table = fl.standing_table(ENTRIES, base="/gp")
    loop, padded, compile_ = table["rows"]
    assert loop[0]["text"] == "dispatch=loop" and compile_[0]["text"] == "compile=none"
    assert loop[1] == {"text": "default-on win", "badge": "keep",
                       "title": "the newest verdict (keep ...)"}  # fmt: skip
    assert [r[1]["badge"] for r in table["rows"]] == ["keep", "inconclusive", "tax"]
    assert loop[2] == {"text": "needs re-review", "badge": "rereview",
                       "title": "torch 2.13.0 -> 2.14.0"}  # fmt: skip
    assert padded[2] is None and table["flags"] == [True, False, False]
    # the newest verdict's date, ratio, environment, lane and ablation
    assert padded[3] == {"text": "2026-09-28 14:13", "sort": T + 7 * DAY}
    assert padded[4] == "1.000× (0.970–1.030)" and compile_[4] is None
    assert padded[5] == "torch 2.14.0 · H100 · git 0123456789"
    assert loop[5] == "torch 2.13.0 · CUDA 12.4 · H100 · git 0123456789"
    assert loop[6] == "pattern AEME · world 8 · bfloat16"
    assert [r[7] for r in table["rows"]] == [1, 2, 1]
    assert padded[8] == {"text": "a2", "href": "/gp/ablations/a2"}
    assert fl.environment_text({}) == "not recorded" and fl.lane_text({}) == "not recorded"


def test_every_verdict_is_listed_newest_first_with_its_reasons() -> None:
    rows = fl.history_table(ENTRIES)["rows"]
    assert [(r[0], r[2]["text"]) for r in rows] == [
        ("dispatch=padded", "inconclusive"),
        ("compile=none", "tax"),
        ("dispatch=padded", "drop"),
        ("dispatch=loop", "keep"),
    ]
    drop = rows[2]
    assert drop[2] == {"text": "drop", "badge": "drop", "title": "drop: one\ntwo"}
    assert drop[3] == "1.200× (1.100–1.300)" and drop[4] == "3 vs 3"
    assert drop[5] == {"text": "a1", "href": "/ablations/a1"}
    assert drop[6] == "dispatch=padded vs dispatch=grouped"


def test_the_trend_draws_each_knob_values_ratio_at_each_verdicts_date() -> None:
    fig = fl.trend_figure(ENTRIES, margin=0.05)
    assert [t.name for t in fig.data] == ["dispatch=loop", "dispatch=padded"]  # no ratio: none
    padded = fig.data[1]
    assert list(padded.x) == [
        datetime.fromtimestamp(T + DAY, tz=UTC),
        datetime.fromtimestamp(T + 7 * DAY, tz=UTC),
    ]
    assert padded.y == (1.2, 1.0) and padded.text == ("drop", "inconclusive")
    # brute force: each bar spans its verdict's interval
    bars = zip(padded.y, padded.error_y.arrayminus, padded.error_y.array, strict=True)
    ends = [(y - m, y + p) for y, m, p in bars]
    assert ends == [pytest.approx((1.1, 1.3)), pytest.approx((0.97, 1.03))]
    assert fig.data[0].line.color != fig.data[1].line.color
    band, one = fig.layout.shapes
    assert (band.y0, band.y1) == pytest.approx((0.95, 1.05)) and one.y0 == one.y1 == 1.0
    lo, hi = 10 ** fig.layout.yaxis.range[0], 10 ** fig.layout.yaxis.range[1]
    assert lo < 0.75 and hi > 1.3


def test_knob_values_are_escaped_where_plotly_draws_them_and_nothing_is_an_empty_figure() -> None:
    hostile = [{**ENTRIES[0], "value": "<img src=x>"}]
    assert fl.trend_figure(hostile).data[0].name == "dispatch=&lt;img src=x&gt;"
    nothing = fl.trend_figure([])
    assert nothing.data == () and "no verdict yet" in nothing.layout.annotations[0].text


def test_notes_count_the_values_and_those_to_review() -> None:
    from dashboards.figures.ledger import environment_text, notes

    env = {"torch": "2.14.0", "device": "cpu"}
    assert notes([], env) == ("", "")
    one = [{"needs_rereview": True}, {"needs_rereview": False}]
    note, banner = notes(one, env)
    assert note == "2 knob values; standings checked against the newest run's environment: " + (
        environment_text(env)
    )
    assert banner.startswith("1 knob value needs re-review: ")
    note, banner = notes([{"needs_rereview": True}] * 2, None)
    assert note == "2 knob values"  # no newest environment: nothing to check against
    assert banner.startswith("2 knob values need re-review: ")
