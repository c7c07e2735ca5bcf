"""Many ranks posting at once (issue 12): N simulated ranks of one run, or of many runs, post
realistic batches to a real server on loopback, then what the service stored is counted back
against what it acknowledged.

    .venv/bin/python bench/load.py                                  # 64 ranks, both setups
    .venv/bin/python bench/load.py --ranks 256 --runs 1,16
    .venv/bin/python bench/load.py --search                        # the largest N held
    .venv/bin/python bench/load.py --setups sqlite --ranks 4 --duration 5   # the smoke test

Setups (`--setups`): `sqlite`, `goodput serve` (one process) on a fresh SQLite file;
`pg<W>` (`pg4` by default), `goodput serve --workers W` on a fresh PostgreSQL database
(`--pg-url`, dropped and created again, then `goodput db upgrade`). The servers run with the
default settings (GOODPUT_* variables are not passed on; `--server-env` adds some).

Each simulated rank is a coroutine of this one process (asyncio, one keep-alive HTTP/1.1
connection per rank; a minimal client, `Connection` says why not httpx). It posts one batch
every `--interval` (0.5 s), starting at a random phase: 5 steps, their 5 data-stall spans and
10 routing records (5 steps x 2 E layers, 64 experts, top-8), the first batch also the run,
the rank's attempt start and its startup span. Ranks are spread over `--runs` runs in turn.
A rank that falls behind posts its next batch as soon as the last one is acknowledged, and no
batch is started after `--duration`. It retries as the trainer's sink does
(trainer_hooks/sink.py): a 503, another 5xx, 408, 429 or a transport error is sent again
after the sink's backoff (0.1 s doubling to 2 s), at least the Retry-After asked for; the
request timeout is the sink's 10 s. Any other answer is final.

After the load, the database is read: `lost` = records in acknowledged (200) batches that
are not stored; `dup` = natural keys stored more than once; `errors` = answers other than
200 and 503 (a 5xx, then retried, or a 4xx); `n503` = 503s (each retried); `timeouts` =
requests with no answer in time (retried). `p99_ms`: per batch, from its first send to its
200, retries and their waits included; `req_p99_ms`: per HTTP request. `rows_per_s`: records
of acknowledged batches over the time from the first send to the last answer. `kept_up`:
batches sent over batches scheduled (below 1: the ranks fell behind the schedule). Each
measurement (setup x ranks x runs) prints exactly one line

    load: setup=<sqlite|pgW> ranks=<N> runs=<M> errors=<n> lost=<n> dup=<n> rows_per_s=<x>
      p99_ms=<y> n503=<n> ...                                      (one line, wrapped here)

`--search` doubles N from `--search-start` with `--search-duration` s runs, for each setup
and `--search-runs`, until a run fails to hold (errors or lost above 0, p99 of 1 s or more,
or kept_up under 0.95), bisects `--search-refine` times between the last N held and the
first that failed, and prints `load-largest: setup=<s> runs=<M> ranks=<N> held ...`.

`--probe` prints what a request costs the client (httpx.AsyncClient against ours) and how
long one batch holds its run's lock, in-process, on SQLite and PostgreSQL.

The client shares the machine's cores with the server and the database: the lines carry
its CPU seconds, the server's, and the whole machine's busy share over the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import Server, free_port  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from trainer_hooks.records import SCHEMA_VERSION  # noqa: E402
from trainer_hooks.sink import RETRY_AFTER_CAP_S, retry_after_s  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INGEST = "/api/v1/ingest"
STEPS_PER_BATCH = 5
LAYERS = (1, 3)
EXPERTS = 64
TOP_K = 8
TOKENS = 8192  # per step and rank
STEP_S = 0.1  # simulated step time: 5 steps per 0.5 s batch
REQUEST_TIMEOUT_S = 10.0  # the sink's (trainer_hooks.sink.Sender)
MAX_BACKOFF_S = 2.0  # the sink's default
RETRIED = frozenset({408, 429})
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/loadbench"
P99_LIMIT_MS = 1000.0


# -- records --


class Records:
    """The batches of one rank. Times are simulated (T0 is when the bench starts), so every
    rank's steps follow each other without overlap, whatever the server's pace."""

    def __init__(self, run_id: str, rank: int, world: int, t0: float, seed: int) -> None:
        self.run_id, self.rank, self.world, self.t0 = run_id, rank, world, t0
        self.base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "attempt": 0}
        self.base["rank"] = rank
        rng = np.random.default_rng([seed, rank, zlib.crc32(run_id.encode())])
        probs = rng.dirichlet(np.full(EXPERTS, 20.0), size=8)
        capacity = int(1.25 * TOKENS * TOP_K / EXPERTS)
        self.hists: list[tuple[list[int], list[int]]] = []
        for p in probs:  # a few histograms, reused: building bodies must stay cheap
            tokens = rng.multinomial(TOKENS * TOP_K, p)
            self.hists.append((tokens.tolist(), np.clip(tokens - capacity, 0, None).tolist()))

    def opening(self) -> list[dict[str, Any]]:
        start = self.t0
        return [
            {
                "kind": "run",
                "schema_version": SCHEMA_VERSION,
                "run_id": self.run_id,
                "name": self.run_id,
                "project": "bench-load",
                "created_at": start,
                "model_plan": {"pattern": "AEAE", "num_experts": EXPERTS, "top_k": TOP_K},
                "tags": ["bench"],
            },
            {**self.base, "kind": "attempt_start", "world_size": self.world, "start": start},
            {**self.base, "kind": "span", "category": "startup", "start": start, "end": start + 5},
        ]

    def batch(self, k: int) -> bytes:
        records = self.opening() if k == 0 else []
        for step in range(k * STEPS_PER_BATCH, (k + 1) * STEPS_PER_BATCH):
            start = self.t0 + 10.0 + step * STEP_S
            records.append(
                {
                    **self.base,
                    "kind": "step",
                    "step": step,
                    "start": start,
                    "end": start + 0.095,
                    "tokens": TOKENS,
                    "loss": 2.0 + 8.0 / (1.0 + step / 100.0),
                    "mem_allocated_peak": 58 * 2**30 + step % 1024,
                }
            )
            records.append(
                {
                    **self.base,
                    "kind": "span",
                    "category": "data_stall",
                    "start": start - 0.004,
                    "end": start,
                    "step": step,
                }
            )
            for layer in LAYERS:
                tokens, dropped = self.hists[(step + layer) % len(self.hists)]
                records.append(
                    {
                        **self.base,
                        "kind": "routing",
                        "step": step,
                        "layer": layer,
                        "num_tokens": TOKENS,
                        "top_k": TOP_K,
                        "tokens_per_expert": tokens,
                        "dropped_per_expert": dropped,
                        "aux_loss": 0.01,
                        "z_loss": 0.001,
                    }
                )
        return json.dumps({"records": records}, separators=(",", ":")).encode()


def batch_records(k: int) -> int:
    return 4 * STEPS_PER_BATCH + (3 if k == 0 else 0)


# -- the load --


@dataclass
class Tally:
    """What the ranks saw."""

    acked: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # (run, rank): ks
    scheduled: int = 0
    sent: int = 0
    records: int = 0
    inserted: int = 0
    duplicates: int = 0
    n503: int = 0
    errors: Counter[int] = field(default_factory=Counter)  # status: count
    timeouts: int = 0
    transport: int = 0
    final: int = 0  # batches given up (a final refusal)
    samples: list[str] = field(default_factory=list)  # the first few error answers
    batch_ms: list[float] = field(default_factory=list)
    request_ms: list[float] = field(default_factory=list)
    first_send: float = float("inf")
    last_answer: float = 0.0


@dataclass(frozen=True)
class Plan:
    ranks: int
    runs: int
    duration_s: float
    interval_s: float
    seed: int

    def run_of(self, i: int) -> tuple[str, int, int]:
        """(run id, rank within the run, world size of the run) of simulated rank i."""
        run = i % self.runs
        world = self.ranks // self.runs + (run < self.ranks % self.runs)
        return f"load-{self.seed}-{run:04d}", i // self.runs, world


class Connection:
    """One keep-alive HTTP/1.1 connection to the server: a rank's, as the sink keeps one.
    Written on asyncio streams because httpx.AsyncClient costs ~2.6 ms of CPU per request on
    this machine against ~0.06 ms for this (a stub server answering in the same process): at
    hundreds of requests a second httpx would take most of a core from the server."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST {INGEST} HTTP/1.1\r\nhost: {host}:{port}\r\n"
            "content-type: application/json\r\ncontent-length: "
        ).encode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, body: bytes, timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one POST; raises TimeoutError, OSError or ValueError
        (then the connection is closed, to be opened again)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._exchange(body)
        except BaseException:
            self.close()
            raise

    async def _exchange(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.head + b"%d\r\n\r\n" % len(body) + body)
        try:
            lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError) as exc:
            raise ValueError(f"no HTTP answer: {exc!r}") from exc
        headers = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        try:
            if "content-length" in headers:
                answer = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                answer = await self._chunks()
            else:
                answer = await self.reader.read()
                headers["connection"] = "close"
        except asyncio.IncompleteReadError as exc:
            raise ValueError(f"a cut answer: {exc!r}") from exc
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, answer

    async def _chunks(self) -> bytes:
        assert self.reader is not None
        out = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            out.append(await self.reader.readexactly(size + 2))
        await self.reader.readuntil(b"\r\n")
        return b"".join(c[:-2] for c in out)


