"""Many windows of one run at once (`/goodput/rolling`): the same sums as
`WindowReader.parts` gives one window, read in a few statements for all of them (the rollups'
SQL lives in service/store/rollups/). Callers pass a Connection; nothing here writes.

A window's steps are summed incrementally, from cumulative figures at its two edges. At each
edge `e` of any window, per attempt rank: the steps that start before `e`, those that end by
`e` (their count, tokens, hook time, and step time minus `blocked_s` on either side of the
attempt's last checkpoint), and the one step that crosses `e`, if any. A window is then the
difference of its edges' figures, with the steps that cross an edge cut to it and measured
against the blocking spans there, exactly as `WindowReader.parts` measures them. The figures
at an edge come from the fine step blocks (read once for the run, summed by numpy); inside
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

Everything after the reads is done for all the windows at once, on arrays (edges by attempt
rank, windows), in the order of operations that one window at a time took, so that each
window's figures are the same floats: the result is each rank's parts as columns over the
windows (calc/goodput_many.PartsColumns), which `accounting.rolling` accounts as arrays.
Only the windows that clashing spans meet are charged one at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from service.calc.goodput import ROUNDING_SLACK_S, RankParts, SpanIn, SpanIndex, charged
from service.calc.goodput_many import PartsColumns
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
        out += conn.exec_driver_sql(sql, params).cursor.fetchall()
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
        found = conn.exec_driver_sql(sql, (run_id,))
        return list(found.cursor.fetchall())  # the driver's tuples, as _plain_rows reads
    finally:
        conn.exec_driver_sql(f"DELETE FROM temp.{table}")


def _sorted_rows(rows: list[Any], width: int) -> np.ndarray:
    """Rows of numbers read by `_values` as one float array in pid order (NULL: nan), so that
    they are added up in the order of their pairs on either database (PostgreSQL's GROUP BY
    keeps no order). Counts and step numbers are exact in a float far past any run's."""
    if not rows:
        return np.zeros((0, width))
    a = np.array(rows, dtype=float)
    return a[np.argsort(a[:, 0], kind="stable")]


def _tuples(*columns: Any) -> list[tuple[Any, ...]]:
    """Rows of plain Python values (what the drivers bind) from columns of numbers, numbered
    by a first column pid."""
    n = len(columns[0]) if columns else 0
    lists = [c.tolist() if isinstance(c, np.ndarray) else c for c in columns]
    return list(zip(range(n), *lists, strict=True))


