"""Ablations over REST (issue 15): declared, joined by runs, each cell judged against the
baseline cell from its completed replicates; the knob table; the feature ledger's standings
and re-review flags. On both databases."""

from __future__ import annotations

from typing import Any

import pytest

from tests import factories as f
from tests.service.test_compare_api import post, timed_run

T0 = f.T0


def declaration(**kw: Any) -> dict[str, Any]:
    return {
        "ablation_id": "abl-1",
        "name": "dispatch",
        "project": "default",
        "created_at": T0,
        "knobs": {"dispatch": ["grouped", "padded"]},
        "cells": {
            "dispatch=grouped": {"dispatch": "grouped"},
            "dispatch=padded": {"dispatch": "padded"},
        },
        "baseline_cell": "dispatch=grouped",
        "repeats": 3,
        "settings": {"steps": 40},
        **kw,
    }


def cell_run(
    run_id: str, cell: str, step_s: float, seed: int, ablation: str = "abl-1", **kw: Any
) -> list:
    dispatch = cell.split("=")[1]
    records = timed_run(run_id, step_s, seed, dispatch_requested=dispatch, **kw)
    records[0].update(ablation_id=ablation, ablation_cell=cell)
    return records


def test_declaring_is_idempotent_and_a_changed_declaration_is_a_409(client: Any) -> None:
    first = client.post("/api/v1/ablations", json=declaration())
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["declared"] and body["expected_runs"] == 6 and body["runs"] == 0
    assert [c["cell"] for c in body["cells"]] == ["dispatch=grouped", "dispatch=padded"]
    again = client.post("/api/v1/ablations", json=declaration(created_at=T0 + 5))
    assert again.status_code == 200  # its created_at is the first sender's
    changed = client.post("/api/v1/ablations", json=declaration(repeats=5))
    assert changed.status_code == 409
    (item,) = changed.json()["detail"]
    assert item["fields"] == {"repeats": {"stored": 3, "sent": 5}}
    assert client.get("/api/v1/ablations/abl-1").json()["repeats"] == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"knobs": {"nope": [1, 2]}}, "knobs"),
        ({"baseline_cell": "dispatch=loop"}, "baseline_cell"),
        (
            {"cells": {"dispatch=grouped": {"compile": "on"}}, "baseline_cell": "dispatch=grouped"},
            "cells.dispatch=grouped",
        ),
        ({"ablation_id": "no spaces"}, "ablation_id"),
    ],
)
def test_a_bad_declaration_is_a_422_naming_the_field(
    client: Any, change: dict[str, Any], field: str
) -> None:
    got = client.post("/api/v1/ablations", json=declaration(**change))
    assert got.status_code == 422
    assert got.json()["detail"][0]["field"] == field
    assert client.get("/api/v1/ablations").json() == {"ablations": []}


def test_cells_are_judged_from_their_completed_replicates(client: Any) -> None:
    assert client.post("/api/v1/ablations", json=declaration()).status_code == 200
    for r in range(3):  # interleaved, as goodput ablate runs them
        post(client, cell_run(f"g{r}", "dispatch=grouped", 0.10, r))
        post(client, cell_run(f"p{r}", "dispatch=padded", 0.125, r))
    body = client.get("/api/v1/ablations/abl-1").json()
    assert (body["runs"], body["runs_ended"], body["expected_runs"]) == (6, 6, 6)
    base, padded = body["cells"]
    assert base["baseline"] and base["comparison"] is None and base["refusal"] is None
    assert [r["run_id"] for r in padded["runs"]] == ["p0", "p1", "p2"]
    assert [r["seed"] for r in padded["runs"]] == [0, 1, 2]
    comparison = padded["comparison"]
    assert comparison["verdict"] == "drop", comparison["reasons"]
    assert comparison["runs"] == {"baseline": 3, "candidate": 3}
    assert comparison["step_time_ratio"]["value"] == pytest.approx(1.25, rel=0.03)
    assert comparison["ablation"] == "abl-1"
    assert any("paired by seed (3 pairs)" in r for r in comparison["reasons"])  # seeds 0, 1, 2
    by_cells = client.get(
        "/api/v1/compare",
        params={
            "ablation": "abl-1",
            "baseline": "dispatch=grouped",
            "candidate": "dispatch=padded",
        },
    )
    assert by_cells.status_code == 200
    assert by_cells.json()["step_time_ratio"] == comparison["step_time_ratio"]
    listed = client.get("/api/v1/ablations").json()["ablations"]
    assert [(a["ablation_id"], a["runs"], a["declared"]) for a in listed] == [("abl-1", 6, True)]


