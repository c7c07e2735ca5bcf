"""GET /api/v1/runs/{run_id}/export.csv: streamed in keyset pages, RFC 4180 quoting, and
text cells guarded against formula injection."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.services import receipts
from service.store import queries
from tests import factories as f
from tests.service.test_receipts import with_receipt_routes

URL = "/api/v1/runs/run-a/export.csv"


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(with_receipt_routes(app)) as c:
        yield c


def ingest(client: Any, records: list[dict[str, Any]]) -> None:
    for lo in range(0, len(records), 5000):
        resp = client.post("/api/v1/ingest", json={"records": records[lo : lo + 5000]})
        assert resp.status_code == 200, resp.text


def export(client: Any, what: str) -> list[dict[str, str]]:
    resp = client.get(URL, params={"what": what})
    assert resp.status_code == 200, resp.text
    return list(csv.DictReader(io.StringIO(resp.text, newline="")))


def test_twelve_thousand_steps_stream_in_pages_and_parse_back(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = [f.step(i, loss=-0.5 + i / 7, device_time_s=0.25 * (i % 3)) for i in range(12_000)]
    ingest(client, [f.run(), *steps])
    pages: list[int] = []
    real_page = queries.export_page

    def counted(*args: Any) -> queries.ExportPage:
        page = real_page(*args)
        pages.append(len(page.rows))
        return page

    monkeypatch.setattr(queries, "export_page", counted)
    with client.stream("GET", URL, params={"what": "steps"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv")
        assert resp.headers["content-disposition"] == 'attachment; filename="run-a-steps.csv"'
        assert "content-length" not in resp.headers
        chunks = [c for c in resp.iter_raw() if c]
    assert pages == [5000, 5000, 2000]
    assert len(chunks) >= 4  # the header, then one chunk per page
    text = b"".join(chunks).decode()
    assert text.startswith("attempt,rank,step,start,end,step_time_s,tokens,loss,")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 12_000
    for row, sent in zip(rows, steps, strict=True):
        assert int(row["step"]) == sent["step"] and int(row["tokens"]) == sent["tokens"]
        assert float(row["start"]) == sent["start"] and float(row["end"]) == sent["end"]
        assert float(row["loss"]) == sent["loss"]
        assert float(row["device_time_s"]) == sent["device_time_s"]
        assert float(row["step_time_s"]) == sent["end"] - sent["start"]
        assert row["flops"] == "" and row["attempt"] == "0"
    assert rows[0]["loss"] == "-0.5"  # a number, not a text cell: no quote prefix


def test_the_generator_yields_the_header_then_one_chunk_per_page(app: FastAPI) -> None:
    client = TestClient(with_receipt_routes(app))
    ingest(client, [f.run(), *[f.step(i) for i in range(8)]])
    chunks = receipts.csv_chunks(app.state.sessionmaker, "run-a", "steps", page_rows=4)
    assert isinstance(chunks, Iterator)
    parts = list(chunks)
    assert len(parts) == 3 and parts[0].startswith("attempt,rank,step")
    assert [len(p.strip().splitlines()) for p in parts[1:]] == [4, 4]


def test_keyset_pages_visit_every_row_once_across_attempts_ranks_and_ties(
    app: FastAPI,
) -> None:
    client = TestClient(with_receipt_routes(app))
    spans = [
        f.span(cat, f.T0 + t, f.T0 + t + 0.5, attempt=a, rank=r)
        for a in (0, 1)
        for r in (0, 2)
        for cat in ("eval", "custom:x.y", "data_stall")
        for t in (1.0, 1.0 + 1e-6, 2.0)
    ]
    ingest(client, [f.run(), *spans])
    parts = list(receipts.csv_chunks(app.state.sessionmaker, "run-a", "spans", page_rows=5))
    rows = list(csv.DictReader(io.StringIO("".join(parts), newline="")))
    keys = [(int(r["attempt"]), int(r["rank"]), r["category"], float(r["start"])) for r in rows]
    assert keys == sorted({(s["attempt"], s["rank"], s["category"], s["start"]) for s in spans})


def test_spans_export_categories_and_flags(client: Any) -> None:
    ingest(
        client,
        [
            f.run(),
            f.span("custom:warm-up.v2", f.T0 + 1, f.T0 + 3, step=4),
            f.span("eval", f.T0 + 5, f.T0 + 6, overlapped=True),
        ],
    )
    rows = export(client, "spans")
    assert [(r["category"], r["overlapped"], r["step"]) for r in rows] == [
        ("custom:warm-up.v2", "false", "4"),
        ("eval", "true", ""),
    ]
    assert float(rows[0]["duration_s"]) == 2.0


def test_routing_export_flattens_histograms_as_json(client: Any) -> None:
    ingest(client, [f.run(), f.routing(0), f.routing(0, layer=1, null_slot=True)])
    rows = export(client, "routing")
    assert [(r["step"], r["layer"]) for r in rows] == [("0", "0"), ("0", "1")]
    assert json.loads(rows[0]["tokens_per_expert"]) == [80, 40, 40, 40]
    assert json.loads(rows[0]["dropped_per_expert"]) == [20, 0, 0, 0]
    assert float(rows[0]["max_vio"]) == pytest.approx(0.6)
    assert rows[1]["null_slot"] == "true"


NASTY = 'fell back, "grouped" -> loop\nbecause: no CUDA\r\n; 2nd line, done'


def test_run_provided_text_survives_quotes_commas_and_newlines(client: Any) -> None:
    ingest(
        client,
        [
            f.run(),
            f.observation("moe_dispatch.layer0", "loop", requested="a,b", reason=NASTY),
        ],
    )
    rows = export(client, "observations")
    assert len(rows) == 1
    assert rows[0]["reason"] == NASTY and rows[0]["requested"] == "a,b"
    assert rows[0]["seam"] == "moe_dispatch.layer0"


@pytest.mark.parametrize(
    "text", ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)"]
)
def test_formula_injection_is_neutralised(client: Any, text: str) -> None:
    ingest(client, [f.run(), f.observation("sdpa", text, reason=text, requested=text)])
    row = export(client, "observations")[0]
    assert row["observed"] == row["reason"] == row["requested"] == "'" + text


def test_an_empty_export_is_the_header_alone(client: Any) -> None:
    ingest(client, [f.run()])
    for what in ("steps", "spans", "routing", "observations"):
        resp = client.get(URL, params={"what": what})
        assert resp.status_code == 200
        assert resp.text.count("\r\n") == 1 and resp.text.endswith("\r\n")


def test_unknown_what_is_422_naming_what_and_unknown_run_is_404(client: Any) -> None:
    ingest(client, [f.run()])
    resp = client.get(URL, params={"what": "losses"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "what"
    assert client.get("/api/v1/runs/nope/export.csv").status_code == 404
    bad = client.get('/api/v1/runs/a"b/export.csv')
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "run_id"
