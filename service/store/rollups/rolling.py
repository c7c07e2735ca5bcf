"""Many windows of one run at once (`/goodput/rolling`): the same sums as
`WindowReader.parts` gives one window, read in a few statements for all of them (the rollups'
SQL lives in service/store/rollups/). Callers pass a Connection; nothing here writes.

A window's steps are summed incrementally, from cumulative figures at its two edges. At each
edge `e` of any window, per attempt rank: the steps that start before `e`, those that end by
`e` (their count, tokens, hook time, and step time minus `blocked_s` on either side of the
attempt's last checkpoint), and the one step that crosses `e`, if any. A window is then the
difference of its edges' figures, with the steps that cross an edge cut to it and measured
against the blocking spans there, exactly as `WindowReader.parts` measures them. The figures
at an edge come from the fine step blocks (read once for the run, summed in Python); inside
each fine block that straddles an edge, from its micro blocks of MICRO_BLOCK steps
(`step_micro_blocks`: those wholly before the edge, summed by the database); and from the
steps of the one or two micro blocks that straddle it. Each runs as one statement over the
list of (edge, block) pairs (`_values`: a temporary table on SQLite, a `VALUES` list on
PostgreSQL).

A window's spans are summed the same way, per (attempt, rank, category): at each edge, the
seconds before it of the blocking spans, from the span buckets of SPAN_BUCKET_S seconds
(`span_buckets`, read once for the run: those whose spans all end before the edge) and, in
one statement, the spans of the buckets that straddle it; with how many spans start before
the edge and how many end by it (a window that no span meets gets no seconds, not a rounding
residue). The buckets hold every blocking span; those that clash with another (few, read
once) are taken out of each window they meet and charged by precedence in Python
(goodput.charged).

Near the cap of 10,000 windows on a 1,000,000-step run this reads about 16 step rows and a few
dozen span rows per edge, where reading every step of the straddling fine blocks and every
span of every window read each record about once (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from service.calc.goodput import ROUNDING_SLACK_S, AttemptSplit, RankParts, SpanIndex, charged
from service.store.models import MICRO_BLOCK, SPAN_BUCKET_S, SpanBucket, StepBlock
from service.store.rollups.common import FINE, grouped
from service.store.rollups.windows import WindowReader

# Rows of one VALUES list (PostgreSQL allows 65,535 bound values in a statement).
CHUNK_ROWS = 2_000
NO_CHECKPOINT = 2**62  # an attempt split at no checkpoint: every step is on the committed side
EVER = 1e300  # an edge after every step

# A window's span seconds are a difference of sums over the whole run: where no span meets it
# they are 0 (counted), and where only spans of no length do, the difference may leave a few
# ulps of those sums; a cut of a real span on epoch times is at least an ulp of one (2.4e-7 s).
RESIDUE_S = 1e-9

_SQL_TYPES = {
    "sqlite": {"int": "INTEGER", "float": "REAL", "text": "TEXT"},  # INTEGER PRIMARY KEY: rowid
    "postgresql": {"int": "BIGINT", "float": "DOUBLE PRECISION", "text": "TEXT"},
}

# Per (pair, edge t, attempt a, rank r, steps f..l, checkpoint step up): the block's steps
# summed against t. Only one step of an attempt rank can cross t (steps of one attempt rank
# never overlap: ingest refuses it), so max() picks its fields; `crossing` counts them.
_CROSS = 's.start < e.t AND s."end" > e.t'
_EDGE_SUMS = f"""
SELECT e.pid,
  sum(CASE WHEN s.start < e.t THEN 1 ELSE 0 END),
  sum(CASE WHEN s.start < e.t THEN s.tokens ELSE 0 END),
  sum(CASE WHEN s."end" <= e.t THEN 1 ELSE 0 END),
  sum(CASE WHEN s."end" <= e.t THEN s.tokens ELSE 0 END),
  sum(CASE WHEN s."end" <= e.t THEN coalesce(s.hook_overhead_s, 0.0) ELSE 0.0 END),
  sum(CASE WHEN s."end" <= e.t AND s.step <= e.up
      THEN s."end" - s.start - s.blocked_s ELSE 0.0 END),
  sum(CASE WHEN s."end" <= e.t AND s.step > e.up
      THEN s."end" - s.start - s.blocked_s ELSE 0.0 END),
  sum(CASE WHEN s.start < e.t AND s.step > e.up THEN 1 ELSE 0 END),
  sum(CASE WHEN s."end" <= e.t AND s.step > e.up THEN 1 ELSE 0 END),
  sum(CASE WHEN {_CROSS} THEN 1 ELSE 0 END),
  max(CASE WHEN {_CROSS} THEN s.step END),
  max(CASE WHEN {_CROSS} THEN s.start END),
  max(CASE WHEN {_CROSS} THEN s."end" END),
  max(CASE WHEN {_CROSS} THEN s."end" - s.start - s.blocked_s END),
  max(CASE WHEN {_CROSS} THEN s.blocked_s END),
  sum(CASE WHEN s."end" <= e.t AND s.start < e.t
      THEN coalesce(s.hook_overhead_s, 0.0) ELSE 0.0 END)
