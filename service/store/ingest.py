"""Ingest: a batch of records validated against what is stored, then written with the rollups
(rollups/) in the caller's transaction; nothing here commits."""

from __future__ import annotations

import json
import math
import operator
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, NoReturn, cast

from pydantic import BaseModel
from sqlalchemy import (
    Row,
    Table,
    bindparam,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.calc.routing_stats import routing_figures
from service.store import bulk
from service.store.models import (
    ROLLUP_LEVELS,
    Attempt,
    Base,
    CheckpointCommit,
    ExcludedWindow,
    Metric,
    Observation,
    PackedCounts,
    Profile,
    RoutingRow,
    Run,
    RunTag,
    Span,
    SpanTotal,
    Step,
    StepBlock,
    pack_counts,
)
from service.store.rollups import common as rollup_common
from service.store.rollups import write as rollup_write
from trainer_hooks.records import (
    AttemptEndRecord,
    AttemptStartRecord,
    CheckpointRecord,
    ExcludedWindowRecord,
    HeartbeatRecord,
    IngestResult,
    MetricRecord,
    ObservationRecord,
    ProfileRecord,
    Record,
    RoutingRecord,
    RunRecord,
    SpanRecord,
    StepRecord,
)


class IngestError(ValueError):
    """A batch that passed the schema but contradicts stored data; `errors` names the fields
    in FastAPI's validation-error shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors


def _err(index: int, field: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", "records", index, field], "msg": msg, "type": kind}


def _rec_err(index: int, rec: Any, field: str, msg: str, kind: str) -> dict[str, Any]:
    """An error naming the record and its field (`records.3.step.end`)."""
    return {"loc": ["body", "records", index, rec.kind, field], "msg": msg, "type": kind}


class IngestConflict(IngestError):
    """Records re-sent under a stored natural key with other content (issue 12): `conflicts`
    (also `errors`, for a caller that only knows IngestError) names each one (`record`:
    `records.N.<kind>`), its `key` and, per differing field, the stored and the sent value
    (`fields`). Permanent: sending the batch again cannot help."""

    def __init__(self, conflicts: list[dict[str, Any]]) -> None:
        super().__init__(conflicts)
        self.conflicts = conflicts


MAX_REPORTED = 100  # conflicts or errors listed in one answer
FUTURE_SLACK_S = 86_400.0  # a record dated later than this after the server's clock: refused

# Per kind: its natural key (trainer_hooks/records.py), and the fields a re-send must repeat.
_NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "run": ("run_id",),
    "attempt_start": ("run_id", "attempt", "rank"),
    "attempt_end": ("run_id", "attempt", "rank"),
    "step": ("run_id", "attempt", "rank", "step"),
    "span": ("run_id", "attempt", "rank", "category", "start"),
    "checkpoint": ("run_id", "attempt", "rank", "step"),
    "routing": ("run_id", "attempt", "rank", "step", "layer"),
    "observation": ("run_id", "attempt", "rank", "seam", "observed"),
    "metric": ("run_id", "attempt", "rank", "name", "step"),
    "profile": ("run_id", "attempt", "rank", "first_step"),
    "excluded_window": ("run_id", "start", "end"),
}
_OF_KIND: dict[str, type[Any]] = {
    "step": StepRecord,
    "span": SpanRecord,
    "checkpoint": CheckpointRecord,
    "routing": RoutingRecord,
    "observation": ObservationRecord,
    "metric": MetricRecord,
    "profile": ProfileRecord,
    "excluded_window": ExcludedWindowRecord,
}
_COMPARED: dict[str, tuple[str, ...]] = {
    kind: tuple(
        f for f in model.model_fields if f not in {"kind", "schema_version", *_NATURAL_KEYS[kind]}
    )
    for kind, model in _OF_KIND.items()
}
# A run record sent again (every rank and attempt sends one) must repeat these; its
# created_at, environment and runtime_policy are the sender's own (its start, its host, its
# world size after an elastic restart, its --steps after a resume): the first stays.
# Its tags may only grow: a stored tag it lacks is a conflict, a new one is added.
_COMPARED["run"] = ("name", "project", "model_plan", "ablation_id", "ablation_cell")
_COMPARED["attempt_start"] = ("start", "world_size")
_COMPARED["attempt_end"] = ("end", "status", "cause", "hook_errors", "counters")
_HISTOGRAMS = ("tokens_per_expert", "dropped_per_expert")  # stored packed


def _plain(value: Any) -> Any:
    """A sent value as JSON would carry it (a list of models as a list of dicts)."""
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [v.model_dump() for v in value]
    return value


def _stored(field: str, value: Any, sent: Any) -> Any:
    """A stored value as the record would carry it (SQLite's 0 and 1 as booleans, packed
    histograms unpacked)."""
    if value is None:
        return None
    if isinstance(sent, bool):
        return bool(value)
    if field in _HISTOGRAMS and isinstance(value, (bytes, bytearray, memoryview)):
        return PackedCounts().process_result_value(bytes(value), cast(Any, None))
    return value


def _diffs(rec: Any, held: dict[str, Any], fields: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """The fields whose stored (held) and sent values differ: both, by field."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in fields:
        sent = _plain(getattr(rec, f))
        stored = _stored(f, held[f], sent)
        if stored != sent:
            out[f] = (stored, sent)
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


class _Problems:
    """What a batch contradicts, gathered while it is stored (nothing is committed before
    `check`, which refuses the batch): a conflicting re-send (409) is reported before a
    contradictory timing (422)."""

    def __init__(self) -> None:
        self.conflicts: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

    def compare(self, index: int, rec: Any, held: dict[str, Any]) -> None:
        """Compare a record with what holds its key (a stored row's values, or the batch's
        earlier record's): exactly, floats included."""
        diffs = _diffs(rec, held, _COMPARED[rec.kind])
        if diffs:
            self.conflict(index, rec, diffs)

    def conflict(self, index: int, rec: Any, diffs: dict[str, tuple[Any, Any]]) -> None:
        key = {k: getattr(rec, k) for k in _NATURAL_KEYS[rec.kind]}
        what = "; ".join(
            f"{f}: stored {_short(a)}, sent {_short(b)}" for f, (a, b) in diffs.items()
        )
        self.conflicts.append(
            {
                "loc": ["body", "records", index, rec.kind],
                "record": f"records.{index}.{rec.kind}",
                "key": key,
                "fields": {f: {"stored": a, "sent": b} for f, (a, b) in diffs.items()},
                "msg": f"{rec.kind} {_short(key)} is already stored with other values ({what}): "
                "a natural key names one record, so a re-send must repeat it",
                "type": "conflict",
            }
        )

    def refuse(self, errors: list[dict[str, Any]]) -> NoReturn:
        if self.conflicts:
            raise IngestConflict(self.conflicts[:MAX_REPORTED])
        raise IngestError([*errors, *self.errors][:MAX_REPORTED])

    def check(self) -> None:
        if self.conflicts or self.errors:
            self.refuse([])


def _insert_ignore(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> int:
    """INSERT ... ON CONFLICT DO NOTHING; returns how many rows were new."""
    return len(_insert_new(session, model, rows, model.__mapper__.primary_key[0]))


def _insert_new(
    session: Session, model: type[Base], rows: list[dict[str, Any]], *returning: Any
) -> Sequence[Row[Any]]:
    """INSERT ... ON CONFLICT DO NOTHING, returning the given columns of the new rows only."""
    if not rows:
        return []
    dialect = session.get_bind().dialect.name
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # On the Table, not the mapped class: Core's executemany, without the ORM's per-row work.
    stmt = ins(cast(Table, model.__table__)).on_conflict_do_nothing().returning(*returning)
    return session.execute(stmt, rows).all()


_TABLES: dict[str, type[Base]] = {  # kinds stored as one row each, a duplicate key ignored
    "checkpoint": CheckpointCommit,
    "observation": Observation,
    "metric": Metric,
    "profile": Profile,
    "excluded_window": ExcludedWindow,
}


def ingest(session: Session, records: Sequence[Record]) -> IngestResult:
    """Store a batch; records already stored (same natural key, same content) count as
    duplicates. Records may come in any order across batches: a record whose run is not
    stored yet gets a placeholder run (filled in by the run record when it comes), a
    heartbeat or attempt_end whose attempt was never started a placeholder attempt (filled in
    by its attempt_start). Refused, with nothing of the batch stored: a record re-sent under
    a stored key with other content (IngestConflict: the fields that may change on a re-send
    are in trainer_hooks/records.py), and timings that contradict each other or the server's
    clock (IngestError): overlapping steps of a rank, a record after its attempt's end, a
    date more than a day ahead."""
    by_kind: dict[str, list[tuple[int, Any]]] = {}
    for i, rec in enumerate(records):
        by_kind.setdefault(rec.kind, []).append((i, rec))
    run_ids = set(map(_RUN_ID, records))  # every record names its run
    ranks = {(r.run_id, r.rank) for r in records if hasattr(r, "rank")}
    # Before the first read: the batch's runs and ranks are locked until it commits (on
    # SQLite the database's write lock is taken), so what is decided from stored rows holds.
    rollup_write.lock_runs(session, run_ids, ranks)
    now = time.time()
    problems = _Problems()
    _future_dates(by_kind, now, problems)
    ends = _stored_ends(session, by_kind)
    run_records = by_kind.get("run", [])
    inserted = _store_runs(session, run_records, now, problems)
    known = {r.run_id for _, r in run_records} | {k[0] for k in ends}  # stored, or now
    _placeholder_runs(session, records, run_ids - known, now)
    inserted += _start_attempts(session, by_kind.get("attempt_start", []), problems)
    _after_attempt_end(by_kind, ends, problems)
    for kind, model in _TABLES.items():
        inserted += _store_rows(session, kind, model, by_kind.get(kind, []), problems)
    inserted += _store_per_step(session, by_kind, problems)
    inserted += _end_attempts(session, by_kind.get("attempt_end", []), problems)
    inserted += _heartbeats(session, by_kind.get("heartbeat", []))
    problems.check()
    return IngestResult(inserted=inserted, duplicates=len(records) - inserted)


# Per kind: the field holding its latest time (end >= start is checked by the contract).
_LATEST: dict[str, str] = {
    "run": "created_at",
    "attempt_start": "start",
    "attempt_end": "end",
    "heartbeat": "time",
    "step": "end",
    "span": "end",
    "checkpoint": "time",
    "observation": "time",
    "metric": "time",
    "excluded_window": "end",
}
_SECOND = itemgetter(1)
_START, _END = attrgetter("start"), attrgetter("end")


def _future_dates(
    by_kind: dict[str, list[tuple[int, Any]]], now: float, problems: _Problems
) -> None:
    """A record dated more than FUTURE_SLACK_S after the server's clock is refused: a clock
    or unit gone wrong, which would stretch its run's total time by years."""
    limit = now + FUTURE_SLACK_S
    for kind, field in _LATEST.items():
        pairs = by_kind.get(kind)
        if not pairs:
            continue
        get = attrgetter(field)
        if max(map(get, map(_SECOND, pairs))) <= limit:
            continue
        problems.errors += [
            _rec_err(
                i,
                rec,
                field,
                f"{field} ({get(rec)}) is more than a day after the server's clock ({now}): "
                "a clock or unit gone wrong",
                "in_future",
            )
            for i, rec in pairs
            if get(rec) > limit
        ]


def _store_rows(
    session: Session,
    kind: str,
    model: type[Base],
    recs: list[tuple[int, Any]],
    problems: _Problems,
) -> int:
    """Insert records stored as one row each (_TABLES); a key already stored, or taken by an
    earlier record of the batch, is a duplicate when the content is the same, else a
    conflict (read only then, in one query per few hundred keys)."""
    if not recs:
        return 0
    key = _NATURAL_KEYS[kind]
    table = _table(model)
    new = {
        tuple(r)
        for r in _insert_new(session, model, [_row(r) for _, r in recs], *(table.c[c] for c in key))
    }
    if len(new) == len(recs):
        return len(new)
    of_key = attrgetter(*key)
    first: dict[Any, Any] = {}
    later: list[tuple[int, Any, Any]] = []
    for i, rec in recs:
        k = of_key(rec)
        if k in new and k not in first:
            first[k] = rec
        else:
            later.append((i, rec, k))
    fields = _COMPARED[kind]
    wanted = sorted({k for _, _, k in later if k not in first})
    stored: dict[Any, dict[str, Any]] = {}
    for j in range(0, len(wanted), _KEYS_PER_QUERY):
        stmt = select(*(table.c[c] for c in (*key, *fields))).where(
            tuple_(*(table.c[c] for c in key)).in_(wanted[j : j + _KEYS_PER_QUERY])
        )
        for row in session.execute(stmt):
            stored[tuple(row[: len(key)])] = dict(zip(fields, row[len(key) :], strict=True))
    for i, rec, k in later:
        held = first.get(k)  # an earlier record of the batch: its values as JSON carries them
        problems.compare(
            i, rec, {f: _plain(getattr(held, f)) for f in fields} if held else stored[k]
        )
    return len(new)


def _dialect_insert(session: Session, model: type[Base]) -> Any:
    ins = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return ins(_table(model))


_RUN_FILLED = (
    "name",
    "project",
    "created_at",
    "model_plan",
    "runtime_policy",
    "environment",
    "ablation_id",
    "ablation_cell",
)


def _store_runs(
    session: Session, run_records: list[tuple[int, RunRecord]], now: float, problems: _Problems
) -> int:
    """Insert the run records, or fill in placeholder runs (declared false) with them, in one
    statement, with their tags. A run already declared (or declared earlier in the batch) is
    a duplicate when the record repeats its name, project, model plan and runtime policy and
    all its tags, else a conflict; tags it adds are stored (the record then counts as
    inserted). Returns how many were stored."""
    first: dict[str, RunRecord] = {}
    for _, r in run_records:
        first.setdefault(r.run_id, r)
    if not first:
        return 0
    rows = [{**_row(first[k], "tags"), "ingested_at": now, "declared": True} for k in sorted(first)]
    table = _table(Run)
    stmt = _dialect_insert(session, Run)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.run_id],
        set_={**{c: stmt.excluded[c] for c in _RUN_FILLED}, "declared": True},
        where=table.c.declared.is_(False),
    ).returning(table.c.run_id)
    filled = set(session.scalars(stmt, rows))
    fields = _COMPARED["run"]
    held: dict[str, tuple[dict[str, Any], set[str]]] = {}
    declared = sorted(set(first) - filled)
    if declared:  # one read of the runs sent again, and one of their tags
        cols = [table.c[f] for f in fields]
        for row in session.execute(
            select(table.c.run_id, *cols).where(table.c.run_id.in_(declared))
        ):
            held[row[0]] = (dict(zip(fields, row[1:], strict=True)), set())
        tag_rows = select(RunTag.run_id, RunTag.tag).where(RunTag.run_id.in_(declared))
        for run_id, tag in session.execute(tag_rows):
            held[run_id][1].add(tag)
    tags: list[dict[str, Any]] = []
    inserted = len(filled)
    for i, rec in run_records:
        sent = list(dict.fromkeys(rec.tags))
        state = held.get(rec.run_id)
        if state is None:  # stored by this batch: its first run record
            held[rec.run_id] = ({f: getattr(rec, f) for f in fields}, set(sent))
            tags += [{"run_id": rec.run_id, "tag": t} for t in sent]
            continue
        values, stored_tags = state
        diffs = _diffs(rec, values, fields)
        if not stored_tags <= set(sent):  # tags are only ever added
            diffs["tags"] = (sorted(stored_tags), sent)
        if diffs:
            problems.conflict(i, rec, diffs)
            continue
        added = [t for t in sent if t not in stored_tags]
        if added:
            stored_tags.update(added)
            tags += [{"run_id": rec.run_id, "tag": t} for t in added]
            inserted += 1
    _insert_ignore(session, RunTag, tags)
    return inserted


