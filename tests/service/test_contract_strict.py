"""The wire contract is strict: a value of the wrong JSON type is refused with a 422 naming
the field, never coerced (issue 12: `"step": "5"` and `"loss": true` were accepted)."""

from __future__ import annotations

from typing import Any

import pytest

from tests import factories as f


@pytest.mark.parametrize(
    "field,value",
    [
        ("step", "5"),
        ("step", 5.0),
        ("loss", True),
        ("tokens", "100"),
        ("start", "1790000000"),
        ("hook_overhead_s", False),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(
    client: Any, field: str, value: Any
) -> None:
    bad = {**f.step(0), field: value}
    r = client.post("/api/v1/ingest", json={"records": [f.run(), f.attempt_start(), bad]})
    assert r.status_code == 422, r.text
    assert any(e["field"].startswith(f"records.2.step.{field}") for e in r.json()["detail"])
    assert client.get("/api/v1/runs").json()["runs"] == []  # nothing of the batch stored


def test_numbers_of_the_right_kind_are_taken(client: Any) -> None:
    ok = {**f.step(0), "loss": 2, "tokens": 7}  # an integer is a number; an int stays an int
    r = client.post("/api/v1/ingest", json={"records": [f.run(), f.attempt_start(), ok]})
    assert r.status_code == 200, r.text
    assert client.get("/api/v1/runs/run-a/steps").json()["points"][0]["loss"] == 2.0