async def post_until_acked(
    conn: Connection, body: bytes, tally: Tally, give_up_at: float
) -> dict[str, Any] | None:
    """POST until a 200 (its answer) or a final refusal / `give_up_at` (None), retrying as
    the sink does."""
    backoff = 0.0
    while True:
        t = time.perf_counter()
        tally.first_send = min(tally.first_send, t)
        asked: float | None = None
        try:
            code, headers, answer = await conn.post(body, REQUEST_TIMEOUT_S)
        except TimeoutError:
            tally.timeouts += 1
        except (OSError, ValueError):
            tally.transport += 1
        else:
            now = time.perf_counter()
            tally.request_ms.append((now - t) * 1000)
            tally.last_answer = max(tally.last_answer, now)
            if code == 200:
                result: dict[str, Any] = json.loads(answer)
                return result
            if code == 503:
                tally.n503 += 1
            else:
                tally.errors[code] += 1
                if len(tally.samples) < 5:
                    tally.samples.append(f"{code}: {answer[:300]!r}")
                if code < 500 and code not in RETRIED:
                    tally.final += 1
                    return None
            asked = retry_after_s(headers.get("retry-after"), RETRY_AFTER_CAP_S)
        backoff = min(MAX_BACKOFF_S, max(0.1, backoff * 2))
        wait = backoff if asked is None else max(backoff, asked)
        if time.perf_counter() + wait > give_up_at:
            return None
        await asyncio.sleep(wait)


