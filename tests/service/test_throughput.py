from __future__ import annotations

from typing import Any

import pytest

from service.calc.goodput import StepIn
from service.calc.throughput import peak_of, step_rates
from tests import factories as f


def test_rates_from_flops_tokens_and_the_peak() -> None:
    step = StepIn(0, 0, 3, 100.0, 100.5, 1000, 2.0, None, 4 * 10**12)
    rates = step_rates(step, 989e12)
    assert rates.tokens_per_s == pytest.approx(2000)
    assert rates.tflops_per_s == pytest.approx(8.0)
    assert rates.mfu == pytest.approx(8e12 / 989e12)


def test_unknown_device_or_flops_give_null_never_a_guess() -> None:
    step = StepIn(0, 0, 3, 100.0, 100.5, 1000, 2.0, None, 4 * 10**12)
    assert step_rates(step, None).mfu is None
    assert step_rates(step._replace(flops=None), 989e12).tflops_per_s is None
    assert step_rates(step._replace(end=100.0), 989e12) == (None, None, None)
    assert peak_of({"peak_flops_per_s": None}) is None and peak_of({}) is None
    assert peak_of({"peak_flops_per_s": "fast"}) is None


def test_steps_endpoint_reports_mfu_against_the_recorded_peak(client: Any) -> None:
    run = f.run(environment={"peak_flops_per_s": 1e12})
    resp = client.post("/api/v1/ingest", json={"records": [run, f.step(0, flops=5 * 10**11)]})
    assert resp.status_code == 200
    point = client.get("/api/v1/runs/run-a/steps").json()["points"][0]
    assert point["mfu"] == pytest.approx(0.5) and point["tokens_per_s"] == pytest.approx(512)