_TIME_FIELDS = ("start", "time", "end")  # a record's earliest time, by kind (routing: none)


_RUNS_STORED = select(rollup_common.table_of(Run).c.run_id).where(
    rollup_common.table_of(Run).c.run_id.in_(bindparam("ids", expanding=True))
)


def _placeholder_runs(
    session: Session, records: Sequence[Record], wanted: set[str], now: float
) -> None:
    """A placeholder row (declared false) for each of the `wanted` runs that is not stored:
    its id as name, project "default", created at the earliest time of its records in the
    batch (else now), empty receipt parts."""
    if not wanted:
        return
    stored = session.connection().execute(_RUNS_STORED, {"ids": sorted(wanted)}).scalars()
    missing = wanted - set(stored)
    if not missing:
        return
    earliest: dict[str, float] = {}
    for rec in records:
        if rec.run_id in missing:
            t = next((getattr(rec, f) for f in _TIME_FIELDS if hasattr(rec, f)), None)
            if t is not None and t < earliest.get(rec.run_id, math.inf):
                earliest[rec.run_id] = t
    rows = [
        {
            "run_id": run_id,
            "name": run_id,
            "project": "default",
            "created_at": earliest.get(run_id, now),
            "model_plan": {},
            "runtime_policy": {},
            "environment": {},
            "ingested_at": now,
            "declared": False,
        }
        for run_id in sorted(missing)
    ]
    _insert_ignore(session, Run, rows)  # a concurrent batch may have made it: that one stays


