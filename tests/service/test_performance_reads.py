"""What the performance page reads (services/performance.py): the step grid, from the steps
and from the blocks, against brute force on the records; the recompiles; and the two pages'
data routes on bad input."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from service.services import performance
from service.store.db import session_scope
from tests import factories as f

GUARD = "tensor 'x' size mismatch at index 0. expected 8, actual 4"


def two_ranks(run_id: str, steps: int = 30) -> list[dict[str, Any]]:
    """Two ranks, two attempts: attempt 0 fails (oom) after a checkpoint at step 19, attempt
    1 resumes at step 20; rank 1 steps 30% slower; FLOPs, CUDA-event times and memory on
    every step, the device's peak known, one recompile with its guard (and attempt 1's end
    counting one on each rank)."""
    env = f.loop_environment(device="NVIDIA H100 80GB HBM3", peak_flops_per_s=989e12)
    recs: list[dict[str, Any]] = [f.run(run_id, "two ranks", environment=env)]
    for attempt, first, t0 in ((0, 0, f.T0), (1, 20, f.T0 + 20 + 2 * steps)):
        for rank, dur in ((0, 1.0), (1, 1.3)):
            at = {"attempt": attempt, "rank": rank}
            recs.append(f.attempt_start(run_id, t0, world_size=2, **at))
            recs.append(f.span("startup", t0, t0 + 5, run_id, **at))
            for i in range(steps):
                extra = {"flops": 4 * 10**14, "device_time_s": 0.9 * dur}
                extra["mem_allocated_peak"] = 30 * 2**30 + (first + i) * 2**24
                recs.append(f.step(first + i, run_id, t0 + 10 + 2 * i, dur, **at, **extra))
            end = t0 + 12 + 2 * steps
            if attempt == 0:
                recs.append(f.checkpoint(19, t0 + 10 + 2 * 19 + 1.5, run_id, **at))
                recs.append(f.attempt_end(run_id, end, "failed", cause="oom", **at))
            else:
                recs.append(f.attempt_end(run_id, end, counters={"recompiles": 1}, **at))
    recs.append(
        f.observation("recompile", "recompile 0/1", run_id, reason=GUARD, step=5, time=f.T0 + 20)
    )
    return recs


@pytest.fixture
def posted(app: Any, client: Any) -> Iterator[tuple[str, list[dict[str, Any]], Any]]:
    run_id = "perf-" + uuid.uuid4().hex[:10]
    records = two_ranks(run_id, steps=150)
    r = client.post("/api/v1/ingest", json={"records": records})
    assert r.status_code == 200, r.text
    yield run_id, records, lambda: session_scope(app.state.sessionmaker)


def brute(records: list[dict[str, Any]], by: str, origin: float, width: float) -> dict:
    """(rank, bucket) -> (steps, mean step time), from the step records."""
    cells: dict[tuple[int, int], list[float]] = {}
    for r in records:
        if r["kind"] != "step":
            continue
        x = r["step"] if by == "step" else r["start"] - origin
        cells.setdefault((r.get("rank", 0), math.floor(x / width)), []).append(
            r["end"] - r["start"]
        )
    return {k: (len(v), sum(v) / len(v)) for k, v in cells.items()}


def grid_cells(grid: performance.StepGrid) -> dict:
    sums: dict[tuple[int, int], tuple[int, float]] = {}
    for c in grid.cells:
        n, busy = sums.get((c.rank, c.bucket), (0, 0.0))
        sums[c.rank, c.bucket] = (n + c.n, busy + c.busy_s)
    return {k: (n, busy / n) for k, (n, busy) in sums.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and math.isclose(a[k][1], b[k][1], rel_tol=1e-9) for k in a
    )


def test_the_step_grid_from_the_steps_and_from_the_blocks_agree_with_brute_force(
    posted: tuple[str, list[dict[str, Any]], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, records, sessions = posted
    with sessions() as s:
        raw = performance.step_grid(s, run_id, "step", columns=2)
        monkeypatch.setattr(performance, "RAW_STEPS", 0)  # every run read from its blocks
        blocks = performance.step_grid(s, run_id, "step", columns=2)
    assert raw.plan.level == 1 and blocks.plan.level == 64
    # steps 0..169, in blocks 0..2 of 64: 2 buckets of 96 steps, or of 2 whole blocks each
    assert (raw.plan.width, blocks.plan.width) == (96, 128)
    assert raw.ranks == [0, 1] and raw.ranks_total == 2
    assert same(grid_cells(raw), brute(records, "step", 0.0, 96))
    assert same(grid_cells(blocks), brute(records, "step", 0.0, 128))
    peaks = {(c.attempt, c.bucket): c.mem_peak for c in blocks.cells if c.rank == 0}
    assert peaks[1, 1] == 30 * 2**30 + 169 * 2**24  # the largest of the bucket's steps


def test_the_time_grid_buckets_steps_by_their_start(
    posted: tuple[str, list[dict[str, Any]], Any],
) -> None:
    run_id, records, sessions = posted
    with sessions() as s:
        grid = performance.step_grid(s, run_id, "time", columns=40)
    start = min(r["start"] for r in records if r["kind"] == "step")
    assert grid.plan.origin == start
    assert same(grid_cells(grid), brute(records, "time", start, grid.plan.width))
    assert len({c.bucket for c in grid.cells}) <= 41


def test_the_grid_is_bounded_however_long_the_run() -> None:
    spans = [performance.reads.RankSpan(r, 1_000_000, 1_000_063, 0.0, 400_000.0) for r in range(8)]
    for axis in ("step", "time"):
        plan = performance.grid_plan(spans, axis)  # type: ignore[arg-type]
        assert plan.level == 64
        top = 1_000_063 if axis == "step" else 400_000.0
        assert top / plan.width <= performance.COLUMNS
    assert performance.grid_plan(spans[:1], "step", raw_steps=2_000_000).level == 1


def test_recompiles_with_their_reason_and_the_count_the_receipt_gives(
    posted: tuple[str, list[dict[str, Any]], Any], client: Any
) -> None:
    run_id, _, sessions = posted
    with sessions() as s:
        got = performance.recompiles(s, run_id)
    assert got.observed == 1 and [r.reason for r in got.rows] == [GUARD]
    assert got.rows[0].step == 5 and got.rows[0].observed == "recompile 0/1"
    receipt = client.get(f"/api/v1/runs/{run_id}/receipt").json()
    assert got.counted == receipt["summary"]["throughput"]["recompiles"] == 3


def test_mfu_without_a_peak_says_why() -> None:
    assert performance.peak_note({"peak_flops_per_s": 989e12}) is None
    note = performance.peak_note({"device": "cpu", "peak_flops_per_s": None})
    assert note is not None and "cpu" in note and "peak" in note


@pytest.mark.parametrize("page", ["goodput", "performance"])
def test_the_pages_data_refuse_bad_input_with_a_4xx_naming_it(client: Any, page: str) -> None:
    run_id = "perf-" + uuid.uuid4().hex[:10]
    assert client.post("/api/v1/ingest", json={"records": f.full_run(run_id)}).status_code == 200
    r = client.get(f"/ui/data/runs/{run_id}/{page}", params={"x": "steps"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "x"
    r = client.get(f"/ui/data/runs/no-such-run/{page}")
    assert r.status_code == 404 and "no-such-run" in r.json()["detail"]
    r = client.get(f"/ui/data/runs/{run_id}/{page}", params={"x": "time"})
    assert r.status_code == 200 and set(r.json()["figures"])


@pytest.mark.parametrize("page", ["goodput", "performance"])
@pytest.mark.parametrize("what", ["run record only", "started, no step yet"])
def test_the_pages_data_of_a_run_without_steps_say_so(client: Any, page: str, what: str) -> None:
    run_id = "bare-" + uuid.uuid4().hex[:10]
    records = [f.run(run_id)] + ([f.attempt_start(run_id)] if what.startswith("started") else [])
    assert client.post("/api/v1/ingest", json={"records": records}).status_code == 200
    for x in ("step", "time"):
        r = client.get(f"/ui/data/runs/{run_id}/{page}", params={"x": x})
        assert r.status_code == 200, r.text
        figures = r.json()["figures"]
        notes = [
            a["text"] for fig in figures.values() for a in fig["layout"].get("annotations", [])
        ]
        assert any(n.startswith("no ") for n in notes), notes
