"""GET /api/v1/compare over real stored runs: one run a side or replicates, knob names,
lanes as they ran, and the refusals."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests import factories as f


def timed_run(
    run_id: str,
    step_s: float,
    seed: int,
    steps: int = 40,
    observed: str | None = None,
    evals: dict[int, float] | None = None,
    **policy: Any,
) -> list:
    """A complete loop-shaped run whose steps take about step_s seconds; its E layers
    observed `observed` (default: what its policy asked for, else grouped); `evals` its
    eval losses by step."""
    rng = random.Random(seed)
    records = f.loop_run(run_id, steps=0)
    end = records.pop()  # the attempt_end, re-added after the steps
    ran = observed or policy.get("dispatch_requested", "grouped")
    if ran == "auto":
        ran = "grouped"
    for r in records:
        if r["kind"] == "observation" and r["seam"].startswith("moe_dispatch."):
            r["observed"] = ran
            r["requested"] = policy.get("dispatch_requested", "auto")
    t = f.T0 + 10
    for i in range(steps):
        dur = step_s * (1 + rng.uniform(-0.03, 0.03))
        records.append(f.step(i, run_id, start=t, dur=dur, loss=2.0 - 0.01 * i))
        t += dur + 0.01
    records[0]["runtime_policy"].update({"seed": seed, **policy})
    for step, value in (evals or {}).items():
        metric = {"kind": "metric", "run_id": run_id, "name": "eval_loss", "step": step}
        records.append({**metric, "value": value, "time": f.T0 + 11})
    records.append({**end, "end": t + 1})
    return records


def post(client: Any, records: list) -> None:
    got = client.post("/api/v1/ingest", json={"records": records})
    assert got.status_code == 200, got.text


def compare(client: Any, **params: Any) -> Any:
    return client.get("/api/v1/compare", params=params)


def test_faster_candidate_with_the_declared_knob_is_kept(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1, dispatch_requested="loop"))
    post(client, timed_run("cand", 0.08, 2, dispatch_requested="grouped"))
    resp = compare(client, baseline="base", candidate="cand", knob="dispatch")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["verdict"] == "keep", body["reasons"]
    assert body["step_time_ratio"]["value"] == pytest.approx(0.8, rel=0.05)
    ratio = body["step_time_ratio"]
    assert ratio["low"] < ratio["value"] < ratio["high"] < 0.98
    assert body["lane_diff"] == {
        "runtime_policy.dispatch_requested": {"baseline": "loop", "candidate": "grouped"}
    }
    assert body["knob_fields"] == ["runtime_policy.dispatch_requested"]
    assert body["runs"] == {"baseline": 1, "candidate": 1}
    assert body["baseline_runs"] == ["base"] and body["candidate_runs"] == ["cand"]
    assert body["steady_steps"] == {"baseline": 35, "candidate": 35}
    assert set(body["badput_s"]) >= {"startup", "data_stall"}
    names = [a["name"] for a in body["axes"]]
    assert names[:2] == ["step_time", "tokens_per_s"] and "peak_memory" in names
    assert body["run_noise"] is not None  # one run a side: the floor, said in the reasons


def test_a_field_path_still_works_as_a_knob_and_an_unknown_knob_is_a_422(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1, dispatch_requested="loop"))
    post(client, timed_run("cand", 0.08, 2, dispatch_requested="grouped"))
    path = compare(
        client, baseline="base", candidate="cand", knob="runtime_policy.dispatch_requested"
    )
    assert path.status_code == 200
    bad = compare(client, baseline="base", candidate="cand", knob="foo")
    assert bad.status_code == 422
    (err,) = bad.json()["detail"]
    assert err["field"] == "knob" and "foo" in err["msg"] and "capacity_factor" in err["msg"]


def test_auto_that_ran_grouped_is_the_grouped_lane(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1, dispatch_requested="auto"))
    post(client, timed_run("cand", 0.10, 2, dispatch_requested="grouped"))
    resp = compare(client, baseline="base", candidate="cand")
    assert resp.status_code == 200, resp.text
    assert resp.json()["lane_diff"] == {}


def test_runs_that_differ_only_in_their_seed_are_replicates_not_a_lane_mismatch(
    client: Any,
) -> None:
    for i in range(3):
        post(client, timed_run(f"a{i}", 0.10, 10 + i, dispatch_requested="grouped"))
        post(client, timed_run(f"b{i}", 0.10, 20 + i, dispatch_requested="grouped"))
    resp = compare(client, baseline="a0,a1,a2", candidate="b0,b1,b2")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["runs"] == {"baseline": 3, "candidate": 3}
    assert body["verdict"] == "inconclusive", body["reasons"]  # A/A: no keep, no drop
    assert body["lane_diff"] == {}
    assert not any("paired" in r for r in body["reasons"])  # seeds 10.. against 20..: unpaired
    single = compare(client, baseline="a0", candidate="b1")
    assert single.status_code == 200 and single.json()["verdict"] == "inconclusive"


def test_replicates_of_mixed_lanes_are_refused_naming_the_runs_and_field(client: Any) -> None:
    post(client, timed_run("a0", 0.10, 1, dispatch_requested="grouped"))
    post(client, timed_run("a1", 0.10, 2, dispatch_requested="grouped", lr=0.01))
    post(client, timed_run("b0", 0.10, 3, dispatch_requested="grouped"))
    resp = compare(client, baseline="a0,a1", candidate="b0")
    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert detail["error"] == "replicates_differ"
    assert detail["fields"] == ["runtime_policy.lr"] and detail["runs"] == ["a0", "a1"]


def test_lanes_differing_beyond_the_knob_are_refused_with_the_fields(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1, dispatch_requested="loop"))
    post(client, timed_run("cand", 0.08, 2, dispatch_requested="grouped", dtype="bf16"))
    params = {"baseline": "base", "candidate": "cand", "knob": "dispatch"}
    resp = compare(client, **params)
    assert resp.status_code == 409
    assert resp.json()["detail"]["fields"] == ["runtime_policy.dtype"]
    forced = compare(client, **params, allow_lane_mismatch="true")
    assert forced.status_code == 200 and "runtime_policy.dtype" in forced.json()["lane_diff"]


def test_better_eval_loss_at_no_speed_cost_is_kept(client: Any) -> None:
    worse = {9: 4.9, 19: 4.8, 29: 4.74, 39: 4.74}
    better = {9: 1.2, 19: 0.5, 29: 0.3, 39: 0.23}
    post(client, timed_run("base", 0.10, 1, evals=worse, lr=0.003))
    post(client, timed_run("cand", 0.10, 2, evals=better, lr=0.01))
    body = compare(client, baseline="base", candidate="cand", knob="lr").json()
    assert body["verdict"] == "keep", body["reasons"]
    assert body["eval_loss"]["baseline"] > body["eval_loss"]["candidate"]
    (axis,) = [a for a in body["axes"] if a["name"] == "eval_loss"]
    assert axis["finding"] == "better"


def test_an_incomplete_receipt_is_refused_with_what_is_missing(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1))
    post(client, timed_run("cand", 0.10, 2)[:-1])  # no attempt_end
    resp = compare(client, baseline="base", candidate="cand")
    assert resp.status_code == 409
    assert resp.json()["detail"]["missing"] == {"cand": ["attempt_end"]}


def test_unknown_runs_and_bad_parameters(client: Any) -> None:
    post(client, timed_run("base", 0.10, 1))
    assert compare(client, baseline="base", candidate="nope").status_code == 404
    bad = compare(client, baseline="base", candidate="base", margin=3)
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "margin"
    both = compare(client, baseline="base", candidate="base")
    assert both.status_code == 422 and "both sides" in both.text
    odd = compare(client, baseline="base,", candidate="x y")
    assert odd.status_code == 422 and odd.json()["detail"][0]["field"] == "candidate"


def test_a_long_run_is_compared_on_its_newest_steps(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison reads the newest COMPARE_STEPS steps of the last attempt: the
    baseline's early slow phase falls outside them, so the two runs compare as equal."""
    from service.calc import compare as calc

    monkeypatch.setattr(calc, "COMPARE_STEPS", 30)
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
    post(client, base)
    post(client, timed_run("cand", 0.10, 2, steps=60, dispatch_requested="grouped"))
    body = compare(client, baseline="base", candidate="cand", knob="dispatch").json()
    assert body["steady_steps"] == {"baseline": 25, "candidate": 25}  # 30 less max(5, 10%)
    assert body["step_time_ratio"]["value"] == pytest.approx(1.0, rel=0.05)
