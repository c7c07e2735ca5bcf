"""Per-run figures for a list of runs: what the runs page and the trends show of each run.

Each figure, for one run:

- **goodput fraction**, **badput** (seconds by category) and **other**: the whole-run
  accounting (`accounting.whole_run`, docs/ACCOUNTING.md), i.e. the run's rank (its slowest).
- **duration**: the accounting's `total_s`: the wall time of the run's rank from its first
  attempt's start to its last attempt's end (or last sign of life while it runs), less the
  excluded windows. The time goodput is a fraction of.
- **tokens/s**: the receipt's figure (calc/receipts.py `summarize_steps`): over the whole
  run, each rank's tokens over its summed step time, summed over the ranks (they step side
  by side). From the coarse step rollups.
- **MFU**: of the reference rank (0, else the lowest rank with steps), the median over its
  newest `MFU_STEPS` steps that carry FLOPs of flops / step time / the device's peak
  (`environment.peak_flops_per_s`); none without a peak or FLOPs.
- **peak memory**: the largest `mem_allocated_peak` of any step of any rank (the receipt's).
- **drop rate**: of the routing reference rank (0, else the lowest rank with routing
  records), over every routing record (every E layer, every step, every attempt): dropped
  token-choices over routed token-choices, sum(dropped) / sum(num_tokens * top_k); a
  record's dropped choices are its stored drop rate times its choices.
- **MaxVio**: of the same rank, the mean over its routing records (every E layer, every
  step, every attempt) of the record's MaxVio, max / mean - 1 of the routed experts'
  assignments (calc/routing_stats.py); records without one (no assignment) are left out.
- **attempts**: how many attempts (restarts + 1) the run has.

Speed: the accounting, tokens/s and peak memory read rollups; MFU reads `MFU_STEPS` rows of
one rank. Every figure is cached per run (`FleetCache`) under a key that changes whenever
its inputs do (row counts of inserted-only tables, the attempt rows, the status, the
peak), so a page of 100 runs recomputes only the runs that changed. The routing sums have
no rollup: per attempt, the coarse blocks (4,096 step numbers) but the newest are summed in
one scan of the routing rows, the newest apart, and each block's record count (from the
routing rollup) is kept with them; a live run then re-reads only the blocks that grew, and
records that come late for an old block sum that attempt again. A first look at a run
scans its routing rows once (about 1 s for 1.2 million rows on SQLite).
"""

from __future__ import annotations

import statistics
import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy.orm import Session

from service.calc.receipts import RankSteps, reference_rank, summarize_steps
from service.calc.throughput import peak_of
from service.schemas import RunSummary
from service.services import accounting
from service.services.errors import Invalid
from service.services.runs import list_runs, run_status
from service.store import fleet as store
from service.store import queries
from service.store.queries import RUN_STATUSES, RunStatus
from service.store.rollups import read as rollup_read

MFU_STEPS = 1_000
CACHE_RUNS = 4_096  # runs whose figures a cache keeps (least recently used go first)
FILTER_FIELDS = ("name", "project", "status", "tag", "pattern", "lane", "from", "to")


@dataclass(frozen=True)
class RunFigures:
    """One run's figures (the module's docstring defines each); None where it has none."""

    run_id: str
    pattern: str | None = None
    lane: str | None = None
    goodput_fraction: float | None = None
    goodput_s: float = 0.0
    total_s: float = 0.0  # the duration
    badput_s: dict[str, float] = field(default_factory=dict)
    other_s: float = 0.0
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    drop_rate: float | None = None
    max_vio: float | None = None
    routing_records: int = 0
    attempts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- filters --


@dataclass(frozen=True)
class RunFilter:
    """The runs page's filters, as its form sends them (an empty field is no filter):
    `name` a substring of the name, `since`/`until` UTC dates, both inclusive."""

    name: str | None = None
    project: str | None = None
    status: RunStatus | None = None
    tag: str | None = None
    pattern: str | None = None
    lane: str | None = None
    since: date | None = None
    until: date | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, str | None]) -> RunFilter:
        """From the query's fields (FILTER_FIELDS); Invalid names the field that is wrong."""
        v = {k: (raw.get(k) or "").strip() or None for k in FILTER_FIELDS}
        status = v["status"]
        if status is not None and status not in RUN_STATUSES:
            msg = f"{status!r} is not a status: one of {', '.join(RUN_STATUSES)}"
            raise Invalid.field("query", "status", msg)
        since, until = _date(v["from"], "from"), _date(v["to"], "to")
        if since and until and until < since:
            raise Invalid.field("query", "to", f"{until} is before from ({since})")
        return cls(
            name=v["name"],
            project=v["project"],
            status=cast(RunStatus, status),  # checked above
            tag=v["tag"],
            pattern=v["pattern"],
            lane=v["lane"],
            since=since,
            until=until,
        )

    def query(self) -> dict[str, Any]:
        """runs.list_runs' filters."""
        return {
            "name_contains": self.name,
            "project": self.project,
            "status": self.status,
            "tag": self.tag,
            "pattern": self.pattern,
            "lane": self.lane,
            "created_from": _midnight(self.since) if self.since else None,
            "created_to": _midnight(self.until + timedelta(days=1)) if self.until else None,
        }

    def params(self) -> dict[str, str]:
        """The filters set, as the page's query fields."""
        values = {
            "name": self.name,
            "project": self.project,
            "status": self.status,
            "tag": self.tag,
            "pattern": self.pattern,
            "lane": self.lane,
            "from": self.since.isoformat() if self.since else None,
            "to": self.until.isoformat() if self.until else None,
        }
        return {k: v for k, v in values.items() if v is not None}

    @property
    def active(self) -> bool:
        return bool(self.params())


