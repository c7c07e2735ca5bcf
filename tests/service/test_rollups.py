"""Rollups kept at ingest answer exactly what the raw records answer: random runs (ranks,
attempts, a crash with a checkpoint, spans inside and across steps) posted in shuffled
batches with resent duplicates, then the goodput summary compared with the calculator on the
raw rows, and the rollups compared with a rebuild from scratch."""

from __future__ import annotations

import math
import random
import time
from typing import Any

import pytest
from sqlalchemy import func, select

from service.calc.goodput_window import cut_steps, raw_disruptions, run_goodput
from service.calc.step_stats import raw_recent, step_figures
from service.store import ingest as repo
from service.store import queries
from service.store.models import RoutingBlock, SpanTotal, Step, StepBlock
from service.store.rollups import common as rollup_common
from service.store.rollups import series as rollup_series
from service.store.rollups import write as rollup_write
from tests import factories as f


def random_run(seed: int, steps: int) -> list[dict[str, Any]]:
    """Two ranks; attempt 0 crashes after a checkpoint, attempt 1 completes."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [f.run()]
    for rank in (0, 1):
        t = f.T0 + rank * 0.01
        crash_at = rng.randrange(steps // 3, steps // 2)
        saved = crash_at - rng.randrange(1, 70)
        resume_from = saved + 1 if rng.random() < 0.8 else 0
        for attempt, numbers in ((0, range(crash_at)), (1, range(resume_from, steps))):
            out.append(f.attempt_start(start=t, rank=rank, attempt=attempt, world_size=2))
            out.append(f.span("startup", t, t + 2.0, rank=rank, attempt=attempt))
            t += 2.0
            for n in numbers:
                stall = rng.choice([0.0, 0.0, 0.01, 0.2])
                if stall:
                    out.append(f.span("data_stall", t, t + stall, rank=rank, attempt=attempt))
                    t += stall
                dur = rng.choice([0.5, 0.5, 0.51, 0.49]) * (3 if rng.random() < 0.01 else 1)
                hook = rng.choice([None, 1e-4])
                step = f.step(n, start=t, dur=dur, rank=rank, attempt=attempt)
                mem = rng.choice([None, rng.randrange(10**9, 9 * 10**9)])
                out.append(
                    {**step, "hook_overhead_s": hook, "tokens": 100 + n % 7}
                    | ({"mem_allocated_peak": mem} if mem is not None else {})
                )
                if rng.random() < 0.03:  # a compile inside the step
                    out.append(f.span("compile", t + 0.1, t + 0.3, rank=rank, attempt=attempt))
                if rng.random() < 0.02:  # overlapped work counts nowhere
                    out.append(
                        f.span("eval", t, t + 0.4, rank=rank, attempt=attempt, overlapped=True)
                    )
                if rng.random() < 0.01:  # a blocking span across this step and the next
                    out.append(f.span("custom:probe", t + 0.3, t + 1.2, rank=rank, attempt=attempt))
                t += dur
                if attempt == 0 and n == saved:
                    out.append(f.checkpoint(n, t, rank=rank, attempt=attempt))
                    out.append(f.span("checkpoint_save", t, t + 0.3, rank=rank, attempt=attempt))
                    t += 0.3
            if attempt == 0:
                t += rng.uniform(3.0, 9.0)  # the crash and the restart
            else:
                out.append(f.attempt_end(end=t + 0.5, rank=rank, attempt=attempt))
    return out


def post_shuffled(client: Any, records: list[dict[str, Any]], seed: int) -> None:
    """Run and attempt starts first (the service needs them), the rest in random batches,
    some of them sent twice."""
    rng = random.Random(seed)
    head = [r for r in records if r["kind"] in ("run", "attempt_start")]
    rest = [r for r in records if r["kind"] not in ("run", "attempt_start")]
    rng.shuffle(rest)
    batches = [head]
    while rest:
        size = rng.randint(1, 700)
        batches.append(rest[:size])
        rest = rest[size:]
    resent = rng.sample(batches[1:], k=min(3, len(batches) - 1))
    for batch in [*batches, *resent]:
        resp = client.post("/api/v1/ingest", json={"records": batch})
        assert resp.status_code == 200, resp.text


def dump(session: Any) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for model in (StepBlock, SpanTotal, RoutingBlock):
        cols = [c for c in model.__table__.columns]
        rows = session.execute(select(*cols).order_by(*model.__table__.primary_key)).all()
        out[model.__tablename__] = [
            tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows
        ]
    return out


@pytest.mark.parametrize("seed,steps", [(1, 300), (2, 5000)])
def test_goodput_from_rollups_equals_goodput_from_raw_rows(
    client: Any, app: Any, seed: int, steps: int
) -> None:
    post_shuffled(client, random_run(seed, steps), seed)
    got = client.get("/api/v1/runs/run-a/goodput").json()
    with app.state.sessionmaker() as session:
        inputs = queries.goodput_inputs(session, "run-a")
    now = time.time()
    want = run_goodput(inputs, now)
    assert got["rank"] == want.rank
    assert got["steps"] == want.steps and got["tokens"] == want.tokens
    for name in ("total_s", "goodput_s", "other_s"):
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-9, abs=1e-6), name
    for cat, seconds in want.badput_s.items():
        assert got["badput_s"][cat] == pytest.approx(seconds, rel=1e-9, abs=1e-6), cat
    assert want.badput_s["wasted_progress"] > 0 and want.badput_s["compile"] > 0
    for mine, theirs in zip(got["ranks"], want.ranks, strict=True):
        assert mine["goodput_s"] == pytest.approx(theirs.goodput_s, rel=1e-9, abs=1e-6)
    parts = got["goodput_s"] + sum(got["badput_s"].values()) + got["other_s"]
    assert math.isclose(parts, got["total_s"], rel_tol=0, abs_tol=1e-6)
    fig = step_figures(
        raw_recent(inputs.steps, want.rank), want.rank, raw_disruptions(inputs, now, want.rank)
    )
    assert [(d["attempt"], d["wasted_steps"]) for d in got["disruptions"]] == [
        (d.attempt, d.wasted_steps) for d in fig.disruptions
    ]
    assert got["disruptions"][0]["time"] == pytest.approx(fig.disruptions[0].time)
    assert got["ideal_step_time_s"] == pytest.approx(fig.ideal_step_time_s)
    assert got["step_time_deviation_s"] == pytest.approx(fig.step_time_deviation_s)
    # The receipt's summary, from the rollups, against its definition on the raw steps.
    from service.calc.receipts import step_summary

    throughput = client.get("/api/v1/runs/run-a/receipt").json()["summary"]["throughput"]
    want_steps = step_summary(inputs.steps)
    for name in ("rank", "num_steps", "final_loss"):
        assert throughput[name] == getattr(want_steps, name), name
    for name in ("median_step_time_s", "tokens_per_s"):
        assert throughput[name] == pytest.approx(getattr(want_steps, name), rel=1e-9), name
    with app.state.sessionmaker() as session:
        peak = session.execute(select(func.max(Step.mem_allocated_peak))).scalar()
    assert throughput["peak_memory_bytes"] == peak


def test_rollups_kept_at_ingest_equal_a_rebuild(client: Any, app: Any) -> None:
    records = random_run(3, 400)
    rng = random.Random(3)
    records += [
        f.routing(
            n,
            layer,
            tokens_per_expert=[rng.choice([0, 40, 80]) for _ in range(4)],
            dropped_per_expert=[0, 0, 0, 0],
        )
        for n in range(0, 400, 3)
        for layer in (0, 1)
    ]
    post_shuffled(client, records, 3)
    with app.state.sessionmaker() as session:
        kept = dump(session)
        blocked = session.execute(
            select(Step.blocked_s).order_by(Step.attempt, Step.rank, Step.step)
        ).all()
        rollup_write.rebuild_run(session, "run-a")
        session.flush()
        assert dump(session) == kept
        again = session.execute(
            select(Step.blocked_s).order_by(Step.attempt, Step.rank, Step.step)
        ).all()
        assert [round(b[0], 9) for b in again] == [round(b[0], 9) for b in blocked]
        assert any(b[0] > 0 for b in blocked)
        session.rollback()


def test_downsampled_series_from_rollups_equal_the_definition_on_rows(
    client: Any, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollup_series, "_KEYS_PER_QUERY", 700)  # kept rows fetched in several parts
    from service.calc.downsample import minmax_keys
    from service.store.models import ROLLUP_LEVELS, RoutingRow

    rng = random.Random(4)
    records = random_run(4, 4500)
    for r in records:
        if r["kind"] == "step":
            r["loss"] = None if rng.random() < 0.1 else rng.uniform(1.0, 4.0)
            if rng.random() < 0.3:  # the hooks time a step in device_every; ties too
                r["device_time_s"] = rng.choice([0.25, rng.uniform(0.1, 0.9)])
    for n in [*range(0, 4500, 3), 4499]:
        for layer in (0, 1) if n < 4499 else (0,):
            tokens = [0, 0, 0, 0] if rng.random() < 0.05 else [rng.randint(1, 90) for _ in range(4)]
            dropped = [min(t, rng.randint(0, 3)) for t in tokens]
            records.append(
                f.routing(n, layer, tokens_per_expert=tokens, dropped_per_expert=dropped)
            )
    post_shuffled(client, records, 4)
    with app.state.sessionmaker() as session:
        steps = session.execute(
            select(Step.step, Step.attempt, Step.end - Step.start).where(Step.rank == 0)
        ).all()
        losses = session.execute(
            select(Step.step, Step.attempt, Step.loss).where(Step.rank == 0, Step.loss.isnot(None))
        ).all()
        devs = session.execute(
            select(Step.step, Step.attempt, Step.device_time_s).where(
                Step.rank == 0, Step.device_time_s.isnot(None)
            )
        ).all()
        routing_all = session.execute(
            select(
                RoutingRow.layer,
                RoutingRow.step,
                RoutingRow.attempt,
                RoutingRow.max_vio,
                RoutingRow.num_tokens,
                RoutingRow.drop_rate,
            )
        ).all()
    step_rows = [tuple(r) for r in steps]
    lo, hi = min(r[0] for r in step_rows), max(r[0] for r in step_rows)
    for max_points, start, end in [
        (320, None, None),
        (20, None, None),
        (2, None, None),
        (3000, None, None),
        (100_000, None, None),
        (320, 100, 4200),
        (40, 4095, 4097),
        (50, 63, 64 * 70),
    ]:
        params: dict[str, Any] = {"max_points": max_points}
        params |= {"start_step": start} if start is not None else {}
        params |= {"end_step": end} if end is not None else {}
        body = client.get("/api/v1/runs/run-a/steps", params=params).json()
        a, b = (lo if start is None else start), (hi if end is None else end)
        want = minmax_keys(step_rows, a, b, max_points, ROLLUP_LEVELS)
        assert [(p["step"], p["attempt"]) for p in body["points"]] == want, params
        assert body["total"] == sum(1 for r in step_rows if a <= r[0] <= b)
        assert len(body["points"]) <= max_points
        series = client.get("/api/v1/runs/run-a/series", params={**params, "metric": "loss"})
        got = series.json()
        want_loss = minmax_keys([tuple(r) for r in losses], a, b, max_points, ROLLUP_LEVELS)
        assert list(zip(got["step"], got["attempt"], strict=True)) == want_loss, params
        assert got["total"] == sum(1 for r in losses if a <= r[0] <= b)
        loss_of = {(s, at): v for s, at, v in losses}  # the values too, from the blocks
        assert got["value"] == [loss_of[k] for k in zip(got["step"], got["attempt"], strict=True)]
        dev = client.get(
            "/api/v1/runs/run-a/series", params={**params, "metric": "device_time_s"}
        ).json()
        want_dev = minmax_keys([tuple(r) for r in devs], a, b, max_points, ROLLUP_LEVELS)
        assert list(zip(dev["step"], dev["attempt"], strict=True)) == want_dev, params
        assert dev["total"] == sum(1 for r in devs if a <= r[0] <= b)
        dev_of = {(s, at): v for s, at, v in devs}
        assert dev["value"] == [dev_of[k] for k in zip(dev["step"], dev["attempt"], strict=True)]
        times = client.get(
            "/api/v1/runs/run-a/series", params={**params, "metric": "step_time_s"}
        ).json()
        assert list(zip(times["step"], times["attempt"], strict=True)) == want
        assert times["value"] == [p["step_time_s"] for p in body["points"]]
    figures = {(n, s, a): (v, t, d) for n, s, a, v, t, d in routing_all}
    for layers in ([1], [0, 1]):
        # Layer 0 goes one step further: all layers share the union of their step ranges.
        lo = min(s for n, s, _ in figures if n in layers)
        hi = max(s for n, s, _ in figures if n in layers)
        for max_points in (2, 64, 320, 5000):
            params = {"max_points": max_points} | ({"layer": 1} if layers == [1] else {})
            body = client.get("/api/v1/runs/run-a/routing", params=params).json()
            assert [s["layer"] for s in body["layers"]] == layers
            for series in body["layers"]:
                n = series["layer"]
                rows = [
                    (s, a, -math.inf if v is None else v)
                    for (m, s, a), (v, _, _) in figures.items()
                    if m == n
                ]
                want = minmax_keys(rows, lo, hi, max_points, ROLLUP_LEVELS)
                got = [(p["step"], p["attempt"]) for p in series["points"]]
                assert got == want, (layers, n, max_points)
                assert series["total"] == len(rows)
                for p in series["points"]:  # figures from the blocks equal the records'
                    v, t, d = figures[(n, p["step"], p["attempt"])]
                    assert (p["max_vio"], p["num_tokens"], p["drop_rate"]) == (v, t, d)


def test_migration_0004_fills_the_rollups_of_rows_stored_before_it(
    client: Any, app: Any, migrated_url: str
) -> None:
    from service.store.migrate import downgrade, upgrade

    routing = [f.routing(n, tokens_per_expert=[n + 20, 7, 2**40, 0]) for n in range(0, 300, 7)]
    post_shuffled(client, random_run(5, 300) + routing, 5)
    before = client.get("/api/v1/runs/run-a/goodput").json()
    export = client.get("/api/v1/runs/run-a/export.csv", params={"what": "routing"}).text
    assert "1099511627776" in export  # 2**40 survives the packing
    with app.state.sessionmaker() as session:
        kept = dump(session)
    app.state.engine.dispose()
    downgrade(migrated_url, "0003")
    upgrade(migrated_url)
    with app.state.sessionmaker() as session:
        assert dump(session) == kept
    after = client.get("/api/v1/runs/run-a/goodput").json()
    assert after["goodput_s"] == pytest.approx(before["goodput_s"], rel=1e-12)
    assert after["badput_s"] == pytest.approx(before["badput_s"], rel=1e-12)
    assert client.get("/api/v1/runs/run-a/export.csv", params={"what": "routing"}).text == export


@pytest.mark.fresh_db
def test_concurrent_ingests_of_one_rank_count_each_overlap_once(app: Any) -> None:
    """Steps from one writer, the compile spans inside them from another, interleaved in
    small batches: every step's blocked time is still counted exactly once."""
    import threading

    from service.store.db import session_scope
    from trainer_hooks.records import IngestBatch

    def post(records: list[dict[str, Any]]) -> None:
        batch = IngestBatch.model_validate({"records": records}).records
        with session_scope(app.state.sessionmaker) as session:
            repo.ingest(session, batch)

    post([f.run(), f.attempt_start()])
    steps = [f.step(n, start=f.T0 + 10 + n, dur=0.8) for n in range(400)]
    spans = [f.span("compile", f.T0 + 10.2 + n, f.T0 + 10.5 + n) for n in range(400)]
    errors: list[BaseException] = []

    def send(records: list[dict[str, Any]]) -> None:
        try:
            for i in range(0, len(records), 10):
                post(records[i : i + 10])
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(r,)) for r in (steps, spans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with app.state.sessionmaker() as session:
        blocked = session.execute(select(Step.blocked_s)).scalars().all()
    assert len(blocked) == 400 and all(b == pytest.approx(0.3) for b in blocked)


def test_a_key_sent_twice_in_one_batch_is_stored_once_with_its_first_record(
    client: Any, app: Any
) -> None:
    first = f.step(0, start=f.T0 + 10, dur=1.0)
    again = {**first}  # same key, same values (other values: a 409, test_ingest_conflicts)
    stall = f.span("data_stall", f.T0 + 10.2, f.T0 + 10.4)
    routing = f.routing(0)
    batch = [f.run(), f.attempt_start(), first, stall, again, stall, routing, routing]
    resp = client.post("/api/v1/ingest", json={"records": batch})
    assert resp.json() == {"inserted": 5, "duplicates": 3}
    with app.state.sessionmaker() as session:
        (row,) = session.execute(select(Step.end, Step.loss, Step.blocked_s)).all()
        assert row.end == first["end"] and row.loss == first["loss"]
        assert row.blocked_s == pytest.approx(0.2)
        block = session.execute(select(StepBlock).where(StepBlock.level == 64)).scalar_one()
        assert (block.n, block.blocked_s) == (1, pytest.approx(0.2))
        totals = session.execute(select(SpanTotal.n, SpanTotal.total_s)).one()
        assert totals == (1, pytest.approx(0.2))
        assert session.execute(select(RoutingBlock.n).where(RoutingBlock.level == 64)).scalar() == 1


def test_a_bulk_insert_of_a_stored_key_is_refused_not_counted_twice(app: Any) -> None:
    """An insert that finds a key taken raises (the caller then rolls back), rather than
    let the rollups count a row that was not inserted."""
    from service.store import bulk
    from service.store.db import session_scope
    from trainer_hooks.records import IngestBatch

    records = IngestBatch.model_validate(
        {"records": [f.run(), f.attempt_start(), f.step(0)]}
    ).records
    with session_scope(app.state.sessionmaker) as session:
        repo.ingest(session, records)
    step = records[-1]
    row = tuple(getattr(step, c) for c in rollup_common.STEP_COLUMNS) + (0.0,)
    columns = (*rollup_common.STEP_COLUMNS, "blocked_s")
    with app.state.sessionmaker() as session:
        table = Step.__table__
        assert bulk.keep_new(session, table, ("run_id", "attempt", "rank"), "step", [step]) == []
        with pytest.raises(bulk.AlreadyStored, match="1 of 1 rows"):
            bulk.insert_rows(session, table, columns, [row])
        session.rollback()


def test_a_batch_of_old_and_new_keys_stores_the_new_ones_once(client: Any, app: Any) -> None:
    """The first try stores the batch as all new and meets a stored key: it is rolled back
    and the batch stored again with its keys probed, new ones only."""
    head = [f.run(), f.attempt_start()]
    old = [f.step(n, start=f.T0 + 10 + n, dur=0.8) for n in range(3)]
    assert client.post("/api/v1/ingest", json={"records": head + old}).json()["inserted"] == 5
    new = [f.step(n, start=f.T0 + 10 + n, dur=0.8) for n in range(3, 6)]
    stalls = [f.span("data_stall", f.T0 + 10.1 + n, f.T0 + 10.2 + n) for n in range(6)]
    mixed = [*old, *new, *stalls, old[0]]
    assert client.post("/api/v1/ingest", json={"records": mixed}).json() == {
        "inserted": 9,
        "duplicates": 4,
    }
    with app.state.sessionmaker() as session:
        blocked = session.execute(select(Step.blocked_s).order_by(Step.step)).scalars().all()
        assert blocked == pytest.approx([0.1] * 6, abs=1e-6)  # epoch-sized floats
        fine = session.execute(select(StepBlock).where(StepBlock.level == 64)).scalar_one()
        assert (fine.n, fine.blocked_s) == (6, pytest.approx(0.6, abs=1e-5))


def assert_goodput_equal(got: dict[str, Any], want: Any, where: Any) -> None:
    """A goodput body (or a rolling window) against a RunGoodput: every figure."""
    assert (got["rank"], got["steps"], got["tokens"]) == (want.rank, want.steps, want.tokens), where
    for name in ("total_s", "goodput_s", "other_s"):
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-9, abs=1e-6), (where, name)
    assert set(got["badput_s"]) == set(want.badput_s)
    for cat, seconds in want.badput_s.items():
        assert got["badput_s"][cat] == pytest.approx(seconds, rel=1e-9, abs=1e-6), (where, cat)
    if "ranks" not in got:
        return
    assert [r["rank"] for r in got["ranks"]] == [r.rank for r in want.ranks], where
    for mine, theirs in zip(got["ranks"], want.ranks, strict=True):
        assert mine["steps"] == theirs.steps, where
        for name in ("total_s", "goodput_s", "other_s"):
            assert mine[name] == pytest.approx(getattr(theirs, name), rel=1e-9, abs=1e-6), where


