"""The service's goodput, through its real HTTP API, against the brute-force reference of
docs/ACCOUNTING.md (`accounting_reference.py`), on generated multi-rank timelines.

One uvicorn server per database (SQLite, then PostgreSQL when GOODPUT_TEST_POSTGRES_URL is
set); every example posts a fresh run in shuffled, partly repeated batches and compares the
whole run (and `?rank=` for each rank), three random windows and back-to-back rolling windows
with the reference, and checks that the rolling windows tile the whole run.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LiveServer, drop_postgres_schema, fresh_postgres_url, postgres_reachable
from tests.service.accounting_reference import Parts, Reference, account
from trainer_hooks.records import BADPUT_CATEGORIES

# Records in any order (docs/ACCOUNTING.md section 5). False: the run record and every
# attempt_start go first, in a batch of their own, and only the rest is shuffled.
SHUFFLE_EVERYTHING = True

TOL = 1e-6
G = 0.25  # the time grid: sums of multiples of 0.25 s are exact in binary floats
# Recent enough that a heartbeat with a 1-day interval is never stalled (6 days), old enough
# that one with a 5 s interval always is; hour-aligned so that times stay on the grid.
BASE = float(int(time.time()) // 3600 * 3600 - 2 * 86_400)
NOT_STALLED_S, STALLED_S = 86_400.0, 5.0
CATEGORIES = (
    "startup",
    "compile",
    "eval",
    "data_stall",
    "checkpoint_save",
    "checkpoint_restore",
    "profiling",
    "observability",
    "custom:x",
    "custom:y",
)


# ---- the server, once per database -------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from service.store.migrate import upgrade

    schema = None
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('acct') / 'goodput.db'}"
    else:
        if not os.environ.get("GOODPUT_TEST_POSTGRES_URL"):
            pytest.skip("GOODPUT_TEST_POSTGRES_URL is not set")
        if not postgres_reachable():
            pytest.skip("PostgreSQL at GOODPUT_TEST_POSTGRES_URL is not reachable")
        url, schema = fresh_postgres_url()
    upgrade(url)
    live = LiveServer(url)
    live.start()
    try:
        yield live.base
    finally:
        live.stop()
        if schema is not None:
            drop_postgres_schema(schema)


HTTP = httpx.Client(timeout=60)  # one connection pool: a new client per call costs 30 ms


def post(base: str, records: list[dict[str, Any]]) -> None:
    r = HTTP.post(f"{base}/api/v1/ingest", json={"records": records})
    assert r.status_code == 200, r.text


def goodput(base: str, run_id: str, path: str = "goodput", **params: Any) -> dict[str, Any]:
    r = HTTP.get(f"{base}/api/v1/runs/{run_id}/{path}", params=params)
    assert r.status_code == 200, f"{path} {params}: HTTP {r.status_code} {r.text[:300]}"
    return r.json()


# ---- comparing ---------------------------------------------------------------------------


def near(a: float, b: float) -> bool:
    return abs(a - b) <= TOL


def zeros() -> dict[str, Any]:
    return {"total_s": 0.0, "goodput_s": 0.0, "badput_s": {}, "other_s": 0.0}


def parts_errors(label: str, got: dict[str, Any] | None, want: Parts) -> list[str]:
    """Differences between a response's parts (None: absent, read as zeros) and the
    reference's, and the invariants every response keeps."""
    got = zeros() if got is None else got
    errs = []
    for key in ("total_s", "goodput_s", "other_s"):
        if not near(got[key], getattr(want, key)):
            errs.append(f"{label}: {key} {got[key]:g} != reference {getattr(want, key):g}")
    for cat in sorted(set(got["badput_s"]) | set(want.badput_s)):
        g, w = got["badput_s"].get(cat, 0.0), want.badput_s.get(cat, 0.0)
        if not near(g, w):
            errs.append(f"{label}: {cat} {g:g} != reference {w:g}")
    for key in ("steps", "tokens"):
        if key in got and got[key] != getattr(want, key):
            errs.append(f"{label}: {key} {got[key]} != reference {getattr(want, key)}")
    return errs + invariant_errors(label, got)


