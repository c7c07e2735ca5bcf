"""Property tests of the wire contract (issue 12), on SQLite and PostgreSQL: whatever the
contract's schema accepts, POST /api/v1/ingest and the ml-goodput import answer 200 or a 4xx
whose `detail` names the field, record or log entry, never a 5xx. After a 200 every record
sent reads back through the API as it was sent (and, for the kinds no route shows, the API
reports it stored: sent again, in any order, every record is a duplicate); after a 4xx
nothing of the body is stored.

The values are hostile but valid: integers and floats at the bounds the schema states,
subnormal and negative-zero floats, text of astral characters (raw UTF-8 or surrogate-pair
escapes), right-to-left marks, line separators and empty strings, the deepest JSON the
contract takes, JSON members named twice (the last one counts, as every JSON parser here
reads them), the longest run id, records in any order, sent twice in a batch, split over two
batches and sent again, of runs and attempts never declared; a NUL where the contract allows
one (an import entry nobody reads). Other batches carry what the contract refuses: a NUL in
a text, a date past the server's clock, a natural key sent again with other content (in the
same batch, or after the first was stored): each must be refused whole, naming the record.

Hypothesis runs derandomized, without an example database: CI draws the same examples (its
dates relative to the clock). What these properties found is kept as plain tests at the end.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.importers.mgm import run_id_of
from trainer_hooks.records import (
    BADPUT_CATEGORIES,
    MAX_COUNT,
    MAX_JSON_DEPTH,
    MAX_RANK,
    MAX_SLOTS,
    MAX_STEP_TOKENS,
)

INGEST = "/api/v1/ingest"
IMPORT = "/api/v1/import/ml-goodput"
MIN_EPOCH, MAX_EPOCH = 946_684_800.0, 7_258_118_400.0
PAST = time.time() - 2 * 86_400  # every date drawn is before it, but the deliberate future one
SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
INGEST_EXAMPLES = 40  # valid batches, per database (and 8 of each kind refused): ~0.25 s each
IMPORT_EXAMPLES = 30
_unique = itertools.count()

# ---------------------------------------------------------------- values


def _chars(**kw: Any) -> st.SearchStrategy[str]:
    # UTF-8 codec: no lone surrogates (JSON in UTF-8 cannot carry them); astral planes in.
    return st.characters(codec="utf-8", exclude_characters="\x00", **kw)


HOSTILE = ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🤖" * 3, "\u202eevil", "=cmd|' /C calc'!A0", " ", "\n\t", '"\\', "é" * 2]
texts = st.one_of(st.sampled_from(HOSTILE), st.text(_chars(), max_size=8))
nonempty = st.one_of(st.sampled_from(HOSTILE), st.text(_chars(), min_size=1, max_size=8))
floats = st.one_of(
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1e300, -1e300, 2.0**53, 0.1]),
    st.floats(-1e300, 1e300, allow_nan=False),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)


def _nested(kids: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(kids, max_size=3) | st.dictionaries(texts, kids, max_size=3)


json_values = st.recursive(json_scalars, _nested, max_leaves=8)


def _deepest() -> dict[str, Any]:
    value: Any = "𝔡𝔢𝔢𝔭"
    for _ in range(MAX_JSON_DEPTH):
        value = {"d": value}
    return value


json_objects = st.one_of(
    st.dictionaries(texts, json_values, max_size=4), st.just(_deepest()), st.just({})
)


def bound(low: int, high: int) -> st.SearchStrategy[int]:
    """An integer, often one of the bounds."""
    return st.one_of(st.sampled_from([low, high]), st.integers(low, high))


counts = bound(0, MAX_COUNT)
smalls = bound(0, MAX_RANK)
seconds = st.one_of(st.sampled_from([0.0, 1e9, 5e-324]), st.floats(0, 1e9))
CATEGORIES = [c for c in BADPUT_CATEGORIES if c not in ("wasted_progress", "infra_recovery")]
categories = st.one_of(
    st.sampled_from(CATEGORIES),
    st.text(st.sampled_from("azAZ09_.-"), min_size=1, max_size=64).map("custom:".__add__),
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


# ---------------------------------------------------------------- batches


@dataclass
class Lane:
    """The records of one attempt of one rank of one run, all within [base, base + 1000]."""

    run: int
    attempt: int
    rank: int
    start: dict[str, Any] | None = None
    end: dict[str, Any] | None = None
    beats: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Batch:
    records: list[dict[str, Any]]  # run_id: "0", "1": the index of the run, named at send time
    lanes: list[Lane]
    refused: str | None  # why the contract must refuse it: "nul", "future", "conflict"
    decoys: list[int]  # records written with a member named twice (a decoy first)
    ascii: bool  # \\u escapes (surrogate pairs for astral characters) or raw UTF-8
    split: int  # a valid batch is sent as its first `split` records, then the others
    # A conflicting record to leave out of a first send (stored), then send with the rest:
    # the 409 compares it with what the database holds.
    later: dict[str, Any] | None = None


@st.composite
def lane_records(draw: st.DrawFn, lane: Lane, base: float) -> list[dict[str, Any]]:
    key = {"run_id": str(lane.run), "attempt": lane.attempt, "rank": lane.rank}
    out: list[dict[str, Any]] = []
    if draw(st.booleans()):
        size = draw(st.sampled_from([1, MAX_RANK, 8]))
        lane.start = {"kind": "attempt_start", **key, "start": base, "world_size": size}
        out.append(lane.start)
    first = draw(st.sampled_from([0, 1, MAX_COUNT - 3]))
    for i in range(draw(st.integers(0, 3))):
        start = base + 1 + 10 * i + draw(st.sampled_from([0.0, 0.5, 1e-6]))
        out.append(
            {
                "kind": "step",
                **key,
                "step": first + i,
                "start": start,
                "end": start + draw(st.sampled_from([0.0, 9.0, 1e-6])),
                "tokens": draw(bound(0, MAX_STEP_TOKENS)),
                "loss": draw(maybe(floats)),
                "device_time_s": draw(maybe(seconds)),
                "hook_overhead_s": draw(maybe(seconds)),
                "flops": draw(maybe(counts)),
                "mem_allocated_peak": draw(maybe(counts)),
                "mem_reserved_peak": draw(maybe(counts)),
                "alloc_retries": draw(maybe(counts)),
            }
        )
    for i in range(draw(st.integers(0, 2))):
        start = base + 50 + 100 * i
        out.append(
            {
                "kind": "span",
                **key,
                "category": draw(categories),
                "start": start,
                "end": start + draw(st.sampled_from([0.0, 99.0])),
                "overlapped": draw(st.booleans()),
                "step": draw(maybe(counts)),
            }
        )
    for i in range(draw(st.integers(0, 2))):
        interval = draw(maybe(st.sampled_from([5e-324, 86_400.0, 10.0])))
        beat = {"kind": "heartbeat", **key, "time": base + 300 + i, "interval_s": interval}
        lane.beats.append(beat)
        out.append(beat)
    if draw(st.booleans()):
        out.append(
            {
                "kind": "checkpoint",
                **key,
                "step": draw(counts),
                "time": base + 400,
                "ok": draw(st.booleans()),
            }
        )
    if draw(st.booleans()):
        out.append(draw(routing(key)))
    if draw(st.booleans()):
        out.append(
            {
                "kind": "observation",
                **key,
                "seam": draw(nonempty),
                "requested": draw(maybe(nonempty)),
                "observed": draw(nonempty),
                "reason": draw(maybe(texts)),
                "time": base + 500,
                "step": draw(maybe(counts)),
            }
        )
    if draw(st.booleans()):
        kernel = st.fixed_dictionaries(
            {"name": nonempty, "device_time_s": seconds, "count": counts}
        )
        out.append(
            {
                "kind": "profile",
                **key,
                "first_step": draw(counts),
                "num_steps": draw(bound(1, 1_000_000)),
                "trace_path": draw(maybe(texts)),
                "top_kernels": draw(st.lists(kernel, max_size=2)),
            }
        )
    if draw(st.booleans()):
        lane.end = {
            "kind": "attempt_end",
            **key,
            "end": base + 1000,
            "status": draw(st.sampled_from(["completed", "failed"])),
            "cause": draw(maybe(texts)),
            "hook_errors": draw(counts),
            "counters": draw(st.dictionaries(st.text(_chars(), max_size=64), counts, max_size=3)),
        }
        out.append(lane.end)
    if not out:  # a lane sends something
        lane.beats.append({"kind": "heartbeat", **key, "time": base + 300, "interval_s": None})
        out.append(lane.beats[-1])
    return out


@st.composite
def routing(draw: st.DrawFn, key: dict[str, Any]) -> dict[str, Any]:
    slots = draw(st.sampled_from([1, 3, MAX_SLOTS]))
    tokens = draw(st.lists(counts, min_size=slots, max_size=slots))
    dropped = [draw(st.sampled_from([0, t])) for t in tokens]
    return {
        "kind": "routing",
        **key,
        "step": draw(counts),
        "layer": draw(bound(0, MAX_SLOTS)),
        "num_steps": draw(bound(1, 1_000_000)),
        "num_tokens": draw(counts),
        "top_k": draw(bound(1, MAX_SLOTS)),
        "null_slot": draw(st.booleans()),
        "tokens_per_expert": tokens,
        "dropped_per_expert": dropped,
        "capacity": draw(maybe(counts)),
        "shared_only_tokens": draw(maybe(counts)),
        "aux_loss": draw(maybe(floats)),
        "z_loss": draw(maybe(floats)),
    }


@st.composite
def batches(draw: st.DrawFn, refused: str | None = None) -> Batch:
    """Records of one or two runs; with `refused`, one more record the contract refuses:
    a NUL in its text ("nul"), a date past the server's clock ("future"), or another
    record's natural key with other content ("conflict")."""
    records: list[dict[str, Any]] = []
    lanes: list[Lane] = []
    for run in range(draw(st.integers(1, 2))):
        if draw(st.integers(0, 4)):  # else a run never declared: placeholders
            records.append(
                {
                    "kind": "run",
                    "run_id": str(run),
                    "name": draw(st.one_of(nonempty, st.just("𝔑" * 200))),
                    "project": draw(st.one_of(nonempty, st.just("default"))),
                    "created_at": draw(st.sampled_from([MIN_EPOCH, PAST])),
                    "model_plan": draw(json_objects),
                    "runtime_policy": draw(json_objects),
                    "environment": draw(json_objects),
                    "tags": draw(st.lists(st.text(_chars(), min_size=1, max_size=64), max_size=3)),
                }
            )
        if draw(st.booleans()):
            start = draw(st.sampled_from([MIN_EPOCH, PAST - 10.0]))
            window = {"kind": "excluded_window", "run_id": str(run), "start": start}
            records.append({**window, "end": start + 5, "reason": draw(maybe(texts))})
        keys = draw(
            st.lists(
                st.tuples(st.sampled_from([0, 1, MAX_RANK]), st.sampled_from([0, 1, MAX_RANK])),
                min_size=1,
                max_size=2,
                unique=True,
            )
        )
        # Lanes of one rank apart in time: a rank runs one step at a time, whatever attempt.
        base = draw(st.sampled_from([MIN_EPOCH, PAST - 100_000]))
        for n, (attempt, rank) in enumerate(keys):
            lane = Lane(run, attempt, rank)
            lanes.append(lane)
            records += draw(lane_records(lane, base + 10_000 * n))
    spoiled = None
    if refused is not None:
        spoil = {"nul": _with_nul, "future": _in_future, "conflict": _conflicting}[refused]
        spoilable = {i: made for i, r in enumerate(records) if (made := spoil(r)) is not None}
        if spoilable:
            i = draw(st.sampled_from(sorted(spoilable)))
            spoiled = spoilable[i]
            if refused == "conflict":  # sent beside the record it contradicts
                records.append(spoiled)
            else:  # instead of the record (beside it, it would contradict it too)
                records[i] = spoiled
        else:
            refused = None
    records += draw(st.lists(st.sampled_from(records), max_size=3))  # sent twice in the batch
    records = draw(st.permutations(records))
    decoys = draw(st.lists(st.integers(0, len(records) - 1), max_size=2, unique=True))
    split = draw(st.integers(0, len(records)))
    first = draw(st.booleans()) and refused == "conflict"
    return Batch(
        records, lanes, refused, decoys, draw(st.booleans()), split, spoiled if first else None
    )


