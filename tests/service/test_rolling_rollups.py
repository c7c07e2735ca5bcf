"""The rollups that many windows read at once (span_buckets, step_micro_blocks; read by
store/rollups/rolling.py): kept at ingest, rebuilt and filled by migration 0008, each equal to
its definition summed over the stored rows; and rolling windows over spans that cross the
buckets' edges, clash or run longer than a bucket, each against clipping every record."""

from __future__ import annotations

import importlib.util
import math
import random
import time
from typing import Any

import pytest
from sqlalchemy import select, update

from service.calc.goodput_window import rolling, run_extent, run_goodput
from service.store import queries
from service.store.migrate import MIGRATIONS_DIR
from service.store.models import (
    MICRO_BLOCK,
    ROLLUP_LEVELS,
    SPAN_BUCKET_S,
    Span,
    SpanBucket,
    Step,
    StepMicroBlock,
)
from service.store.rollups import write as rollup_write
from tests import factories as f
from tests.service.test_rollups import assert_goodput_equal, post_shuffled, random_run


def bucket_run(seed: int, steps: int, run_id: str = "run-a") -> list[dict[str, Any]]:
    """One rank; attempt 0 fails after a checkpoint, attempt 1 resumes. Steps of every
    length (zero too); data stalls between them; spans that start or end exactly on a
    bucket's edge, run longer than a bucket, clash across a bucket's edge or last no time;
    overlapped spans, which count nowhere. The checkpoint's step lies inside a micro block
    that is not the last of its fine block (so that the micro blocks, not the fine ones,
    split it)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [f.run(run_id)]
    keys: set[tuple[int, str, float]] = set()

    def span(category: str, start: float, end: float, **kw: Any) -> None:
        if (kw["attempt"], category, start) not in keys:  # a natural key names one span
            keys.add((kw["attempt"], category, start))
            out.append(f.span(category, start, end, run_id=run_id, **kw))

    t = f.T0  # a bucket's edge
    crash_at, saved = steps * 2 // 3, steps * 5 // 12  # inside a micro block, mostly
    for attempt, numbers in ((0, range(crash_at)), (1, range(saved + 1, steps))):
        out.append(f.attempt_start(run_id, start=t, attempt=attempt))
        for n in numbers:
            edge = math.ceil(t / SPAN_BUCKET_S) * SPAN_BUCKET_S
            if n % 20 == 0 and edge > t:  # a stall that ends on a bucket's edge
                span("data_stall", t, edge, attempt=attempt)
                t = edge
            elif n % 20 == 10:  # one that starts on it
                span("data_stall", edge, edge + 0.4, attempt=attempt)
                t = edge + 0.4
            elif rng.random() < 0.3:
                stall = rng.choice([0.05, 0.3])
                span("data_stall", t, t + stall, attempt=attempt)
                t += stall
            dur = rng.choice([0.3, 0.7, 1.1, 0.0, 2.9])
            step = f.step(n, run_id, start=t, dur=dur, attempt=attempt)
            out.append({**step, "tokens": n % 5})
            if n % 37 == 5:  # a zero-length span, alone in its category
                span("custom:zero", t + dur / 2, t + dur / 2, attempt=attempt)
            if rng.random() < 0.05:  # clashes with the stall before it, across an edge maybe
                span("custom:probe", t - 0.2, t + 0.2, attempt=attempt)
            if rng.random() < 0.05:
                span("eval", t, t + 20.0, attempt=attempt, overlapped=True)
            t += dur
            if attempt == 0 and n == saved:
                out.append(f.checkpoint(n, t, run_id=run_id, attempt=attempt))
                span("checkpoint_save", t, t + 40.0, attempt=attempt)  # 3 buckets
                t += 40.0
        if attempt == 0:
            t += 7.0
    out.append(f.attempt_end(run_id, end=t + 20.5, attempt=1))
    return out


def buckets_of_rows(session: Any) -> list[tuple[Any, ...]]:
    """span_buckets' definition: the stored blocking spans grouped by start bucket."""
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for s in session.execute(select(Span).where(Span.overlapped.is_(False))).scalars():
        key = (s.run_id, s.rank, s.attempt, s.category, math.floor(s.start / SPAN_BUCKET_S))
        a = acc.setdefault(key, [0, 0.0, math.inf, -math.inf])
        a[0] += 1
        a[1] += s.end - s.start
        a[2], a[3] = min(a[2], s.start), max(a[3], s.end)
    return sorted((*k, *a) for k, a in acc.items())