def _row(rec: Record, *exclude: str) -> dict[str, Any]:
    return rec.model_dump(exclude={"kind", "schema_version", *exclude})


_STEP_ROW = attrgetter(*rollup_common.STEP_COLUMNS)
_SPAN_ROW = attrgetter(*rollup_common.SPAN_COLUMNS[:-2])  # then clashes and charged_s, from ingest


_KEY = ("run_id", "attempt", "rank")
_PROBES = {  # per kind: its table, its key but the last column, and that column
    "step": (Step, _KEY, "step"),
    "span": (Span, (*_KEY, "category"), "start"),
    "routing": (RoutingRow, (*_KEY, "layer"), "step"),
}


def _store_per_step(
    session: Session, by_kind: dict[str, list[tuple[int, Any]]], problems: _Problems
) -> int:
    """Steps, spans and routing records with their rollups; returns how many were new (the
    caller holds the runs' locks). A batch is first stored as if none of its keys were
    stored yet, which a streaming client's batches are: if an insert finds a key taken (or
    its steps seem to overlap stored ones), that attempt is rolled back to its savepoint and
    the batch is stored again with its keys probed first (store/bulk.py), the stored rows
    of re-sent keys read in the probe and compared with them (a conflict if they differ)."""
    pairs = {kind: by_kind.get(kind, []) for kind in _PROBES}
    if not any(pairs.values()):
        return 0
    batch = {kind: [r for _, r in p] for kind, p in pairs.items()}
    reads = _rank_reads(session, batch["step"], batch["span"])
    if not _overlapping_steps(reads, pairs["step"]):
        try:  # a key sent twice in the batch is taken by the time its second row is inserted
            with session.begin_nested():
                return _store_new(reads, batch["step"], batch["span"], batch["routing"])
        except bulk.AlreadyStored:
            pass
    index = {id(r): i for p in pairs.values() for i, r in p}
    new: dict[str, list[Any]] = {}
    for kind, (model, prefix, last) in _PROBES.items():
        fields = _COMPARED[kind]
        new[kind], seen = bulk.probe_new(session, _table(model), prefix, last, batch[kind], fields)
        for rec, held in seen:
            if isinstance(held, tuple):
                problems.compare(index[id(rec)], rec, dict(zip(fields, held, strict=True)))
            else:
                problems.compare(index[id(rec)], rec, {f: getattr(held, f) for f in fields})
    reads = _rank_reads(session, new["step"], new["span"])  # what was read before may be gone
    problems.errors += _overlapping_steps(reads, [(index[id(r)], r) for r in new["step"]])
    return _store_new(reads, new["step"], new["span"], new["routing"])


