"""The ingest paths made cheaper per batch (issue 12's load target), each held to what it
replaced, on both databases: a batch's reads of stored spans and step blocks answered from
one read per rank (rollups.common.RankReads) as the queries answer them; the rollups'
upserts compiled once per dialect; big batches of new, stored and mixed keys (PostgreSQL's
one-row INSERTs in one executemany, SQLite's multi-row VALUES, the probes of a re-send);
the placeholder run decided from the batch's attempt rows."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from service.store import bulk
from service.store.models import Run, SpanTotal, Step, StepBlock
from service.store.rollups import common as rollup_common
from service.store.rollups import write as rollup_write
from tests import factories as f


def _spans_and_steps(seed: int) -> list[dict[str, Any]]:
    """Two attempts of rank 0 and one of rank 1: steps, blocking spans of several categories
    and lengths (some long, some across steps), overlapped spans."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [f.run()]
    for rank, attempt, t in ((0, 0, f.T0), (0, 1, f.T0 + 500.0), (1, 0, f.T0)):
        out.append(f.attempt_start(start=t, rank=rank, attempt=attempt))
        out.append(f.span("startup", t, t + 3.0, rank=rank, attempt=attempt))
        t += 3.0
        for n in range(120):
            if rng.random() < 0.5:
                stall = rng.choice([0.004, 0.05, 0.3])
                out.append(f.span("data_stall", t, t + stall, rank=rank, attempt=attempt))
                t += stall
            dur = rng.choice([0.1, 0.12, 0.4])
            out.append(f.step(n, start=t, dur=dur, rank=rank, attempt=attempt))
            if rng.random() < 0.1:  # inside the step, or across it and the next
                a = t + rng.uniform(0, dur)
                b = a + rng.choice([0.01, 0.3, 2.5])
                out.append(f.span("custom:probe", a, b, rank=rank, attempt=attempt))
            if rng.random() < 0.1:
                out.append(f.span("eval", t, t + 0.2, rank=rank, attempt=attempt, overlapped=True))
            t += dur
    return out


def _ingested(client: Any, records: list[dict[str, Any]]) -> None:
    for i in range(0, len(records), 150):
        resp = client.post("/api/v1/ingest", json={"records": records[i : i + 150]})
        assert resp.status_code == 200, resp.text


def _ranges(rng: random.Random, lo: float, hi: float) -> list[tuple[float, float]]:
    """Ranges inside [lo, hi], on its edges, around it and outside it."""
    out = [(lo, hi), (lo, lo), (hi, hi), (lo - 50.0, lo - 40.0), (hi + 1.0, hi + 9.0)]
    out += [(lo - 1.0, hi), (lo, hi + 0.5), (lo - 3.0, hi + 3.0)]
    for _ in range(40):
        a, b = sorted(rng.uniform(lo, hi) for _ in range(2))
        out.append((a, b))
    return out


def test_rank_reads_answer_as_the_queries_do(client: Any, app: Any) -> None:
    """Held ranges answered from memory give exactly the rows of the queries, for ranges
    inside the held one (answered from it), on its edges and outside it (read again)."""
    _ingested(client, _spans_and_steps(1))
    rng = random.Random(1)
    with app.state.sessionmaker() as session:
        for rank, lo, hi in ((0, f.T0 + 10.0, f.T0 + 40.0), (0, f.T0 + 505.0, f.T0 + 560.0)):
            reads = rollup_common.RankReads(session)
            reads.hold("run-a", rank, lo, hi)
            fresh = rollup_common.RankReads(session)  # nothing held: every read a query
            for a, b in _ranges(rng, lo, hi):
                want = rollup_common.stored_blocking(session, "run-a", rank, a, b)
                assert sorted(reads.blocking("run-a", rank, a, b)) == sorted(want), (a, b)
                got = sorted(tuple(r) for r in reads.step_blocks("run-a", rank, a, b))
                assert got == sorted(tuple(r) for r in fresh.step_blocks("run-a", rank, a, b))
                steps = rollup_write.steps_overlapping(reads, "run-a", rank, a, b)
                stored = session.execute(
                    select(Step.attempt, Step.step).where(
                        Step.run_id == "run-a", Step.rank == rank, Step.start < b, Step.end > a
                    )
                ).all()
                assert sorted((s.attempt, s.step) for s in steps) == sorted(map(tuple, stored))
            assert reads.blocking("run-a", 7, lo, hi) == []  # a rank with no spans
            assert reads.step_blocks("run-a", 7, lo, hi) == []


def test_rank_reads_hold_the_union_of_ranges(app: Any) -> None:
    """hold() twice for a rank widens its range; another rank's is its own."""
    with app.state.sessionmaker() as session:
        reads = rollup_common.RankReads(session)
        reads.hold("run-a", 0, 10.0, 20.0)
        reads.hold("run-a", 0, 5.0, 12.0)
        reads.hold("run-a", 1, 30.0, 31.0)
        assert reads._held(("run-a", 0), 5.0, 20.0) == (5.0, 20.0)
        assert reads._held(("run-a", 0), 4.0, 20.0) is None
        assert reads._held(("run-a", 1), 30.0, 31.0) == (30.0, 31.0)
        assert reads._held(("run-a", 1), 20.0, 31.0) is None


def _big_batch(steps: range, layers: int = 2) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n in steps:
        t = f.T0 + 10.0 + n
        out.append(f.step(n, start=t, dur=0.9))
        out.append(f.span("data_stall", t - 0.05, t))
        out += [f.routing(n, layer) for layer in range(layers)]
    return out


