"""GET /api/v1/runs/{run_id}/routing: per-layer series of routing figures, downsampled keeping
max_vio spikes, with each layer's newest histogram."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests import factories as f
from tests.service.test_receipts import with_receipt_routes

URL = "/api/v1/runs/run-a/routing"


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(with_receipt_routes(app)) as c:
        yield c


def ingest(client: Any, records: list[dict[str, Any]]) -> None:
    resp = client.post("/api/v1/ingest", json={"records": records})
    assert resp.status_code == 200, resp.text


def routing(client: Any, **params: Any) -> dict[str, Any]:
    resp = client.get(URL, params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_each_layer_has_its_series_and_newest_histogram(client: Any) -> None:
    records = [f.run()]
    for step in range(4):
        records += [f.routing(step, layer=0), f.routing(step, layer=2, z_loss=0.1 * step)]
    records.append(f.routing(4, layer=2, tokens_per_expert=[50, 50, 50, 50], aux_loss=0.5))
    ingest(client, records)
    body = routing(client)
    assert [layer["layer"] for layer in body["layers"]] == [0, 2]
    first, second = body["layers"]
    assert first["total"] == 4 and [p["step"] for p in first["points"]] == [0, 1, 2, 3]
    point = first["points"][0]
    assert point["max_vio"] == pytest.approx(80 / 50 - 1)
    assert point["drop_rate"] == pytest.approx(20 / 200)
    assert point["null_fraction"] == 0.0 and point["shared_only_fraction"] is None
    assert (point["aux_loss"], point["z_loss"]) == (0.01, 0.001)
    assert [p["z_loss"] for p in second["points"]][1:4] == pytest.approx([0.1, 0.2, 0.3])
    assert second["points"][-1]["max_vio"] == 0.0
    assert second["histogram"]["step"] == 4
    assert second["histogram"]["tokens_per_expert"] == [50, 50, 50, 50]
    assert second["histogram"]["dropped_per_expert"] == [20, 0, 0, 0]
    assert first["histogram"]["step"] == 3 and first["histogram"]["capacity"] == 60


def test_the_newest_attempt_gives_the_histogram(client: Any) -> None:
    ingest(
        client,
        [
            f.run(),
            f.routing(9, tokens_per_expert=[90, 40, 40, 30]),
            f.routing(5, attempt=1, tokens_per_expert=[70, 70, 30, 30]),
        ],
    )
    hist = routing(client)["layers"][0]["histogram"]
    assert (hist["attempt"], hist["step"], hist["tokens_per_expert"]) == (1, 5, [70, 70, 30, 30])


def test_layer_and_rank_filter_the_series(client: Any) -> None:
    ingest(
        client,
        [f.run(), f.routing(0, layer=0), f.routing(0, layer=1), f.routing(0, layer=1, rank=3)],
    )
    assert [layer["layer"] for layer in routing(client, layer=1)["layers"]] == [1]
    assert routing(client, layer=7)["layers"] == []
    body = routing(client, rank=3)
    assert body["rank"] == 3 and [layer["layer"] for layer in body["layers"]] == [1]


def test_downsampling_keeps_the_max_vio_spike_and_the_calmest_step(client: Any) -> None:
    records = [f.run()] + [f.routing(i) for i in range(1000)]
    records[1 + 617] = f.routing(617, tokens_per_expert=[170, 10, 10, 10])
    records[1 + 123] = f.routing(123, tokens_per_expert=[50, 50, 50, 50])
    ingest(client, records)
    layer = routing(client, max_points=20)["layers"][0]
    steps = [p["step"] for p in layer["points"]]
    assert layer["total"] == 1000 and len(steps) <= 20
    assert 617 in steps and 123 in steps and steps == sorted(steps)
    spike = next(p for p in layer["points"] if p["step"] == 617)
    assert spike["max_vio"] == pytest.approx(170 / 50 - 1)


def test_a_run_without_routing_has_no_layers(client: Any) -> None:
    ingest(client, f.full_run())
    assert routing(client)["layers"] == []


def test_unknown_run_is_404(client: Any) -> None:
    assert client.get("/api/v1/runs/nope/routing").status_code == 404


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"layer": -1}, "layer"),
        ({"layer": "first"}, "layer"),
        ({"max_points": 1}, "max_points"),
        ({"max_points": 100_001}, "max_points"),
        ({"rank": -1}, "rank"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    client: Any, params: dict[str, Any], field: str
) -> None:
    ingest(client, [f.run()])
    resp = client.get(URL, params=params)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == field