def _meets(spans: Sequence[Any], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether any of `spans` (sorted by start) meets each [lo, hi]: starts before hi and ends
    after lo, the test `_SortedSpans.meeting` makes, for every interval at once (the spans
    that start before hi, by the latest end among them)."""
    if not spans:
        return np.zeros(len(lo), dtype=bool)
    starts = np.array([s.start for s in spans])
    reach = np.maximum.accumulate(np.array([s.end for s in spans]))
    before = np.searchsorted(starts, hi, side="left")
    return (before > 0) & (reach[np.maximum(before - 1, 0)] > lo)


class _EdgeFigures:
    """Each attempt rank's cumulative figures at every edge: arrays of (attempt ranks,
    edges), row k for keys[k]; and the one step of an attempt rank that crosses an edge."""

    def __init__(self, keys: list[tuple[int, int]], edges: int) -> None:
        shape = (len(keys), edges)
        self.keys = keys

        def ints() -> np.ndarray:
            return np.zeros(shape, dtype=np.int64)

        self.n_lt, self.tok_lt = ints(), ints()  # steps that start before the edge
        self.n_le, self.tok_le = ints(), ints()  # steps that end by the edge
        self.after_lt, self.after_n_le = ints(), ints()  # the same, after the checkpoint
        self.hook_le, self.hook_lt = np.zeros(shape), np.zeros(shape)  # hook_lt: also start before
        # step time minus blocked_s of the steps that end by the edge, on either side of the
        # attempt's checkpoint
        self.upto_le, self.after_le = np.zeros(shape), np.zeros(shape)
        self.crossed = np.zeros(shape, dtype=bool)  # a step crosses the edge: its figures
        self.c_step = ints()
        self.c_start, self.c_end = np.zeros(shape), np.zeros(shape)
        self.c_full = np.zeros(shape)  # its whole step time minus blocked_s
        self.c_blocked = np.zeros(shape)  # its blocked_s, kept at ingest

    def add_whole(self, k: np.ndarray, e: np.ndarray, a: np.ndarray) -> None:
        """Steps that all start before edge e and end by it, summed (micro blocks): rows of
        _MICRO_SUMS, in pid order (a float array)."""
        at = (k, e)
        n, tokens, after_n = (a[:, j].astype(np.int64) for j in (1, 2, 6))
        for x, v in ((self.n_lt, n), (self.n_le, n), (self.tok_lt, tokens), (self.tok_le, tokens)):
            np.add.at(x, at, v)
        for x, v in ((self.after_lt, after_n), (self.after_n_le, after_n)):
            np.add.at(x, at, v)
        for x, j in ((self.hook_le, 3), (self.hook_lt, 3), (self.upto_le, 4), (self.after_le, 5)):
            np.add.at(x, at, a[:, j])

    def add(self, k: np.ndarray, e: np.ndarray, a: np.ndarray) -> None:
        """Straddling blocks' steps summed against edge e: rows of _EDGE_SUMS, in pid order."""
        at = (k, e)
        for x, j in (
            *((self.n_lt, 1), (self.tok_lt, 2), (self.n_le, 3), (self.tok_le, 4)),
            *((self.after_lt, 8), (self.after_n_le, 9)),
        ):
            np.add.at(x, at, a[:, j].astype(np.int64))
        for x, j in ((self.hook_le, 5), (self.upto_le, 6), (self.after_le, 7), (self.hook_lt, 16)):
            np.add.at(x, at, a[:, j])
        crossing = a[:, 10]
        if np.any(crossing > 1):
            raise _Fallback
        rows = np.flatnonzero(crossing == 1)
        ck, ce = k[rows], e[rows]
        twice = len(set(zip(ck.tolist(), ce.tolist(), strict=True))) < len(rows)
        if twice or self.crossed[ck, ce].any():
            raise _Fallback
        self.crossed[ck, ce] = True
        self.c_step[ck, ce] = a[rows, 11].astype(np.int64)
        self.c_start[ck, ce], self.c_end[ck, ce] = a[rows, 12], a[rows, 13]
        self.c_full[ck, ce], self.c_blocked[ck, ce] = a[rows, 14], a[rows, 15]


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

    def before(self, edges: np.ndarray, fig: _EdgeFigures, k: int) -> None:
        """Row k of `fig`: the sums of the blocks that end before each edge (every step of
        them starts before it and ends by it)."""
        order = np.argsort(self.last, kind="stable")
        count = np.searchsorted(self.last[order], edges, side="left")

        def cum(x: np.ndarray) -> Any:
            return np.concatenate(([0.0], np.cumsum(x[order])))[count]

        def whole(x: np.ndarray) -> Any:
            return np.concatenate(([0], np.cumsum(x[order].astype(np.int64))))[count]

        fig.n_lt[k] = fig.n_le[k] = whole(self.n)
        fig.tok_lt[k] = fig.tok_le[k] = whole(self.tokens)
        fig.after_lt[k] = fig.after_n_le[k] = whole(self.after_n)
        fig.hook_le[k] = fig.hook_lt[k] = cum(self.hook)
        fig.upto_le[k], fig.after_le[k] = cum(self.upto_busy), cum(self.after_busy)


class _Fallback(Exception):
    """The stored steps break an assumption (two steps of one attempt rank cross one edge):
    each window is then read on its own."""


def parts_many(
    reader: WindowReader, intervals: Sequence[tuple[float, float]]
) -> dict[int, PartsColumns]:
    """Every rank's records cut to each interval and summed, as columns over the intervals:
    what `reader.parts(lo, hi)` gives in `.ranks`, for all the intervals at once."""
    if not intervals:
        return {}
    try:
        return _Many(reader, intervals).columns()
    except _Fallback:
        return columns_of([reader.parts(lo, hi).ranks for lo, hi in intervals])


def columns_of(windows: Sequence[dict[int, RankParts]]) -> dict[int, PartsColumns]:
    """Each rank's parts of windows read one at a time, as columns over the windows."""
    ranks = sorted({rank for w in windows for rank in w})
    return {rank: PartsColumns.of(rank, [w.get(rank) for w in windows]) for rank in ranks}


