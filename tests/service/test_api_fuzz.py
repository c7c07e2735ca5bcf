"""Schemathesis over the app's own OpenAPI schema: no input may cause a server error (5xx),
and every response must match the schema the API declares."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests import factories as f

EXAMPLES_PER_OPERATION = 40


def test_no_input_causes_a_server_error(app: Any, client: Any) -> None:
    # Some stored data, so that lookups of a known run are exercised too.
    client.post("/api/v1/ingest", json={"records": f.full_run("run-a", steps=3)})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

        check()
