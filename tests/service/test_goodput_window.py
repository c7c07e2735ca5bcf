from __future__ import annotations

import math
from typing import Any

import pytest

from service.calc import goodput_window
from service.calc.goodput import AttemptIn, GoodputInputs, RunGoodput, SpanIn, StepIn
from service.calc.goodput_window import rolling, run_extent
from tests import factories as f

T = 1_790_000_000.0


def run_goodput(inputs: GoodputInputs, lo: float = -math.inf, hi: float = math.inf) -> RunGoodput:
    return goodput_window.run_goodput(inputs, T + 1e6, lo, hi)


def inputs() -> GoodputInputs:
    return GoodputInputs(
        attempts=[AttemptIn(0, 0, T, T + 20, "completed")],
        steps=[StepIn(0, 0, n, T + 4 + 2 * n, T + 5 + 2 * n, 10, None, 0.1) for n in range(8)],
        spans=[SpanIn(0, 0, "startup", T, T + 4, False)],
    )


def adds_up(g: Any) -> bool:
    return math.isclose(g.goodput_s + sum(g.badput_s.values()) + g.other_s, g.total_s, abs_tol=1e-9)


def test_window_cuts_intervals_and_keeps_the_invariant() -> None:
    g = run_goodput(inputs(), T + 2, T + 6.5)
    assert g.total_s == pytest.approx(4.5)
    assert g.badput_s["startup"] == pytest.approx(2.0)
    assert g.goodput_s == pytest.approx(1.0 + 0.5)  # step 0 whole, step 1 half
    assert g.badput_s["observability"] == pytest.approx(0.1)  # only step 0 ended inside
    assert adds_up(g)


def test_windows_partition_the_run() -> None:
    whole = run_goodput(inputs())
    parts = [run_goodput(inputs(), a, b) for a, b in rolling(run_extent(whole), 5.0, 5.0)]
    assert sum(p.total_s for p in parts) == pytest.approx(whole.total_s)
    assert sum(p.goodput_s for p in parts) == pytest.approx(whole.goodput_s)
    assert all(adds_up(p) for p in parts)


def test_rolling_refuses_bad_or_too_many_windows() -> None:
    extent = run_extent(run_goodput(inputs()))
    assert extent == (T, T + 20)
    with pytest.raises(ValueError, match="window_s"):
        rolling(extent, 0.0, 1.0)
    with pytest.raises(ValueError, match="windows"):
        rolling(extent, 1e-4, 1e-4)
    with pytest.raises(ValueError, match="resolution"):  # T + 1e-10 == T
        rolling(extent, 1e-10, 1e8)
    assert rolling(None, 1.0, 1.0) == []


def test_goodput_endpoint_windows_and_ranks(client: Any) -> None:
    client.post("/api/v1/ingest", json={"records": f.full_run(steps=4)})
    whole = client.get("/api/v1/runs/run-a/goodput").json()
    half = client.get("/api/v1/runs/run-a/goodput", params={"start": f.T0, "end": f.T0 + 9}).json()
    assert half["total_s"] == pytest.approx(9) and half["badput_s"]["startup"] == 10 - 1
    assert whole["total_s"] == pytest.approx(18)
    assert client.get("/api/v1/runs/run-a/goodput", params={"rank": 0}).json()["rank"] == 0
    assert client.get("/api/v1/runs/run-a/goodput", params={"rank": 5}).status_code == 404
    bad = client.get("/api/v1/runs/run-a/goodput", params={"start": f.T0 + 5, "end": f.T0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "end"


def test_a_window_of_a_run_without_steps(client: Any) -> None:
    """Only an attempt and a startup span: the window reads no step block at all."""
    records = [f.run(), f.attempt_start(), f.span("startup", f.T0, f.T0 + 10)]
    client.post("/api/v1/ingest", json={"records": records}).raise_for_status()
    g = client.get("/api/v1/runs/run-a/goodput", params={"start": f.T0 + 2, "end": f.T0 + 6})
    body = g.json()
    assert g.status_code == 200 and body["steps"] == 0
    assert body["total_s"] == pytest.approx(4) and body["badput_s"]["startup"] == pytest.approx(4)
    rolled = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 5}).json()
    assert [w["badput_s"]["startup"] for w in rolled["windows"]] == pytest.approx([5, 5])


def test_rolling_endpoint(client: Any) -> None:
    client.post("/api/v1/ingest", json={"records": f.full_run(steps=4)})
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 6}).json()
    windows = body["windows"]
    assert len(windows) == 3 and windows[0]["start"] == f.T0
    assert sum(w["total_s"] for w in windows) == pytest.approx(18)
    too_many = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 0.001})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["field"] == "window_s"
    tiny = client.get(
        "/api/v1/runs/run-a/goodput/rolling", params={"window_s": 1e-10, "step_s": 1e8}
    )  # found by the schema fuzz test: was a 500
    assert tiny.status_code == 422 and tiny.json()["detail"][0]["field"] == "window_s"


def test_goodput_reports_disruptions_ideal_step_time_and_stragglers(client: Any) -> None:
    records = [f.run(), f.attempt_start(), f.attempt_start(rank=1)]
    for n in range(30):
        records.append(f.step(n, dur=1.0))
        records.append(f.step(n, dur=1.5, rank=1))
    records += [
        f.attempt_end(status="failed", cause="NCCL timeout"),
        f.attempt_end(status="failed", cause="NCCL timeout", rank=1),
    ]
    records += [f.checkpoint(19, f.T0 + 50), f.attempt_start(attempt=1, start=f.T0 + 120)]
    client.post("/api/v1/ingest", json={"records": records}).raise_for_status()
    g = client.get("/api/v1/runs/run-a/goodput", params={"rank": 0}).json()
    assert g["ideal_step_time_s"] == pytest.approx(1.0)
    assert [s["rank"] for s in g["stragglers"]] == [1]
    assert g["disruptions"] == [
        {"attempt": 0, "time": f.T0 + 100, "cause": "NCCL timeout", "wasted_steps": 10}
    ]