def _counts(app: Any) -> tuple[int, int, float]:
    with app.state.sessionmaker() as session:
        n_steps = session.execute(select(func.count()).select_from(Step)).scalar_one()
        fine = session.execute(
            select(func.sum(StepBlock.n)).where(StepBlock.level == rollup_common.FINE)
        ).scalar_one()
        total = session.execute(
            select(SpanTotal.total_s).where(SpanTotal.category == "data_stall")
        ).scalar_one()
        return n_steps, fine, total


def test_big_batches_of_new_stored_and_mixed_keys(client: Any, app: Any) -> None:
    """A batch over the bulk paths' chunk sizes (insert_rows' 200 rows a statement on SQLite,
    probe_new's 400 keys a query), sent again whole (every key stored: the all-new try is
    rolled back and the probes find them all), then again with new keys among the stored
    ones: each record stored once, and the rollups count each once."""
    head = [f.run(), f.attempt_start()]
    first = _big_batch(range(450))
    resp = client.post("/api/v1/ingest", json={"records": head + first})
    assert resp.json() == {"inserted": 2 + 4 * 450, "duplicates": 0}
    assert _counts(app)[:2] == (450, 450)
    resp = client.post("/api/v1/ingest", json={"records": first})
    assert resp.json() == {"inserted": 0, "duplicates": 4 * 450}
    mixed = _big_batch(range(300, 520))
    resp = client.post("/api/v1/ingest", json={"records": mixed})
    assert resp.json() == {"inserted": 4 * 70, "duplicates": 4 * 150}
    n_steps, fine, total = _counts(app)
    assert (n_steps, fine) == (520, 520)
    stalls = [r for r in first + mixed if r["kind"] == "span"]
    want = sum({r["start"]: r["end"] - r["start"] for r in stalls}.values())
    assert total == pytest.approx(want, rel=1e-12)


def test_a_resent_big_batch_with_other_content_is_refused_whole(client: Any, app: Any) -> None:
    """A conflicting re-send inside a big batch: a 409 naming it, nothing of the batch
    stored (its new keys included)."""
    head = [f.run(), f.attempt_start()]
    first = _big_batch(range(300), layers=1)
    assert client.post("/api/v1/ingest", json={"records": head + first}).status_code == 200
    changed = _big_batch(range(250, 420), layers=1)
    changed[3 * 20] = {**changed[3 * 20], "tokens": 999}  # step 270, stored with 512
    resp = client.post("/api/v1/ingest", json={"records": changed})
    assert resp.status_code == 409, resp.text
    (conflict,) = resp.json()["detail"]
    assert conflict["key"]["step"] == 270
    assert conflict["fields"] == {"tokens": {"stored": 512, "sent": 999}}
    assert _counts(app)[:2] == (300, 300)


def test_a_run_named_by_its_attempts_gets_no_placeholder(client: Any, app: Any) -> None:
    """A batch naming a declared run (only through its steps) and a run never seen: the
    first keeps its row as declared, the second gets a placeholder."""
    head = [f.run(name="declared"), f.attempt_start()]
    assert client.post("/api/v1/ingest", json={"records": head}).status_code == 200
    batch = [f.step(0), f.step(0, run_id="run-b"), f.step(1)]
    assert client.post("/api/v1/ingest", json={"records": batch}).json()["inserted"] == 3
    with app.state.sessionmaker() as session:
        rows = session.execute(select(Run.run_id, Run.name, Run.declared).order_by(Run.run_id))
        assert [tuple(r) for r in rows] == [("run-a", "declared", True), ("run-b", "run-b", False)]


def test_the_compiled_upsert_folds_rows_and_keys_like_the_statement(client: Any, app: Any) -> None:
    """span_totals' upsert, compiled once per dialect, through its boolean key (a bind
    processor on SQLite): two folds of blocking and overlapped spans of two categories."""
    assert client.post("/api/v1/ingest", json={"records": [f.run()]}).status_code == 200
    spans = [
        SimpleNamespace(category="data_stall", start=f.T0, end=f.T0 + 1.0, overlapped=False),
        SimpleNamespace(category="eval", start=f.T0 + 2.0, end=f.T0 + 2.5, overlapped=True),
        SimpleNamespace(category="eval", start=f.T0 + 2.0, end=f.T0 + 2.5, overlapped=False),
    ]
    for s in spans:
        s.run_id, s.rank, s.attempt = "run-a", 0, 0
    columns = (*rollup_write._SPAN_TOTAL_KEY, *rollup_write._SPAN_TOTAL_FIGURES)
    with app.state.sessionmaker() as session:
        rollup_write.add_spans(session, spans)
        rollup_write.add_spans(session, spans)
        rows = session.execute(
            select(SpanTotal.category, SpanTotal.overlapped, SpanTotal.n, SpanTotal.total_s)
            .where(SpanTotal.run_id == "run-a")
            .order_by(SpanTotal.category, SpanTotal.overlapped)
        ).all()
        assert [(c, bool(o), n) for c, o, n, _ in rows] == [
            ("data_stall", False, 2),
            ("eval", False, 2),
            ("eval", True, 2),
        ]
        assert [t for *_, t in rows] == pytest.approx([2.0, 1.0, 1.0])
        dialect = session.connection().dialect
        once = bulk._compiled(dialect, rollup_write._span_totals_upsert, columns)
        assert bulk._compiled(dialect, rollup_write._span_totals_upsert, columns) is once
        session.rollback()
