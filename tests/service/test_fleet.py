"""Per-run figures of the runs list and the trends (services/fleet.py), held to a brute-force
reference written from the module's definitions on the raw records of hand-built runs, on
both databases; the cache (recomputed when a run grows, only the routing blocks that
changed re-read); the list's new filters, on the API and the pages' data routes."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.services import fleet
from service.store import fleet as store_fleet
from service.store.db import session_scope
from tests import factories as f
from tests.service.accounting_reference import account

COARSE = 4096
PEAK = 2e12


def ingest(client: TestClient, records: list[dict[str, Any]]) -> None:
    for i in range(0, len(records), 2000):
        resp = client.post("/api/v1/ingest", json={"records": records[i : i + 2000]})
        assert resp.status_code == 200, resp.text


def figures(app: FastAPI, run_ids: list[str], cache: fleet.FleetCache) -> dict[str, Any]:
    with session_scope(app.state.sessionmaker) as session:
        return {k: v.as_dict() for k, v in cache.figures(session, run_ids).items()}


# -- hand-built runs --


def routing(rng: random.Random, run_id: str, step: int, layer: int, **kw: Any) -> dict[str, Any]:
    """A routing record with random counts: its slots add up to num_tokens * top_k."""
    experts, top_k, null_slot = 4, 2, rng.random() < 0.3
    slots = experts + (1 if null_slot else 0)
    tokens = rng.choice([0, 50, 100, 128])
    per = [0] * slots
    for _ in range(tokens * top_k):
        per[rng.randrange(slots)] += 1
    dropped = [rng.randint(0, c) if rng.random() < 0.5 else 0 for c in per]
    if null_slot:
        dropped[-1] = 0
    return f.routing(
        step,
        layer,
        run_id,
        num_tokens=tokens,
        top_k=top_k,
        null_slot=null_slot,
        tokens_per_expert=per,
        dropped_per_expert=dropped,
        **kw,
    )


def attempt(
    rng: random.Random,
    run_id: str,
    number: int,
    start: float,
    steps: list[int],
    ranks: tuple[int, ...],
    routing_ranks: tuple[int, ...],
    end_status: str | None,
) -> tuple[list[dict[str, Any]], float]:
    """One attempt on `ranks`: startup, steps (with data stalls, FLOPs, memory), routing of
    two layers on `routing_ranks`, a checkpoint, its end; returns the records and its end."""
    out: list[dict[str, Any]] = []
    last = start
    for rank in ranks:
        kw = {"attempt": number, "rank": rank}
        out.append(f.attempt_start(run_id, start, **kw))
        t = start + 1.0
        out.append(f.span("startup", start, t, run_id, **kw))
        for n in steps:
            if rng.random() < 0.2:
                out.append(f.span("data_stall", t, t + 0.1, run_id, step=n, **kw))
                t += 0.1
            dur = rng.uniform(0.5, 1.5)
            extra: dict[str, Any] = {"tokens": rng.randint(100, 1000)}
            if rng.random() < 0.8:
                extra["flops"] = rng.randint(10**11, 10**12)
            if rng.random() < 0.8:
                extra["mem_allocated_peak"] = rng.randint(1, 8) * 2**30
            out.append(f.step(n, run_id, start=t, dur=dur, **kw, **extra))
            if rank in routing_ranks:
                out += [routing(rng, run_id, n, layer, **kw) for layer in (0, 1)]
            t += dur + rng.uniform(0.0, 0.2)
        out.append(f.checkpoint(steps[len(steps) // 2], t, run_id, **kw))
        t += 0.5
        if end_status is not None:
            out.append(f.attempt_end(run_id, t, end_status, **kw))
        last = max(last, t)
    return out, last


def run_a(rng: random.Random, run_id: str = "fleet-a") -> list[dict[str, Any]]:
    """Two ranks, a failed attempt and a completed one, steps and routing over several
    coarse blocks, FLOPs with a device peak, memory."""
    records = [
        f.run(
            run_id,
            "Alpha run",
            project="p1",
            created_at=f.T0,
            model_plan=f.loop_plan("AEE"),
            runtime_policy=f.loop_policy(dispatch_requested="padded"),
            environment=f.loop_environment(peak_flops_per_s=PEAK),
        )
    ]
    first, end = attempt(rng, run_id, 0, f.T0, [0, 1, 2, 4094, 4095], (0, 1), (0, 1), "failed")
    second, _ = attempt(
        rng, run_id, 1, end + 5, [4094, 4095, 4096, 4097, 8300, 8301], (0, 1), (0, 1), "completed"
    )
    return records + first + second


def run_c(rng: random.Random, run_id: str = "fleet-c") -> list[dict[str, Any]]:
    """Steps on ranks 1 and 2 only, routing on rank 2 only, no device peak, still running."""
    records = [
        f.run(
            run_id,
            "Charlie 100%_x",
            project="p2",
            created_at=f.T0 + 86_400 * 3,
            runtime_policy=f.loop_policy(dispatch_requested="grouped"),
        )
    ]
    recs, _ = attempt(rng, run_id, 0, f.T0 + 50, [0, 1, 2, 3], (1, 2), (2,), None)
    return records + recs


# -- the reference, from the definitions (services/fleet.py) on the raw records --


def reference(records: list[dict[str, Any]], now: float, mfu_steps: int) -> dict[str, Any]:
    acc = account(records, now).run
    env = next(r for r in records if r["kind"] == "run").get("environment") or {}
    steps = [r for r in records if r["kind"] == "step"]
    ranks = sorted({s.get("rank", 0) for s in steps})
    busy = {r: sum(s["end"] - s["start"] for s in steps if s.get("rank", 0) == r) for r in ranks}
    tokens = {r: sum(s["tokens"] for s in steps if s.get("rank", 0) == r) for r in ranks}
    tokens_per_s = sum(tokens[r] / busy[r] for r in ranks) if ranks else None
    mfu = None
    if ranks and env.get("peak_flops_per_s"):
        ref = 0 if 0 in ranks else ranks[0]
        mine = sorted(
            (s for s in steps if s.get("rank", 0) == ref),
            key=lambda s: (s.get("attempt", 0), s["step"]),
        )[-mfu_steps:]
        rates = [
            s["flops"] / (s["end"] - s["start"]) / env["peak_flops_per_s"]
            for s in mine
            if s.get("flops")
        ]
        mfu = statistics.median(rates) if rates else None
    mems = [s["mem_allocated_peak"] for s in steps if s.get("mem_allocated_peak") is not None]
    rout = [r for r in records if r["kind"] == "routing"]
    rranks = sorted({r.get("rank", 0) for r in rout})
    drop_rate = max_vio = None
    if rranks:
        rr = 0 if 0 in rranks else rranks[0]
        mine = [r for r in rout if r.get("rank", 0) == rr]
        choices = sum(r["num_tokens"] * r["top_k"] for r in mine)
        dropped = sum(min(sum(r["dropped_per_expert"]), r["num_tokens"] * r["top_k"]) for r in mine)
        drop_rate = dropped / choices if choices else None
        vios = []
        for r in mine:
            routed = r["tokens_per_expert"][:-1] if r["null_slot"] else r["tokens_per_expert"]
            mean = sum(routed) / len(routed)
            if mean > 0:
                vios.append(max(routed) / mean - 1)
        max_vio = statistics.fmean(vios) if vios else None
    kinds = ("attempt_start", "attempt_end", "step", "span", "checkpoint", "routing")
    return {
        "goodput_fraction": acc.goodput_s / acc.total_s if acc.total_s > 0 else None,
        "total_s": acc.total_s,
        "goodput_s": acc.goodput_s,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory_bytes": max(mems) if mems else None,
        "drop_rate": drop_rate,
        "max_vio": max_vio,
        "routing_records": sum(1 for r in rout if r.get("rank", 0) == (rranks or [0])[0]),
        "attempts": len({r.get("attempt", 0) for r in records if r["kind"] in kinds}),
    }


def expect(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if v is None or isinstance(v, int):
            assert got[k] == v, (k, got[k], v)
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), (k, got[k], v)


@pytest.fixture
def small_mfu(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Few enough MFU steps that the newest-steps window cuts through attempts."""
    monkeypatch.setattr(fleet, "MFU_STEPS", 5)
    yield 5