def test_a_window_summed_by_the_database_equals_clipping_every_record(
    client: Any, app: Any
) -> None:
    """The goodput of [start, end] (store/rollups/windows.py: rollups and SQL sums) against its
    definition, every record of the run clipped to the window and accounted in Python: whole
    and tiny windows, a window of spans alone, windows that cut steps, spans and the crash,
    and windows outside."""
    post_shuffled(client, random_run(5, 700), 5)
    rng = random.Random(5)
    with app.state.sessionmaker() as session:
        full = queries.goodput_inputs(session, "run-a")
    first = min(a.start for a in full.attempts)
    last = max(s.end for s in full.steps)
    windows = [(first - 5.0, last + 5.0), (first + 3.0, first + 3.2), (first - 9.0, first - 1.0)]
    windows += [(first + 0.5, first + 1.5)]  # inside the startup spans: no step at all
    windows += [(s.start, s.end) for s in rng.sample(full.steps, 3)]  # exactly one step
    windows += [(s.start + 0.1, s.end + 0.3) for s in rng.sample(full.spans, 3)]
    windows += [tuple(sorted(rng.uniform(first, last) for _ in range(2))) for _ in range(12)]
    assert any(a.end is None for a in full.attempts)  # a crashed attempt was in play
    now = time.time()
    for lo, hi in windows:
        want = run_goodput(full, now, lo, hi)
        got = client.get("/api/v1/runs/run-a/goodput", params={"start": lo, "end": hi}).json()
        assert_goodput_equal(got, want, (lo, hi))
        recent = raw_recent(cut_steps(full.steps, lo, hi), want.rank)
        if len(recent) == 1:  # one rank: only the summary rank's steps are read
            recent = {r: v for r, v in recent.items() if r == want.rank}
        fig = step_figures(recent, want.rank, raw_disruptions(full, now, want.rank))
        for name in ("ideal_step_time_s", "step_time_deviation_s"):
            expected = getattr(fig, name)
            close = pytest.approx(expected, rel=1e-9) if expected is not None else None
            assert got[name] == close, (lo, hi, name)
        assert [(d["attempt"], d["wasted_steps"], d["cause"]) for d in got["disruptions"]] == [
            (d.attempt, d.wasted_steps, d.cause) for d in fig.disruptions
        ], (lo, hi)
        assert [s["rank"] for s in got["stragglers"]] == [s.rank for s in fig.stragglers]
    whole = client.get("/api/v1/runs/run-a/goodput", params={"start": first - 5.0}).json()
    assert whole["total_s"] == pytest.approx(run_goodput(full, now).total_s, abs=1e-6)


