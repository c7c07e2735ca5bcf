"""Schemathesis with all its checks over the app's own OpenAPI document, as
`st run --checks all` runs them: every phase (coverage, fuzzing, stateful; the document has
no examples) and every check: no server error, status codes, content types, response
headers and bodies as documented, schema-invalid requests refused, schema-valid ones
accepted, missing headers, unsupported methods, use after free, resource availability,
ignored auth and object-level authorization. On SQLite and PostgreSQL, with runs stored;
and once more with tokens configured, where the document declares them (`security`, 401,
403) and `ignored_auth` probes every operation without a token and with a wrong one.

The engine is schemathesis's own (`schemathesis.engine`, what the CLI drives), called on the
ASGI app in-process with a fixed seed, no example database and bounded examples: the run is
reproducible and takes seconds. From the CLI, against a served app, the same run is

    st run http://127.0.0.1:8000/openapi.json --checks all --max-examples 20 --seed 20260501

which reports no failure but the refusals UNSTATABLE lists (below).

No check is excluded. Three have nothing to find here, by the API's design:
`use_after_free` (no operation deletes), `ensure_resource_availability` (what POST
/api/v1/ingest creates is read under /api/v1/runs, not under its own path) and
`object_level_authorization` (a token grants a level, read or write, never objects of its
own). One is narrowed, per operation, to what a JSON Schema cannot state:
`positive_data_acceptance` takes a 422 on the operations of UNSTATABLE, and only when each
of its errors names one of that operation's rules (the check
`refused_only_for_unstatable_rules` below fails any other 422 of a schema-valid request).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from pydantic import SecretStr
from schemathesis.engine import events, from_schema

from tests import factories as f

SEED = 20260501
EXAMPLES = 20  # per operation, fuzzing and stateful (coverage is not bounded by it)
TOKEN_EXAMPLES = 10  # the token variant: what it adds is the auth probes, once per operation
WRITE_TOKEN, READ_TOKEN = "fuzz-write-token", "fuzz-read-token"

Rule = Callable[[dict[str, Any], Any], bool]  # (an error of the 422, the body sent)

# Ingest refusals a schema cannot state (types of store.ingest.IngestError, and pydantic's
# cross-field validators of trainer_hooks/records.py): an end before its start, a date past
# the server's clock, timings that contradict stored records or the batch's other records.
_INGEST_RULES = {
    "in_future",
    "overlapping_steps",
    "after_attempt_end",
    "end_before_start",
    "end_before_records",
    "start_after_end",
}
_CROSS_FIELD = re.compile(
    r"end \(.*\) (is before|must be after) start"
    r"|slots, tokens_per_expert has|a slot dropped more assignments than it received"
    r"|ablation_id and ablation_cell come together"
)


def _sent(body: Any, loc: list[Any]) -> Any:
    """The value a `loc` (`body.records.2.step.tokens`) names in the body sent; the record's
    kind after its index (the union's tag) names no member."""
    value, parts = body, list(loc[1:])
    for n, part in enumerate(parts):
        tag = n > 0 and isinstance(parts[n - 1], int) and isinstance(value, dict)
        if tag and value.get("kind") == part:
            continue
        member = isinstance(value, dict) and part in value
        item = isinstance(value, list) and isinstance(part, int) and part < len(value)
        if not (member or item):
            return None
        value = value[part]
    return value


def _ingest_rule(error: dict[str, Any], body: Any) -> bool:
    if error["type"] == "int_type":  # strict: 5.0 is not an integer, though JSON Schema says so
        sent = _sent(body, error["loc"])
        return isinstance(sent, float) and sent.is_integer()
    return error["type"] in _INGEST_RULES or (
        error["type"] == "value_error" and bool(_CROSS_FIELD.search(error["msg"]))
    )


# Per operation: the rules of a 422 that a schema-valid request may still meet.
UNSTATABLE: dict[str, Rule] = {
    # Records validated against each other, the server's clock and the stored run; and
    # integers written as JSON integers (`5`, never `5.0`), which JSON Schema cannot say (its
    # `integer` is any number whose fraction is zero).
    "POST /api/v1/ingest": _ingest_rule,
    # A log is JSON (or JSON lines) whose meaning is not a schema: which entries start the
    # job, in what order, dated within a day of the server's clock. Each error names its
    # entry or key (never an empty field).
    "POST /api/v1/import/ml-goodput": lambda e, _: bool(e["field"]),
    # A cursor is opaque: only the server's own `next_cursor` decodes.
    "GET /api/v1/runs": lambda e, _: e["field"] == "cursor",
    # `end` after `start`: two parameters compared.
    "GET /api/v1/runs/{run_id}/goodput": lambda e, _: (
        e["field"] == "end" and "must be after start" in e["msg"]
    ),
    # The number of windows depends on the run's length (at most MAX_WINDOWS), and a window
    # below the resolution of its timestamps on their magnitude.
    "GET /api/v1/runs/{run_id}/goodput/rolling": lambda e, _: (
        e["field"] in ("window_s", "step_s") and ("windows" in e["msg"] or "resolution" in e["msg"])
    ),
}


@schemathesis.check
def refused_only_for_unstatable_rules(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schema-valid request refused with a 422 names only rules of UNSTATABLE."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    rule = UNSTATABLE.get(case.operation.label)
    if rule is None:
        return None  # positive_data_acceptance reports any 422 of these operations
    errors = response.json()["detail"]
    other = [e for e in errors if not rule(e, case.body)]
    if other:
        raise AssertionError(f"a schema-valid request refused for a rule it could state: {other}")
    return None


def _config(examples: int, **extra: Any) -> Any:
    # positive_data_acceptance's own list (5xx: not_a_server_error reports those), and 422.
    accepted = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx", "422"]
    operations = [
        {
            "include-method": label.split(" ", 1)[0],
            "include-path": label.split(" ", 1)[1],
            "checks": {"positive_data_acceptance": {"expected-statuses": accepted}},
        }
        for label in UNSTATABLE
    ]
    data: dict[str, Any] = {
        "seed": SEED,
        "generation": {"max-examples": examples, "database": "none"},
        "operations": operations,
        **extra,
    }
    config = schemathesis.Config.from_dict(data)
    config.projects.override.checks.update(included_check_names=["all"])  # --checks all
    return config


def _store_runs(client: Any, headers: dict[str, str] | None = None) -> None:
    """Runs for lookups to find: `run-a`, and `0`, the id generated first (the smallest
    string of the id pattern); and an ablation of each id."""
    for run_id in ("run-a", "0"):
        records = f.full_run(run_id, steps=3)
        resp = client.post("/api/v1/ingest", json={"records": records}, headers=headers)
        assert resp.status_code == 200, resp.text
        ablation = {
            "ablation_id": run_id,
            "name": "lr",
            "created_at": f.T0,
            "knobs": {"lr": [0.001, 0.01]},
            "cells": {"lr=0.001": {"lr": 0.001}, "lr=0.01": {"lr": 0.01}},
            "baseline_cell": "lr=0.001",
            "repeats": 1,
        }
        resp = client.post("/api/v1/ablations", json=ablation, headers=headers)
        assert resp.status_code == 200, resp.text


def run_schemathesis(app: Any, config: Any, **load: Any) -> tuple[int, list[str]]:
    """Run the engine over the app; (requests made, failures and errors as text)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config, **load)
    cases, problems = 0, []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for node in checks:
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        problems.append(
                            f"[{event.phase.value}] {node.name} on {failure.operation}: "
                            f"{failure.title}: {failure.message}\n"
                            f"{node.failure_info.code_sample[:2000]}"
                        )
        elif isinstance(event, events.NonFatalError):
            problems.append(f"engine error on {event.label}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            problems.append(f"engine error: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            problems += [f"after the run: {failure}" for failure in event.failures]
            assert event.stop_reason == "completed", event.stop_reason
    return cases, sorted(set(problems))


def test_the_api_keeps_its_openapi_contract(app: Any, client: Any) -> None:
    _store_runs(client)
    started = time.monotonic()
    cases, problems = run_schemathesis(app, _config(EXAMPLES))
    elapsed = time.monotonic() - started
    assert not problems, "\n\n".join(problems)
    assert cases > 1000, cases  # every phase ran (the coverage phase alone makes ~2,000)
    assert elapsed < 120, elapsed  # ~20 s on two cores


class Refusals:
    """The app, noting each request it refused for its token (401, 403)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.state
        self.seen: set[tuple[str, str]] = set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                self.seen.add((scope["method"], scope["path"]))
            await send(message)

        await self.app(scope, receive, noting)


@pytest.fixture
def token_app(migrated_url: str) -> Any:
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        database_url=migrated_url,
        write_token=SecretStr(WRITE_TOKEN),
        read_token=SecretStr(READ_TOKEN),
    )
    application = create_app(settings)
    yield application
    application.state.engine.dispose()


def test_with_tokens_every_operation_refuses_a_missing_or_wrong_token(
    token_app: Any, db_url: str
) -> None:
    """The document declares the tokens (`security`, 401, 403) and the checks send the write
    token; `ignored_auth` probes each operation once without a token and once with a wrong
    one, on its first 2xx. The lookups name the stored run, so that each operation has a
    2xx; the coverage phase, which adds nothing about tokens, is left to the open runs."""
    if not db_url.startswith("sqlite"):
        pytest.skip("tokens are checked before any database is read: SQLite suffices")
    from fastapi.testclient import TestClient

    write = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    with TestClient(token_app) as client:
        _store_runs(client, write)
        doc = client.get("/openapi.json", headers=write).json()
    secured = {
        (method.upper(), path.replace("{run_id}", "run-a").replace("{ablation_id}", "run-a"))
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if path != "/healthz" and op["security"] and {"401", "403"} <= set(op["responses"])
    }
    assert len(secured) == sum(len(item) for item in doc["paths"].values()) - 1  # all but /healthz
    app = Refusals(token_app)
    config = _config(
        TOKEN_EXAMPLES,
        auth={"openapi": {"bearer": {"bearer": WRITE_TOKEN}}},
        parameters={
            "run_id": "run-a",
            "ablation_id": "run-a",
            "baseline": "run-a",
            "candidate": "0",
        },
        phases={"coverage": {"enabled": False}},
    )
    cases, problems = run_schemathesis(app, config, headers=write)
    assert not problems, "\n\n".join(problems)
    assert cases > 50, cases
    assert secured <= app.seen, secured - app.seen  # every operation was probed, and refused


# -- what schemathesis found: each a 500 before --


def test_windows_too_many_for_a_float_are_a_422(client: Any) -> None:
    _store_runs(client)
    resp = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 5e-324})
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["field"] == "window_s"


def test_a_cursor_this_server_did_not_issue_is_a_422(client: Any) -> None:
    import base64
    import json

    for made_up in ([10**400, "run-a"], [1.0, "run\x00a"], [1.0, "\ud800"], [float("inf"), "a"]):
        text = json.dumps(made_up).encode()
        cursor = base64.urlsafe_b64encode(text).decode().rstrip("=")
        resp = client.get("/api/v1/runs", params={"cursor": cursor})
        assert resp.status_code == 422, (made_up, resp.text)
        assert resp.json()["detail"][0]["field"] == "cursor"
