"""The routing page's heatmap (services/routing_view.py, calc/routing_heatmap.py,
store/routing_heatmap.py): tokens per expert summed per bucket of steps, held against a
brute-force sum of the posted records written from the documented rules; the cache that
re-reads only the buckets that grew; the page's data route and its errors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.services import routing_view
from service.store import routing_heatmap as store
from service.store.models import pack_counts
from tests import factories as f

RUN = "heat-a"


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    routing_view.CACHE.clear()
    with TestClient(app) as c:
        yield c


def ingest(client: TestClient, records: list[dict[str, Any]]) -> None:
    for i in range(0, len(records), 5000):
        r = client.post("/api/v1/ingest", json={"records": records[i : i + 5000]})
        assert r.status_code == 200, r.text


def view(app: FastAPI, layer: int = 0, max_columns: int = 160) -> dict[str, Any]:
    with app.state.sessionmaker() as session:
        return routing_view.layer_view(session, RUN, layer, 0, max_columns)


def record(rng: random.Random, step: int, attempt: int = 0, layer: int = 0) -> dict[str, Any]:
    """A routing record with random counts: 4 experts (some records 6, some a null slot),
    each token's top_k choices spread over the slots (counts past 255 and 65,535 now and
    then: other packed widths), up to half of a slot's choices dropped."""
    slots = (6 if rng.random() < 0.1 else 4) + (null := rng.random() < 0.5)
    num_tokens = rng.choice([rng.randrange(1, 60), rng.randrange(60, 9000), 70_000])
    top_k = rng.choice([1, 2])
    cuts = sorted(rng.randrange(0, num_tokens * top_k + 1) for _ in range(slots - 1))
    tokens = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens * top_k], strict=True)]
    if rng.random() < 0.2:
        tokens[0] += tokens[1]  # expert 1 idles now and then
        tokens[1] = 0
    return f.routing(
        step,
        layer=layer,
        run_id=RUN,
        attempt=attempt,
        num_tokens=num_tokens,
        top_k=top_k,
        null_slot=null,
        tokens_per_expert=tokens,
        dropped_per_expert=[rng.randrange(0, t // 2 + 1) for t in tokens],
        shared_only_tokens=rng.choice([None, rng.randrange(0, num_tokens + 1)]),
        aux_loss=rng.choice([None, rng.random()]),
    )


def records_for(seed: int, spans: dict[int, range], layers: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        record(rng, s, attempt=a, layer=n)
        for a, steps in spans.items()
        for s in steps
        for n in range(layers)
    ]


# -- the reference: the documented rules on the posted records, nothing of the code --


def reference(records: list[dict[str, Any]], width: int, layer: int = 0) -> dict[str, Any]:
    mine = [r for r in records if r["layer"] == layer and r.get("rank", 0) == 0]
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in mine:
        buckets.setdefault((r.get("attempt", 0), r["step"] // width), []).append(r)
    experts = max(len(r["tokens_per_expert"]) - r["null_slot"] for r in mine)
    cols = []
    for key in sorted(buckets):
        rs = buckets[key]
        tokens = [0] * experts
        null = 0
        dropped = 0
        for r in rs:
            slots = r["tokens_per_expert"]
            routed = slots[:-1] if r["null_slot"] else slots
            for e, t in enumerate(routed):
                tokens[e] += t
            null += slots[-1] if r["null_slot"] else 0
            dropped += sum(r["dropped_per_expert"])
        assignments = sum(r["num_tokens"] * r["top_k"] for r in rs)
        shared = [r for r in rs if r["shared_only_tokens"] is not None]
        auxes = [r["aux_loss"] for r in rs if r["aux_loss"] is not None]
        cols.append(
            {
                "attempt": key[0],
                "first": min(r["step"] for r in rs),
                "last": max(r["step"] for r in rs),
                "records": len(rs),
                "tokens": tokens,
                "null": null,
                "drop_rate": min(1.0, dropped / assignments),
                "null_fraction": min(1.0, null / assignments),
                "shared_only_fraction": (
                    min(
                        1.0,
                        sum(r["shared_only_tokens"] for r in shared)
                        / sum(r["num_tokens"] for r in shared),
                    )
                    if shared
                    else None
                ),
                "aux_loss": sum(auxes) / len(auxes) if auxes else None,
            }
        )
    newest = sorted(mine, key=lambda r: (r.get("attempt", 0), r["step"]))[-100:]
    seen = [0] * experts
    for r in newest:
        routed = r["tokens_per_expert"][:-1] if r["null_slot"] else r["tokens_per_expert"]
        for e, t in enumerate(routed):
            seen[e] += t
    return {
        "experts": experts,
        "columns": cols,
        "dead": [e for e in range(experts) if seen[e] == 0],
    }


def assert_matches(got: dict[str, Any], records: list[dict[str, Any]], layer: int = 0) -> None:
    want = reference(records, got["width"], layer)
    assert got["experts"] == want["experts"]
    assert [(c["attempt"], c["first"], c["last"], c["records"]) for c in got["columns"]] == [
        (c["attempt"], c["first"], c["last"], c["records"]) for c in want["columns"]
    ]
    rows = {r["label"]: r["z"] for r in got["rows"]}
    for e in range(want["experts"]):
        assert rows[f"expert {e}"] == [c["tokens"][e] for c in want["columns"]], e
    assert rows["null slot"] == [c["null"] for c in want["columns"]]
    for g, w in zip(got["columns"], want["columns"], strict=True):
        for name in ("drop_rate", "null_fraction", "shared_only_fraction", "aux_loss"):
            assert g[name] == pytest.approx(w[name]), name
    assert got["dead"] == want["dead"]
    assert got["records"] == sum(c["records"] for c in want["columns"])


@pytest.mark.parametrize("max_columns", [200, 4])
def test_the_heatmap_is_the_sum_of_the_records_in_each_bucket(
    client: TestClient, app: FastAPI, max_columns: int
) -> None:
    """200 columns: buckets of 2 steps, read from the records; 4 columns: buckets of whole
    rollup blocks, cached. Attempt 1 resumes inside attempt 0's steps: kept apart."""
    records = records_for(1, {0: range(0, 200), 1: range(150, 300)}, layers=2)
    ingest(client, [f.run(RUN), *records])
    got = view(app, layer=1, max_columns=max_columns)
    width = got["width"]
    assert 1 < width < 64 if max_columns == 200 else width % 64 == 0
    assert len(got["columns"]) <= max_columns + 2 * 2
    assert_matches(got, records, layer=1)


def test_a_refresh_rereads_only_the_buckets_that_grew(
    client: TestClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int, int]] = []
    real = store.record_chunks

    def counting(
        session: Any, run_id: str, rank: int, layer: int, attempt: int, lo: int, hi: int
    ) -> Any:
        reads.append((attempt, lo, hi))
        return real(session, run_id, rank, layer, attempt, lo, hi)

    monkeypatch.setattr(store, "record_chunks", counting)
    records = records_for(2, {0: range(0, 1000, 3)})
    ingest(client, [f.run(RUN), *records])
    first = view(app, max_columns=4)
    width = first["width"]
    buckets = len(first["columns"])
    assert width % 64 == 0 and reads == [(0, 0, buckets * width - 1)]  # all, in one range
    reads.clear()
    assert view(app, max_columns=4) == first and reads == []  # nothing new: nothing read
    more = [record(random.Random(3), s) for s in (1, 4)]  # into the first bucket
    ingest(client, more)
    got = view(app, max_columns=4)
    assert reads == [(0, 0, width - 1)]
    assert_matches(got, records + more)


def test_dead_experts_are_idle_in_the_newest_records(client: TestClient, app: FastAPI) -> None:
    none = [0] * 4
    busy = [
        f.routing(s, run_id=RUN, tokens_per_expert=[5] * 4, dropped_per_expert=none)
        for s in range(10)
    ]
    idle = [
        f.routing(s, run_id=RUN, tokens_per_expert=[9, 0, 9, 0], dropped_per_expert=none)
        for s in range(10, 110)
    ]
    ingest(client, [f.run(RUN), *busy, *idle])
    got = view(app)
    assert got["dead"] == [1, 3]
    table = {e["expert"]: e for e in got["experts_table"]}
    assert table[1]["tokens"] == 50 and table[1]["last_step"] == 9 and table[1]["dead"]
    assert [r["label"] for r in got["rows"] if r["dead"]] == ["expert 1", "expert 3"]
    assert "null slot" not in [r["label"] for r in got["rows"]]  # no record had one


def test_unpack_reads_every_packed_width() -> None:
    hists = [[1, 2, 3], [300, 0, 1], [70_000, 5, 2**40], [7, 8]]
    slots, matrix = store.unpack([pack_counts(h) for h in hists])
    assert slots.tolist() == [3, 3, 3, 2]
    assert matrix.tolist() == [[1, 2, 3], [300, 0, 1], [70_000, 5, 2**40], [7, 8, 0]]
    assert store.unpack([])[1].shape == (0, 0)
    with pytest.raises(ValueError, match="width code"):
        store.unpack([b"Z\x01"])


def test_the_page_data_names_a_bad_or_unknown_layer(client: TestClient) -> None:
    ingest(client, [f.run(RUN), f.routing(0, run_id=RUN), f.routing(0, layer=2, run_id=RUN)])
    url = f"/ui/data/runs/{RUN}/routing"
    assert (
        client.get(url)
        .json()["figures"]["heatmap"]["layout"]["title"]["text"]
        .startswith("Tokens per expert, layer 0")
    )
    r = client.get(url, params={"layer": "1"})
    assert r.status_code == 404 and "layer 1" in r.json()["detail"] and "0, 2" in r.json()["detail"]
    r = client.get(url, params={"layer": "-1"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "layer"]
    r = client.get(f"/runs/{RUN}/routing", params={"layer": "9"}, headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "layer 9" in r.text
    body = client.get(url, params={"layer": "all"}).json()
    assert [t["name"] for t in body["figures"]["drop_all"]["data"]] == ["layer 0", "layer 2"]
    row = body["tables"]["layers-table"]["rows"][0]
    assert row[1:5] == [1, 0, "10.00%", 0.6]  # 20 of 100 * 2 dropped; 80 / 50 - 1


def test_a_run_without_routing_says_why(client: TestClient) -> None:
    ingest(client, [f.run(RUN, model_plan={"pattern": "AAM"}), f.run("heat-b", "b")])
    texts = client.get(f"/ui/data/runs/{RUN}/routing", params={"layer": "3"}).json()["texts"]
    assert "no E (routed-expert) layer (pattern 'AAM')" in texts["routing-empty"]
    texts = client.get("/ui/data/runs/heat-b/routing").json()["texts"]
    assert "No routing record has arrived" in texts["routing-empty"]


def test_bucket_sums_keep_attempts_and_nulls_apart() -> None:
    """The calculator alone, on a hand-built chunk: two buckets, a null slot, a NaN."""
    from service.calc.routing_heatmap import RecordChunk, accumulate

    chunk = RecordChunk(
        steps=np.array([0, 1, 4], np.int64),
        num_tokens=np.array([10, 10, 10], np.int64),
        top_k=np.array([1, 1, 1], np.int64),
        null_slot=np.array([True, False, True]),
        shared_only=np.array([1.0, np.nan, 2.0]),
        max_vio=np.array([0.5, np.nan, 1.5]),
        aux_loss=np.array([np.nan, np.nan, np.nan]),
        z_loss=np.array([0.1, 0.3, np.nan]),
        slots=np.array([3, 3, 3], np.int64),
        tokens=np.array([[4, 4, 2], [5, 5, 0], [1, 1, 8]], np.int64),
        dropped=np.array([[1, 0, 0], [0, 2, 0], [0, 0, 0]], np.int64),
    )
    acc: dict[tuple[int, int], Any] = {}
    accumulate(acc, 3, 4, chunk)
    first, second = acc[(3, 0)], acc[(3, 1)]
    assert (first.n, first.first, first.last, first.experts) == (2, 0, 1, 3)
    assert first.tokens.tolist() == [9, 9, 0] and first.null_tokens == 2
    assert first.drop_rate() == pytest.approx(3 / 20)
    assert first.null_fraction() == pytest.approx(2 / 20)
    assert first.shared_only_fraction() == pytest.approx(1 / 10)
    assert (first.max_vio_high(), first.max_vio_mean(), first.aux_loss()) == (0.5, 0.5, None)
    assert first.z_loss() == pytest.approx(0.2)
    assert second.tokens.tolist()[:2] == [1, 1] and second.null_tokens == 8 and second.experts == 2


def test_past_max_expert_rows_neighbours_share_a_row() -> None:
    assert routing_view._row_groups(3) == [(0, 0), (1, 1), (2, 2)]
    groups = routing_view._row_groups(600)  # 3 experts a row
    assert len(groups) == 200 and groups[0] == (0, 2) and groups[-1] == (597, 599)
    assert routing_view._row_groups(257)[-1] == (256, 256)