def _rank_reads(session: Session, steps: list[Any], spans: list[Any]) -> rollup_common.RankReads:
    """The batch's reads of its ranks' stored steps and spans (rollup_common.RankReads), each
    rank's range the time its steps and blocking spans cover: its new steps are checked
    against the stored steps and measured against the stored spans, its new spans checked
    against both, in one read of each."""
    reads = rollup_common.RankReads(session)
    ranges: dict[tuple[str, int], list[float]] = {}
    for r in chain(steps, (s for s in spans if not s.overlapped)):
        k = (r.run_id, r.rank)
        have = ranges.get(k)
        if have is None:
            ranges[k] = [r.start, r.end]
        else:
            if r.start < have[0]:
                have[0] = r.start
            if r.end > have[1]:
                have[1] = r.end
    for (run_id, rank), (lo, hi) in ranges.items():
        reads.hold(run_id, rank, lo, hi)
    return reads


def _overlapping_steps(
    reads: rollup_common.RankReads, steps: list[tuple[int, Any]]
) -> list[dict[str, Any]]:
    """An error for each step that shares more than a float ulp of time with another step of
    its rank (of any attempt: a rank runs one step at a time), stored or in `steps`. Per
    rank, one indexed read of the fine step blocks reaching into the steps' time range (none
    for a streaming batch, which starts where the stored steps end), then the steps of the
    blocks found; a pair with the same key is a re-send, not an overlap."""
    by_rank: dict[tuple[str, int], list[tuple[int, Any]]] = {}
    for pair in steps:
        rec = pair[1]
        by_rank.setdefault((rec.run_id, rec.rank), []).append(pair)
    errors: list[dict[str, Any]] = []
    named: set[int] = set()
    for (run_id, rank), pairs in by_rank.items():
        recs = list(map(_SECOND, pairs))
        starts, ends = list(map(_START, recs)), list(map(_END, recs))
        if all(map(operator.le, ends[:-1], starts[1:])):  # in order, one after the other
            lo, hi = starts[0], ends[-1]  # as a streaming client sends them: no sweep
            stored = _stored_steps_near(reads, run_id, rank, lo, hi)
            if not stored:
                continue
        else:
            lo, hi = min(starts), max(ends)
            stored = _stored_steps_near(reads, run_id, rank, lo, hi)
        items = [(r.start, r.end, r.attempt, r.step, i) for i, r in pairs]
        items += [(*s, -1) for s in stored]
        if len(items) < 2:
            continue
        items.sort()
        widest: Any = None  # the step reaching latest so far, and the latest new one
        widest_new: Any = None
        for item in items:
            start, end, attempt, step, i = item
            other = widest if i >= 0 else widest_new
            if other is not None and (other[2], other[3]) != (attempt, step):
                overlap = min(other[1], end) - start
                i_new, a, b = (i, item, other) if i >= 0 else (other[4], other, item)
                if overlap > math.ulp(start) and i_new not in named:  # one error a record
                    named.add(i_new)
                    errors.append(
                        {
                            "loc": ["body", "records", i_new, "step"],
                            "msg": f"step {a[3]} of attempt {a[2]}, rank {rank} ({a[0]} to "
                            f"{a[1]}) overlaps step {b[3]} of attempt {b[2]} ({b[0]} to "
                            f"{b[1]}) by {overlap} s: a rank runs one step at a time",
                            "type": "overlapping_steps",
                        }
                    )
            if widest is None or end > widest[1]:
                widest = item
            if i >= 0 and (widest_new is None or end > widest_new[1]):
                widest_new = item
    return errors