async def rank_loop(
    address: tuple[str, int], plan: Plan, i: int, t0: float, start: float, tally: Tally
) -> None:
    run_id, rank, world = plan.run_of(i)
    recs = Records(run_id, rank, world, t0, plan.seed)
    acked = tally.acked.setdefault((run_id, rank), [])
    phase = random.Random(i).random() * plan.interval_s
    end = start + plan.duration_s
    give_up_at = end + 60.0  # retries of a batch go on after the schedule ends, this long
    conn = Connection(*address)
    k = 0
    try:
        while (due := start + phase + k * plan.interval_s) < end:
            tally.scheduled += 1
            now = time.perf_counter()
            if now >= end:  # behind the schedule at its end: the rest is never sent
                k += 1
                continue
            if due > now:
                await asyncio.sleep(due - now)
            body = recs.batch(k)
            tally.sent += 1
            t = time.perf_counter()
            answer = await post_until_acked(conn, body, tally, give_up_at)
            if answer is not None:
                tally.batch_ms.append((time.perf_counter() - t) * 1000)
                acked.append(k)
                tally.records += batch_records(k)
                tally.inserted += int(answer.get("inserted", 0))
                tally.duplicates += int(answer.get("duplicates", 0))
            k += 1
    finally:
        conn.close()


async def load(base: str, plan: Plan, t0: float) -> Tally:
    tally = Tally()
    url = urlsplit(base)
    address = (url.hostname or "127.0.0.1", url.port or 80)
    start = time.perf_counter() + 0.2
    await asyncio.gather(
        *(rank_loop(address, plan, i, t0, start, tally) for i in range(plan.ranks))
    )
    return tally


# -- counting back --


@dataclass
class Stored:
    lost: int
    dup: int
    unacked: int  # stored, from batches never acknowledged (an answer that did not arrive)
    rows: int