def _date(text: str | None, name: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise Invalid.field("query", name, f"{text!r} is not a date (YYYY-MM-DD)") from None


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


# -- the list --


class Listed(NamedTuple):
    runs: list[RunSummary]
    figures: dict[str, RunFigures]
    next_cursor: str | None
    any_runs: bool  # whether the service holds any run (filters aside)


def listed(
    session: Session,
    flt: RunFilter,
    cache: FleetCache,
    limit: int,
    cursor: str | None = None,
) -> Listed:
    """The runs the filters admit, newest first (at most `limit`), with their figures."""
    found = list_runs(session, limit=limit, cursor=cursor, **flt.query())
    ids = [r.run_id for r in found.runs]
    return Listed(
        found.runs,
        cache.figures(session, ids),
        found.next_cursor,
        bool(found.runs) or store.any_run(session),
    )


def check_cursor(cursor: str | None) -> None:
    """Invalid (naming `cursor`) unless it is a `next_cursor` this service gave."""
    if cursor:
        try:
            queries.Cursor.decode(cursor)
        except ValueError as exc:
            raise Invalid.field("query", "cursor", str(exc)) from exc


def any_run(session: Session) -> bool:
    """Whether the service holds any run at all."""
    return store.any_run(session)


def choices(session: Session) -> store.Choices:
    """The values the filters can take (the forms' suggestions)."""
    return store.choices(session)


# -- the figures, cached --


class _AttemptRouting(NamedTuple):
    """One attempt's routing sums: its coarse blocks below `frozen_to` summed together
    (`frozen`, one scan), each later block apart (`tail`: where a live run grows); `counts`
    the records each block held when summed."""

    counts: dict[int, int]
    frozen_to: int
    frozen: store.RoutingSums
    tail: dict[int, store.RoutingSums]

    def total(self) -> store.RoutingSums:
        out = self.frozen
        for part in self.tail.values():
            out = out.plus(part)
        return out


class _Routing(NamedTuple):
    rank: int
    attempts: dict[int, _AttemptRouting]


class FleetCache:
    """Each run's figures, reused while its inputs are unchanged (the module's docstring)."""

    def __init__(self, max_runs: int = CACHE_RUNS) -> None:
        self._lock = threading.Lock()
        self._max = max_runs
        self._runs: OrderedDict[str, tuple[Hashable, RunFigures]] = OrderedDict()
        self._routing: dict[str, _Routing] = {}

    def figures(self, session: Session, run_ids: Sequence[str]) -> dict[str, RunFigures]:
        """The figures of each run named (one that is not stored gets empty figures)."""
        if not run_ids:
            return {}
        parts = store.run_parts(session, run_ids)
        keys = _change_keys(session, run_ids, parts)  # before the rows: never older
        out = {}
        for run_id in run_ids:
            with self._lock:
                hit = self._runs.get(run_id)
            p = parts.get(run_id)
            if hit is None or hit[0] != keys[run_id]:
                figs = self._compute(session, run_id, p)
                with self._lock:
                    self._runs[run_id] = (keys[run_id], figs)
            else:
                figs = hit[1]
            with self._lock:
                self._runs.move_to_end(run_id)
            out[run_id] = figs
        self._trim()
        return out

    def _trim(self) -> None:
        with self._lock:
            while len(self._runs) > self._max:
                gone, _ = self._runs.popitem(last=False)
                self._routing.pop(gone, None)

    def _compute(self, session: Session, run_id: str, p: store.RunParts | None) -> RunFigures:
        if p is None:
            return RunFigures(run_id)
        g = accounting.whole_run(session, run_id).goodput
        per_rank = {
            r: RankSteps(*s) for r, s in rollup_read.rank_step_sums(session, run_id).items()
        }
        ref = reference_rank(r for r, v in per_rank.items() if v.steps > 0)
        peak = peak_of(p.environment)
        mfu = None
        if ref is not None and peak is not None:
            mfu = median_mfu(store.newest_step_work(session, run_id, ref, MFU_STEPS), peak)
        routing = self._routing_sums(session, run_id)
        return RunFigures(
            run_id=run_id,
            pattern=p.pattern,
            lane=p.lane,
            goodput_fraction=g.goodput_fraction,
            goodput_s=g.goodput_s,
            total_s=g.total_s,
            badput_s=dict(g.badput_s),
            other_s=g.other_s,
            tokens_per_s=summarize_steps(per_rank, [], None).tokens_per_s,
            mfu=mfu,
            peak_memory_bytes=queries.peak_memory_of(session, run_id),
            drop_rate=routing.dropped / routing.assignments if routing.assignments else None,
            max_vio=routing.max_vio_sum / routing.max_vio_n if routing.max_vio_n else None,
            routing_records=routing.records,
            attempts=len({a.attempt for a in rollup_read.attempt_rows(session, run_id)}),
        )

    def _routing_sums(self, session: Session, run_id: str) -> store.RoutingSums:
        """The routing sums of the run's routing reference rank, re-reading only what
        changed since they were summed (`_attempt_sums`)."""
        ranks = store.routing_ranks(session, run_id)
        if not ranks:
            return store.NO_ROUTING
        rank = 0 if 0 in ranks else ranks[0]
        counts = store.routing_block_counts(session, run_id, rank)
        with self._lock:
            have = self._routing.get(run_id)
        kept = have.attempts if have is not None and have.rank == rank else {}
        attempts = {
            attempt: _attempt_sums(session, run_id, rank, attempt, blocks, kept.get(attempt))
            for attempt, blocks in counts.items()
        }
        with self._lock:
            self._routing[run_id] = _Routing(rank, attempts)
        total = store.NO_ROUTING
        for part in attempts.values():
            total = total.plus(part.total())
        return total


def _attempt_sums(
    session: Session,
    run_id: str,
    rank: int,
    attempt: int,
    counts: dict[int, int],
    have: _AttemptRouting | None,
) -> _AttemptRouting:
    """One attempt's routing sums, given each coarse block's record count now (routing rows
    are only ever inserted: a block whose count is unchanged holds the same rows). Blocks
    that changed at or after `frozen_to` are re-read one by one (a live run's newest
    blocks); any other change (records that came late for an old block) sums the attempt
    again: all its blocks but the last in one scan, the last apart."""
    if have is not None and set(have.counts) <= set(counts):
        changed = [b for b, n in counts.items() if have.counts.get(b) != n]
        if all(b >= have.frozen_to for b in changed):
            seen, tail = dict(have.counts), dict(have.tail)
            for b in changed:
                tail[b] = store.routing_sums(session, run_id, rank, attempt, b, b)
                seen[b] = tail[b].records  # a block that grew meanwhile is read again
            return _AttemptRouting(seen, have.frozen_to, have.frozen, tail)
    last = max(counts)
    frozen = store.NO_ROUTING
    if last > 0:
        frozen = store.routing_sums(session, run_id, rank, attempt, 0, last - 1)
    newest = store.routing_sums(session, run_id, rank, attempt, last, last)
    seen = {**counts, last: newest.records}
    if frozen.records != sum(n for b, n in counts.items() if b < last):
        seen = {}  # rows came between the counts and the scan: sum it all again next time
    return _AttemptRouting(seen, last, frozen, {last: newest})


def median_mfu(steps: Sequence[store.StepWork], peak_flops_per_s: float) -> float | None:
    """The median of flops / step time / peak over the steps that carry FLOPs."""
    rates = [s.flops / s.seconds / peak_flops_per_s for s in steps if s.flops and s.seconds > 0]
    return statistics.median(rates) if rates else None


def _change_keys(
    session: Session, run_ids: Sequence[str], parts: Mapping[str, store.RunParts]
) -> dict[str, Hashable]:
    """What a run's figures depend on: its row counts (steps, spans, checkpoints, excluded
    windows, routing records: only ever inserted), its attempt rows (updated), its status
    now (a run stalls with time alone) and its device's peak (the run record may come
    late). Routing blocks are checked apart (FleetCache._routing_sums)."""
    attempts: dict[str, list[Any]] = {r: [] for r in run_ids}
    for a in queries.attempts_of(session, run_ids):
        attempts[a.run_id].append(a)
    counts = queries.goodput_row_counts(session, run_ids)
    routing = store.routing_counts(session, run_ids)
    keys: dict[str, Hashable] = {}
    for r in run_ids:
        rows = tuple(
            (a.attempt, a.rank, a.start, a.end, a.status, a.last_seen, a.heartbeat_s)
            for a in attempts[r]
        )
        p = parts.get(r)
        peak = peak_of(p.environment) if p is not None else None
        keys[r] = (
            counts.get(r),
            routing.get(r, 0),
            rows,
            run_status(attempts[r]),
            peak,
            p.pattern if p else None,
            p.lane if p else None,
        )
    return keys


def cache_of(holder: Any) -> FleetCache:
    """The FleetCache kept on `holder` (the app's state: one per app, so apps on other
    databases never share figures), made on first use."""
    cache = getattr(holder, "fleet_cache", None)
    if not isinstance(cache, FleetCache):
        cache = FleetCache()
        holder.fleet_cache = cache
    return cache