def _stored_steps_near(
    reads: rollup_common.RankReads, run_id: str, rank: int, lo: float, hi: float
) -> list[tuple[float, float, int, int]]:
    """(start, end, attempt, step) of the rank's stored steps that overlap (lo, hi)."""
    rows = rollup_write.steps_overlapping(reads, run_id, rank, lo, hi)
    return [(r.start, r.end, r.attempt, r.step) for r in rows]


def _store_new(
    reads: rollup_common.RankReads, steps: list[Any], spans: list[Any], routing: list[Any]
) -> int:
    """Store records whose keys are not stored yet, and their rollups. Every read of stored
    rows runs before this batch's rows are written, so each pair of a step and a blocking
    span is measured once: new steps against stored and new spans, new spans against stored
    steps."""
    session = reads.session
    step_rows = [_STEP_ROW(r) for r in steps]
    blocked = rollup_write.blocked_of(session, step_rows, spans, reads)
    rollup_write.block_stored_steps(session, spans, reads)
    clashes, charged = rollup_write.flag_clashes(session, spans, reads)
    span_rows = [(*_SPAN_ROW(r), f, c) for r, f, c in zip(spans, clashes, charged, strict=True)]
    bulk.insert_rows(session, _table(Span), rollup_common.SPAN_COLUMNS, span_rows)
    rollup_write.add_spans(session, spans, charged)
    bulk.insert_rows(
        session,
        _table(Step),
        (*rollup_common.STEP_COLUMNS, "blocked_s"),
        [(*row, b) for row, b in zip(step_rows, blocked, strict=True)],
    )
    rollup_write.add_steps(session, step_rows, blocked)
    routing_rows = [_routing_row(r) for r in routing]
    bulk.insert_rows(session, _table(RoutingRow), rollup_common.ROUTING_COLUMNS, routing_rows)
    rollup_write.add_routing(session, routing_rows)
    return len(steps) + len(spans) + len(routing)