_TEXTS = {
    "run": "name",
    "attempt_end": "cause",
    "observation": "seam",
    "excluded_window": "reason",
    "profile": "trace_path",
}
_LATEST = {"run": "created_at", "attempt_start": "start", "attempt_end": "end"}
_LATEST |= {"heartbeat": "time", "checkpoint": "time", "observation": "time"}
_LATEST |= {"step": "end", "span": "end", "excluded_window": "end"}
_CHANGES: dict[str, tuple[str, Any]] = {
    "step": ("tokens", lambda v: v + 1 if v < MAX_STEP_TOKENS else v - 1),
    "span": ("overlapped", lambda v: not v),
    "checkpoint": ("ok", lambda v: not v),
    "attempt_start": ("world_size", lambda v: v + 1 if v < MAX_RANK else v - 1),
    "run": ("name", lambda v: v + "2" if len(v) < 200 else v[:-1]),
    "observation": ("step", lambda v: 7 if v != 7 else 8),
    "attempt_end": ("hook_errors", lambda v: v + 1 if v < MAX_COUNT else v - 1),
    "excluded_window": ("reason", lambda v: "other" if v != "other" else None),
    "profile": ("top_kernels", lambda v: [*v, {"name": "𝔨", "device_time_s": 0.0, "count": 0}]),
    # Stored packed: the stored histogram is unpacked to be compared, and shown.
    "routing": ("dropped_per_expert", lambda v: [0] * len(v) if any(v) else None),
}


