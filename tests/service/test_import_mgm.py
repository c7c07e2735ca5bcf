"""Importing ml-goodput-measurement logs: the pure mapping, the endpoint and the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from service.importers.mgm import (
    ImportConflict,
    MgmFormatError,
    StoredRun,
    check_stored,
    custom_category,
    map_log,
)
from tests.conftest import LiveServer
from trainer_hooks.records import (
    AttemptEndRecord,
    AttemptStartRecord,
    CheckpointRecord,
    HeartbeatRecord,
    RunRecord,
    SpanRecord,
    StepRecord,
)

T0 = 1_700_000_000.0
JOB = "llama-train"
URL = "/api/v1/import/ml-goodput"


def e(**fields: Any) -> dict[str, Any]:
    return {"job_name": JOB, **fields}


def pair(prefix: str, start: float, end: float) -> list[dict[str, Any]]:
    return [e(**{f"{prefix}_start_time": T0 + start}), e(**{f"{prefix}_end_time": T0 + end})]


def custom(kind: str, start: float, end: float) -> list[dict[str, Any]]:
    return [
        e(custom_badput_event_type=kind, custom_badput_event_start_time=T0 + start),
        e(custom_badput_event_type=kind, custom_badput_event_end_time=T0 + end),
    ]


def steps(first: int, *starts: float) -> list[dict[str, Any]]:
    return [e(step_count=first + i, step_start_time=T0 + t) for i, t in enumerate(starts)]


def realistic_log() -> list[dict[str, Any]]:
    """Three attempts (two restarts): crash after step 4 started, resume at 3; crash after
    step 5 started, resume at 5; then the job ends."""
    return [
        e(job_start_time=T0),
        *pair("tpu_init", 1, 11),
        *pair("training_prep", 11, 16),
        *pair("data_loading", 16, 20),
        *steps(0, 20, 30, 40, 50, 60),
        *custom("eval_step", 42, 45),
        e(some_future_key=1.0),  # not ml-goodput-measurement's: ignored
        e(job_start_time=T0 + 100),
        *pair("tpu_init", 101, 106),
        *pair("data_loading", 106, 108),
        *steps(3, 110, 120, 130),
        e(job_start_time=T0 + 200),
        *pair("tpu_init", 200, 204),
        *steps(5, 210, 220, 230),
        *custom("SDC Check", 222, 224),
        e(job_end_time=T0 + 245),
    ]


def lines(entries: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(x) for x in entries) + "\n"


def of(records: list[Any], kind: type) -> list[Any]:
    return [r for r in records if isinstance(r, kind)]


# ---------------------------------------------------------------- pure mapping


def test_realistic_log_maps_to_attempts_steps_spans_and_checkpoints() -> None:
    mapped = map_log(json.dumps(realistic_log()))
    recs = mapped.records
    assert [a.attempt for a in of(recs, AttemptStartRecord)] == [0, 1, 2]
    ends = {a.attempt: (a.status, a.cause, a.end - T0) for a in of(recs, AttemptEndRecord)}
    assert ends == {
        0: ("failed", "restarted", 60.0),
        1: ("failed", "restarted", 130.0),
        2: ("completed", None, 245.0),
    }
    got = [(s.attempt, s.step, s.start - T0, s.end - T0) for s in of(recs, StepRecord)]
    assert got == [
        (0, 0, 20, 30), (0, 1, 30, 40), (0, 2, 40, 50), (0, 3, 50, 60),
        (1, 3, 110, 120), (1, 4, 120, 130),
        (2, 5, 210, 220), (2, 6, 220, 230), (2, 7, 230, 245),
    ]  # fmt: skip
    spans = sorted((s.attempt, s.category, s.start - T0) for s in of(recs, SpanRecord))
    assert spans == [
        (0, "custom:eval_step", 42), (0, "data_stall", 16), (0, "startup", 1), (0, "startup", 11),
        (1, "data_stall", 106), (1, "startup", 101),
        (2, "custom:sdc_check", 222), (2, "startup", 200),
    ]  # fmt: skip
    assert [(c.attempt, c.step) for c in of(recs, CheckpointRecord)] == [(0, 2), (1, 4)]
    assert mapped.ignored == 3  # the unknown entry and the two steps cut by a crash
    assert any("step 4 (attempt 0)" in w for w in mapped.warnings)
    assert mapped.run_id.startswith("mgm-") and of(recs, RunRecord)[0].name == JOB


def test_run_id_depends_on_job_and_first_start_only() -> None:
    log = realistic_log()
    a = map_log(json.dumps(log), run_name="mine")
    assert a.run_id == map_log(lines(log)).run_id
    assert of(a.records, RunRecord)[0].name == "mine"
    other = [{**x, "job_name": "other"} for x in log]
    assert map_log(json.dumps(other)).run_id != a.run_id


def test_json_array_and_json_lines_map_to_the_same_records() -> None:
    log = realistic_log()
    assert map_log(json.dumps(log)).records == map_log(lines(log)).records


def test_cloud_logging_export_and_unordered_entries_are_read() -> None:
    log = realistic_log()
    wrapped = [{"jsonPayload": x, "severity": "INFO"} for x in reversed(log)]
    assert map_log(json.dumps(wrapped)).records == map_log(json.dumps(log)).records


def test_step_logged_again_without_job_start_is_a_restart() -> None:
    log = [e(job_start_time=T0), *steps(0, 1, 2, 3), *steps(1, 10, 11), e(job_end_time=T0 + 12)]
    recs = map_log(json.dumps(log)).records
    starts = [(a.attempt, a.start - T0) for a in of(recs, AttemptStartRecord)]
    assert starts == [(0, 0), (1, 10)]
    assert of(recs, AttemptEndRecord)[0].cause.startswith("restarted (step 1 logged again")
    assert [(c.attempt, c.step) for c in of(recs, CheckpointRecord)] == [(0, 0)]


def test_open_attempt_gets_a_heartbeat_and_unpaired_events_are_reported() -> None:
    log = [
        e(job_start_time=T0),
        *steps(0, 1, 2),
        e(data_loading_end_time=T0 + 3),
        e(tpu_init_start_time=T0 + 4),
    ]
    mapped = map_log(lines(log))
    assert [h.time - T0 for h in of(mapped.records, HeartbeatRecord)] == [4]
    assert not of(mapped.records, AttemptEndRecord)
    assert len(of(mapped.records, StepRecord)) == 1
    assert mapped.ignored == 3
    assert any("data_loading ended but never started" in w for w in mapped.warnings)


def test_orbax_checkpoint_entries_become_checkpoint_spans() -> None:
    save = {
        "event_type": "save",
        "step": 10,
        "directory": "gs://b/c",
        "checkpoint_manager_blocking_start_time": T0 + 5,
        "checkpoint_manager_blocking_duration_secs": 1.5,
    }
    restore = {
        "event_type": "restore",
        "step": 10,
        "checkpoint_manager_start_time": T0 + 1,
        "checkpoint_manager_duration_secs": 2.0,
    }
    log = [e(job_start_time=T0), restore, save, e(job_end_time=T0 + 9)]
    spans = of(map_log(json.dumps(log)).records, SpanRecord)
    got = sorted((s.category, s.start - T0, s.end - T0) for s in spans)
    assert got == [("checkpoint_restore", 1, 3), ("checkpoint_save", 5, 6.5)]


def test_entries_of_another_job_are_ignored() -> None:
    log = [e(job_start_time=T0), {"job_name": "x", "job_end_time": T0 + 1}]
    mapped = map_log(json.dumps(log))
    assert mapped.ignored == 1 and "job 'x'" in mapped.warnings[0]


@pytest.mark.parametrize(
    ("raw", "custom_type"),
    [
        ("eval_step", "custom:eval_step"),
        ("SDC Check!", "custom:sdc_check_"),
        ("", "custom:unknown"),
    ],
)
def test_custom_category_is_sanitized(raw: str, custom_type: str) -> None:
    assert custom_category(raw) == custom_type
    assert len(custom_category("x" * 200)) == len("custom:") + 64


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ("", []),
        ("[]", []),
        ("[1, 2", ["index", 1]),
        ('{"job_start_time": 1700000000}\n{oops\n', ["line", 2]),
        ('[{"job_start_time": 1700000000}, 5]', ["index", 1]),
        ('[{"job_start_time": "1700000000"}]', ["index", 0, "job_start_time"]),
        ('[{"job_start_time": 1700000000000}]', ["index", 0, "job_start_time"]),
        ('[{"job_start_time": NaN}]', ["index", 0]),
        ('[{"step_start_time": 1700000000}]', ["index", 0, "step_count"]),
        ('[{"step_start_time": 1700000000, "step_count": 1.5}]', ["index", 0, "step_count"]),
        ('[{"step_start_time": 1700000000, "step_count": true}]', ["index", 0, "step_count"]),
        ('[{"job_name": 3, "job_start_time": 1700000000}]', ["index", 0, "job_name"]),
        ('[{"job_end_time": 1700000000}]', []),  # no job_start_time at all
    ],
)
def test_bad_logs_are_refused_naming_the_entry_and_key(body: str, loc: list[Any]) -> None:
    with pytest.raises(MgmFormatError) as info:
        map_log(body)
    assert info.value.errors[0]["loc"] == ["body", *loc]


# ---------------------------------------------------------------- the endpoint


def post(client: Any, body: str, ctype: str = "application/json", **params: Any) -> Any:
    return client.post(URL, content=body, headers={"content-type": ctype}, params=params)


def test_import_stores_the_run_and_its_goodput_adds_up(client: Any) -> None:
    resp = post(client, json.dumps(realistic_log()))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["duplicates"] == 0 and body["ignored"] == 3 and body["inserted"] > 20
    run = client.get(f"/api/v1/runs/{body['run_id']}").json()
    assert run["project"] == "ml-goodput-import" and run["status"] == "completed"
    assert run["environment"]["source"] == "ml-goodput-measurement"
    assert [a["status"] for a in run["attempts"]] == ["failed", "failed", "completed"]
    g = client.get(f"/api/v1/runs/{body['run_id']}/goodput").json()
    badput = {k: v for k, v in g["badput_s"].items() if v}
    assert badput == pytest.approx(
        {
            "startup": 24.0,
            "data_stall": 6.0,
            "custom:eval_step": 3.0,
            "custom:sdc_check": 2.0,
            "wasted_progress": 10.0,
            "infra_recovery": 110.0,
        }
    )
    assert g["total_s"] == pytest.approx(245.0) and g["goodput_s"] == pytest.approx(80.0)
    assert g["other_s"] == pytest.approx(10.0)
    parts = g["goodput_s"] + sum(g["badput_s"].values()) + g["other_s"]
    assert parts == pytest.approx(g["total_s"])


def test_json_array_then_json_lines_store_the_same_and_nothing_twice(client: Any) -> None:
    first = post(client, json.dumps(realistic_log())).json()
    assert first["existing_run"] is False
    again = post(client, lines(realistic_log()), "application/x-ndjson", run_name=JOB).json()
    assert again["run_id"] == first["run_id"]
    assert (again["inserted"], again["duplicates"]) == (0, first["inserted"])
    assert again["existing_run"] is True
    n = first["inserted"]
    assert again["warnings"][0] == (
        f"run {first['run_id']} ({JOB!r}) was already stored: {n} of this log's {n} records "
        "were already there; this import repeated that run and stored nothing new"
    )
    third = post(client, json.dumps(realistic_log())).json()
    assert (third["inserted"], third["duplicates"]) == (0, first["inserted"])
    assert third["warnings"][1:] == first["warnings"]  # the import's own, after it


def stored_steps(client: Any, run_id: str) -> list[tuple[int, int]]:
    points = client.get(f"/api/v1/runs/{run_id}/steps").json()["points"]
    return [(p["attempt"], p["step"]) for p in points]


def test_a_longer_log_of_the_same_job_extends_the_run(client: Any) -> None:
    full = realistic_log()
    cut = full.index(e(job_start_time=T0 + 200))  # the job ran on after this export
    short = post(client, json.dumps(full[:cut])).json()
    assert short["existing_run"] is False
    longer = post(client, json.dumps(full)).json()
    assert longer["run_id"] == short["run_id"] and longer["existing_run"] is True
    # all it stored but the heartbeat of attempt 1, then open, which the longer log ends
    assert longer["duplicates"] == short["inserted"] - 1 and longer["inserted"] > 0
    total = longer["inserted"] + longer["duplicates"]
    assert longer["warnings"][0] == (
        f"run {short['run_id']} ({JOB!r}) was already stored: {longer['duplicates']} of this "
        f"log's {total} records were already there; this import extended that run with "
        f"{longer['inserted']} new records"
    )
    # the same as importing the whole log at once (test_import_stores_the_run_...)
    g = client.get(f"/api/v1/runs/{short['run_id']}/goodput").json()
    assert g["total_s"] == pytest.approx(245.0) and g["goodput_s"] == pytest.approx(80.0)
    assert g["badput_s"]["infra_recovery"] == pytest.approx(110.0)
    run = client.get(f"/api/v1/runs/{short['run_id']}").json()
    assert [a["status"] for a in run["attempts"]] == ["failed", "failed", "completed"]
    again = post(client, json.dumps(full[:cut])).json()  # the shorter one again: nothing new
    assert again["inserted"] == 0 and again["existing_run"] is True


def test_another_run_name_for_a_stored_run_is_a_409_naming_both(client: Any) -> None:
    first = post(client, json.dumps(realistic_log()), run_name="hist")
    assert first.status_code == 200
    run_id = first.json()["run_id"]
    for given, name in ((None, JOB), ("other", "other")):
        params = {"run_name": given} if given else {}
        resp = post(client, json.dumps(realistic_log()), **params)
        assert resp.status_code == 409, resp.text
        detail = resp.json()["detail"]
        assert detail["error"] == "run_name_mismatch" and detail["run_id"] == run_id
        assert (detail["stored_name"], detail["import_name"]) == ("hist", name)
        assert detail["suggested_run_name"] == "hist"
        assert "'hist'" in detail["message"] and repr(name) in detail["message"]
        assert "run_name='hist'" in detail["message"]
    runs = client.get("/api/v1/runs").json()["runs"]
    assert [r["name"] for r in runs] == ["hist"]
    ok = post(client, json.dumps(realistic_log()), run_name="hist").json()  # as suggested
    assert ok["existing_run"] is True and ok["inserted"] == 0


def test_a_different_log_that_contradicts_the_stored_run_is_a_409_storing_nothing(
    client: Any,
) -> None:
    first = post(client, json.dumps(realistic_log())).json()
    run_id = first["run_id"]
    before = stored_steps(client, run_id)
    other = [  # the same job name and first start, another history
        e(job_start_time=T0),
        *pair("data_loading", 16, 25),  # stored: 16 -> 20
        *steps(0, 21, 31, 41),  # stored: step 0 from 20 to 30
        *steps(3, 50),  # stored: step 3 from 50 to 60 (agrees: not listed)
        *steps(9, 60),  # a new step: no conflict of its own
        e(job_end_time=T0 + 80),  # stored: attempt 0 failed at 60
    ]
    resp = post(client, json.dumps(other))
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert detail["error"] == "conflicting_records" and detail["run_id"] == run_id
    got = {
        (c["kind"], tuple(c["key"].values())): (c["stored"], c["import"])
        for c in detail["conflicts"]
    }
    assert got[("step", (0, 0, 0))] == (
        {"start": T0 + 20, "end": T0 + 30},
        {"start": T0 + 21, "end": T0 + 31},
    )
    assert got[("span", (0, 0, "data_stall", T0 + 16))] == (
        {"end": T0 + 20, "overlapped": False},
        {"end": T0 + 25, "overlapped": False},
    )
    assert got[("attempt_end", (0, 0))] == (
        {"end": T0 + 60, "status": "failed", "cause": "restarted"},
        {"end": T0 + 80, "status": "completed", "cause": None},
    )
    assert ("step", (0, 0, 3)) not in got and detail["count"] == len(got) == 5  # steps 0, 1, 2
    assert "step (attempt 0, rank 0, step 0)" in detail["message"]
    assert "nothing was stored" in detail["message"]
    # nothing of it was stored, not even the new step 9
    assert stored_steps(client, run_id) == before
    g = client.get(f"/api/v1/runs/{run_id}/goodput").json()
    assert g["total_s"] == pytest.approx(245.0) and g["goodput_s"] == pytest.approx(80.0)


def test_a_different_log_that_only_adds_to_the_stored_run_lands_with_a_warning(
    client: Any,
) -> None:
    """What the check cannot tell from a longer log: nothing contradicts, so it is stored,
    and the answer says it landed on a stored run."""
    first = post(client, lines([e(job_start_time=T0), *pair("tpu_init", 1, 5)])).json()
    more = post(client, lines([e(job_start_time=T0), *steps(0, 6, 7), e(job_end_time=T0 + 8)]))
    assert more.status_code == 200, more.text
    body = more.json()
    assert body["run_id"] == first["run_id"] and body["existing_run"] is True
    assert body["inserted"] == 3 and body["duplicates"] == 2  # steps 0, 1, the end; run, start
    assert "already stored: 2 of this log's 5 records" in body["warnings"][0]
    assert "extended that run with 3 new records" in body["warnings"][0]


def test_check_stored_skips_what_a_placeholder_holds() -> None:
    mapped = map_log(json.dumps(realistic_log()))
    placeholder = StoredRun(
        run_id=mapped.run_id,
        name=mapped.run_id,  # a placeholder run row: its id as name
        declared=False,
        rows={
            "attempt_start": {},
            "attempt_end": {(0, 0): {"end": T0 + 60, "status": "failed", "cause": "restarted"}},
        },
    )
    check_stored(mapped, placeholder)  # neither the name nor an agreeing end is a conflict
    named = StoredRun(run_id=mapped.run_id, name="someone-else")
    with pytest.raises(ImportConflict) as info:
        check_stored(mapped, named)
    assert info.value.detail["error"] == "run_name_mismatch"
    check_stored(mapped, None)  # a new run: nothing to check


def test_bad_log_is_a_422_naming_the_entry_and_stores_nothing(client: Any) -> None:
    bad = e(step_count=9, step_start_time="soon")
    log = lines([*realistic_log(), bad])
    resp = post(client, log, "application/x-ndjson")
    assert resp.status_code == 422
    detail = resp.json()["detail"][0]
    n = len(realistic_log()) + 1
    assert detail["field"] == f"line.{n}.step_start_time" and f"line {n}" in detail["msg"]
    assert client.get("/api/v1/runs").json()["runs"] == []
    assert post(client, "   ").status_code == 422
    assert post(client, "\xff", "text/plain").status_code == 422


# ---------------------------------------------------------------- the CLI


def test_cli_imports_a_file_against_a_live_server(migrated_url: str, tmp_path: Any) -> None:
    from service.cli import app

    server = LiveServer(migrated_url, write_token="w-secret")
    server.start()
    try:
        path = tmp_path / "goodput.jsonl"
        path.write_text(lines(realistic_log()))
        runner = CliRunner()
        args = ["import-mgm", str(path), "--server", server.base, "--run-name", "hist"]
        refused = runner.invoke(app, args)
        assert refused.exit_code == 1 and "401" in refused.output
        ok = runner.invoke(app, args, env={"GOODPUT_TOKEN": "w-secret"})
        assert ok.exit_code == 0, ok.output
        assert "duplicates=0" in ok.output and "ignored=3" in ok.output
        again = runner.invoke(app, [*args, "--token", "w-secret"])
        assert "inserted=0" in again.output
    finally:
        server.stop()


def test_an_import_over_the_entry_cap_is_a_413_naming_it(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.importers.mgm as mgm

    monkeypatch.setattr(mgm, "MAX_IMPORT_ENTRIES", 10)
    body = lines([e(job_start_time=T0), *steps(0, *range(1, 12)), e(job_end_time=T0 + 20)])
    r = post(client, body, "application/x-ndjson")
    assert r.status_code == 413 and "at most 10" in r.json()["detail"]
    assert client.get("/api/v1/runs").json()["runs"] == []