def _routing_row(rec: RoutingRecord) -> tuple[Any, ...]:
    """A routing record laid out as rollup_common.ROUTING_COLUMNS, its derived figures included."""
    fig = routing_figures(
        rec.tokens_per_expert,
        rec.dropped_per_expert,
        rec.num_tokens,
        rec.top_k,
        rec.null_slot,
        rec.shared_only_tokens,
    )
    return (
        rec.run_id,
        rec.attempt,
        rec.rank,
        rec.layer,
        rec.step,
        rec.num_steps,  # POINT_FIELDS from here
        rec.num_tokens,
        fig.max_vio,
        fig.drop_rate,
        fig.null_fraction,
        fig.shared_only_fraction,
        rec.aux_loss,
        rec.z_loss,
        rec.top_k,  # then the rest
        rec.null_slot,
        pack_counts(rec.tokens_per_expert),
        pack_counts(rec.dropped_per_expert),
        rec.capacity,
        rec.shared_only_tokens,
    )


assert rollup_common.ROUTING_COLUMNS[5:13] == rollup_common.POINT_FIELDS, "_routing_row's layout"


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


_AttemptKey = tuple[str, int, int]
_ATTEMPT_KEY = attrgetter("run_id", "attempt", "rank")
_KEYS_PER_QUERY = 300
_ATTEMPT_STATE = (
    *("start", "end", "start_declared", "last_seen", "heartbeat_s", "world_size"),
    "records_dropped",
    *("status", "cause", "hook_errors", "counters"),  # compared by a re-sent attempt_end
)


def _stored_attempts(session: Session, keys: Iterable[_AttemptKey]) -> dict[_AttemptKey, Any]:
    """The stored rows of these attempts (id, key and _ATTEMPT_STATE), a few hundred keys a
    query; on PostgreSQL locked until the transaction ends, so that what is decided from
    them still holds when the rows are written."""
    table = _table(Attempt)
    key = tuple_(table.c.run_id, table.c.attempt, table.c.rank)
    cols = [table.c.id, table.c.run_id, table.c.attempt, table.c.rank]
    cols += [table.c[c] for c in _ATTEMPT_STATE]
    lock = session.get_bind().dialect.name == "postgresql"
    ordered = sorted(keys)  # one lock order for every batch
    out: dict[_AttemptKey, Any] = {}
    for i in range(0, len(ordered), _KEYS_PER_QUERY):
        stmt = select(*cols).where(key.in_(ordered[i : i + _KEYS_PER_QUERY]))
        for row in session.execute(stmt.with_for_update() if lock else stmt):
            out[(row.run_id, row.attempt, row.rank)] = row
    return out


def _start_attempts(
    session: Session, starts: list[tuple[int, AttemptStartRecord]], problems: _Problems
) -> int:
    """Insert attempt rows, or fill in the placeholders that a heartbeat or attempt_end made
    before their attempt_start (declared start and world size); a start already declared is
    a duplicate if it repeats them, else a conflict. A declared start after the end stored
    on a placeholder is refused."""
    first: dict[_AttemptKey, tuple[int, AttemptStartRecord]] = {}
    fields = _COMPARED["attempt_start"]
    for i, rec in starts:
        k = _ATTEMPT_KEY(rec)
        if k in first:
            problems.compare(i, rec, {f: getattr(first[k][1], f) for f in fields})
        else:
            first[k] = (i, rec)
    if not first:
        return 0
    stored = _stored_attempts(session, first)
    for k, (i, rec) in first.items():
        if k in stored and stored[k].start_declared:
            problems.compare(i, rec, dict(stored[k]._mapping))
    errors = [
        _err(
            i,
            "start",
            f"start ({rec.start}) is after the end of attempt {rec.attempt} of rank "
            f"{rec.rank} ({stored[k].end}), which its attempt_end stored first",
            "start_after_end",
        )
        for k, (i, rec) in first.items()
        if k in stored
        and not stored[k].start_declared
        and stored[k].end is not None
        and rec.start > stored[k].end
    ]
    if errors:
        problems.refuse(errors)
    rows = [
        {**_row(rec), "start_declared": True}
        for k, (_, rec) in first.items()
        if k not in stored or not stored[k].start_declared
    ]
    if not rows:
        return 0
    table = _table(Attempt)
    stmt = _dialect_insert(session, Attempt)
    stmt = stmt.on_conflict_do_update(  # a row another batch made meanwhile: the same rules
        index_elements=[table.c.run_id, table.c.attempt, table.c.rank],
        set_={
            "start": stmt.excluded.start,
            "world_size": stmt.excluded.world_size,
            "start_declared": True,
        },
        where=table.c.start_declared.is_(False),
    ).returning(table.c.id)
    return len(session.execute(stmt, rows).all())