def _with_nul(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The record with a NUL in a text field."""
    name = _TEXTS.get(rec["kind"])
    if name is None or not isinstance(rec.get(name), str):
        return None
    return {**rec, name: rec[name] + "\x00"}


def _in_future(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The record dated at the contract's upper bound, 2200: past the server's clock."""
    name = _LATEST.get(rec["kind"])
    return {**rec, name: MAX_EPOCH} if name in rec else None


def _conflicting(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The record with other content under the same natural key."""
    change = _CHANGES.get(rec["kind"])
    if change is None:
        return None
    name, how = change
    value = how(rec[name])
    if value == rec[name] or value is None and rec["kind"] == "routing":
        return None
    return {**rec, name: value}


# ---------------------------------------------------------------- sending


def _member(name: str, value: Any, ascii_only: bool) -> str:
    return (
        f"{json.dumps(name, ensure_ascii=ascii_only)}: {json.dumps(value, ensure_ascii=ascii_only)}"
    )


def body_of(batch: Batch, ids: list[str], order: list[int] | None = None) -> bytes:
    """The batch as JSON text, its runs named; decoy records name a member twice, a wrong
    value first."""
    parts = []
    for i in order if order is not None else range(len(batch.records)):
        rec = {**batch.records[i], "run_id": ids[int(batch.records[i]["run_id"])]}
        members = [_member(k, v, batch.ascii) for k, v in rec.items()]
        if i in batch.decoys:
            members.insert(0, _member("run_id", "!not an id", batch.ascii))
            members.insert(0, _member("kind", "no such kind", batch.ascii))
        parts.append("{" + ", ".join(members) + "}")
    return ('{"records": [' + ",\n ".join(parts) + "]}").encode()


def assert_names_its_record(resp: Any) -> None:
    body = resp.json()
    assert body["detail"], resp.text
    for item in body["detail"]:
        if resp.status_code == 409:
            assert item["record"].startswith("records."), item
            assert body["retriable"] is False
        else:
            assert item["field"].startswith("records."), item


def assert_nothing_stored(client: Any, ids: list[str]) -> None:
    for run_id in ids:
        resp = client.get(f"/api/v1/runs/{run_id}")
        assert resp.status_code == 404, resp.text


# ---------------------------------------------------------------- reading back


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by their decimal value (PostgreSQL's jsonb keeps 1e300
    as the integer it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return Decimal(repr(a)) == Decimal(repr(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    return bool(a == b)


def export(client: Any, run_id: str, what: str) -> list[dict[str, str]]:
    resp = client.get(f"/api/v1/runs/{run_id}/export.csv", params={"what": what})
    assert resp.status_code == 200, resp.text
    return list(csv.DictReader(io.StringIO(resp.text, newline="")))


def number(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def integer(cell: str) -> int | None:
    return None if cell == "" else int(cell)


def assert_stored(client: Any, batch: Batch, ids: list[str]) -> None:
    sent = {json.dumps(r, sort_keys=True): r for r in batch.records}.values()  # once each
    for run, run_id in enumerate(ids):
        mine = [r for r in sent if r["run_id"] == str(run)]
        if not mine:
            assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
            continue
        resp = client.get(f"/api/v1/runs/{run_id}")
        assert resp.status_code == 200, resp.text
        got = resp.json()
        _check_run(got, [r for r in mine if r["kind"] == "run"])
        _check_attempts(got["attempts"], [lane for lane in batch.lanes if lane.run == run])
        _check_steps(export(client, run_id, "steps"), [r for r in mine if r["kind"] == "step"])
        _check_spans(export(client, run_id, "spans"), [r for r in mine if r["kind"] == "span"])
        routed = [r for r in mine if r["kind"] == "routing"]
        _check_routing(export(client, run_id, "routing"), routed)
        seen = [r for r in mine if r["kind"] == "observation"]
        if seen:
            _check_observations(client.get(f"/api/v1/runs/{run_id}/receipt").json(), seen)


def _check_run(got: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    if not runs:
        assert got["declared"] is False
        return
    (rec,) = runs
    assert got["declared"] is True
    assert (got["name"], got["project"], got["created_at"]) == (
        rec["name"],
        rec["project"],
        rec["created_at"],
    )
    for part in ("model_plan", "runtime_policy", "environment"):
        assert same_json(got[part], rec[part]), (part, got[part], rec[part])
    assert set(got["tags"]) == set(rec["tags"])


def _check_attempts(rows: list[dict[str, Any]], lanes: list[Lane]) -> None:
    by_key = {(a["attempt"], a["rank"]): a for a in rows}
    for lane in lanes:
        row = by_key.get((lane.attempt, lane.rank))
        if lane.start is not None:
            assert row is not None and row["start_declared"] is True
            assert (row["start"], row["world_size"]) == (
                lane.start["start"],
                lane.start["world_size"],
            )
        if lane.end is not None:
            assert row is not None
            fields = ("end", "status", "cause", "hook_errors", "counters")
            assert {k: row[k] for k in fields} == {k: lane.end[k] for k in fields}
        elif row is not None:
            assert row["end"] is None and row["status"] is None
        if lane.beats:
            assert row is not None
            assert row["last_seen"] == max(b["time"] for b in lane.beats)
            intervals = {b["interval_s"] for b in lane.beats} - {None}
            assert row["heartbeat_s"] in (intervals or {None})


def _check_steps(rows: list[dict[str, str]], steps: list[dict[str, Any]]) -> None:
    got = {(int(r["attempt"]), int(r["rank"]), int(r["step"])): r for r in rows}
    assert len(got) == len(steps)
    for s in steps:
        row = got[(s["attempt"], s["rank"], s["step"])]
        for name in ("start", "end", "loss", "device_time_s", "hook_overhead_s"):
            assert number(row[name]) == s[name], (name, row[name], s[name])
        for name in ("tokens", "flops", "mem_allocated_peak", "mem_reserved_peak", "alloc_retries"):
            assert integer(row[name]) == s[name], (name, row[name], s[name])


def _check_spans(rows: list[dict[str, str]], spans: list[dict[str, Any]]) -> None:
    got = {(int(r["attempt"]), int(r["rank"]), r["category"], float(r["start"])): r for r in rows}
    assert len(got) == len(spans)
    for s in spans:
        row = got[(s["attempt"], s["rank"], s["category"], s["start"])]
        assert float(row["end"]) == s["end"]
        assert row["overlapped"] == ("true" if s["overlapped"] else "false")
        assert integer(row["step"]) == s["step"]


def _check_routing(rows: list[dict[str, str]], routed: list[dict[str, Any]]) -> None:
    got = {(int(r["attempt"]), int(r["rank"]), int(r["step"]), int(r["layer"])): r for r in rows}
    assert len(got) == len(routed)
    for r in routed:
        row = got[(r["attempt"], r["rank"], r["step"], r["layer"])]
        for name in ("num_steps", "num_tokens", "top_k", "capacity", "shared_only_tokens"):
            assert integer(row[name]) == r[name], (name, row[name], r[name])
        for name in ("aux_loss", "z_loss"):
            assert number(row[name]) == r[name], (name, row[name], r[name])
        assert row["null_slot"] == ("true" if r["null_slot"] else "false")
        for name in ("tokens_per_expert", "dropped_per_expert"):
            assert json.loads(row[name]) == r[name], name


def _check_observations(receipt: dict[str, Any], seen: list[dict[str, Any]]) -> None:
    stored = [
        (
            o["attempt"],
            o["rank"],
            seam,
            o["observed"],
            o["requested"],
            o["reason"],
            o["time"],
            o["step"],
        )
        for seam, s in receipt["observed"].items()
        for o in s["observations"]
    ]
    sent = [
        (
            r["attempt"],
            r["rank"],
            r["seam"],
            r["observed"],
            r["requested"],
            r["reason"],
            r["time"],
            r["step"],
        )
        for r in seen
    ]
    assert sorted(map(repr, stored)) == sorted(map(repr, sent))


# ---------------------------------------------------------------- ingest


def check_ingest(client: Any, batch: Batch) -> None:
    n = next(_unique)
    ids = [f"w{n}-{run}" for run in range(2)]  # runs of this example alone
    ids = [run_id.ljust(128, "x") if n % 3 == 0 else run_id for run_id in ids]  # longest id
    sent = [ids[run] for run in sorted({int(r["run_id"]) for r in batch.records})]
    if batch.later is not None:  # stored first without the conflicting record
        kept = replace(batch, records=[r for r in batch.records if r is not batch.later])
        resp = client.post(INGEST, content=body_of(kept, ids))
        assert resp.status_code == 200, resp.text
        resp = client.post(INGEST, content=body_of(batch, ids))
        assert resp.status_code == 409, resp.text
        assert_names_its_record(resp)
        assert any(item["fields"] for item in resp.json()["detail"]), resp.text
        assert_stored(client, kept, ids)  # as it was: nothing of the refused batch
        return
    if batch.refused is None and 0 < batch.split < len(batch.records):  # two batches first
        for part in (range(batch.split), range(batch.split, len(batch.records))):
            resp = client.post(INGEST, content=body_of(batch, ids, list(part)))
            assert resp.status_code == 200, resp.text
    body = body_of(batch, ids)
    resp = client.post(INGEST, content=body, headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    event(f"ingest {resp.status_code} ({batch.refused or 'valid'})")
    if batch.refused is not None:  # the contract refuses it, whatever else it holds
        assert resp.status_code == (409 if batch.refused == "conflict" else 422), resp.text
    else:
        assert resp.status_code == 200, resp.text
    again = list(reversed(range(len(batch.records))))
    if resp.status_code != 200:
        assert_names_its_record(resp)
        assert_nothing_stored(client, sent)
        resent = client.post(INGEST, content=body_of(batch, ids, again))
        assert resent.status_code == resp.status_code, resent.text
        assert_nothing_stored(client, sent)
        return
    assert resp.json()["inserted"] + resp.json()["duplicates"] == len(batch.records)
    if 0 < batch.split < len(batch.records):
        assert resp.json()["inserted"] == 0, resp.text  # the two parts stored it all
    for order in (None, again):  # sent again, in any order: stored already, every record
        resent = client.post(INGEST, content=body_of(batch, ids, order))
        assert resent.status_code == 200, resent.text
        assert resent.json() == {"inserted": 0, "duplicates": len(batch.records)}
    assert_stored(client, batch, ids)


@pytest.mark.parametrize(
    ("refused", "examples"),
    [(None, INGEST_EXAMPLES), ("nul", 8), ("future", 8), ("conflict", 12)],
)
def test_any_batch_the_schema_accepts_is_stored_or_refused_whole(
    client: Any, refused: str | None, examples: int
) -> None:
    @settings(SETTINGS, max_examples=examples)
    @given(batch=batches(refused))
    def check(batch: Batch) -> None:
        check_ingest(client, batch)

    check()


# ---------------------------------------------------------------- the ml-goodput import


@dataclass
class Log:
    entries: list[dict[str, Any]]
    job: str
    first: float
    lines: bool  # JSON lines, else a JSON array
    run_name: str | None
    refused: str | None  # "nul" in the job name, or an attempt started in "future" (2200)


@st.composite
def logs(draw: st.DrawFn, refused: str | None = None) -> Log:
    job = draw(texts) + ("\x00" if refused == "nul" else "")
    base = draw(st.sampled_from([MIN_EPOCH, PAST - 100_000.0]))
    entries: list[dict[str, Any]] = []
    t = base
    step = draw(st.sampled_from([0, MAX_COUNT - 8]))
    for _ in range(draw(st.integers(1, 2))):
        t += 10
        entries.append({"job_name": job, "job_start_time": t})
        for _ in range(draw(st.integers(0, 3))):
            t += draw(st.sampled_from([1.0, 1e-6, 30.0]))
            entries.append({"job_name": job, "step_start_time": t, "step_count": step})
            step += 1
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["tpu_init", "training_prep", "data_loading"]))
            entries.append({f"{kind}_start_time": t + 0.1})
            entries.append({f"{kind}_end_time": t + 0.2})
        if draw(st.booleans()):
            event_type = draw(texts)
            entries.append(
                {"custom_badput_event_type": event_type, "custom_badput_event_start_time": t}
            )
            entries.append(
                {"custom_badput_event_type": event_type, "custom_badput_event_end_time": t + 1}
            )
        if draw(st.booleans()):
            entries.append(
                {
                    "event_type": "save",
                    "checkpoint_manager_blocking_start_time": t + 0.3,
                    "checkpoint_manager_blocking_duration_secs": draw(st.sampled_from([0.0, 0.5])),
                }
            )
        if draw(st.booleans()):
            # Ignored (and counted): the one place a NUL is allowed.
            ignored = draw(st.one_of(json_values, st.just("a NUL \x00 nobody reads")))
            entries.append({"something_else": ignored})
        t += 5
        if draw(st.booleans()):
            entries.append({"job_name": job, "job_end_time": t})
        step = max(0, step - draw(st.sampled_from([0, 1])))  # a resume repeats its last step
    if refused == "future":  # an attempt starting past the server's clock
        entries.append({"job_name": job, "job_start_time": MAX_EPOCH - 10})
    if draw(st.booleans()):
        entries = [{"jsonPayload": e} if draw(st.booleans()) else e for e in entries]
    entries = draw(st.permutations(entries))  # the import orders them by time
    run_name = draw(maybe(st.text(_chars(), min_size=1, max_size=20)))
    return Log(entries, job, base + 10, draw(st.booleans()), run_name, refused)


def log_body(log: Log, job: str) -> bytes:
    named = [_renamed(e, job) for e in log.entries]
    if log.lines:
        return ("\ufeff" + "\r\n\n".join(json.dumps(e, ensure_ascii=False) for e in named)).encode()
    return json.dumps(named).encode()


def _renamed(entry: dict[str, Any], job: str) -> dict[str, Any]:
    inner = entry.get("jsonPayload", entry)
    if "job_name" in inner:
        inner = {**inner, "job_name": job}
    return {"jsonPayload": inner} if "jsonPayload" in entry else inner


def check_import(client: Any, log: Log) -> None:
    job = f"job{next(_unique)}-{log.job}"  # a run of its own
    params = {"run_name": log.run_name} if log.run_name is not None else {}
    kind = "application/x-ndjson" if log.lines else "application/json"
    body = log_body(log, job)
    resp = client.post(IMPORT, content=body, params=params, headers={"content-type": kind})
    assert resp.status_code < 500, resp.text
    event(f"import {resp.status_code} ({log.refused or 'valid'})")
    run_id = run_id_of(job, log.first)
    assert resp.status_code == (200 if log.refused is None else 422), resp.text
    if resp.status_code != 200:
        for item in resp.json()["detail"]:
            assert item["field"] and item["field"] != "body", item  # an entry, named
        assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
        return
    got = resp.json()
    assert got["run_id"] == run_id and got["existing_run"] is False
    run = client.get(f"/api/v1/runs/{run_id}")
    assert run.status_code == 200 and run.json()["name"] == (log.run_name or job[:200]), run.text
    again = client.post(IMPORT, content=body, params=params, headers={"content-type": kind})
    assert again.status_code == 200, again.text
    total = got["inserted"] + got["duplicates"]
    assert (again.json()["inserted"], again.json()["duplicates"]) == (0, total)
    assert again.json()["existing_run"] is True


@pytest.mark.parametrize(
    ("refused", "examples"), [(None, IMPORT_EXAMPLES), ("nul", 5), ("future", 5)]
)
def test_any_log_is_imported_or_refused_naming_its_entry(
    client: Any, refused: str | None, examples: int
) -> None:
    @settings(SETTINGS, max_examples=examples)
    @given(log=logs(refused))
    def check(log: Log) -> None:
        check_import(client, log)

    check()


# ---------------------------------------------------------------- what these tests found


def test_a_profile_sent_twice_in_one_batch_is_a_duplicate(client: Any) -> None:
    """Found by the ingest property: the second copy was compared with the first's kernels
    as models, not as JSON, so it was a conflict, and its 409 a 500 (models in the body)."""
    kernels = [{"name": "gemm 𝔘", "device_time_s": 0.5, "count": 3}]
    profile = {"kind": "profile", "run_id": "p", "first_step": 0, "num_steps": 1}
    profile["top_kernels"] = kernels
    resp = client.post(INGEST, json={"records": [profile, profile]})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"inserted": 1, "duplicates": 1}
    resp = client.post(INGEST, json={"records": [profile, {**profile, "num_steps": 2}]})
    assert resp.status_code == 409, resp.text
    assert resp.json()["detail"][0]["record"] == "records.1.profile"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "index.0"),  # nested too deeply to read
        (b'[{"job_start_time": 1790000000.0}, [[[1]]]]', "index.1"),  # a list, not an entry
        (b'[{"job_start_time": 1790000000.0}, {"step_count": 1,]', "index.1"),  # malformed
        (b'[{"job_start_time": 1790000000.0} {"job_end_time": 1790000001.0}]', "index.1"),
        (b'[{"job_start_time": 1790000000.0},', "index.1"),  # cut short
        (b'[{"job_start_time": NaN}]', "index.0"),
        (b'[{"job_start_time": 1790000000.0}]\n[{"job_end_time": 1790000001.0}]', "line.2"),
        (b'{"job_start_time": 1790000000.0}\n{"job_name": "\xff"}', "line.2"),  # not UTF-8
        (
            b'[{"jsonPayload": {"job_name": 5, "job_start_time": 1.79e9}}]',
            "index.0.jsonPayload.job_name",
        ),
        (
            b'{"job_start_time": 1790000000.0}\n{"job_start_time": 7258118000.0}',
            "line.2.job_start_time",
        ),
        (b"  \n ", "body"),  # empty
    ],
)
def test_every_import_422_names_the_entry(client: Any, body: bytes, field: str) -> None:
    """Issue 12: a nested array was a 422 naming no field (`""`); a record the store refused
    named a record of the mapping (`records.3.attempt_start.start`), not the log's entry."""
    resp = client.post(IMPORT, content=body)
    assert resp.status_code == 422, resp.text
    assert [e["field"] for e in resp.json()["detail"]][:1] == [field], resp.text


def test_json_lines_break_at_newlines_only(client: Any) -> None:
    """Found by the import property: JSON lines were split by str.splitlines, which also
    breaks at U+0085, U+2028 and U+2029, characters a JSON string holds as they are; an
    entry holding one was a 422 ("Unterminated string")."""
    job = "job \u2028 \u0085 \u2029 line-breaks"
    entries = [
        {"job_name": job, "job_start_time": 1_790_000_000.0},
        {"job_name": job, "step_start_time": 1_790_000_001.0, "step_count": 0},
        {"job_name": job, "job_end_time": 1_790_000_002.0},
    ]
    body = "\r\n".join(json.dumps(e, ensure_ascii=False) for e in entries).encode()
    resp = client.post(IMPORT, content=body, headers={"content-type": "application/x-ndjson"})
    assert resp.status_code == 200, resp.text
    run = client.get(f"/api/v1/runs/{resp.json()['run_id']}").json()
    assert run["name"] == job and run["num_steps"] == 1