def test_each_figure_matches_a_brute_force_reference_of_the_raw_records(
    app: FastAPI, client: TestClient, small_mfu: int
) -> None:
    rng = random.Random(7)
    a, c = run_a(rng), run_c(rng)
    b = [f.run("fleet-b", "bravo", created_at=f.T0 + 10)]
    for records in (a, b, c):
        ingest(client, records)
    got = figures(app, ["fleet-a", "fleet-b", "fleet-c"], fleet.FleetCache())
    now = time.time()
    expect(got["fleet-a"], reference(a, now, small_mfu))
    expect(got["fleet-c"], reference(c, now, small_mfu))
    assert got["fleet-a"]["pattern"] == "AEE" and got["fleet-a"]["lane"] == "padded"
    assert got["fleet-a"]["attempts"] == 2 and got["fleet-a"]["drop_rate"] > 0
    assert got["fleet-c"]["routing_records"] > 0 and got["fleet-c"]["mfu"] is None
    assert got["fleet-b"] == fleet.RunFigures("fleet-b", lane=None).as_dict() | {
        "badput_s": got["fleet-b"]["badput_s"]
    }
    assert got["fleet-b"]["goodput_fraction"] is None and got["fleet-b"]["attempts"] == 0


def test_a_growing_run_is_recomputed_reading_only_the_routing_blocks_that_changed(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch, small_mfu: int
) -> None:
    rng = random.Random(11)
    records = run_a(rng)
    # leave the completed attempt open, so that more of it can come
    records = [r for r in records if not (r["kind"] == "attempt_end" and r["attempt"] == 1)]
    ingest(client, records)
    reads: list[tuple[int, int, int]] = []
    whole_runs: list[str] = []
    real_sums, real_whole = store_fleet.routing_sums, fleet.accounting.whole_run

    def counting_sums(session: Any, run_id: str, rank: int, att: int, lo: int, hi: int) -> Any:
        reads.append((att, lo, hi))
        return real_sums(session, run_id, rank, att, lo, hi)

    def counting_whole(session: Any, run_id: str, *a: Any) -> Any:
        whole_runs.append(run_id)
        return real_whole(session, run_id, *a)

    monkeypatch.setattr(store_fleet, "routing_sums", counting_sums)
    monkeypatch.setattr(fleet.accounting, "whole_run", counting_whole)
    cache = fleet.FleetCache()
    figures(app, ["fleet-a"], cache)
    # every block once: each attempt's blocks but its newest in one scan, the newest apart
    assert sorted(reads) == [(0, 0, 0), (1, 0, 1), (1, 2, 2)]

    reads.clear()
    whole_runs.clear()
    again = figures(app, ["fleet-a"], cache)
    assert reads == [] and whole_runs == []  # nothing changed: nothing read again

    t = max(r.get("end", r.get("time", 0.0)) for r in records if r.get("attempt") == 1) + 1
    more = [
        f.step(8302, "fleet-a", start=t, dur=1.0, attempt=1, flops=5 * 10**11, tokens=300),
        routing(rng, "fleet-a", 8302, 0, attempt=1),
        routing(rng, "fleet-a", 8302, 1, attempt=1),
    ]
    more[1]["dropped_per_expert"] = [0] * len(more[1]["tokens_per_expert"])
    ingest(client, more)
    reads.clear()
    grown = figures(app, ["fleet-a"], cache)
    assert reads == [(1, 2, 2)]  # only the block that grew
    assert grown != again
    expect(grown["fleet-a"], reference(records + more, time.time(), small_mfu))

    late = [routing(rng, "fleet-a", 4098, 1, attempt=1)]  # late, for an old block
    ingest(client, late)
    reads.clear()
    after = figures(app, ["fleet-a"], cache)
    assert sorted(reads) == [(1, 0, 1), (1, 2, 2)]  # the attempt summed again, no other
    expect(after["fleet-a"], reference(records + more + late, time.time(), small_mfu))


