"""Receipts: the pure completeness and summary rules on hand-built data, the receipt route on
both databases, and a real offline training run replayed into a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.calc.goodput import StepIn
from service.calc.receipts import (
    AttemptEndIn,
    ObservationIn,
    csv_cell,
    e_layer_count,
    is_fallback,
    last_attempt_completed,
    missing_parts,
    observed_seams,
    recompile_count,
    step_summary,
)
from tests import factories as f
from tests.conftest import LiveServer, wait_http

RECEIPT_PATH = "/api/v1/runs/{run_id}/receipt"


def with_receipt_routes(app: FastAPI) -> FastAPI:
    """Include the receipts router unless app.py already does."""
    from service.api.routes.receipts import router

    # FastAPI lists included routers lazily in app.routes: ask the OpenAPI document
    if RECEIPT_PATH not in app.openapi()["paths"]:
        app.include_router(router)
        app.openapi_schema = None
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(with_receipt_routes(app)) as c:
        yield c


def ingest(client: Any, records: list[dict[str, Any]]) -> None:
    resp = client.post("/api/v1/ingest", json={"records": records})
    assert resp.status_code == 200, resp.text


def receipt(client: Any, run_id: str = "run-a") -> dict[str, Any]:
    resp = client.get(f"/api/v1/runs/{run_id}/receipt")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# -- pure rules --

ENDED = [AttemptEndIn(0, 0, f.T0 + 100, "completed", {})]
SEAMS = ["moe_dispatch.layer0", "moe_dispatch.layer1"]


def missing_of(**change: Any) -> list[str]:
    parts: dict[str, Any] = {
        "model_plan": f.loop_plan("AEME"),
        "runtime_policy": f.loop_policy(),
        "environment": f.loop_environment(),
        "observed_seams": SEAMS,
        "num_steps": 3,
        "attempts": ENDED,
    }
    return missing_parts(**{**parts, **change})


def test_a_receipt_like_the_bundled_loop_sends_is_complete() -> None:
    assert missing_of() == []


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        ({"model_plan": {**f.loop_plan(), "top_k": None}}, ["model_plan.top_k"]),
        ({"runtime_policy": f.loop_policy(dtype=None)}, ["runtime_policy.dtype"]),
        ({"runtime_policy": f.loop_policy(world_size=float("nan"))}, ["runtime_policy.world_size"]),
        ({"environment": {"torch": "2.13.0"}}, ["environment.device", "environment.host"]),
        ({"observed_seams": SEAMS[:1]}, ["observed.moe_dispatch.layer1"]),
        ({"num_steps": 0}, ["steps"]),
        ({"attempts": []}, ["attempt_end"]),
    ],
)
def test_each_missing_item_is_named(change: dict[str, Any], missing: list[str]) -> None:
    assert missing_of(**change) == missing


def test_a_plan_without_e_layers_needs_no_moe_keys_nor_dispatch() -> None:
    plan = {"pattern": "AMA", "family_counts": {"A": 2, "M": 1, "E": 0, "R": 0}}
    policy = {k: v for k, v in f.loop_policy().items() if k != "dispatch_requested"}
    assert missing_of(model_plan=plan, runtime_policy=policy, observed_seams=[]) == []


def test_an_empty_plan_names_what_would_tell_the_e_layers() -> None:
    assert missing_of(model_plan={}) == [
        "model_plan.pattern",
        "model_plan.num_experts",
        "model_plan.top_k",
        "model_plan.family_counts",
    ]


@pytest.mark.parametrize(
    ("plan", "count"),
    [
        (f.loop_plan("AEMEAEMEAEMR"), 5),
        ({"e_positions": [1, 3, 7]}, 3),
        ({"layers": "AEAEE"}, 3),
        ({"pattern": "AM*3"}, 0),
        ({"pattern": "AE*3"}, None),
        ({"family_counts": {"A": 1}}, 0),
        ({"family_counts": {"E": 10**9}}, None),
        ({"family_counts": {"E": True}}, None),
        ({"family_counts": {"E": "2"}}, None),
        ({"family_counts": [1, 2]}, None),
    ],
)
def test_e_layer_count_reads_the_plan_defensively(plan: dict[str, Any], count: int | None) -> None:
    assert e_layer_count(plan) == count


def test_only_a_completed_newest_attempt_on_every_rank_counts_as_ended() -> None:
    failed = AttemptEndIn(0, 0, f.T0 + 5, "failed", None)
    running = AttemptEndIn(1, 1, None, None, None)
    done = [AttemptEndIn(1, r, f.T0 + 9, "completed", None) for r in (0, 1)]
    assert last_attempt_completed([failed, *done])
    assert not last_attempt_completed([failed])
    assert not last_attempt_completed([failed, done[0], running])


@pytest.mark.parametrize(
    ("requested", "observed", "reason", "fallback"),
    [
        ("grouped", "grouped", None, False),
        ("grouped", "loop", None, True),
        ("auto", "grouped", None, False),
        ("auto", "padded", "auto chose padded (capacity set): no CUDA", True),
        ("loop", "loop", "odd, but a reason was given", True),
        (None, "recompile 0/1", "guard failed", False),
    ],
)
def test_fallback_means_the_request_was_not_honoured(
    requested: str | None, observed: str, reason: str | None, fallback: bool
) -> None:
    assert is_fallback(requested, observed, reason) is fallback


def obs(seam: str, observed: str, t: float, **kw: Any) -> ObservationIn:
    base: dict[str, Any] = {"attempt": 0, "rank": 0, "requested": None, "reason": None}
    return ObservationIn(**{**base, **kw}, seam=seam, observed=observed, time=t, step=None)


def test_a_seam_seen_with_several_values_lists_them_all_and_is_flagged() -> None:
    seams = observed_seams(
        [
            obs("moe_dispatch.layer0", "loop", 3.0, requested="grouped", reason="no CUDA"),
            obs("moe_dispatch.layer0", "grouped", 1.0, requested="grouped"),
            obs("sdpa", "flash", 2.0, requested="auto"),
            obs("sdpa", "flash", 2.0, requested="auto", rank=1),
        ]
    )
    dispatch = seams["moe_dispatch.layer0"]
    assert [o.observed for o in dispatch.observations] == ["grouped", "loop"]
    assert dispatch.observed == "loop" and dispatch.multiple and dispatch.fallback
    assert not seams["sdpa"].multiple and not seams["sdpa"].fallback
    assert len(seams["sdpa"].observations) == 2


def test_step_summary_takes_rank_0_and_sums_the_ranks_rates() -> None:
    def s(rank: int, n: int, dur: float, loss: float, attempt: int = 0) -> StepIn:
        return StepIn(attempt, rank, n, f.T0 + n, f.T0 + n + dur, 100, loss)

    steps = [s(0, 0, 1.0, 3.0), s(0, 1, 3.0, 2.5), s(0, 2, 2.0, 9.0), s(0, 2, 2.0, 2.0, 1)]
    steps += [s(1, 0, 4.0, 7.0)]
    summary = step_summary(steps)
    assert summary.rank == 0 and summary.num_steps == 4
    assert summary.median_step_time_s == 2.0
    assert summary.final_loss == 2.0
    assert summary.tokens_per_s == pytest.approx(400 / 8.0 + 100 / 4.0)
    assert step_summary([]).num_steps == 0
    assert step_summary([s(3, 0, 1.0, 1.5)]).rank == 3


def test_recompiles_take_the_larger_of_observations_and_counters_per_attempt_rank() -> None:
    seen = [obs("recompile", f"recompile 0/{i}", float(i)) for i in (1, 2)]
    seen += [obs("recompile", "recompile 0/1", 1.0, attempt=1)]
    ends = [
        AttemptEndIn(0, 0, 1.0, "completed", {"recompiles": 1}),
        AttemptEndIn(1, 0, 1.0, "completed", {"recompiles": 4}),
        AttemptEndIn(2, 0, 1.0, "completed", {"recompiles": True}),
    ]
    assert recompile_count(seen, ends) == 2 + 4


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (True, "true"),
        (-1.5, "-1.5"),
        (0.1, "0.1"),
        (-3, "-3"),
        ([1, 2], "[1,2]"),
        ('=HYPERLINK("x")', '\'=HYPERLINK("x")'),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("a=b", "a=b"),
    ],
)
def test_csv_cells_keep_numbers_and_neutralise_formulas(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


# -- the route --


def test_full_run_receipt_is_complete_with_dispatch_per_e_layer(client: Any) -> None:
    ingest(client, f.loop_run(pattern="AEMEAE", steps=6))
    body = receipt(client)
    assert body["complete"] is True and body["missing"] == []
    assert body["status"] == "completed"
    for j in range(3):
        seam = body["observed"][f"moe_dispatch.layer{j}"]
        assert (seam["requested"], seam["observed"], seam["fallback"]) == ("auto", "grouped", False)
        assert seam["multiple"] is False and len(seam["observations"]) == 1
    assert body["model_plan"]["e_positions"] == [1, 3, 5]
    assert body["runtime_policy"]["dispatch_requested"] == "auto"
    assert body["attempts"][0]["counters"]["recompiles"] == 0


def test_summary_has_goodput_and_throughput(client: Any) -> None:
    records = f.loop_run(steps=5)
    last = next(i for i, r in enumerate(records) if r["kind"] == "step" and r["step"] == 4)
    records[last] = f.step(4, mem_allocated_peak=2**30, dur=1.5)  # bigger and slower
    records.append(f.observation("recompile", "recompile 0/1", reason="shape changed"))
    ingest(client, records)
    summary = receipt(client)["summary"]
    g = summary["goodput"]
    assert g["goodput_s"] + sum(g["badput_s"].values()) + g["other_s"] == pytest.approx(
        g["total_s"]
    )
    assert g["badput_s"]["startup"] == 9.0
    t = summary["throughput"]
    assert t["num_steps"] == 5 and t["median_step_time_s"] == 1.0
    assert t["final_loss"] == pytest.approx(3.0 - 0.04)
    assert t["peak_memory_bytes"] == 2**30
    assert t["tokens_per_s"] == pytest.approx(5 * 512 / 5.5)
    assert t["recompiles"] == 1


def drop_kind(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] != kind]


def without_seam(records: list[dict[str, Any]], seam: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("seam") != seam]


def with_run(records: list[dict[str, Any]], part: str, **change: Any) -> list[dict[str, Any]]:
    run = {**records[0], part: {**records[0][part], **change}}
    return [run, *records[1:]]


@pytest.mark.parametrize(
    ("mutate", "missing"),
    [
        (lambda r: with_run(r, "model_plan", num_experts=None), ["model_plan.num_experts"]),
        (lambda r: with_run(r, "runtime_policy", dtype=None), ["runtime_policy.dtype"]),
        (lambda r: with_run(r, "environment", host=None), ["environment.host"]),
        (lambda r: without_seam(r, "moe_dispatch.layer1"), ["observed.moe_dispatch.layer1"]),
        (lambda r: drop_kind(drop_kind(r, "step"), "routing"), ["steps"]),
        (lambda r: drop_kind(r, "attempt_end"), ["attempt_end"]),
    ],
)
def test_incomplete_receipt_names_what_is_missing(
    client: Any, mutate: Any, missing: list[str]
) -> None:
    ingest(client, mutate(f.loop_run(pattern="AEME", steps=3)))
    body = receipt(client)
    assert body["complete"] is False
    assert body["missing"] == missing


def test_a_failed_last_attempt_leaves_the_receipt_incomplete(client: Any) -> None:
    records = f.loop_run(steps=3)
    records[-1] = f.attempt_end(end=f.T0 + 20, status="failed", cause="OOM")
    ingest(client, records)
    body = receipt(client)
    assert body["missing"] == ["attempt_end"]
    assert body["attempts"][0]["cause"] == "OOM"


def test_fallback_and_several_observed_values_are_flagged(client: Any) -> None:
    records = f.loop_run(pattern="AE", steps=2)
    records.append(
        f.observation(
            "moe_dispatch.layer0",
            "loop",
            requested="auto",
            reason="auto chose loop (no capacity): no grouped_mm on cpu",
            time=f.T0 + 30,
        )
    )
    ingest(client, records)
    seam = receipt(client)["observed"]["moe_dispatch.layer0"]
    assert seam["observed"] == "loop" and seam["fallback"] is True and seam["multiple"] is True
    assert [(o["observed"], o["fallback"]) for o in seam["observations"]] == [
        ("grouped", False),
        ("loop", True),
    ]


def test_a_run_with_only_its_run_record_is_incomplete_not_an_error(client: Any) -> None:
    ingest(client, [f.run()])
    body = receipt(client)
    assert body["missing"] == [
        "model_plan.pattern",
        "model_plan.num_experts",
        "model_plan.top_k",
        "model_plan.family_counts",
        "runtime_policy.world_size",
        "runtime_policy.dtype",
        "runtime_policy.dispatch_requested",
        "runtime_policy.compile",
        "environment.torch",
        "environment.device",
        "environment.host",
        "steps",
        "attempt_end",
    ]
    assert body["summary"]["throughput"]["median_step_time_s"] is None


def test_unknown_run_is_404_and_bad_run_id_is_422(client: Any) -> None:
    assert client.get("/api/v1/runs/nope/receipt").status_code == 404
    resp = client.get("/api/v1/runs/bad%20id/receipt")
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "run_id"


def test_no_input_causes_a_server_error_on_these_routes(app: FastAPI, client: Any) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi.checks import response_schema_conformance

    ingest(client, f.loop_run(run_id="run-a", steps=3))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    ours = ("/receipt", "/routing", "/export.csv")
    found = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    operations = [op for op in found if op.path.endswith(ours)]
    assert len(operations) == 3
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        check()


# -- end to end: a real offline run, replayed into a live server --


class ReceiptServer(LiveServer):
    """LiveServer with the receipts router included."""

    def start(self) -> None:
        import uvicorn

        from service.app import create_app
        from service.settings import Settings

        app = with_receipt_routes(create_app(Settings(database_url=self.db_url)))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        wait_http(self.base + "/healthz")


@pytest.fixture(scope="module", params=["AE", "AEME"])
def offline_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """`python -m moe_core.train` with no server: its spool and run id."""
    tmp = tmp_path_factory.mktemp("offline")
    cmd = [sys.executable, "-m", "moe_core.train", "--steps", "12", "--no-progress"]
    cmd += ["--spool", str(tmp / "spool"), "--checkpoint-dir", str(tmp / "c")]
    if request.param != "AE":  # AE is the default pattern: the command as a user types it
        cmd += ["--pattern", request.param]
    env = {k: v for k, v in os.environ.items() if k != "GOODPUT_RUN_ID"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"^run_id (\S+)", out.stdout, re.MULTILINE)
    assert match, out.stdout
    return tmp / "spool", match.group(1)


def test_offline_run_replayed_gives_a_complete_receipt(
    offline_run: tuple[Path, str], migrated_url: str
) -> None:
    from trainer_hooks.sink import replay

    spool, run_id = offline_run
    server = ReceiptServer(migrated_url)
    server.start()
    try:
        sent = replay(spool, server.base, from_start=True)
        body = httpx.get(server.base + RECEIPT_PATH.format(run_id=run_id), timeout=30).json()
        csv_url = f"{server.base}/api/v1/runs/{run_id}/export.csv"
        exported = httpx.get(csv_url, params={"what": "steps"}, timeout=30)
    finally:
        server.stop()
    assert sent["rejected"] == 0 and sent["inserted"] > 0
    assert body["missing"] == [] and body["complete"] is True
    num_e = body["model_plan"]["family_counts"]["E"]
    assert len(body["model_plan"]["e_positions"]) == num_e >= 1
    for j in range(num_e):
        seam = body["observed"][f"moe_dispatch.layer{j}"]
        assert seam["requested"] == "auto" and seam["observed"] in {"grouped", "padded", "loop"}
    throughput = body["summary"]["throughput"]
    assert throughput["num_steps"] == 12 and throughput["final_loss"] is not None
    assert exported.headers["transfer-encoding"] == "chunked"  # streamed, no length up front
    assert len(exported.text.splitlines()) == 1 + 12
