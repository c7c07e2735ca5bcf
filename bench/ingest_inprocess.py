"""Where an ingest batch's time goes, inside one process, without HTTP:

    .venv/bin/python bench/ingest_inprocess.py            # the 20,000-step workload, 3 rounds
    .venv/bin/python bench/ingest_inprocess.py --quick    # the smoke test's run
    .venv/bin/python bench/ingest_inprocess.py --load-batches [--code DIR] [--profile N]

The workload and its request bodies are bench/ingest.py's (part 1). Each round stores them
into a fresh SQLite file the way `POST /api/v1/ingest` does (`parse_batch`: pydantic-core
validates the body's bytes; then `store.ingest.ingest` in one transaction per batch) and times
the two parts. Rounds alternate between the cyclic garbage collector left running (default
thresholds) and paused for each batch as the server pauses it (`service.services.gc_pause`), each
after `gc.freeze()` as the server does; the best round of each is printed, and the last line
is `ingest_inprocess: collector_steps_per_s=<x> paused_steps_per_s=<y> ratio=<y/x>`.

`--load-batches` times instead the whole server path of bench/load.py's batches (5 steps,
their 5 data-stall spans and 10 routing records; the first also the run, the attempt start
and the startup span), on SQLite and on PostgreSQL (`--pg-url`, dropped and created again):
each request is one ASGI call of the app (middleware, body, dependencies, the route in the
thread pool, validation, the store, the commit, the answer; not the HTTP parse), `--ranks`
ranks of as many runs posting in turn, `--batches` each. Per db it prints the mean and median
wall ms and the mean CPU ms (this process, all threads) per batch after `--warmup` rounds,
and `ingest_inprocess_load: db=<db> ... cpu_ms_per_batch=<x>`. `--code DIR` measures the
service in DIR (another checkout: `git worktree add /tmp/before <sha>`), the bodies being
this checkout's; `--profile N` prints cProfile's N costliest functions (by own time, with
their callers' totals) of the first db, its timer the CPU clock; `--sections` the CPU
time of the path's functions (SECTIONS, inclusive) and the statements, per batch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple


def _code_root(argv: list[str]) -> Path:
    """The checkout whose service is measured: `--code DIR`, else this one."""
    for i, a in enumerate(argv):
        if a == "--code" and i + 1 < len(argv):
            return Path(argv[i + 1]).resolve()
        if a.startswith("--code="):
            return Path(a.split("=", 1)[1]).resolve()
    return Path(__file__).resolve().parent.parent


CODE = _code_root(sys.argv)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(CODE))  # first: the benches imported below put this checkout first
os.environ["PYTHONPATH"] = os.pathsep.join(  # `goodput db upgrade` runs CODE's migrations
    [str(CODE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

import service  # noqa: E402
from service.app import create_app  # noqa: E402
from service.services import gc_pause  # noqa: E402
from service.services.ingest import parse_batch  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import ingest as repo  # noqa: E402
from service.store.db import session_scope  # noqa: E402


class Round(NamedTuple):
    steps: int
    validate_s: float
    store_s: float

    @property
    def steps_per_s(self) -> float:
        return self.steps / (self.validate_s + self.store_s)

    def line(self, label: str) -> str:
        us = 1e6 / self.steps
        return (
            f"{label}: {self.steps_per_s:,.0f} steps/s; per step: validate "
            f"{self.validate_s * us:.1f} us, store {self.store_s * us:.1f} us"
        )


def one_batch(app: Any, body: bytes) -> tuple[float, float]:
    """service.services.ingest.store_body, timed in its two parts."""
    t0 = time.perf_counter()
    batch = parse_batch(body)
    t1 = time.perf_counter()
    with session_scope(app.state.sessionmaker) as session:
        repo.ingest(session, batch.records)
    return t1 - t0, time.perf_counter() - t1


def one_round(bodies: list[bytes], steps: int, pause: bool) -> Round:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(database_url=f"sqlite:///{tmp}/goodput.db"))
        gc.collect()
        gc.freeze()
        validate = store = 0.0
        try:
            for body in bodies:
                with gc_pause.paused() if pause else contextlib.nullcontext():
                    v, st = one_batch(app, body)  # the batch is freed inside, as the server's
                validate, store = validate + v, store + st
        finally:
            gc.unfreeze()
            app.state.engine.dispose()
    return Round(steps, validate, store)


async def _asgi_post(app: Any, body: bytes) -> int:
    """POST /api/v1/ingest as one ASGI call of the app; the answer's status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/ingest",
        "raw_path": b"/api/v1/ingest",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    status = [0]

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]

    await app(scope, receive, send)
    return status[0]