def test_a_cell_waits_for_completed_runs(client: Any) -> None:
    assert client.post("/api/v1/ablations", json=declaration()).status_code == 200
    post(client, cell_run("g0", "dispatch=grouped", 0.10, 0))
    post(client, cell_run("p0", "dispatch=padded", 0.10, 0)[:-1])  # still running
    body = client.get("/api/v1/ablations/abl-1").json()
    padded = body["cells"][1]
    assert padded["comparison"] is None
    assert (
        padded["refusal"]["error"] == "waiting"
        and "dispatch=padded" in padded["refusal"]["message"]
    )
    assert padded["runs"][0]["status"] == "running" and body["runs_ended"] == 1


def test_an_undeclared_ablation_is_read_from_its_runs(client: Any) -> None:
    post(client, cell_run("g0", "dispatch=grouped", 0.10, 0, ablation="mine"))
    post(client, cell_run("p0", "dispatch=padded", 0.10, 0, ablation="mine"))
    body = client.get("/api/v1/ablations/mine").json()
    assert not body["declared"] and body["baseline_cell"] == "dispatch=grouped"
    assert body["knobs"] == {"dispatch": ["grouped", "padded"]}
    assert body["cells"][1]["comparison"]["verdict"] == "inconclusive"
    assert client.get("/api/v1/ablations/nope").status_code == 404
    cells = {"ablation": "mine", "baseline": "dispatch=grouped", "candidate": "dispatch=loop"}
    missing = client.get("/api/v1/compare", params=cells)
    assert missing.status_code == 404 and "dispatch=padded" in missing.text


def test_the_knob_table_is_served() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(database_url="sqlite://"))) as c:
        knobs = {k["name"]: k for k in c.get("/api/v1/knobs").json()}
    assert knobs["dispatch"]["fields"][0] == "runtime_policy.dispatch_requested"
    assert knobs["dispatch"]["observed_seam"] == "moe_dispatch.layer"
    assert {"capacity_factor", "compile", "null_slot", "lr"} <= set(knobs)


def test_the_ledger_gives_each_knob_value_its_standing_and_flags_a_changed_environment(
    client: Any,
) -> None:
    assert client.post("/api/v1/ablations", json=declaration()).status_code == 200
    for r in range(3):
        post(client, cell_run(f"g{r}", "dispatch=grouped", 0.10, r))
        post(client, cell_run(f"p{r}", "dispatch=padded", 0.08, r))
    ledger = client.get("/api/v1/ledger").json()
    (entry,) = ledger["entries"]
    assert (entry["knob"], entry["value"]) == ("dispatch", "padded")
    assert entry["standing"] == "default-on win", entry["standing_reason"]
    assert not entry["needs_rereview"]
    (verdict,) = entry["verdicts"]
    assert verdict["verdict"] == "keep" and verdict["environment"]["torch"] == "2.13.0"
    assert verdict["lane"]["pattern"] == "AEME"
    # A newer run on another torch: the standing rests on the old one.
    newer = f.loop_run("later", steps=2)
    newer[0]["environment"]["torch"] = "2.14.0"
    newer[0]["created_at"] = T0 + 100
    post(client, newer)
    (entry,) = client.get("/api/v1/ledger").json()["entries"]
    assert entry["needs_rereview"] and "torch 2.13.0 -> 2.14.0" in entry["rereview_reason"]
    other = client.get("/api/v1/ledger", params={"project": "elsewhere"}).json()
    assert other["entries"] == []