def _open_attempts(
    session: Session, recs: Sequence[tuple[int, Any]], time_of: Callable[[Any], float]
) -> dict[_AttemptKey, dict[str, Any]]:
    """The rows of the attempts these records belong to, as mutable dicts; an attempt never
    started gets a placeholder row first (start_declared false, world size 1, started at the
    earliest of these records' times), which its attempt_start fills in when it comes."""
    earliest: dict[_AttemptKey, float] = {}
    for _, rec in recs:
        k, t = _ATTEMPT_KEY(rec), time_of(rec)
        if t < earliest.get(k, math.inf):
            earliest[k] = t
    stored = _stored_attempts(session, earliest)
    missing = [k for k in earliest if k not in stored]
    if missing:
        placeholders = [
            {
                "run_id": run_id,
                "attempt": attempt,
                "rank": rank,
                "world_size": 1,
                "start": earliest[(run_id, attempt, rank)],
                "start_declared": False,
                "hook_errors": 0,
            }
            for run_id, attempt, rank in missing
        ]
        _insert_ignore(session, Attempt, placeholders)  # or a concurrent batch made it
        stored.update(_stored_attempts(session, missing))
    return {k: dict(row._mapping) for k, row in stored.items()}


def _update_attempts(
    session: Session, rows: Iterable[dict[str, Any]], columns: tuple[str, ...]
) -> None:
    """Write `columns` of attempt rows (dicts holding `id`), one executemany."""
    params = [{"b_id": r["id"], **{f"b_{c}": r[c] for c in columns}} for r in rows]
    if not params:
        return
    table = _table(Attempt)
    values = {c: bindparam(f"b_{c}", type_=table.c[c].type) for c in columns}
    stmt = update(table).where(table.c.id == bindparam("b_id")).values(values)
    session.connection().execute(stmt, params)


def _lower_placeholder_start(row: dict[str, Any], t: float) -> bool:
    """A placeholder start is the earliest time seen of its attempt: lower it to `t`."""
    if row["start_declared"] or t >= row["start"]:
        return False
    row["start"] = t
    return True


_END_FIELDS = ("end", "status", "cause", "hook_errors", "counters")