# --sections: the functions of a batch's path timed (inclusive CPU time of their thread);
# those a checkout lacks are skipped.
SECTIONS = {
    "service.services.ingest": ("ingest", "parse_batch", "store_body"),
    "service.store.ingest": (
        *("ingest", "_store_runs", "_placeholder_runs", "_start_attempts", "_stored_ends"),
        *("_after_attempt_end", "_store_rows", "_store_per_step", "_overlapping_steps"),
        *("_store_new", "_routing_row", "_end_attempts", "_heartbeats"),
    ),
    "service.store.rollups.write": (
        *("lock_runs", "blocked_of", "block_stored_steps", "flag_clashes", "add_steps"),
        *("_add_micro_blocks", "add_spans", "_add_span_buckets", "add_routing"),
    ),
    "service.store.bulk": ("insert_rows", "upsert_rows", "probe_new"),
}


class Sections:
    """Inclusive CPU seconds and calls of SECTIONS, and statements by their first words."""

    def __init__(self) -> None:
        import collections
        import functools
        import importlib

        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        self.on = False
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.statements: collections.Counter[str] = collections.Counter()
        for name, functions in SECTIONS.items():
            module = importlib.import_module(name)
            for fn in functions:
                if hasattr(module, fn):
                    key = f"{name.removeprefix('service.')}.{fn}"
                    orig = getattr(module, fn)
                    setattr(module, fn, functools.wraps(orig)(self._timed(key, orig)))

        @event.listens_for(Engine, "before_cursor_execute")
        def _count(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
            if self.on:
                words = statement.split()
                verb = words[0] if words else "?"
                where = {"INSERT": 2, "UPDATE": 1, "SELECT": -1}.get(verb)
                table = ""
                if verb == "SELECT" and "FROM" in words:
                    table = words[words.index("FROM") + 1]
                elif where is not None and where > 0 and len(words) > where:
                    table = words[where]
                self.statements[f"{verb} {table}".strip()] += 1

    def _timed(self, key: str, orig: Any) -> Any:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                if self.on:
                    self.cpu[key] += time.thread_time() - t
                    self.calls[key] += 1

        return timed

    def report(self, batches: int) -> None:
        for key, sec in sorted(self.cpu.items(), key=lambda kv: -kv[1]):
            calls = self.calls[key] / batches
            print(f"#   {1000 * sec / batches:7.3f} ms  {calls:5.1f} calls  {key}")
        total = sum(self.statements.values()) / batches
        print(f"#   statements per batch: {total:.2f}")
        for what, n in self.statements.most_common():
            print(f"#   {n / batches:7.2f}  {what}")


async def _drive(
    app: Any, rounds: list[list[bytes]], warmup: int, prof: Any, sections: Sections | None
) -> tuple[list[float], list[float]]:
    """Post every round's bodies in turn; (wall, CPU) seconds of each after `warmup` rounds."""
    wall: list[float] = []
    cpu: list[float] = []
    for k, bodies in enumerate(rounds):
        timed = k >= warmup
        if sections is not None:
            sections.on = timed
        if timed and prof is not None:
            prof.enable()
        for body in bodies:
            w, c = time.perf_counter(), time.process_time()
            status = await _asgi_post(app, body)
            if timed:
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
            assert status == 200, f"round {k}: status {status}"
        if prof is not None:
            prof.disable()
    return wall, cpu


def load_batches(args: argparse.Namespace) -> None:
    """--load-batches: bench/load.py's batches through the whole app, per batch."""
    import asyncio
    import cProfile
    import pstats
    import statistics

    from load import Records, fresh_postgres

    sys.path.insert(0, str(CODE))  # load.py put this checkout first

    t0 = time.time() - 3600.0
    ranks = [Records(f"inproc-{i:04d}", 0, 1, t0, args.seed) for i in range(args.ranks)]
    rounds = [[r.batch(k) for r in ranks] for k in range(args.batches)]
    sections = Sections() if args.sections else None
    for n_db, db in enumerate(args.dbs.split(",")):
        prof = cProfile.Profile(time.process_time) if args.profile_n and n_db == 0 else None
        with tempfile.TemporaryDirectory(prefix="ingest-inprocess-") as tmp:
            if db == "postgresql":
                fresh_postgres(args.pg_url)
                url = args.pg_url
            else:
                url = f"sqlite:///{tmp}/goodput.db"
            app = create_app(Settings(database_url=url))
            try:
                wall, cpu = asyncio.run(_drive(app, rounds, args.warmup, prof, sections))
            finally:
                app.state.engine.dispose()
        n = len(wall)
        figures = (
            f"db={db} batches={n} wall_ms_mean={1000 * sum(wall) / n:.2f} "
            f"wall_ms_median={1000 * statistics.median(wall):.2f} "
            f"cpu_ms_per_batch={1000 * sum(cpu) / n:.2f}"
        )
        print(f"ingest_inprocess_load: {figures}", flush=True)
        if sections is not None:
            print(f"# db={db}: where a batch's CPU goes, per batch (inclusive; timers add some)")
            sections.report(n)
            sections.on = False
            sections.cpu.clear()
            sections.calls.clear()
            sections.statements.clear()
        if prof is not None:
            print(f"# cProfile of db={db} (CPU clock; its overhead inflates every figure)")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile_n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3, help="per GC setting")
    p.add_argument("--quick", action="store_true", help="500 steps, one round each")
    p.add_argument("--load-batches", action="store_true", help="bench/load.py's batches")
    p.add_argument("--code", default=str(CODE), help="the checkout whose service is measured")
    p.add_argument("--dbs", default="sqlite,postgresql", help="with --load-batches")
    p.add_argument("--ranks", type=int, default=16, help="with --load-batches")
    p.add_argument("--batches", type=int, default=25, help="per rank, with --load-batches")
    p.add_argument("--warmup", type=int, default=5, help="rounds untimed, with --load-batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/inprocbench")
    p.add_argument("--profile", dest="profile_n", type=int, default=0, metavar="N")
    p.add_argument("--sections", action="store_true", help="CPU per function and statements")
    args = p.parse_args(argv)
    if args.load_batches:
        head = subprocess.run(
            ["git", "-C", str(CODE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        )
        print(f"# command: bench/ingest_inprocess.py {' '.join(argv or sys.argv[1:])}")
        where = Path(service.__file__).parent.parent
        load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"# service from {where} (git HEAD {head.stdout.strip() or 'unknown'}); Python "
            f"{sys.version.split()[0]}; {os.cpu_count()} cores, load average {load_avg}",
            flush=True,
        )
        load_batches(args)
        return
    from ingest import Workload, our_batches, seeded_id

    if args.quick:
        args.steps, args.rounds = 500, 1
    w = Workload(steps=args.steps, layers=(1,), checkpoint_every=100)
    batches = list(our_batches(w, seeded_id(w.seed, 1), "bench-ingest"))
    bodies, steps = [b.body for b in batches], sum(b.steps for b in batches)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"# command: bench/ingest_inprocess.py {' '.join(argv or sys.argv[1:])}")
    print(f"# git HEAD {head.stdout.strip() or 'unknown'}; Python {sys.version.split()[0]}")
    print(f"# {steps} steps, {sum(b.records for b in batches)} records, {len(bodies)} batches")
    rounds: dict[str, list[Round]] = {"collector": [], "paused": []}
    for i in range(args.rounds):
        for name in rounds:
            r = one_round(bodies, steps, pause=name == "paused")
            rounds[name].append(r)
            print(r.line(f"round {i} gc {name}"), flush=True)
    best = {name: max(rs, key=lambda r: r.steps_per_s) for name, rs in rounds.items()}
    for name, r in best.items():
        print(r.line(f"best gc {name}"))
    a, b = best["collector"].steps_per_s, best["paused"].steps_per_s
    figures = f"collector_steps_per_s={a:.0f} paused_steps_per_s={b:.0f} ratio={b / a:.2f}"
    print(f"ingest_inprocess: {figures}")


if __name__ == "__main__":
    main()