def expected_keys(plan: Plan, tally: Tally) -> dict[str, set[tuple[Any, ...]]]:
    want: dict[str, set[tuple[Any, ...]]] = {
        "runs": set(), "attempts": set(), "steps": set(), "spans": set(), "routing": set()
    }  # fmt: skip
    for (run_id, rank), ks in tally.acked.items():
        for k in ks:
            if k == 0:
                want["runs"].add((run_id,))
                want["attempts"].add((run_id, rank))
                want["spans"].add((run_id, rank, "startup", None))
            for step in range(k * STEPS_PER_BATCH, (k + 1) * STEPS_PER_BATCH):
                want["steps"].add((run_id, rank, step))
                want["spans"].add((run_id, rank, "data_stall", step))
                for layer in LAYERS:
                    want["routing"].add((run_id, rank, step, layer))
    return want


COUNT_SQL = {
    "runs": "SELECT run_id, COUNT(*) FROM runs WHERE run_id LIKE :p GROUP BY run_id",
    "attempts": "SELECT run_id, rank, COUNT(*) FROM attempts WHERE run_id LIKE :p "
    "GROUP BY run_id, rank",
    "steps": "SELECT run_id, rank, step, COUNT(*) FROM steps WHERE run_id LIKE :p "
    "GROUP BY run_id, rank, step",
    "spans": "SELECT run_id, rank, category, step, COUNT(*) FROM spans WHERE run_id LIKE :p "
    "GROUP BY run_id, rank, category, step",
    "routing": "SELECT run_id, rank, step, layer, COUNT(*) FROM routing WHERE run_id LIKE :p "
    "GROUP BY run_id, rank, step, layer",
}


def count_back(db_url: str, plan: Plan, tally: Tally) -> Stored:
    want = expected_keys(plan, tally)
    lost = dup = unacked = rows = 0
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            for table, sql in COUNT_SQL.items():
                got: dict[tuple[Any, ...], int] = {}
                for row in conn.execute(text(sql), {"p": f"load-{plan.seed}-%"}):
                    got[tuple(row[:-1])] = int(row[-1])
                rows += sum(got.values())
                dup += sum(n - 1 for n in got.values())
                lost += len(want[table] - got.keys())
                unacked += len(got.keys() - want[table])
    finally:
        engine.dispose()
    return Stored(lost, dup, unacked, rows)