def invariant_errors(label: str, got: dict[str, Any]) -> list[str]:
    errs = []
    if got["badput_s"]:  # a response (not an absent rank) lists every category
        missing = [c for c in BADPUT_CATEGORIES if c not in got["badput_s"]]
        if missing:
            errs.append(f"{label}: badput_s lacks {missing}")
    negative = {k: v for k, v in got["badput_s"].items() if v < -TOL}
    if got["goodput_s"] < -TOL or got["total_s"] < -TOL or negative:
        errs.append(f"{label}: negative part: goodput {got['goodput_s']:g}, {negative}")
    total = got["goodput_s"] + sum(got["badput_s"].values()) + got["other_s"]
    if not near(total, got["total_s"]):
        errs.append(f"{label}: parts add up to {total:g}, total_s is {got['total_s']:g}")
    return errs


def ranks_errors(label: str, got: list[dict[str, Any]], want: dict[int, Parts]) -> list[str]:
    """The response's `ranks` list against the reference's figures of every rank."""
    by_rank = {r["rank"]: r for r in got}
    errs = []
    for r, parts in want.items():
        errs += parts_errors(f"{label} ranks[{r}]", by_rank.get(r), parts)
    if set(by_rank) - set(want):
        errs.append(f"{label}: ranks {sorted(set(by_rank) - set(want))} not in the reference")
    return errs


def tiling_errors(label: str, windows: list[dict[str, Any]], whole: dict[str, Any]) -> list[str]:
    """The windows' parts, summed, against the whole run's (both from the service)."""
    total = zeros()
    for w in windows:
        for key in ("total_s", "goodput_s", "other_s"):
            total[key] += w[key]
        for cat, v in w["badput_s"].items():
            total["badput_s"][cat] = total["badput_s"].get(cat, 0.0) + v
    errs = []
    for key in ("total_s", "goodput_s", "other_s"):
        if not near(total[key], whole[key]):
            errs.append(f"{label}: windows' {key} sum to {total[key]:g}, whole {whole[key]:g}")
    for cat in sorted(set(total["badput_s"]) | set(whole["badput_s"])):
        a, b = total["badput_s"].get(cat, 0.0), whole["badput_s"].get(cat, 0.0)
        if not near(a, b):
            errs.append(f"{label}: windows' {cat} sum to {a:g}, whole {b:g}")
    return errs


def disruption_errors(got: list[dict[str, Any]], ref: Reference) -> list[str]:
    have = sorted((d["attempt"], d["cause"], d["wasted_steps"], d["time"]) for d in got)
    want = [(d.attempt, d.cause, d.wasted_steps, d.time) for d in ref.disruptions()]
    if [d[0] for d in have] != [d[0] for d in want]:
        return [f"whole: disruptions {have} != reference {want}"]
    errs = []
    for h, w in zip(have, want, strict=True):
        stalled = "stalled: no heartbeat for "  # N s: depends on the query time
        cause_ok = h[1] == w[1] or (h[1].startswith(stalled) and w[1].startswith(stalled))
        if not (cause_ok and h[2] == w[2] and (w[3] is None or near(h[3], w[3]))):
            errs.append(f"whole: disruption {h} != reference {w}")
    return errs


def check_whole(base: str, run_id: str, ref: Reference) -> list[str]:
    """GET /goodput and /goodput?rank= for every rank; disruptions."""
    g = goodput(base, run_id)
    want = ref.account()
    errs = parts_errors("whole", g, want.run)
    if g["rank"] != want.rank:
        errs.append(f"whole: rank {g['rank']} != reference's slowest rank {want.rank}")
    errs += ranks_errors("whole", g["ranks"], want.ranks)
    for r, parts in want.ranks.items():
        errs += parts_errors(f"whole ?rank={r}", goodput(base, run_id, rank=r), parts)
    return errs + disruption_errors(g["disruptions"], ref)


