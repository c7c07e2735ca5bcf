"""GET /api/v1/compare over real stored runs."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests import factories as f


@pytest.fixture
def cclient(app: Any, client: Any) -> Any:
    from service.api.routes.compare import router as compare_router
    from service.api.routes.receipts import router as receipts_router

    paths = {getattr(r, "path", "") for r in app.routes}
    for router in (receipts_router, compare_router):
        if not {r.path for r in router.routes} <= paths:
            app.include_router(router)
    return client


def timed_run(run_id: str, step_s: float, seed: int, steps: int = 40, **policy: Any) -> list:
    """A complete loop-shaped run whose steps take about step_s seconds."""
    rng = random.Random(seed)
    records = f.loop_run(run_id, steps=0)
    end = records.pop()  # the attempt_end, re-added after the steps
    t = f.T0 + 10
    for i in range(steps):
        dur = step_s * (1 + rng.uniform(-0.03, 0.03))
        records.append(f.step(i, run_id, start=t, dur=dur, loss=2.0 - 0.01 * i))
        t += dur + 0.01
    records[0]["runtime_policy"].update(policy)
    records.append({**end, "end": t + 1})
    return records


def post(client: Any, records: list) -> None:
    assert client.post("/api/v1/ingest", json={"records": records}).status_code == 200


def test_faster_candidate_with_the_declared_knob_is_kept(cclient: Any) -> None:
    post(cclient, timed_run("base", 0.10, 1, dispatch_requested="loop"))
    post(cclient, timed_run("cand", 0.08, 2, dispatch_requested="grouped"))
    resp = cclient.get(
        "/api/v1/compare",
        params={
            "baseline": "base",
            "candidate": "cand",
            "knob": "runtime_policy.dispatch_requested",
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["verdict"] == "keep"
    assert body["step_time_ratio"]["value"] == pytest.approx(0.8, rel=0.05)
    ratio = body["step_time_ratio"]
    assert ratio["low"] < ratio["value"] < ratio["high"] < 0.98  # the interval holds its estimate
    assert body["lane_diff"] == {
        "runtime_policy.dispatch_requested": {"baseline": "loop", "candidate": "grouped"}
    }
    assert body["steady_steps"] == {"baseline": 35, "candidate": 35}
    assert set(body["badput_s"]) >= {"startup", "data_stall"}


def test_lanes_differing_beyond_the_knob_are_refused_with_the_fields(cclient: Any) -> None:
    post(cclient, timed_run("base", 0.10, 1, dispatch_requested="loop"))
    post(cclient, timed_run("cand", 0.08, 2, dispatch_requested="grouped", dtype="bf16"))
    params = {"baseline": "base", "candidate": "cand", "knob": "runtime_policy.dispatch_requested"}
    resp = cclient.get("/api/v1/compare", params=params)
    assert resp.status_code == 409
    assert resp.json()["detail"]["fields"] == ["runtime_policy.dtype"]
    forced = cclient.get("/api/v1/compare", params={**params, "allow_lane_mismatch": "true"})
    assert forced.status_code == 200 and "runtime_policy.dtype" in forced.json()["lane_diff"]


def test_an_incomplete_receipt_is_refused_with_what_is_missing(cclient: Any) -> None:
    post(cclient, timed_run("base", 0.10, 1))
    unfinished = timed_run("cand", 0.10, 2)[:-1]  # no attempt_end
    post(cclient, unfinished)
    resp = cclient.get("/api/v1/compare", params={"baseline": "base", "candidate": "cand"})
    assert resp.status_code == 409
    assert resp.json()["detail"]["missing"] == {"baseline": [], "candidate": ["attempt_end"]}


def test_unknown_runs_and_bad_parameters(cclient: Any) -> None:
    post(cclient, timed_run("base", 0.10, 1))
    assert (
        cclient.get("/api/v1/compare", params={"baseline": "base", "candidate": "nope"}).status_code
        == 404
    )
    bad = cclient.get(
        "/api/v1/compare", params={"baseline": "base", "candidate": "base", "margin": 3}
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "margin"


def test_a_long_run_is_compared_on_its_newest_steps(
    cclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bootstrap reads the newest COMPARE_STEPS steps of the last attempt: the baseline's
    early slow phase falls outside them, so the two runs compare as equal."""
    from service.services import compare

    monkeypatch.setattr(compare, "COMPARE_STEPS", 30)
    base = timed_run("base", 0.10, 1, steps=60, dispatch_requested="loop")
    shift = 0.0  # the first 30 steps twice as slow, the later ones moved after them
    for r in base:
        if r["kind"] == "step":
            dur = r["end"] - r["start"]
            r["start"] += shift
            if r["step"] < 30:
                shift += dur
                dur *= 2
            r["end"] = r["start"] + dur
        elif r["kind"] == "attempt_end":
            r["end"] += shift
    post(cclient, base)
    post(cclient, timed_run("cand", 0.10, 2, steps=60, dispatch_requested="grouped"))
    body = cclient.get(
        "/api/v1/compare",
        params={
            "baseline": "base",
            "candidate": "cand",
            "knob": "runtime_policy.dispatch_requested",
        },
    ).json()
    assert body["steady_steps"] == {"baseline": 25, "candidate": 25}  # 30 less max(5, 10%)
    assert body["step_time_ratio"]["value"] == pytest.approx(1.0, rel=0.05)