# -- machine figures --


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine (/proc/stat)."""
    with open("/proc/stat") as fh:
        parts = [float(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of the live processes in process group `pgid` (the server and workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # pgrp; utime, stime at 11, 12 (after the name)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# -- servers --


def child_env(extra: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOODPUT_")}
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def goodput(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def fresh_postgres(url: str) -> None:
    """Drop and create the database of `url` (through the `postgres` database)."""
    u = make_url(url)
    admin = create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{u.database}"'))
    finally:
        admin.dispose()
    subprocess.run(goodput("db", "upgrade", "--db", url), check=True, capture_output=True)


@contextmanager
def serving(setup: str, args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str, int]]:
    """(base URL, database URL, server process group) of a fresh server of `setup`."""
    if setup == "sqlite":
        db = f"sqlite:///{tmp / f'load-{time.monotonic_ns()}.db'}"
        workers = 1
    else:
        m = re.fullmatch(r"pg(\d+)", setup)
        if m is None:
            raise SystemExit(f"--setups: {setup!r} is neither sqlite nor pg<workers>")
        db, workers = args.pg_url, int(m.group(1))
        fresh_postgres(db)
    port = free_port()
    argv = goodput("serve", "--host", "127.0.0.1", "--port", str(port), "--db", db)
    if workers > 1:
        argv += ["--workers", str(workers)]
    with ExitStack() as stack:
        server = Server("goodput", argv, child_env(args.server_env), tmp / f"{setup}.log")
        stack.callback(server.stop)
        base = f"http://127.0.0.1:{port}"
        server.start(base + "/healthz")
        assert server.proc is not None
        if workers > 1:
            time.sleep(1.0)  # every worker up, not only the first to answer
        yield base, db, server.proc.pid


# -- one measurement --


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Result:
    line: str
    held: bool


def measure(
    setup: str, ranks: int, runs: int, duration_s: float, args: argparse.Namespace
) -> Result:
    plan = Plan(ranks, min(runs, ranks), duration_s, args.interval, args.seed)
    t0 = time.time() - 3600.0  # simulated times: an hour ago on, never "in the future"
    with (
        tempfile.TemporaryDirectory(prefix="bench-load-") as d,
        serving(setup, args, Path(d)) as (
            base,
            db,
            pgid,
        ),
    ):
        cpu0, busy0 = time.process_time(), cpu_busy()
        server0 = group_cpu_s(pgid)
        wall0 = time.perf_counter()
        tally = asyncio.run(load(base, plan, t0))
        wall = time.perf_counter() - wall0
        client_cpu = time.process_time() - cpu0
        server_cpu = group_cpu_s(pgid) - server0
        busy1 = cpu_busy()
        stored = count_back(db, plan, tally)
    machine = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0)
    span_s = max(tally.last_answer - tally.first_send, 1e-9)
    errors = sum(tally.errors.values())
    p99 = pct(tally.batch_ms, 99)
    kept_up = tally.sent / max(tally.scheduled, 1)
    unacked = tally.sent - sum(map(len, tally.acked.values()))
    codes = ",".join(f"{c}:{n}" for c, n in sorted(tally.errors.items())) or "-"
    line = (
        f"load: setup={setup} ranks={plan.ranks} runs={plan.runs} errors={errors} "
        f"lost={stored.lost} dup={stored.dup} rows_per_s={tally.records / span_s:.0f} "
        f"p99_ms={p99:.0f} n503={tally.n503} timeouts={tally.timeouts} "
        f"transport_errors={tally.transport} unacked_batches={unacked} "
        f"p50_ms={pct(tally.batch_ms, 50):.0f} req_p99_ms={pct(tally.request_ms, 99):.0f} "
        f"kept_up={kept_up:.3f} batches={tally.sent}/{tally.scheduled} "
        f"stored_rows={stored.rows} unacked_stored={stored.unacked} error_codes={codes} "
        f"duration_s={duration_s:g} wall_s={wall:.1f} client_cpu_s={client_cpu:.1f} "
        f"server_cpu_s={server_cpu:.1f} machine_busy={machine:.2f} "
        f"load_avg_1m={os.getloadavg()[0]:.2f}"
    )
    for sample in tally.samples:
        print(f"# {setup} ranks={plan.ranks} runs={plan.runs} error answer {sample}")
    held = errors == 0 and stored.lost == 0 and p99 < P99_LIMIT_MS and kept_up >= 0.95
    return Result(line, held)


def search(setup: str, runs: int, args: argparse.Namespace) -> None:
    """Double N while it holds, then `--search-refine` bisections between the last N held
    and the first that was not."""
    held, failed = 0, None
    n = args.search_start
    while n <= args.search_max:
        if search_step(setup, n, runs, args):
            held, n = n, n * 2
        else:
            failed = n
            break
    for _ in range(args.search_refine):
        if failed is None or failed - held <= max(1, held // 8):
            break
        mid = (held + failed) // 2
        if search_step(setup, mid, runs, args):
            held = mid
        else:
            failed = mid
    beyond = f"; ranks={failed} did not" if failed is not None else ""
    print(
        f"load-largest: setup={setup} runs={runs} ranks={held} held (p99 under "
        f"{P99_LIMIT_MS:.0f} ms, no error, nothing lost, kept_up >= 0.95){beyond}",
        flush=True,
    )


def search_step(setup: str, ranks: int, runs: int, args: argparse.Namespace) -> bool:
    res = measure(setup, ranks, runs, args.search_duration, args)
    print(res.line.replace("load: ", "load-search: ", 1) + f" held={res.held}", flush=True)
    return res.held


# -- probes: what one request costs the client, how long a batch holds its run's lock --


async def _stub_server() -> tuple[asyncio.Server, int]:
    """Answers every POST at once with an ingest's 200, in this process."""
    answer = b'{"inserted":20,"duplicates":0}'
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    reply += b"%d\r\n\r\n" % len(answer) + answer

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                size = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(size.group(1)) if size else 0)
                writer.write(reply)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _client_cost(kind: str, conns: int, per_conn: int) -> float:
    """CPU ms per request, client and stub server together, of `kind` (httpx or ours)."""
    import httpx  # imported before the clock starts

    server, port = await _stub_server()
    body = Records("probe", 0, 1, time.time(), 0).batch(1)
    cpu = time.process_time()
    if kind == "httpx":
        limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as c:

            async def one_httpx() -> None:
                for _ in range(per_conn):
                    r = await c.post(INGEST, content=body, headers={"content-type": "x/json"})
                    r.json()

            await asyncio.gather(*(one_httpx() for _ in range(conns)))
    else:

        async def one_ours() -> None:
            conn = Connection("127.0.0.1", port)
            for _ in range(per_conn):
                json.loads((await conn.post(body, REQUEST_TIMEOUT_S))[2])
            conn.close()

        await asyncio.gather(*(one_ours() for _ in range(conns)))
    spent = time.process_time() - cpu
    server.close()
    await asyncio.sleep(0.1)  # the stub's handlers see their connections closed
    return spent / (conns * per_conn) * 1000


