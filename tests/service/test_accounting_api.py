"""The accounting rules of docs/ACCOUNTING.md through the API, on both databases: a stalled
run (REST status and filter, /metrics, the accounting), excluded windows, clashing spans
that arrive in any order, and windows cut from the whole run's decisions."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests import factories as f


def post(client: Any, records: list[dict[str, Any]]) -> None:
    r = client.post("/api/v1/ingest", json={"records": records})
    assert r.status_code == 200, r.text


def test_a_run_whose_heartbeats_stopped_is_stalled_everywhere(client: Any) -> None:
    now = time.time()
    t0 = now - 3600
    records = [f.run(), f.attempt_start(start=t0)]
    records += [f.step(n, start=t0 + 1 + n, dur=1.0) for n in range(4)]
    records += [{**f.heartbeat(t0 + 5), "interval_s": 10.0}]
    post(client, records)
    post(client, [f.run("run-b", name="fresh"), f.attempt_start("run-b", start=now - 20)])
    post(client, [{**f.heartbeat(now - 5, run_id="run-b"), "interval_s": 10.0}])
    run = client.get("/api/v1/runs/run-a").json()
    assert run["status"] == "stalled"
    assert client.get("/api/v1/runs/run-b").json()["status"] == "running"
    listed = client.get("/api/v1/runs", params={"status": "stalled"}).json()["runs"]
    assert [r["run_id"] for r in listed] == ["run-a"]
    running = client.get("/api/v1/runs", params={"status": "running"}).json()["runs"]
    assert [r["run_id"] for r in running] == ["run-b"]
    g = client.get("/api/v1/runs/run-a/goodput").json()
    # ended at its last sign of life (the heartbeat at +5), its uncommitted steps wasted
    assert g["total_s"] == pytest.approx(5)
    assert g["goodput_s"] == pytest.approx(0, abs=1e-9)
    assert g["badput_s"]["wasted_progress"] == pytest.approx(4)
    assert [d["cause"].split(":")[0] for d in g["disruptions"]] == ["stalled"]
    text = client.get("/metrics").text
    assert (
        'goodput_run_status{project="default",run_id="run-a",run_name="alpha",status="stalled"} 1.0'
        in text
    )
    assert (
        'goodput_run_status{project="default",run_id="run-b",run_name="fresh",status="running"} 1.0'
        in text
    )


def test_excluded_windows_come_out_of_the_total_whole_run_and_windows(client: Any) -> None:
    T = f.T0
    records = [f.run(), f.attempt_start(), f.span("startup", T, T + 4)]
    records += [f.step(0, start=T + 5, dur=3.0), f.step(1, start=T + 9, dur=3.0)]
    records += [f.attempt_end(end=T + 20)]
    records += [
        {"kind": "excluded_window", "run_id": "run-a", "start": T + 2, "end": T + 6},
        {"kind": "excluded_window", "run_id": "run-a", "start": T + 3, "end": T + 7, "reason": "x"},
    ]
    post(client, records)
    g = client.get("/api/v1/runs/run-a/goodput").json()
    assert g["total_s"] == pytest.approx(15)
    assert g["badput_s"]["startup"] == pytest.approx(2)
    assert g["goodput_s"] == pytest.approx(1 + 3)
    w = client.get("/api/v1/runs/run-a/goodput", params={"start": T, "end": T + 8}).json()
    assert w["total_s"] == pytest.approx(3) and w["goodput_s"] == pytest.approx(1)
    rolled = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 3}).json()
    assert sum(x["total_s"] for x in rolled["windows"]) == pytest.approx(15)
    assert sum(x["goodput_s"] for x in rolled["windows"]) == pytest.approx(4)


@pytest.mark.parametrize("order", ["spans first", "steps first", "one batch"])
def test_clashing_spans_are_charged_once_in_any_order(client: Any, order: str) -> None:
    T = f.T0
    steps = [f.step(0, start=T + 1, dur=1.0), f.step(1, start=T + 2, dur=2.0)]
    spans = [
        f.span("data_stall", T + 1, T + 2),
        f.span("custom:x", T + 1, T + 2),
        f.span("eval", T + 2.5, T + 3.5),
        f.span("checkpoint_save", T + 3, T + 5),
    ]
    head = [f.run(), f.attempt_start(), f.attempt_end(end=T + 6)]
    if order == "one batch":
        post(client, head + steps + spans)
    else:
        first, second = (spans, steps) if order == "spans first" else (steps, spans)
        post(client, head + first[:1])
        post(client, first[1:])
        post(client, second)
    g = client.get("/api/v1/runs/run-a/goodput").json()
    b = g["badput_s"]
    assert b["data_stall"] == pytest.approx(1) and b.get("custom:x", 0) == pytest.approx(0)
    assert b["checkpoint_save"] == pytest.approx(2) and b["eval"] == pytest.approx(0.5)
    assert g["goodput_s"] == pytest.approx(0.5)  # step 1: [2, 4] less eval [2.5, 3] and save
    assert g["other_s"] == pytest.approx(6 - 0.5 - 1 - 2 - 0.5)
    assert all(v >= -1e-9 for v in b.values())
    halves = [
        client.get("/api/v1/runs/run-a/goodput", params={"start": lo, "end": hi}).json()
        for lo, hi in ((T, T + 3.2), (T + 3.2, T + 6))
    ]
    for key in ("data_stall", "eval", "checkpoint_save"):
        assert sum(h["badput_s"][key] for h in halves) == pytest.approx(b[key])
    assert sum(h["goodput_s"] for h in halves) == pytest.approx(g["goodput_s"])


def test_a_window_keeps_the_whole_runs_decisions(client: Any) -> None:
    """Issue 11, item 2: a crash at 3 (oom) after a commit of step 0 at 2, attempt 1 at 10."""
    T = f.T0
    records = [f.run(), f.attempt_start(), f.step(0, start=T + 1, dur=1.0)]
    records += [f.checkpoint(0, T + 2), f.attempt_end(end=T + 3, status="failed", cause="oom")]
    records += [
        f.attempt_start(attempt=1, start=T + 10),
        f.step(1, start=T + 10, dur=2.0, attempt=1),
    ]
    records += [f.attempt_end(attempt=1, end=T + 12)]
    post(client, records)
    a = client.get("/api/v1/runs/run-a/goodput", params={"start": T, "end": T + 6}).json()
    assert a["total_s"] == pytest.approx(6)
    assert a["badput_s"]["infra_recovery"] == pytest.approx(3)
    assert a["badput_s"]["wasted_progress"] == pytest.approx(1)  # [2, 3]: after the commit
    assert a["goodput_s"] == pytest.approx(1)
    b = client.get("/api/v1/runs/run-a/goodput", params={"start": T + 4, "end": T + 9}).json()
    assert b["total_s"] == pytest.approx(5) and b["badput_s"]["infra_recovery"] == pytest.approx(5)
    whole = client.get("/api/v1/runs/run-a/goodput").json()
    rolled = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 1.5}).json()
    for key in ("total_s", "goodput_s", "other_s"):
        assert sum(w[key] for w in rolled["windows"]) == pytest.approx(whole[key])
    for cat, seconds in whole["badput_s"].items():
        assert sum(w["badput_s"][cat] for w in rolled["windows"]) == pytest.approx(seconds)