FROM {{source}} CROSS JOIN steps s
WHERE s.run_id = {{run}} AND s.attempt = e.a AND s.rank = e.r AND s.step BETWEEN e.f AND e.l
  AND s.start <= e.t
GROUP BY e.pid
"""
_EDGE_COLS = (
    *(("pid", "int"), ("t", "float"), ("a", "int"), ("r", "int")),
    *(("f", "int"), ("l", "int"), ("up", "int")),
)

# Per (pair, edge t, attempt a, rank r, micro blocks f..l, checkpoint step up): the micro
# blocks that start by t, those whose steps all end before t and lie on one side of up summed
# (`whole`), and how many others there are, the first and the last (their steps are summed
# by _EDGE_SUMS).
_WHOLE = (
    f"(m.last_end < e.t AND ((m.micro + 1) * {MICRO_BLOCK} - 1 <= e.up"
    f" OR m.micro * {MICRO_BLOCK} > e.up))"
)
_MICRO_SUMS = f"""
SELECT e.pid,
  sum(CASE WHEN {_WHOLE} THEN m.n ELSE 0 END),
  sum(CASE WHEN {_WHOLE} THEN m.tokens ELSE 0 END),
  sum(CASE WHEN {_WHOLE} THEN m.hook_s ELSE 0.0 END),
  sum(CASE WHEN {_WHOLE} AND m.micro * {MICRO_BLOCK} <= e.up
      THEN m.busy_s - m.blocked_s ELSE 0.0 END),
  sum(CASE WHEN {_WHOLE} AND m.micro * {MICRO_BLOCK} > e.up
      THEN m.busy_s - m.blocked_s ELSE 0.0 END),
  sum(CASE WHEN {_WHOLE} AND m.micro * {MICRO_BLOCK} > e.up THEN m.n ELSE 0 END),
  sum(CASE WHEN {_WHOLE} THEN 0 ELSE 1 END),
  min(CASE WHEN {_WHOLE} THEN NULL ELSE m.micro END),
  max(CASE WHEN {_WHOLE} THEN NULL ELSE m.micro END)
FROM {{source}} CROSS JOIN step_micro_blocks m
WHERE m.run_id = {{run}} AND m.attempt = e.a AND m.rank = e.r AND m.micro BETWEEN e.f AND e.l
  AND m.first_start <= e.t
GROUP BY e.pid
"""

# Per (pair, attempt, rank, category, reach, lo, hi): the cut seconds of the blocking spans
# that clash with no other and overlap [lo, hi].
_SPAN_SUMS = """
SELECT e.pid,
  sum(CASE WHEN s."end" < e.hi THEN s."end" ELSE e.hi END
      - CASE WHEN s.start > e.lo THEN s.start ELSE e.lo END)
FROM {source} CROSS JOIN spans s
WHERE s.run_id = {run} AND s.attempt = e.a AND s.rank = e.r AND s.category = e.c
  AND s.start >= e.reach AND s.start < e.hi AND s."end" > e.lo
  AND NOT s.overlapped AND NOT s.clashes
