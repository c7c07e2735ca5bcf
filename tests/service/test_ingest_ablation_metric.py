"""The wire's ablation fields on a run and its `metric` records (issue 15): stored, repeated
harmlessly, a changed value a 409 naming both, half an ablation a 422. On both databases."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import select

from service.store.db import session_scope
from service.store.models import Metric, Run
from tests import factories as f

T0 = f.T0


def post(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/ingest", json={"records": records})


def metric(step: int, value: float, **kw: Any) -> dict[str, Any]:
    base = {"kind": "metric", "run_id": "run-a", "name": "eval_loss", "step": step}
    return {**base, "value": value, "time": T0 + 5 + step, **kw}


def test_metrics_are_stored_once_and_a_changed_value_is_a_conflict(client: Any, app: Any) -> None:
    first = [f.run(), f.attempt_start(), metric(3, 2.5), metric(7, 2.25)]
    assert post(client, first).json() == {"inserted": 4, "duplicates": 0}
    assert post(client, first).json() == {"inserted": 0, "duplicates": 4}
    got = post(client, [metric(7, 2.0)])
    assert got.status_code == 409
    conflict = got.json()["detail"][0]
    assert conflict["fields"]["value"] == {"stored": 2.25, "sent": 2.0}
    with session_scope(app.state.sessionmaker) as s:
        rows = s.execute(select(Metric.step, Metric.value).order_by(Metric.step)).all()
    assert [tuple(r) for r in rows] == [(3, 2.5), (7, 2.25)]


def test_a_metric_after_its_attempt_ended_is_refused(client: Any) -> None:
    assert post(client, [f.run(), f.attempt_start(), f.attempt_end(end=T0 + 8)]).status_code == 200
    got = post(client, [metric(7, 2.0)])  # at T0 + 12
    assert got.status_code == 422 and "after the end of attempt" in got.text


def test_a_runs_ablation_is_stored_and_may_not_change(client: Any, app: Any) -> None:
    run = f.run(ablation_id="abl-1", ablation_cell="dispatch=padded")
    assert post(client, [run]).status_code == 200
    assert post(client, [run]).json()["duplicates"] == 1
    got = post(client, [f.run(ablation_id="abl-1", ablation_cell="dispatch=grouped")])
    assert got.status_code == 409
    assert got.json()["detail"][0]["fields"]["ablation_cell"] == {
        "stored": "dispatch=padded",
        "sent": "dispatch=grouped",
    }
    with session_scope(app.state.sessionmaker) as s:
        row = s.execute(select(Run.ablation_id, Run.ablation_cell)).one()
    assert tuple(row) == ("abl-1", "dispatch=padded")


def test_a_placeholder_run_is_filled_in_with_its_ablation(client: Any, app: Any) -> None:
    assert post(client, [f.attempt_start(), metric(1, 3.0)]).status_code == 200
    run = f.run(ablation_id="abl-1", ablation_cell="dispatch=padded")
    assert post(client, [run]).json()["inserted"] == 1
    with session_scope(app.state.sessionmaker) as s:
        row = s.execute(select(Run.ablation_id, Run.ablation_cell)).one()
    assert tuple(row) == ("abl-1", "dispatch=padded")


@pytest.mark.parametrize("half", [{"ablation_id": "abl-1"}, {"ablation_cell": "a=1"}])
def test_half_an_ablation_is_a_422_naming_it(client: Any, half: dict[str, str]) -> None:
    got = post(client, [f.run(**half)])
    assert got.status_code == 422
    assert "ablation_id and ablation_cell come together" in got.text


def test_the_recorder_sends_tags_ablation_metrics_and_typed_receipt_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from trainer_hooks import Recorder

    class Sink:
        def __init__(self) -> None:
            self.records: list[tuple[str, dict[str, Any]]] = []

        def emit(self, kind: str, fields: dict[str, Any]) -> None:
            self.records.append((kind, dict(fields)))

        def close(self, timeout_s: float = 0) -> None:
            return None

    sink = Sink()
    with caplog.at_level(logging.WARNING, logger="trainer_hooks.recorder"):
        rec = Recorder(
            run_name="r",
            sink=sink,
            heartbeat_s=0,
            tags=["nightly"],
            ablation="abl-1",
            cell="dispatch=padded",
            pattern="AE",
            num_experts=8,
            top_k=2,
            dtype="bfloat16",
            compile="eager",
            dispatch="padded",
            runtime_policy={"dispatch_requested": "auto", "lr": 0.01},
            environment={"torch": "2.13", "device": "cpu", "host": "h"},
            watch_compile=False,
            attempt_start="now",
        )
    rec.metric("eval_loss", 2.5, step=9)
    rec.close()
    (run,) = [fields for kind, fields in sink.records if kind == "run"]
    assert run["tags"] == ["nightly"]
    assert (run["ablation_id"], run["ablation_cell"]) == ("abl-1", "dispatch=padded")
    assert run["model_plan"] == {"pattern": "AE", "num_experts": 8, "top_k": 2}
    policy = run["runtime_policy"]
    assert policy["dispatch_requested"] == "padded"  # the typed argument wins
    assert (policy["world_size"], policy["dtype"], policy["compile"]) == (1, "bfloat16", "eager")
    assert policy["lr"] == 0.01
    assert "incomplete" not in caplog.text
    (m,) = [fields for kind, fields in sink.records if kind == "metric"]
    assert (m["name"], m["step"], m["value"]) == ("eval_loss", 9, 2.5)


def test_the_recorder_names_the_receipt_keys_nobody_gave(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from trainer_hooks import Recorder

    class Sink:
        def emit(self, kind: str, fields: dict[str, Any]) -> None:
            pass

        def close(self, timeout_s: float = 0) -> None:
            return None

    with caplog.at_level(logging.WARNING, logger="trainer_hooks.recorder"):
        Recorder(
            run_name="r",
            sink=Sink(),
            heartbeat_s=0,
            pattern="AEME",
            environment={"torch": "2.13", "device": "cpu", "host": "h"},
            watch_compile=False,
            attempt_start="now",
        ).close()
    assert "receipt will be incomplete" in caplog.text
    for key in ("model_plan.num_experts", "model_plan.top_k", "runtime_policy.dtype"):
        assert key in caplog.text
    assert "runtime_policy.world_size" not in caplog.text  # the hooks fill it