@pytest.mark.parametrize("window_s,step_s", [(40.0, None), (97.5, 31.0), (3.0, 700.0)])
def test_rolling_windows_equal_clipping_every_record(
    client: Any, app: Any, window_s: float, step_s: float | None
) -> None:
    """Back to back, overlapping and sparse windows, each against its definition."""
    from service.calc.goodput_window import rolling, run_extent

    post_shuffled(client, random_run(6, 500), 6)
    with app.state.sessionmaker() as session:
        full = queries.goodput_inputs(session, "run-a")
    params = {"window_s": window_s} | ({"step_s": step_s} if step_s else {})
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params=params).json()
    now = time.time()
    bounds = rolling(run_extent(run_goodput(full, now)), window_s, step_s or window_s)
    assert [(w["start"], w["end"]) for w in body["windows"]] == bounds and len(bounds) > 1
    for w, (lo, hi) in zip(body["windows"], bounds, strict=True):
        assert_goodput_equal(w, run_goodput(full, now, lo, hi), (lo, hi))
    one = client.get("/api/v1/runs/run-a/goodput/rolling", params=params | {"rank": 1}).json()
    assert one["windows"] and all(w["rank"] == 1 for w in one["windows"])


def edge_run() -> tuple[list[dict[str, Any]], float]:
    """Steps that meet the rolling windows' edges every way: ending on one, starting on one,
    zero-length on one, longer than a window; a checkpoint inside a block; clashing spans
    across an edge and inside a step that crosses one."""
    t0 = f.T0
    out: list[dict[str, Any]] = [f.run(), f.attempt_start(start=t0)]
    t, n = t0, 0
    durations = [2.0, 0.5, 1.5, 0.0, 0.7, 5.3, 0.25, 1.75, 0.0, 0.0, 3.0, 1.0, 0.4, 0.6]
    for rep in range(12):  # about 12 fine blocks: edges inside blocks and between them
        for dur in durations:
            out.append({**f.step(n, start=t, dur=dur), "hook_overhead_s": 1e-4, "tokens": n})
            if n % 9 == 4 and dur > 0.5:  # a data stall inside the step, across an edge
                out.append(f.span("data_stall", t + 0.3, t + dur - 0.1))
            if dur > 2.5:  # two blocking spans that share time inside a long step
                out.append(f.span("data_stall", t + 0.3, t + dur - 0.1))
                out.append(f.span("custom:probe", t + 0.2, t + 0.5))
            t += dur
            n += 1
        if rep == 6:
            out.append(f.checkpoint(n - 1, t))
        out.append(f.span("eval", t, t + 1.0))
        if rep % 4 == 1:  # two blocking spans that share time (charged by precedence)
            out.append(f.span("checkpoint_save", t + 0.5, t + 1.5))
        t += 1.0 + (0.5 if rep % 4 == 1 else 0.0)
    out.append(f.attempt_end(end=t + 0.5, status="failed"))
    return out, t0