GROUP BY e.pid
"""
_SPAN_COLS = (
    *(("pid", "int"), ("a", "int"), ("r", "int"), ("c", "text")),
    *(("reach", "float"), ("lo", "float"), ("hi", "float")),
)


# Per (pair, edge t, attempt a, rank r, category c, bucket start f, u = min(bucket end, t)):
# the bucket's blocking spans that start before t, summed against it: their seconds before t,
# their count, and the count of those that end by t.
_BUCKET_SUMS = """
SELECT e.pid,
  sum(CASE WHEN s."end" <= e.t THEN s."end" - s.start ELSE e.t - s.start END),
  count(*),
  sum(CASE WHEN s."end" <= e.t THEN 1 ELSE 0 END)
FROM {source} CROSS JOIN spans s
WHERE s.run_id = {run} AND s.attempt = e.a AND s.rank = e.r AND s.category = e.c
  AND s.start >= e.f AND s.start < e.u AND NOT s.overlapped
GROUP BY e.pid
"""
_BUCKET_COLS = (
    *(("pid", "int"), ("t", "float"), ("a", "int"), ("r", "int"), ("c", "text")),
    *(("f", "float"), ("u", "float")),
)


def _plain_rows(conn: Connection, stmt: Any) -> list[tuple[Any, ...]]:
    """The rows of a read of numbers as the driver gives them (tuples), without building a
    Row for each: numpy reads tuples quickly, Rows one value at a time."""
    return list(conn.execute(stmt).cursor.fetchall())


def _values(
    conn: Connection, template: str, cols: Sequence[tuple[str, str]], run_id: str, rows: list
) -> list[Any]:
    """Run `template` joined with `rows` as the relation e, whose first column `pid` numbers
    the rows. On SQLite the rows go into a temporary table keyed by pid (the connection's own:
    the run's tables are only read), which the join then scans in pid order, so the rows need
    no sorting to be grouped; on PostgreSQL they are a `VALUES` list, in chunks, its first
    row cast to the columns' types (PostgreSQL infers them from it)."""
    if not rows:
        return []
    if conn.dialect.name == "sqlite":
        return _temp_table(conn, template, cols, run_id, rows)
    types = _SQL_TYPES["postgresql"]
    names = ", ".join(name for name, _ in cols)
    typed = "(" + ", ".join(f"CAST(%s AS {types[kind]})" for _, kind in cols) + ")"
    plain = "(" + ", ".join(["%s"] * len(cols)) + ")"
    out: list[Any] = []
    for i in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[i : i + CHUNK_ROWS]
        values = ", ".join([typed] + [plain] * (len(chunk) - 1))
        sql = f"WITH e({names}) AS (VALUES {values}) " + template.format(source="e", run="%s")
        params = tuple(v for row in chunk for v in row) + (run_id,)
        out += conn.exec_driver_sql(sql, params).all()
    return out


def _temp_table(
    conn: Connection, template: str, cols: Sequence[tuple[str, str]], run_id: str, rows: list
) -> list[Any]:
    types = _SQL_TYPES["sqlite"]
    table = "goodput_rolling_" + "_".join(name for name, _ in cols)
    columns = ", ".join(
        f"{name} {types[kind]}" + (" PRIMARY KEY" if name == "pid" else "") for name, kind in cols
    )
    conn.exec_driver_sql(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({columns})")
    conn.exec_driver_sql(f"DELETE FROM temp.{table}")
    try:
        marks = ", ".join("?" * len(cols))
        conn.exec_driver_sql(f"INSERT INTO temp.{table} VALUES ({marks})", rows)
        sql = template.format(source=f"temp.{table} AS e", run="?")
        return list(conn.exec_driver_sql(sql, (run_id,)).all())
    finally:
        conn.exec_driver_sql(f"DELETE FROM temp.{table}")


@dataclass(slots=True)
class _Crossing:
    """The step of one attempt rank that crosses an edge."""

    step: int
    start: float
    end: float
    full: float  # its whole step time minus blocked_s
    blocked: float  # blocked_s: its seconds covered by blocking spans, kept at ingest


@dataclass
class _EdgeFigures:
    """One attempt rank's cumulative figures at every edge (lists over the sorted edges)."""

    n_lt: list[int]  # steps that start before the edge
    tok_lt: list[int]
    n_le: list[int]  # steps that end by the edge
    tok_le: list[int]
    hook_le: list[float]
    hook_lt: list[float]  # hook time of the steps that end by the edge and start before it
    upto_le: list[float]  # step time minus blocked_s of the steps that end by it, <= checkpoint
    after_le: list[float]  # the same, after the checkpoint
    after_lt: list[int]  # steps after the checkpoint that start before the edge
    after_n_le: list[int]
    crossing: dict[int, _Crossing] = field(default_factory=dict)  # edge index -> its step

    def add_whole(
        self, e: int, n: int, tokens: int, hook: float, upto: float, after: float, after_n: int
    ) -> None:
        """Steps that all start before edge `e` and end by it, summed (micro blocks)."""
        self.n_lt[e] += n
        self.tok_lt[e] += tokens
        self.n_le[e] += n
        self.tok_le[e] += tokens
        self.hook_le[e] += hook
        self.hook_lt[e] += hook
        self.upto_le[e] += upto
        self.after_le[e] += after
        self.after_lt[e] += after_n
        self.after_n_le[e] += after_n

    def add(self, e: int, row: Any) -> None:
        """One straddling block's steps summed against edge `e` (a row of _EDGE_SUMS)."""
        n_lt, tok_lt, n_le, tok_le, hook, upto, after, a_lt, a_le, crossing = row[1:11]
        self.n_lt[e] += int(n_lt)
        self.tok_lt[e] += int(tok_lt)
        self.n_le[e] += int(n_le)
        self.tok_le[e] += int(tok_le)
        self.hook_le[e] += hook
        self.hook_lt[e] += row[16]
        self.upto_le[e] += upto
        self.after_le[e] += after
        self.after_lt[e] += int(a_lt)
        self.after_n_le[e] += int(a_le)
        if crossing:
            if crossing > 1 or e in self.crossing:
                raise _Fallback
            self.crossing[e] = _Crossing(int(row[11]), row[12], row[13], row[14], row[15])


class _Blocks:
    """One attempt rank's fine blocks, as arrays; each block's step time minus blocked_s on
    either side of the attempt's checkpoint step `up`."""

    def __init__(self, rows: list[Any], up: int) -> None:
        a = np.array([r[2:] for r in rows], dtype=float)
        self.up = up
        self.block, self.first, self.last = a[:, 0], a[:, 1], a[:, 2]
        self.n, self.tokens, self.hook, busy = a[:, 3], a[:, 4], a[:, 5], a[:, 6]
        after = self.block * FINE > up  # wholly after the checkpoint
        self.across = ~after & ((self.block + 1) * FINE - 1 > up)  # holds the checkpoint step
        self.upto_busy = np.where(after | self.across, 0.0, busy)
        self.after_busy = np.where(after, busy, 0.0)
        self.after_n = np.where(after, self.n, 0.0)

    def before(self, edges: np.ndarray) -> _EdgeFigures:
        """The sums of the blocks that end before each edge (every step of them starts
        before it and ends by it)."""
        order = np.argsort(self.last, kind="stable")
        count = np.searchsorted(self.last[order], edges, side="left")

        def cum(x: np.ndarray) -> Any:
            return np.concatenate(([0.0], np.cumsum(x[order])))[count]

        def whole(x: np.ndarray) -> Any:
            return np.concatenate(([0], np.cumsum(x[order].astype(np.int64))))[count]

        n, tokens, after_n = whole(self.n), whole(self.tokens), whole(self.after_n)
        return _EdgeFigures(  # lists: one value at a time, they are faster than arrays
            n_lt=n.tolist(),
            tok_lt=tokens.tolist(),
            n_le=n.tolist(),
            tok_le=tokens.tolist(),
            hook_le=cum(self.hook).tolist(),
            hook_lt=cum(self.hook).tolist(),
            upto_le=cum(self.upto_busy).tolist(),
            after_le=cum(self.after_busy).tolist(),
            after_lt=after_n.tolist(),
            after_n_le=after_n.tolist(),
        )


class _Fallback(Exception):
    """The stored steps break an assumption (two steps of one attempt rank cross one edge):
    each window is then read on its own."""


def parts_many(
    reader: WindowReader, intervals: Sequence[tuple[float, float]]
) -> list[dict[int, RankParts]]:
    """Every rank's records cut to each interval and summed: what `reader.parts(lo, hi)`
    gives in `.ranks`, for all the intervals at once."""
    if not intervals:
        return []
    try:
        return _Many(reader, intervals).parts()
    except _Fallback:
        return [reader.parts(lo, hi).ranks for lo, hi in intervals]


class _Many:
    def __init__(self, reader: WindowReader, intervals: Sequence[tuple[float, float]]) -> None:
        for lo, hi in intervals:
            if not hi > lo:
                raise ValueError(f"end ({hi}) must be after start ({lo})")
        self.reader = reader
        self.conn = reader.session.connection()
        self.intervals = list(intervals)
        self.edges = np.array(sorted({x for pair in intervals for x in pair}), dtype=float)
        self.at = {float(x): i for i, x in enumerate(self.edges)}
        self.ups: dict[int, int] = {}

    def parts(self) -> list[dict[int, RankParts]]:
        figures = self._edge_figures()
        windows = [self._steps_of(lo, hi, figures) for lo, hi in self.intervals]
        blocked = self._blocked([edge for w in windows for edge in w.edges])
        spans = self._span_sums()
        out = []
        for i, (lo, hi) in enumerate(self.intervals):
            w = windows[i]
            for rank, (a, b), attempt, step in w.edges:
                split = w.split.setdefault((attempt, rank), [0.0, 0.0, 0])
                split[0 if self._upto(attempt, step.step) else 1] += (b - a) - blocked[rank, a, b]
            out.append(self._ranks(i, lo, hi, w, spans))
        return out

    # -- steps --

    def _edge_figures(self) -> dict[tuple[int, int], _EdgeFigures]:
        b = StepBlock
        stmt = select(
            b.attempt,
            b.rank,
            b.block,
            b.first_start,
            b.last_end,
            b.n,
            b.tokens,
            b.hook_s,
            b.busy_s - b.blocked_s,
        ).where(b.run_id == self.reader.run_id, b.level == FINE)
        by_key = grouped(_plain_rows(self.conn, stmt), lambda r: (r[0], r[1]))
        blocks = {key: _Blocks(rows, self._checkpoint(key[0])) for key, rows in by_key.items()}
        self._split_across(blocks)
        out: dict[tuple[int, int], _EdgeFigures] = {}
        pairs: list[tuple[Any, ...]] = []
        where: list[tuple[tuple[int, int], int]] = []
        for key, blk in sorted(blocks.items()):
            out[key] = blk.before(self.edges)
            for e, j in self._straddles(blk.first, blk.last):
                first = int(blk.block[j]) * FINE // MICRO_BLOCK
                pairs.append((len(pairs), float(self.edges[e]), *key, first))
                pairs[-1] += (first + FINE // MICRO_BLOCK - 1, blk.up)
                where.append((key, e))
        steps: list[tuple[Any, ...]] = []  # the straddling micro blocks' steps, per edge
        at: list[tuple[tuple[int, int], int]] = []
        found = _values(self.conn, _MICRO_SUMS, _EDGE_COLS, self.reader.run_id, pairs)
        for pid, n, tokens, hook, upto, after, after_n, left, first, last in found:
            key, e = where[pid]
            _, t, attempt, rank, block_first, block_last, up = pairs[pid]
            if left and last - first + 1 != left:  # not one run of micro blocks: every step
                first, last = block_first, block_last
            else:
                out[key].add_whole(e, int(n), int(tokens), hook, upto, after, int(after_n))
            if left:
                steps.append((len(steps), t, attempt, rank, first * MICRO_BLOCK))
                steps[-1] += ((last + 1) * MICRO_BLOCK - 1, up)
                at.append((key, e))
        for row in _values(self.conn, _EDGE_SUMS, _EDGE_COLS, self.reader.run_id, steps):
            key, e = at[row[0]]
            out[key].add(e, row)
        return out

    def _split_across(self, blocks: dict[tuple[int, int], _Blocks]) -> None:
        """The block that holds an attempt's checkpoint step (one at most per attempt rank)
        has its steps summed on either side of it, once."""
        pairs: list[tuple[Any, ...]] = []
        where: list[tuple[tuple[int, int], int]] = []
        for key, blk in sorted(blocks.items()):
            for j in np.flatnonzero(blk.across).tolist():
                first_step = int(blk.block[j]) * FINE
                pairs.append((len(pairs), EVER, *key, first_step, first_step + FINE - 1, blk.up))
                where.append((key, j))
        for row in _values(self.conn, _EDGE_SUMS, _EDGE_COLS, self.reader.run_id, pairs):
            key, j = where[row[0]]
            blk = blocks[key]
            blk.upto_busy[j], blk.after_busy[j], blk.after_n[j] = row[6], row[7], int(row[8])

    def _checkpoint(self, attempt: int) -> int:
        """The step the accounting splits the attempt at: its last successful checkpoint's,
        or none (every step on the committed side)."""
        upto = self.reader.upto.get(attempt, math.inf)
        if upto == math.inf:
            return NO_CHECKPOINT
        if upto != self.reader.saved.get(attempt, -1):  # the accounting only cuts at these
            raise RuntimeError(f"no sums kept for a cut at step {upto}")
        return int(upto)

    def _straddles(self, first: np.ndarray, last: np.ndarray) -> list[tuple[int, int]]:
        """(edge index, block index) for each block whose time span holds the edge (first
        start <= edge <= last end), by edge: each block's edges are a run of the sorted
        edges."""
        lo = np.searchsorted(self.edges, first, side="left")
        counts = np.maximum(np.searchsorted(self.edges, last, side="right") - lo, 0)
        blocks = np.repeat(np.arange(len(first)), counts)
        offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        edges = np.arange(len(blocks)) + offsets
        order = np.lexsort((blocks, edges))
        return list(zip(edges[order].tolist(), blocks[order].tolist(), strict=True))

    def _steps_of(
        self, lo: float, hi: float, figures: dict[tuple[int, int], _EdgeFigures]
    ) -> _Window:
        """A window's steps from its edges' figures; the steps that cross an edge cut to it,
        their blocked time still to be measured."""
        il, ih = self.at[lo], self.at[hi]
        w = _Window()
        for (attempt, rank), f in figures.items():
            n = f.n_lt[ih] - f.n_le[il]
            if n <= 0:
                continue
            upto = f.upto_le[ih] - f.upto_le[il]
            after = f.after_le[ih] - f.after_le[il]
            low, high = f.crossing.get(il), f.crossing.get(ih)
            if low is not None and low.end <= hi:  # summed whole by its end: take it out
                if self._upto(attempt, low.step):
                    upto -= low.full
                else:
                    after -= low.full
            w.split[attempt, rank] = [upto, after, f.after_lt[ih] - f.after_n_le[il]]
            w.steps[rank] = w.steps.get(rank, 0) + n
            w.tokens[rank] = w.tokens.get(rank, 0) + (f.tok_lt[ih] - f.tok_le[il])
            w.hook[rank] = w.hook.get(rank, 0.0) + (f.hook_lt[ih] - f.hook_le[il])
            if low is not None:
                w.edges.append((rank, (lo, min(low.end, hi)), attempt, low))
            if high is not None and (low is None or high.step != low.step):
                w.edges.append((rank, (max(high.start, lo), hi), attempt, high))
        return w

    def _upto(self, attempt: int, step: int) -> bool:
        up = self.ups.get(attempt)
        if up is None:
            up = self.ups[attempt] = self._checkpoint(attempt)
        return step <= up

    # -- spans --

    def _blocked(
        self, edges: list[tuple[int, tuple[float, float], int, _Crossing]]
    ) -> dict[tuple[int, float, float], float]:
        """The seconds of each edge step's cut, (rank, a, b), covered by the rank's blocking
        spans (their union). The spans that clash with none are disjoint from every other, so
        their cut seconds add up; the clashing ones (in memory) are measured as a union. Where
        no clashing span meets the step, the part of it after an edge is its blocked_s less
        the part before: both windows beside an edge read one interval."""
        asked: dict[tuple[int, float, float], None] = {}
        derived: list[tuple[tuple[int, float, float], _Crossing, tuple[int, float, float]]] = []
        direct: list[tuple[int, float, float]] = []
        for rank, (a, b), _, step in edges:
            clashing = self.reader.clashing.get(rank)
            near = clashing is not None and bool(clashing.meeting(step.start, step.end))
            if b == step.end and a > step.start and not near:
                derived.append(((rank, a, b), step, (rank, step.start, a)))
                asked[rank, step.start, a] = None
            else:
                direct.append((rank, a, b))
                asked[rank, a, b] = None
        keys = list(asked)
        sums = dict(zip(keys, (sum(x.values()) for x in self._sums(keys)), strict=True))
        out = {key: sums[key] for key in direct}
        for rank, idx in grouped(direct, lambda k: k[0]).items():
            clashing = self.reader.clashing.get(rank)
            if clashing is not None:
                index = SpanIndex(clashing.spans)
                for key, x in zip(idx, index.overlaps([(a, b) for _, a, b in idx]), strict=True):
                    out[key] += x
        for key, step, before in derived:
            out[key] = step.blocked - sums[before]
        return out

    def _span_sums(self) -> list[dict[int, dict[str, float]]]:
        """Per interval, per rank: seconds charged to each category (by precedence). Each
        category's blocking spans of an attempt rank, clashing or not, are summed at every
        edge (`_span_edges`) and an interval is the difference of its edges; the clashing
        spans that meet it are then taken out and charged by precedence instead."""
        ranks = sorted({g.rank for g in self.reader.span_groups if not g.overlapped})
        edges = {  # as lists: indexing them is faster than numpy's one value at a time
            rank: [(c, f.tolist(), lt.tolist(), le.tolist()) for (_, c), (f, lt, le) in g.items()]
            for rank, g in self._span_edges().items()
        }
        out: list[dict[int, dict[str, float]]] = []
        for lo, hi in self.intervals:
            il, ih = self.at[lo], self.at[hi]
            mine: dict[int, dict[str, float]] = {}
            for rank in ranks:
                seconds: dict[str, float] = {}
                count: dict[str, int] = {}
                for category, f, n_lt, n_le in edges.get(rank, ()):
                    n = n_lt[ih] - n_le[il]
                    if n > 0:
                        seconds[category] = seconds.get(category, 0.0) + (f[ih] - f[il])
                        count[category] = count.get(category, 0) + n
                clashing = self.reader.clashing.get(rank)
                meeting = clashing.meeting(lo, hi) if clashing is not None else []
                for sp in meeting:
                    cut = min(sp.end, hi) - max(sp.start, lo)
                    seconds[sp.category] = seconds.get(sp.category, 0.0) - cut
                    count[sp.category] = count.get(sp.category, 0) - 1
                cats = {
                    c: (x if count[c] > 0 and abs(x) > RESIDUE_S else 0.0)
                    for c, x in seconds.items()
                }
                if meeting:
                    for cat, x in charged(meeting, lo, hi).items():
                        cats[cat] = cats.get(cat, 0.0) + x
                cats = {c: x for c, x in cats.items() if x}
                if cats:
                    mine[rank] = cats
            out.append(mine)
        return out

    def _span_edges(
        self,
    ) -> dict[int, dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Per rank, per (attempt, category): at every edge t, the seconds before t of its
        blocking spans, how many start before t and how many end by t. From the span buckets
        (read once for the run): the buckets whose spans all end before t, summed in order of
        their last end; and, in one statement, the spans of the buckets that straddle t."""
        b = SpanBucket
        out: dict[int, dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        pairs: list[tuple[Any, ...]] = []
        where: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        edges = self.edges
        groups = {
            (g.rank, g.attempt, g.category) for g in self.reader.span_groups if not g.overlapped
        }
        for rank, attempt, category in sorted(groups):
            stmt = select(b.bucket, b.n, b.total_s, b.first_start, b.last_end).where(
                b.run_id == self.reader.run_id,
                b.rank == rank,
                b.attempt == attempt,
                b.category == category,
            )
            rows = _plain_rows(self.conn, stmt)
            if not rows:
                continue
            a = np.array(rows, dtype=float)
            bucket, n, total, first, last = a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4]
            order = np.argsort(last, kind="stable")
            before = np.searchsorted(last[order], edges, side="left")
            f = np.concatenate(([0.0], np.cumsum(total[order])))[before]
            n_lt = np.concatenate(([0], np.cumsum(n[order].astype(np.int64))))[before]
            n_le = n_lt.copy()
            out.setdefault(rank, {})[attempt, category] = (f, n_lt, n_le)
            for e, j in self._straddles(first, last):
                t = float(edges[e])
                lo = float(bucket[j]) * SPAN_BUCKET_S
                up = min(lo + SPAN_BUCKET_S, t)
                pairs.append((len(pairs), t, attempt, rank, category, lo, up))
                where.append((f, n_lt, n_le, e))
        for pid, seconds, started, ended in _values(
            self.conn, _BUCKET_SUMS, _BUCKET_COLS, self.reader.run_id, pairs
        ):
            f, n_lt, n_le, e = where[pid]
            f[e] += seconds
            n_lt[e] += int(started)
            n_le[e] += int(ended)
        return out

    def _sums(self, asked: list[tuple[int, float, float]]) -> list[dict[str, float]]:
        """Per (rank, lo, hi): the cut seconds of each category's blocking spans of that rank
        (any attempt) that clash with none, in one statement per chunk."""
        groups = grouped((g for g in self.reader.span_groups if not g.overlapped), lambda g: g.rank)
        pairs: list[tuple[Any, ...]] = []
        where: list[tuple[int, str]] = []
        for rank, idx in grouped(range(len(asked)), lambda i: asked[i][0]).items():
            at = np.array(idx)
            lo = np.array([asked[i][1] for i in idx])
            hi = np.array([asked[i][2] for i in idx])
            for g in groups.get(rank, ()):
                meet = np.flatnonzero((lo < g.last_end) & (hi > g.first_start))
                reach = (lo[meet] - (g.longest_s + ROUNDING_SLACK_S)).tolist()
                first = len(pairs)
                pairs += zip(
                    range(first, first + len(meet)),
                    [g.attempt] * len(meet),
                    [rank] * len(meet),
                    [g.category] * len(meet),
                    reach,
                    lo[meet].tolist(),
                    hi[meet].tolist(),
                    strict=True,
                )
                where += zip(at[meet].tolist(), [g.category] * len(meet), strict=True)
        out: list[dict[str, float]] = [{} for _ in asked]
        for pid, seconds in _values(self.conn, _SPAN_SUMS, _SPAN_COLS, self.reader.run_id, pairs):
            i, category = where[pid]
            out[i][category] = out[i].get(category, 0.0) + seconds
        return out

    def _ranks(
        self, i: int, lo: float, hi: float, w: _Window, spans: list[dict[int, dict[str, float]]]
    ) -> dict[int, RankParts]:
        blocking = spans[i]
        out: dict[int, RankParts] = {}
        for rank in sorted(set(w.steps) | set(blocking)):
            out[rank] = RankParts(
                rank=rank,
                split={
                    attempt: AttemptSplit(s[0], s[1], s[2])
                    for (attempt, r), s in w.split.items()
                    if r == rank
                },
                blocking_s=blocking.get(rank, {}),
                hook_s=w.hook.get(rank, 0.0),
                steps=w.steps.get(rank, 0),
                tokens=w.tokens.get(rank, 0),
            )
        return out


@dataclass
class _Window:
    """One window's steps, per attempt rank and per rank, before its edge steps are measured."""

    split: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    hook: dict[int, float] = field(default_factory=dict)
    # (rank, the step cut to the window, attempt, the step)
    edges: list[tuple[int, tuple[float, float], int, _Crossing]] = field(default_factory=list)