def check_window(base: str, run_id: str, ref: Reference, lo: float, hi: float) -> list[str]:
    """GET /goodput?start=&end=: the slowest rank's share of the window, and every rank's."""
    g = goodput(base, run_id, start=lo, end=hi)
    want = ref.account((lo, hi))
    label = f"window [{lo - BASE:g}, {hi - BASE:g}]"
    errs = parts_errors(label, g, want.run)
    if g["rank"] != want.rank:
        errs.append(f"{label}: rank {g['rank']} != the whole run's slowest rank {want.rank}")
    return errs + ranks_errors(label, g["ranks"], want.ranks)


def check_rolling(base: str, run_id: str, ref: Reference, window_s: float) -> list[str]:
    """/goodput/rolling, for the run and with ?rank= for every rank: back-to-back windows
    from the run's first start, each as the reference says, summing to the whole run."""
    whole = goodput(base, run_id)
    extent = ref.account().extent
    assert extent is not None
    errs = []
    for rank in [None, *ref.ranks]:
        label = f"rolling window_s={window_s:g}" + ("" if rank is None else f" ?rank={rank}")
        params: dict[str, Any] = {"window_s": window_s}
        if rank is not None:
            params["rank"] = rank
        windows = goodput(base, run_id, "goodput/rolling", **params)["windows"]
        if rank is None:
            if not windows:
                errs.append(f"{label}: no windows")
                continue
            if not near(windows[0]["start"], extent[0]):
                errs.append(
                    f"{label}: first window starts at {windows[0]['start'] - BASE:g}, "
                    f"the run at {extent[0] - BASE:g}"
                )
            for a, b in zip(windows, windows[1:], strict=False):
                if not near(a["end"], b["start"]) or not near(a["end"] - a["start"], window_s):
                    errs.append(f"{label}: windows not back to back at {a['end'] - BASE:g}")
            if windows[-1]["end"] < extent[1] - TOL:
                errs.append(
                    f"{label}: windows end at {windows[-1]['end'] - BASE:g}, "
                    f"before the run's end {extent[1] - BASE:g}"
                )
        for w in windows:
            wl = f"{label} [{w['start'] - BASE:g}, {w['end'] - BASE:g}]"
            errs += parts_errors(wl, w, ref.account((w["start"], w["end"]), rank).run)
            want_rank = ref.slowest if rank is None else rank
            if w["rank"] != want_rank:
                errs.append(f"{wl}: rank {w['rank']} != {want_rank}")
        mine = whole if rank is None else next(x for x in whole["ranks"] if x["rank"] == rank)
        errs += tiling_errors(label, windows, mine)
    return errs