@pytest.mark.parametrize("window_s,step_s", [(2.0, None), (0.5, None), (3.0, 1.0), (7.0, 7.5)])
def test_rolling_windows_with_records_on_their_edges(
    client: Any, app: Any, window_s: float, step_s: float | None
) -> None:
    """Rolling windows summed incrementally (store/rollups/rolling.py) against their definition,
    where steps and spans sit exactly on, across and between the windows' edges."""
    from service.calc.goodput_window import rolling, run_extent

    records, _ = edge_run()
    post_shuffled(client, records, 7)
    with app.state.sessionmaker() as session:
        full = queries.goodput_inputs(session, "run-a")
    params = {"window_s": window_s} | ({"step_s": step_s} if step_s else {})
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params=params).json()
    now = time.time()
    bounds = rolling(run_extent(run_goodput(full, now)), window_s, step_s or window_s)
    assert [(w["start"], w["end"]) for w in body["windows"]] == bounds
    edges = {x for b in bounds for x in b}
    assert any(s.end == s.start and s.start in edges for s in full.steps)  # the cases happen
    assert any(s.end in edges and s.end > s.start for s in full.steps)
    for w, (lo, hi) in zip(body["windows"], bounds, strict=True):
        assert_goodput_equal(w, run_goodput(full, now, lo, hi), (lo, hi))