def lock_hold(db_url: str, batches: int = 60, warmup: int = 10) -> tuple[float, float]:
    """Median ms per batch, in-process and one at a time, of the whole ingest and of the run
    lock's hold (its first statement, which takes the lock, to the end of the commit)."""
    from sqlalchemy import event

    from service.services import gc_pause
    from service.services.ingest import store_body
    from service.store.db import make_engine, make_sessionmaker, session_scope

    engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    locked_at = [0.0]

    @event.listens_for(engine, "before_cursor_execute")
    def _mark(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if "FOR UPDATE" in statement or statement.startswith("UPDATE runs"):
            locked_at[0] = time.perf_counter()

    recs = Records("load-probe", 0, 1, time.time() - 3600, 0)
    whole, held = [], []
    try:
        for k in range(batches):
            body = recs.batch(k)
            t = time.perf_counter()
            with gc_pause.paused(), session_scope(factory) as session:
                store_body(session, body)
            end = time.perf_counter()
            if k >= warmup:
                whole.append((end - t) * 1000)
                held.append((end - locked_at[0]) * 1000)
    finally:
        engine.dispose()
    return pct(whole, 50), pct(held, 50)


def probe(args: argparse.Namespace) -> None:
    for kind in ("httpx", "ours"):
        ms = asyncio.run(_client_cost(kind, 64, 20))
        print(
            f"probe: client={kind} cpu_ms_per_request={ms:.3f} (64 connections x 20 POSTs "
            "of a 20-record batch to a stub server in this process, both counted)",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        sqlite_url = f"sqlite:///{Path(d) / 'probe.db'}"
        subprocess.run(
            goodput("db", "upgrade", "--db", sqlite_url), check=True, capture_output=True
        )
        fresh_postgres(args.pg_url)
        for name, url in (("sqlite", sqlite_url), ("postgresql", args.pg_url)):
            whole, held = lock_hold(url)
            print(
                f"probe: db={name} batch_ms={whole:.1f} run_lock_held_ms={held:.1f} (median "
                "of 50 batches of one rank, in-process, one at a time)",
                flush=True,
            )


# -- main --


def header() -> None:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout

    print("# command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    parts = ("service", "migrations", "trainer_hooks", "bench/load.py")
    changed = git("status", "--porcelain", "--", *parts).split("\n")
    print(
        f"# git HEAD {git('rev-parse', '--short', 'HEAD').strip() or '?'}; uncommitted under "
        f"{', '.join(parts)}: {' '.join(c.strip() for c in changed if c.strip()) or 'none'}"
    )
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# machine: {os.cpu_count()} cores shared by this client, the server, the database "
        f"and other work (load average {load_avg}); Python {platform.python_version()}, "
        f"{platform.platform()}",
        flush=True,
    )


def csv_ints(text_: str) -> list[int]:
    return [int(x) for x in text_.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", default="sqlite,pg4", help="comma-separated: sqlite, pg<W>")
    p.add_argument("--ranks", type=csv_ints, default=[64], help="comma-separated N")
    p.add_argument("--runs", type=csv_ints, default=[1], help="comma-separated M")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of posting")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between a rank's posts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-url", default=DEFAULT_PG, help="dropped and created for each run")
    p.add_argument("--server-env", action="append", default=[], help="KEY=VALUE for the server")
    p.add_argument("--probe", action="store_true", help="client cost and run-lock hold only")
    p.add_argument("--search", action="store_true", help="find the largest N each setup holds")
    p.add_argument("--search-start", type=int, default=16)
    p.add_argument("--search-max", type=int, default=1024)
    p.add_argument("--search-duration", type=float, default=20.0)
    p.add_argument("--search-runs", type=csv_ints, default=[1])
    p.add_argument("--search-refine", type=int, default=1, help="bisections after doubling")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    header()
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if args.probe:
        probe(args)
        return
    if args.search:
        for setup in setups:
            for runs in args.search_runs:
                search(setup, runs, args)
        return
    for ranks in args.ranks:
        for runs in args.runs:
            for setup in setups:
                print(measure(setup, ranks, runs, args.duration, args).line, flush=True)


if __name__ == "__main__":
    main()