def micro_blocks_of_rows(session: Any) -> list[tuple[Any, ...]]:
    """step_micro_blocks' definition: the stored steps grouped by step // MICRO_BLOCK."""
    acc: dict[tuple[Any, ...], list[Any]] = {}
    for s in session.execute(select(Step)).scalars():
        key = (s.run_id, s.rank, s.attempt, s.step // MICRO_BLOCK)
        a = acc.setdefault(key, [0, 0.0, 0.0, 0, 0.0, math.inf, -math.inf])
        a[0] += 1
        a[1] += s.end - s.start
        a[2] += s.blocked_s
        a[3] += s.tokens
        a[4] += s.hook_overhead_s or 0.0
        a[5], a[6] = min(a[5], s.start), max(a[6], s.end)
    return sorted((*k, *a) for k, a in acc.items())


def stored(session: Any, model: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in session.execute(select(*model.__table__.columns)).all())


def rounded(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows]


def test_the_constants_agree_with_migration_0008() -> None:
    """Migration 0008 fills the tables with its own copies of the bucket sizes."""
    path = MIGRATIONS_DIR / "versions" / "0008_rolling_rollups.py"
    spec = importlib.util.spec_from_file_location("migration_0008", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.SPAN_BUCKET_S, module.MICRO_BLOCK) == (SPAN_BUCKET_S, MICRO_BLOCK)
    assert all(level % MICRO_BLOCK == 0 for level in ROLLUP_LEVELS)
    assert math.log2(SPAN_BUCKET_S).is_integer()  # bucket bounds exact in floating point


def test_kept_at_ingest_and_rebuilt_equal_their_definition(client: Any, app: Any) -> None:
    """Spans arrive before and after the steps they block (each moves the steps' blocked_s
    and the micro blocks' with it), in shuffled batches, some sent twice."""
    post_shuffled(client, random_run(11, 300) + bucket_run(11, 200, "run-b"), 11)
    with app.state.sessionmaker() as session:
        buckets, micro = stored(session, SpanBucket), stored(session, StepMicroBlock)
        assert rounded(buckets) == rounded(buckets_of_rows(session))
        assert rounded(micro) == rounded(micro_blocks_of_rows(session))
        assert any(r[-1] - r[-2] > SPAN_BUCKET_S for r in buckets)  # a span longer than one
        assert sum(r[6] > 0 for r in micro) > 10  # blocked time kept
        rollup_write.rebuild_run(session, "run-a")
        rollup_write.rebuild_run(session, "run-b")
        session.flush()
        assert rounded(stored(session, SpanBucket)) == rounded(buckets)
        assert rounded(stored(session, StepMicroBlock)) == rounded(micro)
        session.rollback()


def test_migration_0008_fills_them_from_the_stored_rows(
    client: Any, app: Any, migrated_url: str
) -> None:
    from service.store.migrate import downgrade, upgrade

    post_shuffled(client, bucket_run(12, 150), 12)
    with app.state.sessionmaker() as session:
        buckets, micro = stored(session, SpanBucket), stored(session, StepMicroBlock)
    assert buckets and micro
    app.state.engine.dispose()
    downgrade(migrated_url, "0007")
    upgrade(migrated_url)
    with app.state.sessionmaker() as session:
        assert rounded(stored(session, SpanBucket)) == rounded(buckets)
        assert rounded(stored(session, StepMicroBlock)) == rounded(micro)


@pytest.mark.parametrize("window_s,step_s", [(5.0, None), (16.0, None), (37.0, 11.0)])
def test_rolling_windows_over_buckets_equal_clipping_every_record(
    client: Any, app: Any, window_s: float, step_s: float | None
) -> None:
    post_shuffled(client, bucket_run(13, 240), 13)
    with app.state.sessionmaker() as session:
        full = queries.goodput_inputs(session, "run-a")
        clashing = session.execute(select(Span).where(Span.clashes.is_(True))).scalars().all()
    assert clashing  # the case happens
    params = {"window_s": window_s} | ({"step_s": step_s} if step_s else {})
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params=params).json()
    now = time.time()
    bounds = rolling(run_extent(run_goodput(full, now)), window_s, step_s or window_s)
    assert [(w["start"], w["end"]) for w in body["windows"]] == bounds and len(bounds) > 10
    for w, (lo, hi) in zip(body["windows"], bounds, strict=True):
        assert_goodput_equal(w, run_goodput(full, now, lo, hi), (lo, hi))


def test_rolling_falls_back_on_overlapping_steps_whose_rollups_agree(client: Any, app: Any) -> None:
    """A database written before ingest refused overlapping steps holds some, with rollups
    rebuilt from its rows: two steps then cross one edge inside micro blocks that straddle
    it, and each window is read on its own, as `?start=&end=` reads it."""
    post_shuffled(client, random_run(8, 200), 8)
    with app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Step)
            .where(Step.rank == 0, Step.attempt == 1, Step.step.in_([150, 151]))
            .values(end=Step.end + 1.3)
        )
        rollup_write.rebuild_run(session, "run-a")
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 2.0}).json()
    for w in body["windows"]:
        got = client.get(
            "/api/v1/runs/run-a/goodput", params={"start": w["start"], "end": w["end"]}
        ).json()
        for name in ("total_s", "goodput_s", "other_s", "steps", "tokens"):
            assert w[name] == pytest.approx(got[name], rel=1e-12, abs=1e-9), (w["start"], name)
        assert w["badput_s"] == pytest.approx(got["badput_s"], rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("window_s,step_s", [(7.0, None), (23.0, 9.0)])
def test_rolling_windows_with_excluded_intervals_equal_clipping_every_record(
    client: Any, app: Any, window_s: float, step_s: float | None
) -> None:
    """Windows accounted as arrays (calc/goodput_many.py) with excluded intervals that cut
    some of them, contain others and overlap each other, clashing custom categories and a
    checkpoint split, against the reference; for the run and for ?rank=."""
    records = bucket_run(14, 240)
    t0 = f.T0
    for lo, hi in ((t0 + 30.0, t0 + 41.5), (t0 + 38.0, t0 + 90.0), (t0 + 200.25, t0 + 200.5)):
        records.append({"kind": "excluded_window", "run_id": "run-a", "start": lo, "end": hi})
    post_shuffled(client, records, 14)
    with app.state.sessionmaker() as session:
        full = queries.goodput_inputs(session, "run-a")
    assert full.excluded
    params = {"window_s": window_s} | ({"step_s": step_s} if step_s else {})
    now = time.time()
    bounds = rolling(run_extent(run_goodput(full, now)), window_s, step_s or window_s)
    for extra in ({}, {"rank": 0}):
        body = client.get("/api/v1/runs/run-a/goodput/rolling", params=params | extra).json()
        assert [(w["start"], w["end"]) for w in body["windows"]] == bounds and len(bounds) > 10
        for w, (lo, hi) in zip(body["windows"], bounds, strict=True):
            assert_goodput_equal(w, run_goodput(full, now, lo, hi), (lo, hi))