def test_rolling_falls_back_to_one_window_at_a_time_on_overlapping_steps(
    client: Any, app: Any
) -> None:
    """Steps of one attempt rank never overlap (ingest refuses it); a database written before
    that rule may hold some, and two steps then cross one edge: each window is read on its
    own, as `?start=&end=` reads it."""
    from sqlalchemy import update

    post_shuffled(client, random_run(8, 200), 8)
    with app.state.sessionmaker() as session, session.begin():
        session.execute(
            update(Step)
            .where(Step.rank == 0, Step.attempt == 1, Step.step.in_([150, 151]))
            .values(end=Step.end + 1.3)
        )
        rollup_write.rebuild_run(session, "run-a")  # as `goodput db upgrade` leaves such a run
    body = client.get("/api/v1/runs/run-a/goodput/rolling", params={"window_s": 2.0}).json()
    for w in body["windows"]:
        one = client.get(
            "/api/v1/runs/run-a/goodput", params={"start": w["start"], "end": w["end"]}
        )
        got = one.json()
        for name in ("total_s", "goodput_s", "other_s", "steps", "tokens"):
            assert w[name] == pytest.approx(got[name], rel=1e-12, abs=1e-9), (w["start"], name)
        assert w["badput_s"] == pytest.approx(got["badput_s"], rel=1e-12, abs=1e-9)