def _end_attempts(
    session: Session, ends: list[tuple[int, AttemptEndRecord]], problems: _Problems
) -> int:
    """Complete attempt rows (an attempt never started gets a placeholder row); an end already
    stored is a duplicate if the record repeats it (end, status, cause, hook errors,
    counters), else a conflict. Refused: an end before the attempt's declared start, or
    before a step, span, checkpoint or heartbeat already stored of its attempt rank."""
    if not ends:
        return 0
    attempts = _open_attempts(session, ends, attrgetter("end"))
    changed: dict[_AttemptKey, dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    index: dict[_AttemptKey, int] = {}
    for i, rec in ends:
        k = _ATTEMPT_KEY(rec)
        row = attempts[k]
        if row["end"] is not None:  # stored, or set by an earlier record of the batch
            problems.compare(i, rec, row)
            continue
        if rec.end < row["start"] and row["start_declared"]:
            errors.append(
                _err(
                    i,
                    "end",
                    f"end ({rec.end}) is before the attempt's start ({row['start']})",
                    "end_before_start",
                )
            )
            continue
        _lower_placeholder_start(row, rec.end)
        row.update({f: getattr(rec, f) for f in _END_FIELDS})
        changed[k] = row
        index[k] = i
    # (A batch already refused for a record after its end is not read again for it.)
    latest = {} if problems.errors else _latest_stored(session, changed)
    for k, (t, what) in latest.items():
        row = changed[k]
        if t > row["end"]:
            errors.append(
                _err(
                    index[k],
                    "end",
                    f"end ({row['end']}) is before the {what} of attempt {k[1]}, rank {k[2]} "
                    f"stored at {t}: a rank records nothing after its attempt ends",
                    "end_before_records",
                )
            )
    if errors:
        problems.refuse(errors)
    _update_attempts(session, changed.values(), ("start", *_END_FIELDS))
    return len(changed)


def _latest_stored(
    session: Session, rows: dict[_AttemptKey, dict[str, Any]]
) -> dict[_AttemptKey, tuple[float, str]]:
    """Per attempt rank: its latest stored time (a step's or span's end, a checkpoint's or
    heartbeat's time) and what holds it. Per run, one indexed read each of the coarse step
    blocks, the span totals and the checkpoints."""
    out: dict[_AttemptKey, tuple[float, str]] = {}

    def later(k: _AttemptKey, t: float | None, what: str) -> None:
        if t is not None and k in rows and (k not in out or t > out[k][0]):
            out[k] = (t, what)

    for k, row in rows.items():
        later(k, row["last_seen"], "heartbeat")
    by_run: dict[str, list[_AttemptKey]] = {}
    for k in rows:
        by_run.setdefault(k[0], []).append(k)
    for run_id, keys in by_run.items():
        ranks = sorted({k[2] for k in keys})
        attempts = sorted({k[1] for k in keys})
        reads = (
            (
                select(StepBlock.attempt, StepBlock.rank, func.max(StepBlock.last_end))
                .where(
                    StepBlock.run_id == run_id,
                    StepBlock.rank.in_(ranks),
                    StepBlock.level == ROLLUP_LEVELS[-1],
                    StepBlock.attempt.in_(attempts),
                )
                .group_by(StepBlock.attempt, StepBlock.rank),
                "step",
            ),
            (
                select(SpanTotal.attempt, SpanTotal.rank, func.max(SpanTotal.last_end))
                .where(
                    SpanTotal.run_id == run_id,
                    SpanTotal.rank.in_(ranks),
                    SpanTotal.attempt.in_(attempts),
                )
                .group_by(SpanTotal.attempt, SpanTotal.rank),
                "span",
            ),
            (
                select(
                    CheckpointCommit.attempt,
                    CheckpointCommit.rank,
                    func.max(CheckpointCommit.time),
                )
                .where(
                    CheckpointCommit.run_id == run_id,
                    CheckpointCommit.attempt.in_(attempts),
                    CheckpointCommit.rank.in_(ranks),
                )
                .group_by(CheckpointCommit.attempt, CheckpointCommit.rank),
                "checkpoint",
            ),
        )
        for stmt, what in reads:
            for attempt, rank, t in session.execute(stmt):
                later((run_id, attempt, rank), t, what)
    return out


_AT_END = {
    "step": "end",
    "span": "end",
    "checkpoint": "time",
    "heartbeat": "time",
    "metric": "time",
}


_ATTEMPTS = _table(Attempt).c
_ATTEMPT_ENDS = select(_ATTEMPTS.run_id, _ATTEMPTS.attempt, _ATTEMPTS.rank, _ATTEMPTS.end).where(
    tuple_(_ATTEMPTS.run_id, _ATTEMPTS.attempt, _ATTEMPTS.rank).in_(
        bindparam("keys", expanding=True)
    )
)


def _stored_ends(
    session: Session, by_kind: dict[str, list[tuple[int, Any]]]
) -> dict[_AttemptKey, float | None]:
    """The stored attempt rows of the batch's steps, spans, checkpoints, heartbeats and
    metrics: each one's end (None while it has none). One read of the batch's attempt ranks
    (a few hundred a query) whatever their records, before the batch writes attempts (which
    sets no end before _after_attempt_end reads these); an attempt row found also says its
    run is stored."""
    keys: set[_AttemptKey] = set()
    for kind in _AT_END:
        keys.update(map(_ATTEMPT_KEY, map(_SECOND, by_kind.get(kind, ()))))
    ordered = sorted(keys)
    ends: dict[_AttemptKey, float | None] = {}
    conn = session.connection()
    for j in range(0, len(ordered), _KEYS_PER_QUERY):
        found = conn.execute(_ATTEMPT_ENDS, {"keys": ordered[j : j + _KEYS_PER_QUERY]})
        ends.update(((r, a, k), e) for r, a, k, e in found)
    return ends


def _after_attempt_end(
    by_kind: dict[str, list[tuple[int, Any]]],
    stored: dict[_AttemptKey, float | None],
    problems: _Problems,
) -> None:
    """An error for each step, span, checkpoint or heartbeat later than its attempt rank's
    end: the one stored (`stored`: _stored_ends), else the batch's attempt_end."""
    ends = {k: e for k, e in stored.items() if e is not None}
    for _, rec in by_kind.get("attempt_end", ()):
        ends.setdefault(_ATTEMPT_KEY(rec), rec.end)
    if not ends:
        return
    for kind, field in _AT_END.items():
        for i, rec in by_kind.get(kind, ()):
            end = ends.get(_ATTEMPT_KEY(rec))
            if end is not None and getattr(rec, field) > end:
                problems.errors.append(
                    _rec_err(
                        i,
                        rec,
                        field,
                        f"{field} ({getattr(rec, field)}) is after the end of attempt "
                        f"{rec.attempt} of rank {rec.rank} ({end}): a rank records nothing "
                        "after its attempt ends",
                        "after_attempt_end",
                    )
                )


def _heartbeats(session: Session, beats: list[tuple[int, HeartbeatRecord]]) -> int:
    """Advance each attempt's last_seen (an attempt never started gets a placeholder row); a
    heartbeat that does not advance it is a duplicate. A declared interval is kept in
    heartbeat_s, the newest heartbeat's winning; a count of dropped records in
    records_dropped, the largest seen (the hooks send a running total)."""
    if not beats:
        return 0
    attempts = _open_attempts(session, beats, attrgetter("time"))
    changed: dict[_AttemptKey, dict[str, Any]] = {}
    done = 0
    for _, rec in beats:
        k = _ATTEMPT_KEY(rec)
        row = attempts[k]
        if _lower_placeholder_start(row, rec.time):
            changed[k] = row
        last = row["last_seen"]
        newest = last is None or rec.time >= last
        interval = rec.interval_s
        known = row["heartbeat_s"]
        if interval is not None and interval != known and (newest or known is None):
            row["heartbeat_s"] = interval
            changed[k] = row
        if last is None or rec.time > last:
            row["last_seen"] = rec.time
            changed[k] = row
            done += 1
        dropped = rec.records_dropped
        if dropped is not None and dropped > (row["records_dropped"] or 0):
            row["records_dropped"] = dropped  # a running total: the largest is the newest
            changed[k] = row
            if not (last is None or rec.time > last):
                done += 1  # it told something new: not a duplicate
    columns = ("start", "last_seen", "heartbeat_s", "records_dropped")
    _update_attempts(session, changed.values(), columns)
    return done


_RUN_ID = attrgetter("run_id")