# -- the list's filters --


def names(client: TestClient, **params: Any) -> list[str]:
    resp = client.get("/api/v1/runs", params=params)
    assert resp.status_code == 200, resp.text
    return sorted(r["name"] for r in resp.json()["runs"])


def test_the_api_filters_runs_by_name_substring_lane_and_creation_time(
    client: TestClient,
) -> None:
    rng = random.Random(3)
    ingest(client, run_a(rng) + run_c(rng))
    ingest(client, [f.run("fleet-d", "delta 100%", created_at=f.T0 + 86_400)])
    assert names(client, name_contains="ALPHA") == ["Alpha run"]
    assert names(client, name_contains="100%") == ["Charlie 100%_x", "delta 100%"]
    assert names(client, name_contains="100%_") == ["Charlie 100%_x"]  # % and _ literal
    assert names(client, name_contains="%") == ["Charlie 100%_x", "delta 100%"]
    assert names(client, lane="grouped") == ["Charlie 100%_x"]
    assert names(client, lane="padded", project="p1") == ["Alpha run"]
    assert names(client, created_from=f.T0 + 86_400) == ["Charlie 100%_x", "delta 100%"]
    assert names(client, created_to=f.T0 + 86_400) == ["Alpha run"]  # before, not at
    assert names(client, created_from=f.T0 + 1, created_to=f.T0 + 86_401) == ["delta 100%"]
    assert names(client, created_from=f.T0 + 10, created_to=f.T0 + 5) == []  # an empty range