# ---- generated timelines -----------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """What the generator may put in a timeline (scripts narrow it down to find the rule
    that differs)."""

    max_ranks: int = 3
    max_attempts: int = 3
    max_steps: int = 8  # per rank of an attempt
    blocking_spans: bool = True
    overlapped_spans: bool = True
    categories: tuple[str, ...] = CATEGORIES
    checkpoints: bool = True
    heartbeats: bool = True
    intervals: tuple[float | None, ...] = (None, NOT_STALLED_S, STALLED_S, STALLED_S)
    end_records: tuple[str, ...] = ("completed", "failed", "none")
    hooks: bool = True
    excluded_windows: bool = True


@dataclass
class Timeline:
    records: list[dict[str, Any]]  # run_id "RUN", replaced by a fresh one when posted
    batches: list[list[int]]  # indexes into records, in the order they are sent
    windows: list[tuple[float, float]]
    window_s: float

    def __repr__(self) -> str:  # times as offsets from BASE, one record a line
        def show(rec: dict[str, Any]) -> str:
            fields = []
            for k, v in rec.items():
                if k in ("run_id", "kind", "name", "created_at", "tokens", "world_size"):
                    continue
                fields.append(f"{k}={v - BASE:g}" if k in ("start", "end", "time") else f"{k}={v}")
            return f"  {rec['kind']}(" + ", ".join(fields) + ")"

        lines = [show(r) for r in self.records if r["kind"] != "run"]
        wins = ", ".join(f"[{lo - BASE:g}, {hi - BASE:g}]" for lo, hi in self.windows)
        return (
            "Timeline(\n" + "\n".join(lines) + f"\n  windows {wins}; window_s={self.window_s:g}"
            f"; batches {self.batches})"
        )

    def send(self, base: str) -> tuple[str, list[dict[str, Any]]]:
        run_id = "acct-" + uuid.uuid4().hex[:16]
        records = [{**r, "run_id": run_id} for r in self.records]
        for batch in self.batches:
            post(base, [records[i] for i in batch])
        return run_id, records


def grid(draw: Any, lo: int, hi: int) -> float:
    return float(draw(st.integers(lo, hi)) * G)


@st.composite
def timelines(draw: Any, f: Features = Features()) -> Timeline:  # noqa: B008
    recs: list[dict[str, Any]] = []
    spans_seen: set[tuple[int, int, str, float]] = set()

    def add(kind: str, attempt: int, rank: int, **kw: Any) -> None:
        recs.append({"kind": kind, "run_id": "RUN", "attempt": attempt, "rank": rank, **kw})

    def span(attempt: int, rank: int, lo: float, hi: float, overlapped: bool = False) -> float:
        cat = draw(st.sampled_from(f.categories))
        if (attempt, rank, cat, lo) not in spans_seen:  # natural key: one span each
            spans_seen.add((attempt, rank, cat, lo))
            add("span", attempt, rank, category=cat, start=lo, end=hi, overlapped=overlapped)
        return hi

    n_ranks = draw(st.integers(1, f.max_ranks))
    t_attempt = BASE + grid(draw, 0, 4)
    resume = 0  # the step number an attempt may resume at, at most
    for a in range(draw(st.integers(1, f.max_attempts))):
        first = draw(st.integers(0, resume))
        silent = draw(st.integers(0, 2)) == 0  # no rank sends an end record: running, stalled
        ends = []  # or restarted
        interval = draw(st.sampled_from(f.intervals))  # the heartbeats' declared interval
        for r in range(n_ranks):
            t0 = t_attempt + grid(draw, 0, 2)  # ranks start apart
            add("attempt_start", a, r, start=t0, world_size=n_ranks)
            last = t = t0  # t: where the next step may start; last: the latest record
            if f.blocking_spans and draw(st.booleans()):
                t = last = span(a, r, t, t + grid(draw, 1, 8))
            for i in range(draw(st.integers(0, f.max_steps))):
                gap = grid(draw, 0, 6)
                if f.blocking_spans and gap and draw(st.booleans()):  # between steps
                    lo = t + grid(draw, 0, int(gap / G))
                    last = max(last, span(a, r, lo, lo + grid(draw, 0, 8)))
                s = t + gap
                e = s + grid(draw, 1, 12)
                step = {"step": first + i, "start": s, "end": e, "tokens": 100}
                hook = draw(st.sampled_from([None, None, None, 0.25, 0.5, 2.0]))
                if f.hooks and hook is not None:
                    step["hook_overhead_s"] = hook
                add("step", a, r, **step)
                last = max(last, e)
                for _ in range(draw(st.integers(0, 2))):  # spans in, around or across it
                    overlapped = draw(st.booleans())
                    if (f.overlapped_spans and overlapped) or (f.blocking_spans and not overlapped):
                        lo = max(t0, s + grid(draw, -2, int((e - s) / G)))
                        last = max(last, span(a, r, lo, lo + grid(draw, 0, 8), overlapped))
                if f.checkpoints and draw(st.integers(0, 3)) == 0:
                    at = e + grid(draw, 0, 2)
                    add("checkpoint", a, r, step=first + i, time=at, ok=draw(st.booleans()))
                    last = max(last, at)
                t = max(e, last if draw(st.booleans()) else e)  # steps never overlap
            if draw(st.integers(0, 3)) == 0:  # now and then, ranks declare different ones
                interval = draw(st.sampled_from(f.intervals))
            for _ in range(draw(st.integers(0, 2)) if f.heartbeats else 0):
                at = last + grid(draw, 0, 6)
                extra = {} if interval is None else {"interval_s": interval}
                add("heartbeat", a, r, time=at, **extra)
                last = max(last, at)
            how = "none" if silent else draw(st.sampled_from(f.end_records))
            if how != "none":
                end = last + grid(draw, 0, 6)  # never before a record of the attempt
                cause = None if how == "completed" else draw(st.sampled_from(["oom", "NCCL"]))
                add("attempt_end", a, r, end=end, status=how, cause=cause)
                last = end
            ends.append(last)
        resume = first + 9
        t_attempt = max(ends) + grid(draw, 0, 24)  # the recovery gap before the next attempt
    units = max(1, int((t_attempt - BASE) / G))
    for _ in range(draw(st.sampled_from([0, 1, 2])) if f.excluded_windows else 0):
        lo = BASE + grid(draw, -4, units)
        recs.append(
            {"kind": "excluded_window", "run_id": "RUN", "start": lo, "end": lo + grid(draw, 1, 24)}
        )
    recs.insert(0, {"kind": "run", "run_id": "RUN", "name": "acct", "created_at": BASE})

    windows = []
    for _ in range(3):
        lo = BASE + grid(draw, -8, units + 8)
        windows.append((lo, lo + grid(draw, 1, units + 16)))
    window_s = max(G, math.ceil(units / draw(st.integers(1, 12))) * G) + grid(draw, 0, 3)

    rnd = random.Random(draw(st.integers(0, 2**32)))
    order = list(range(len(recs)))
    head = (
        []
        if SHUFFLE_EVERYTHING
        else [i for i in order if recs[i]["kind"] in ("run", "attempt_start")]
    )
    rest = [i for i in order if i not in head]
    rnd.shuffle(rest)
    cuts = sorted(rnd.sample(range(1, len(rest)), min(len(rest) - 1, draw(st.integers(0, 3)))))
    batches = [head] if head else []
    batches += [rest[i:j] for i, j in zip([0, *cuts], [*cuts, len(rest)], strict=True)]
    for b in list(batches):  # idempotent ingest: some batches again, later
        if draw(st.integers(0, 3)) == 0:
            batches.append(b)
    return Timeline(recs, batches, windows, window_s)


PROPERTY_SETTINGS = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_none(errs: list[str], tl: Timeline) -> None:
    """No difference; else the differences and the (shrunk) timeline, times from BASE."""
    head = f"{len(errs)} differences from the reference:\n"
    assert not errs, head + "\n".join(errs[:30]) + f"\nin {tl!r}"


@pytest.mark.timeout(900)  # shrinking a failure takes minutes; passing takes seconds
@PROPERTY_SETTINGS
@given(tl=timelines())
def test_whole_run_as_the_reference(server: str, tl: Timeline) -> None:
    run_id, records = tl.send(server)
    assert_none(check_whole(server, run_id, Reference(records, time.time())), tl)


@pytest.mark.timeout(900)
@PROPERTY_SETTINGS
@given(tl=timelines())
def test_windows_as_the_reference(server: str, tl: Timeline) -> None:
    run_id, records = tl.send(server)
    ref = Reference(records, time.time())
    errs = [e for lo, hi in tl.windows for e in check_window(server, run_id, ref, lo, hi)]
    assert_none(errs, tl)


@pytest.mark.timeout(900)
@PROPERTY_SETTINGS
@given(tl=timelines())
def test_rolling_windows_tile_the_run_as_the_reference(server: str, tl: Timeline) -> None:
    run_id, records = tl.send(server)
    assert_none(check_rolling(server, run_id, Reference(records, time.time()), tl.window_s), tl)


# ---- the worked examples, with exact numbers ---------------------------------------------

T0 = 1_700_000_000.0


def _run(run_id: str, *recs: dict[str, Any]) -> list[dict[str, Any]]:
    out = [{"kind": "run", "run_id": run_id, "name": "worked", "created_at": T0}]
    for rec in recs:
        out.append({"run_id": run_id, **rec})
    return out


def start(t: float, attempt: int = 0, rank: int = 0) -> dict[str, Any]:
    return {"kind": "attempt_start", "start": T0 + t, "attempt": attempt, "rank": rank}


def end(
    t: float, status: str, cause: str | None = None, attempt: int = 0, rank: int = 0
) -> dict[str, Any]:
    return {
        "kind": "attempt_end",
        "end": T0 + t,
        "status": status,
        "cause": cause,
        "attempt": attempt,
        "rank": rank,
    }


def step_(n: int, a: float, b: float, attempt: int = 0, rank: int = 0) -> dict[str, Any]:
    return {
        "kind": "step",
        "step": n,
        "start": T0 + a,
        "end": T0 + b,
        "attempt": attempt,
        "rank": rank,
    }


def ckpt(n: int, t: float, attempt: int = 0, rank: int = 0) -> dict[str, Any]:
    return {
        "kind": "checkpoint",
        "step": n,
        "time": T0 + t,
        "ok": True,
        "attempt": attempt,
        "rank": rank,
    }


def span_(cat: str, a: float, b: float, attempt: int = 0, rank: int = 0) -> dict[str, Any]:
    return {
        "kind": "span",
        "category": cat,
        "start": T0 + a,
        "end": T0 + b,
        "attempt": attempt,
        "rank": rank,
    }


def expect(
    got: dict[str, Any], total: float, goodput: float = 0.0, other: float = 0.0, **badput: float
) -> None:
    want = {"total_s": total, "goodput_s": goodput, "other_s": other}
    assert {k: round(got[k], 6) for k in want} == want, got
    bad = {k: round(v, 6) for k, v in got["badput_s"].items() if abs(v) > TOL}
    assert bad == badput, got["badput_s"]
    assert not invariant_errors("", got)


def test_worked_a_failed_attempt_then_a_restart(server: str) -> None:
    rid = "worked-a-" + uuid.uuid4().hex[:8]
    recs = _run(
        rid,
        start(0),
        step_(0, 1, 2),
        ckpt(0, 2),
        end(3, "failed", "oom"),
        start(10, attempt=1),
        step_(1, 10, 12, attempt=1),
        end(12, "completed", attempt=1),
    )
    post(server, recs)
    numbers = [
        ((0, 6), dict(total=6, goodput=1, other=1, wasted_progress=1, infra_recovery=3)),
        ((4, 9), dict(total=5, infra_recovery=5)),
        (None, dict(total=12, goodput=3, other=1, wasted_progress=1, infra_recovery=7)),
    ]
    for window, want in numbers:  # the reference first, then the service
        lo_hi = None if window is None else (T0 + window[0], T0 + window[1])
        expect(vars(account(recs, time.time(), lo_hi).run), **want)
        params = {} if lo_hi is None else {"start": lo_hi[0], "end": lo_hi[1]}
        expect(goodput(server, rid, **params), **want)  # type: ignore[arg-type]
    g = goodput(server, rid)
    assert [(d["attempt"], d["cause"], d["wasted_steps"]) for d in g["disruptions"]] == [
        (0, "oom", 0)
    ]
    assert g["disruptions"][0]["time"] == pytest.approx(T0 + 3)


def test_worked_b_overlapping_blocking_spans_charge_their_union_once(server: str) -> None:
    rid = "worked-b-" + uuid.uuid4().hex[:8]
    recs = _run(
        rid,
        start(0),
        step_(0, 1, 2),
        span_("data_stall", 1, 2),
        span_("custom:x", 1, 2),
        end(3, "completed"),
    )
    post(server, recs)
    expect(vars(account(recs, time.time()).run), total=3, goodput=0, other=2, data_stall=1)
    g = goodput(server, rid)
    expect(g, total=3, goodput=0, other=2, data_stall=1)
    assert g["badput_s"].get("custom:x", 0.0) == 0.0


def test_worked_c_a_rank_without_end_record_fails_with_its_attempt(server: str) -> None:
    rid = "worked-c-" + uuid.uuid4().hex[:8]
    recs = _run(
        rid,
        start(0, rank=0),
        step_(0, 1, 2, rank=0),
        end(3, "failed", "NCCL timeout", rank=0),
        start(0, rank=1),
        step_(0, 1, 2, rank=1),
        {"kind": "heartbeat", "time": T0 + 3.5, "attempt": 0, "rank": 1},
    )
    post(server, recs)
    # Rank 1: L = 3.5 (its last heartbeat) dates its end; its last progress P is 2 (the step),
    # so [2, 3.5] is the partial step at the crash (rule 4): wasted, with the step itself.
    ref = account(recs, time.time())
    assert ref.rank == 1 and ref.status[0] == ("failed", "NCCL timeout")
    expect(vars(ref.ranks[0]), total=3, other=1, wasted_progress=2)
    expect(vars(ref.ranks[1]), total=3.5, other=1, wasted_progress=2.5)
    g = goodput(server, rid)
    assert g["rank"] == 1  # the slowest: 3.5 s against 3 s
    expect(g, total=3.5, other=1, wasted_progress=2.5)
    expect(goodput(server, rid, rank=0), total=3, other=1, wasted_progress=2)
    expect(goodput(server, rid, rank=1), total=3.5, other=1, wasted_progress=2.5)
    assert [(d["attempt"], d["cause"], d["wasted_steps"]) for d in g["disruptions"]] == [
        (0, "NCCL timeout", 1)
    ]
    assert g["disruptions"][0]["time"] == pytest.approx(T0 + 3.5)


def test_worked_d_the_partial_step_starts_at_the_last_progress(server: str) -> None:
    rid = "worked-d-" + uuid.uuid4().hex[:8]
    recs = _run(rid, start(0), step_(0, 1, 2), ckpt(0, 2.5), end(3, "failed", "oom"))
    post(server, recs)
    want = dict(total=3, goodput=1, other=1.5, wasted_progress=0.5)
    expect(vars(account(recs, time.time()).run), **want)
    expect(goodput(server, rid), **want)
    expect(goodput(server, rid, start=T0 + 2, end=T0 + 3), total=1, other=0.5, wasted_progress=0.5)

    # Without an end record, and nothing after it: running, ending at its last sign of life.
    rid = "worked-d2-" + uuid.uuid4().hex[:8]
    recs = _run(rid, start(0), step_(0, 1, 2), ckpt(0, 2.5))
    post(server, recs)
    expect(vars(account(recs, time.time()).run), total=2.5, goodput=1, other=1.5)
    expect(goodput(server, rid), total=2.5, goodput=1, other=1.5)

    # Without an end record but restarted at 5: failed at 2.5, then recovery until 5.
    rid = "worked-d3-" + uuid.uuid4().hex[:8]
    recs = _run(
        rid,
        start(0),
        step_(0, 1, 2),
        ckpt(0, 2.5),
        start(5, attempt=1),
        step_(1, 5, 6, attempt=1),
        end(6, "completed", attempt=1),
    )
    post(server, recs)
    want = dict(total=6, goodput=2, other=1.5, infra_recovery=2.5)
    expect(vars(account(recs, time.time()).run), **want)
    expect(goodput(server, rid), **want)
    expect(
        goodput(server, rid, start=T0, end=T0 + 3),
        total=3,
        goodput=1,
        other=1.5,
        infra_recovery=0.5,
    )
    g = goodput(server, rid)
    assert [(d["attempt"], d["cause"], d["wasted_steps"]) for d in g["disruptions"]] == [
        (0, "restarted (no end record)", 0)
    ]


def test_worked_the_slowest_rank_among_equal_totals_has_the_least_goodput(server: str) -> None:
    rid = "worked-tie-" + uuid.uuid4().hex[:8]
    recs = _run(
        rid,
        start(0, rank=0), step_(0, 1, 3, rank=0), end(4, "completed", rank=0),
        start(0, rank=1), step_(0, 1, 2, rank=1), end(4, "completed", rank=1),
        start(0, rank=2), step_(0, 1, 2, rank=2), end(4, "completed", rank=2),
    )  # fmt: skip
    post(server, recs)
    assert account(recs, time.time()).rank == 1
    g = goodput(server, rid)
    assert g["rank"] == 1  # totals 4, 4, 4; goodput 2, 1, 1: the lowest of ranks 1 and 2
    expect(g, total=4, goodput=1, other=3)
    w = goodput(server, rid, start=T0 + 2, end=T0 + 4)
    assert w["rank"] == 1  # kept for a window, where rank 0 has the most goodput
    expect(w, total=2, other=2)