@dataclass
class _Cuts:
    """The steps that cross a window's edge, cut to the window: one element a cut."""

    window: np.ndarray  # the interval's position
    key: np.ndarray  # the attempt rank's row in _EdgeFigures
    low: np.ndarray  # True: the step crosses the window's start (else its end)
    rank: np.ndarray
    a: np.ndarray  # the cut
    b: np.ndarray
    step: np.ndarray  # the step's number, start, end and blocked_s
    start: np.ndarray
    end: np.ndarray
    blocked: np.ndarray


@dataclass
class _Steps:
    """The intervals' steps: per attempt rank, busy time on either side of its checkpoint
    and the steps after it; per rank, steps, tokens and hook time."""

    split: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )
    steps: dict[int, np.ndarray] = field(default_factory=dict)
    tokens: dict[int, np.ndarray] = field(default_factory=dict)
    hook: dict[int, np.ndarray] = field(default_factory=dict)


class _Many:
    def __init__(self, reader: WindowReader, intervals: Sequence[tuple[float, float]]) -> None:
        for lo, hi in intervals:
            if not hi > lo:
                raise ValueError(f"end ({hi}) must be after start ({lo})")
        self.reader = reader
        self.conn = reader.session.connection()
        self.lo = np.array([lo for lo, _ in intervals], dtype=float)
        self.hi = np.array([hi for _, hi in intervals], dtype=float)
        self.edges = np.unique(np.concatenate([self.lo, self.hi]))  # sorted
        self.il = np.searchsorted(self.edges, self.lo)  # each interval's edges
        self.ih = np.searchsorted(self.edges, self.hi)
        self.ups: dict[int, int] = {}

    def columns(self) -> dict[int, PartsColumns]:
        figures = self._edge_figures()
        steps, cuts = self._steps_of(figures)
        self._add_cuts(steps, figures.keys, cuts, self._blocked(cuts))
        spans = self._span_sums()
        n = len(self.lo)
        out: dict[int, PartsColumns] = {}
        for rank in sorted(set(steps.steps) | set(spans)):
            mine = out[rank] = PartsColumns.empty(rank, n)
            mine.split = {a: x for (a, r), x in steps.split.items() if r == rank}
            mine.blocking_s = spans.get(rank, {})
            if rank in steps.steps:
                mine.hook_s, mine.steps = steps.hook[rank], steps.steps[rank]
                mine.tokens = steps.tokens[rank]
        return out

    # -- steps --

    def _edge_figures(self) -> _EdgeFigures:
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
        keys = sorted(blocks)
        fig = _EdgeFigures(keys, len(self.edges))
        # Per (edge, straddling fine block): the attempt rank's row, the edge, the attempt
        # rank, the block's first and last micro block, the checkpoint step.
        cols: list[list[np.ndarray]] = [[] for _ in range(7)]
        per_block = FINE // MICRO_BLOCK
        for row, key in enumerate(keys):
            blk = blocks[key]
            blk.before(self.edges, fig, row)
            edge, j = self._straddles(blk.first, blk.last)
            micro = blk.block[j].astype(np.int64) * per_block
            same = np.ones(len(edge), dtype=np.int64)
            for col, x in zip(
                cols,
                (row * same, edge, key[0] * same, key[1] * same),
                strict=False,
            ):
                col.append(x)
            cols[4].append(micro)
            cols[5].append(micro + per_block - 1)
            cols[6].append(blk.up * same)
        if not keys:
            return fig
        k, e, attempt, rank, first, last, up = (np.concatenate(c) for c in cols)
        t = self.edges[e]
        pairs = _tuples(t, attempt, rank, first, last, up)
        found = _sorted_rows(
            _values(self.conn, _MICRO_SUMS, _EDGE_COLS, self.reader.run_id, pairs), 10
        )
        pid = found[:, 0].astype(np.int64)
        left, m_first, m_last = found[:, 7], found[:, 8], found[:, 9]
        # Micro blocks left to read that are not one run of them: read every step of the block.
        widen = (left > 0) & (m_last - m_first + 1 != left)
        whole = ~widen
        fig.add_whole(k[pid[whole]], e[pid[whole]], found[whole])
        steps = np.flatnonzero(left > 0)
        at = pid[steps]
        lo_m = np.where(widen[steps], first[at], m_first[steps]).astype(np.int64)
        hi_m = np.where(widen[steps], last[at], m_last[steps]).astype(np.int64)
        pairs = _tuples(
            t[at], attempt[at], rank[at], lo_m * MICRO_BLOCK, (hi_m + 1) * MICRO_BLOCK - 1, up[at]
        )
        rows = _sorted_rows(
            _values(self.conn, _EDGE_SUMS, _EDGE_COLS, self.reader.run_id, pairs), 17
        )
        sid = at[rows[:, 0].astype(np.int64)]
        fig.add(k[sid], e[sid], rows)
        return fig

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
        up = self.ups.get(attempt)
        if up is not None:
            return up
        upto = self.reader.upto.get(attempt, math.inf)
        if upto == math.inf:
            up = NO_CHECKPOINT
        elif upto != self.reader.saved.get(attempt, -1):  # the accounting only cuts at these
            raise RuntimeError(f"no sums kept for a cut at step {upto}")
        else:
            up = int(upto)
        self.ups[attempt] = up
        return up

    def _straddles(self, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(edge indices, block indices) of each block whose time span holds the edge (first
        start <= edge <= last end), by edge: each block's edges are a run of the sorted
        edges."""
        lo = np.searchsorted(self.edges, first, side="left")
        counts = np.maximum(np.searchsorted(self.edges, last, side="right") - lo, 0)
        blocks = np.repeat(np.arange(len(first)), counts)
        offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        edges = np.arange(len(blocks)) + offsets
        order = np.lexsort((blocks, edges))
        return edges[order], blocks[order]

    def _steps_of(self, fig: _EdgeFigures) -> tuple[_Steps, _Cuts]:
        """Every interval's steps from its edges' figures, per attempt rank; the steps that
        cross an edge cut to it, their blocked time still to be measured (`_Cuts`)."""
        il, ih, lo, hi = self.il, self.ih, self.lo, self.hi
        out = _Steps()
        parts: list[tuple[np.ndarray, ...]] = []
        for k, (attempt, rank) in enumerate(fig.keys):
            n = fig.n_lt[k, ih] - fig.n_le[k, il]
            seen = n > 0
            low = seen & fig.crossed[k, il]
            high = seen & fig.crossed[k, ih] & (~low | (fig.c_step[k, ih] != fig.c_step[k, il]))
            upto = fig.upto_le[k, ih] - fig.upto_le[k, il]
            after = fig.after_le[k, ih] - fig.after_le[k, il]
            # the step across the start, summed whole by its end: taken out
            whole = low & (fig.c_end[k, il] <= hi)
            committed = fig.c_step[k, il] <= self._checkpoint(attempt)
            upto = np.where(whole & committed, upto - fig.c_full[k, il], upto)
            after = np.where(whole & ~committed, after - fig.c_full[k, il], after)
            steps_after = fig.after_lt[k, ih] - fig.after_n_le[k, il]
            out.split[attempt, rank] = (
                np.where(seen, upto, 0.0),
                np.where(seen, after, 0.0),
                np.where(seen, steps_after, 0),
            )
            zero_i, zero_f = np.zeros(len(lo), dtype=np.int64), np.zeros(len(lo))
            out.steps[rank] = out.steps.get(rank, zero_i) + np.where(seen, n, 0)
            tokens = fig.tok_lt[k, ih] - fig.tok_le[k, il]
            out.tokens[rank] = out.tokens.get(rank, zero_i) + np.where(seen, tokens, 0)
            hook = fig.hook_lt[k, ih] - fig.hook_le[k, il]
            out.hook[rank] = out.hook.get(rank, zero_f) + np.where(seen, hook, 0.0)
            for is_low, mask, edge in ((True, low, il), (False, high, ih)):
                w = np.flatnonzero(mask)
                x = edge[w]
                end = fig.c_end[k, x]
                a = lo[w] if is_low else np.maximum(fig.c_start[k, x], lo[w])
                b = np.minimum(end, hi[w]) if is_low else hi[w]
                parts.append(
                    (w, np.full(len(w), k), np.full(len(w), is_low), np.full(len(w), rank), a, b)
                    + (fig.c_step[k, x], fig.c_start[k, x], end, fig.c_blocked[k, x])
                )
        if not parts:  # no attempt rank
            return out, _Cuts(*(np.zeros(0),) * 10)
        return out, _Cuts(*(np.concatenate(c) for c in zip(*parts, strict=True)))

    def _add_cuts(
        self, out: _Steps, keys: list[tuple[int, int]], cuts: _Cuts, blocked: np.ndarray
    ) -> None:
        """The cut steps' busy time added to their attempt rank's side of its checkpoint: the
        step across the start first, then the one across the end, as one window at a time
        adds them."""
        busy = (cuts.b - cuts.a) - blocked
        for k, (attempt, rank) in enumerate(keys):
            split = out.split[attempt, rank]
            committed = cuts.step <= self._checkpoint(attempt)
            for is_low in (True, False):
                mine = (cuts.key == k) & (cuts.low == is_low)
                for side, sel in ((0, mine & committed), (1, mine & ~committed)):
                    split[side][cuts.window[sel]] += busy[sel]  # one cut a window: no repeats

    # -- spans --

    def _blocked(self, cuts: _Cuts) -> np.ndarray:
        """The seconds of each cut step, (rank, a, b), covered by the rank's blocking spans
        (their union). A step whose blocked_s is 0 has none: a span that met a part of it
        would cover a positive length of it. The spans that clash with none are disjoint from
        every other, so their cut seconds add up; the clashing ones (in memory) are measured
        as a union. Where no clashing span meets the step, the part of it after an edge is its
        blocked_s less the part before: both windows beside an edge read one interval."""
        out = np.zeros(len(cuts.a))
        at = np.flatnonzero(cuts.blocked != 0.0)
        if not len(at):
            return out
        rank, a, b = cuts.rank[at], cuts.a[at], cuts.b[at]
        start, end, blocked = cuts.start[at], cuts.end[at], cuts.blocked[at]
        near = np.zeros(len(at), dtype=bool)
        for r, clashing in self.reader.clashing.items():
            mine = np.flatnonzero(rank == r)
            near[mine] = _meets(clashing.spans, start[mine], end[mine])
        derived = (b == end) & (a > start) & ~near
        asked = np.stack([rank, np.where(derived, start, a), np.where(derived, a, b)])
        keys, which = np.unique(asked, axis=1, return_inverse=True)
        which = which.reshape(-1)
        rank_of = keys[0].astype(np.int64)
        sums = self._sums(rank_of, keys[1], keys[2])
        direct = sums.copy()
        for r, clashing in self.reader.clashing.items():  # the clashing spans' union
            mine = np.flatnonzero((rank_of == r) & np.isin(np.arange(len(sums)), which[~derived]))
            if len(mine):
                index = SpanIndex(clashing.spans)
                direct[mine] += index.overlaps(
                    list(zip(keys[1, mine].tolist(), keys[2, mine].tolist(), strict=True))
                )
        out[at] = np.where(derived, blocked - sums[which], direct[which])
        return out

    def _span_sums(self) -> dict[int, dict[str, np.ndarray]]:
        """Per rank, per category: each interval's seconds charged to it (by precedence). Each
        category's blocking spans of an attempt rank, clashing or not, are summed at every
        edge (`_span_edges`) and an interval is the difference of its edges; the clashing
        spans that meet it are then taken out and charged by precedence instead."""
        il, ih = self.il, self.ih
        ranks = sorted({g.rank for g in self.reader.span_groups if not g.overlapped})
        edges = self._span_edges()
        out: dict[int, dict[str, np.ndarray]] = {}
        for rank in ranks:
            seconds: dict[str, np.ndarray] = {}
            count: dict[str, np.ndarray] = {}
            for (_, category), (f, n_lt, n_le) in edges.get(rank, {}).items():
                n = n_lt[ih] - n_le[il]
                met = n > 0
                x = np.where(met, f[ih] - f[il], 0.0)
                seconds[category] = seconds[category] + x if category in seconds else 0.0 + x
                count[category] = count.get(category, 0) + np.where(met, n, 0)
            cats = {
                c: np.where((count[c] > 0) & (np.abs(x) > RESIDUE_S), x, 0.0)
                for c, x in seconds.items()
            }
            clashing = self.reader.clashing.get(rank)
            if clashing is not None:
                for i in np.flatnonzero(_meets(clashing.spans, self.lo, self.hi)).tolist():
                    self._charge_clashing(
                        i, clashing.meeting(self.lo[i], self.hi[i]), seconds, count, cats
                    )
            cats = {c: x for c, x in cats.items() if x.any()}
            if cats:
                out[rank] = cats
        return out

    def _charge_clashing(
        self,
        i: int,
        meeting: list[SpanIn],
        seconds: dict[str, np.ndarray],
        count: dict[str, np.ndarray],
        cats: dict[str, np.ndarray],
    ) -> None:
        """Interval i, which clashing spans meet: their cut seconds taken out of the sums and
        charged by precedence (goodput.charged), in the order one window at a time takes."""
        lo, hi = float(self.lo[i]), float(self.hi[i])
        mine = {c: float(x[i]) for c, x in seconds.items()}
        n = {c: int(x[i]) for c, x in count.items()}
        for sp in meeting:
            cut = min(sp.end, hi) - max(sp.start, lo)
            mine[sp.category] = mine.get(sp.category, 0.0) - cut
            n[sp.category] = n.get(sp.category, 0) - 1
        charged_i = {c: (x if n[c] > 0 and abs(x) > RESIDUE_S else 0.0) for c, x in mine.items()}
        for cat, x in charged(meeting, lo, hi).items():
            charged_i[cat] = charged_i.get(cat, 0.0) + x
        for c, x in charged_i.items():
            if c not in cats:
                cats[c] = np.zeros(len(self.lo))
            cats[c][i] = x

    def _span_edges(
        self,
    ) -> dict[int, dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Per rank, per (attempt, category): at every edge t, the seconds before t of its
        blocking spans, how many start before t and how many end by t. From the span buckets
        (read once for the run): the buckets whose spans all end before t, summed in order of
        their last end; and, in one statement, the spans of the buckets that straddle t."""
        b = SpanBucket
        out: dict[int, dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        cols: list[list[Any]] = [[] for _ in range(7)]  # group, e, a, r, c, f, u
        sums: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
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
            e, j = self._straddles(first, last)
            lo = bucket[j] * SPAN_BUCKET_S
            for col, x in zip(
                cols,
                (np.full(len(e), len(sums)), e, [attempt] * len(e), [rank] * len(e)),
                strict=False,
            ):
                col.append(x)
            cols[4].append([category] * len(e))
            cols[5].append(lo)
            cols[6].append(np.minimum(lo + SPAN_BUCKET_S, edges[e]))
            sums.append((f, n_lt, n_le))
        if not sums:
            return out
        group, e = np.concatenate(cols[0]), np.concatenate(cols[1])
        pairs = _tuples(
            edges[e],
            [x for c in cols[2] for x in c],
            [x for c in cols[3] for x in c],
            [x for c in cols[4] for x in c],
            np.concatenate(cols[5]),
            np.concatenate(cols[6]),
        )
        rows = _values(self.conn, _BUCKET_SUMS, _BUCKET_COLS, self.reader.run_id, pairs)
        a = _sorted_rows(rows, 4)
        pid = a[:, 0].astype(np.int64)
        for g, (f, n_lt, n_le) in enumerate(sums):
            mine = pid[group[pid] == g]
            sel = group[pid] == g
            np.add.at(f, e[mine], a[sel, 1])
            np.add.at(n_lt, e[mine], a[sel, 2].astype(np.int64))
            np.add.at(n_le, e[mine], a[sel, 3].astype(np.int64))
        return out

    def _sums(self, rank: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per (rank, lo, hi): the cut seconds of the rank's blocking spans (any attempt, any
        category) that clash with none, in one statement per chunk."""
        groups = grouped((g for g in self.reader.span_groups if not g.overlapped), lambda g: g.rank)
        cols: list[list[Any]] = [[] for _ in range(7)]  # at, a, r, c, reach, lo, hi
        for r in np.unique(rank).tolist():
            at = np.flatnonzero(rank == r)
            for g in groups.get(r, ()):
                meet = at[(lo[at] < g.last_end) & (hi[at] > g.first_start)]
                cols[0].append(meet)
                cols[1] += [g.attempt] * len(meet)
                cols[2] += [r] * len(meet)
                cols[3] += [g.category] * len(meet)
                cols[4].append(lo[meet] - (g.longest_s + ROUNDING_SLACK_S))
                cols[5].append(lo[meet])
                cols[6].append(hi[meet])
        out = np.zeros(len(rank))
        if not cols[0]:
            return out
        at = np.concatenate(cols[0])
        pairs = _tuples(cols[1], cols[2], cols[3], *(np.concatenate(c) for c in cols[4:]))
        rows = _sorted_rows(
            _values(self.conn, _SPAN_SUMS, _SPAN_COLS, self.reader.run_id, pairs), 2
        )
        np.add.at(out, at[rows[:, 0].astype(np.int64)], rows[:, 1])
        return out