def test_the_page_filters_parse_dates_as_inclusive_utc_days() -> None:
    flt = fleet.RunFilter.parse({"name": " al ", "status": "", "from": "2026-09-21", "to": ""})
    assert flt.params() == {"name": "al", "from": "2026-09-21"}
    q = fleet.RunFilter.parse({"from": "2026-09-21", "to": "2026-09-21"}).query()
    assert q["created_from"] == 1_789_948_800.0  # 2026-09-21T00:00:00Z
    assert q["created_to"] == q["created_from"] + 86_400
    assert not fleet.RunFilter.parse({}).active


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"status": "finished"}, "status"),
        ({"from": "21/09/2026"}, "from"),
        ({"to": "2026-02-30"}, "to"),
        ({"from": "2026-09-21", "to": "2026-09-20"}, "to"),
    ],
)
def test_a_bad_filter_names_its_field(raw: dict[str, str], field: str) -> None:
    with pytest.raises(fleet.Invalid) as err:
        fleet.RunFilter.parse(raw)
    assert err.value.errors[0]["loc"] == ["query", field]


def test_the_pages_data_routes_answer_bad_filters_with_a_422_naming_the_field(
    client: TestClient,
) -> None:
    resp = client.get("/ui/data/runs", params={"status": "finished"})
    assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "status"
    resp = client.get("/", params={"from": "soon"}, headers={"Accept": "text/html"})
    assert resp.status_code == 422 and "from" in resp.text
    assert resp.headers["content-type"].startswith("text/html")
    resp = client.get("/ui/data/trends", params={"lane": "x" * 201})
    assert resp.status_code == 422 and resp.json()["detail"][0]["field"] == "lane"
    resp = client.get("/", params={"cursor": "bm90LW91cnM"}, headers={"Accept": "text/html"})
    assert resp.status_code == 422 and "cursor" in resp.text
    resp = client.get("/runs", params={"lane": "grouped"}, follow_redirects=False)
    assert resp.status_code == 307 and resp.headers["location"] == "/?lane=grouped"


def test_the_pages_suggest_the_stored_projects_patterns_lanes_and_tags(
    client: TestClient,
) -> None:
    home = client.get("/", headers={"Accept": "text/html"})
    assert home.status_code == 200 and "No runs yet" in home.text
    rng = random.Random(9)
    ingest(client, run_a(rng) + run_c(rng) + [f.run("fleet-t", "t", tags=["nightly"])])
    for path in ("/", "/trends"):
        page = client.get(path, headers={"Accept": "text/html"})
        assert page.status_code == 200
        for value in ("p1", "p2", "AEE", "padded", "grouped"):
            assert f'<option value="{value}">' in page.text, (path, value)
    assert '<option value="nightly">' in client.get("/").text
    assert 'id="no-runs" class="empty" hidden' in client.get("/").text


def test_the_runs_data_lists_figures_and_follows_live_runs(client: TestClient) -> None:
    empty = client.get("/ui/data/runs").json()
    assert empty["any_runs"] is False and empty["live"] is True  # waits for a first run
    assert client.get("/ui/data/trends").json()["any_runs"] is False
    rng = random.Random(5)
    ingest(client, run_a(rng) + run_c(rng))
    body = client.get("/ui/data/runs").json()
    table = body["tables"]["runs"]
    assert table["select"] == ["fleet-c", "fleet-a"]  # newest first
    assert body["live"] is True  # fleet-c is still running
    assert body["names"]["fleet-a"] == "Alpha run"
    only_a = client.get("/ui/data/runs", params={"lane": "padded"}).json()
    assert only_a["live"] is False and only_a["ended"]
    none = client.get("/ui/data/runs", params={"tag": "nope"}).json()["tables"]["runs"]
    assert none["rows"] == [] and "No runs match" in none["empty"]
    trends = client.get("/ui/data/trends", params={"project": "p2"}).json()
    assert trends["matched"] == 1 and trends["figures"]["drop_rate"]["data"]
    nothing = client.get("/ui/data/trends", params={"project": "p9"}).json()
    assert nothing["matched"] == 0 and nothing["texts"]["trend-note"].startswith("No runs match")
