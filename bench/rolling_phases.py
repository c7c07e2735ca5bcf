"""Where the time of `/goodput/rolling` near its cap goes: the scale workload of
bench/ingest.py loaded into SQLite by this tree's server, then `accounting.rolling` over
40-second windows (9,984 on the default 1,000,000 steps) run in this process, its phases timed
in CPU seconds (`time.process_time`), which a machine busy with other work inflates less than
wall time.

    .venv/bin/python bench/rolling_phases.py [--steps 1000000] [--window-s 40] [--reps 3]
        [--db build/rolling_1m.db]

With `--db`, the database is kept at that path: built there when the file is missing, read as
it is when it exists (building it takes minutes). A database built by an older tree is
upgraded first by this tree's migrations (`goodput db upgrade`), as a server would be.

With `--http`, the same database is then served by this tree's server and
`GET /runs/{id}/goodput/rolling` timed through HTTP (`--reps` calls after a warm-up) at
40-second, ten-minute and one-hour windows, wall time in ms. To compare two trees whose
schemas differ, run this file from each (a copy of it in a worktree of the earlier commit),
each on its own copy of one database, alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as bench  # noqa: E402
import query_before_after as qba  # noqa: E402

from service.calc.goodput_window import rolling, run_extent  # noqa: E402
from service.services import accounting  # noqa: E402
from service.store import migrate  # noqa: E402
from service.store.db import make_engine, make_sessionmaker  # noqa: E402
from service.store.rollups import rolling as rr  # noqa: E402
from service.store.rollups import windows  # noqa: E402

PHASES = ("_edge_figures", "_blocked", "_span_sums", "_span_edges", "_steps_of", "_charge_clashing")


def timed(spent: dict[str, float], name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def g(*a: Any, **k: Any) -> Any:
        t = time.process_time()
        try:
            return f(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - t

    return g


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--window-s", type=float, default=40.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--db", type=Path, help="keep the database here (reused when it exists)")
    p.add_argument("--http", action="store_true", help="also time the route through HTTP")
    args = p.parse_args()
    bench.header()
    w = bench.scale_workload(bench.parse(["--part", "scale", "--scale-steps", str(args.steps)]))
    run_id = bench.seeded_id(w.seed, 2)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rolling-")))
        db = args.db.resolve() if args.db else tmp / "goodput.db"
        if db.exists():
            t = time.perf_counter()
            migrate.upgrade(f"sqlite:///{db}")
            print(f"reused {db}; upgraded in {time.perf_counter() - t:.1f} s")
        else:
            db.parent.mkdir(parents=True, exist_ok=True)
            with ExitStack() as loading:
                base = qba.serve(loading, db, tmp / "load.log", qba.ROOT)
                with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
                    batches = bench.prefetched(bench.our_batches(w, run_id, "bench-scale"))
                    bench.send_all(client, "/api/v1/ingest", batches, bench._all_inserted)
        spent: dict[str, float] = {}
        for name in PHASES:  # those this tree has
            if hasattr(rr._Many, name):
                setattr(rr._Many, name, timed(spent, name, getattr(rr._Many, name)))
        if hasattr(rr, "_values"):
            rr._values = timed(spent, "sql", rr._values)  # inside the phases above
        sessions = make_sessionmaker(make_engine(f"sqlite:///{db}"))
        for rep in range(args.reps):
            spent.clear()
            with sessions() as session:
                acc = accounting.whole_run(session, run_id)
                bounds = rolling(run_extent(acc.goodput), args.window_s, args.window_s)
                t, c = time.perf_counter(), time.process_time()
                out = accounting.rolling(
                    windows.WindowReader(session, run_id, acc.decided), acc, bounds
                )
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                if hasattr(out, "rows"):  # the response's dicts (built after the figures)
                    r = time.process_time()
                    out.rows()
                    spent["rows, after"] = time.process_time() - r
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in spent.items())
            print(
                f"rep {rep}: {len(bounds)} windows, wall {wall:.3f} s, cpu {cpu:.3f} s "
                f"(of it: {parts})"
            )
        if args.http:
            with ExitStack() as serving:
                base = qba.serve(serving, db, tmp / "serve.log", qba.ROOT)
                with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
                    url = f"/api/v1/runs/{run_id}/goodput/rolling"
                    for window_s in (args.window_s, 600.0, 3600.0):
                        ms = qba.timed(client, url, {"window_s": window_s}, args.reps)
                        n = len(client.get(url, params={"window_s": window_s}).json()["windows"])
                        print(
                            f"http rolling window_s={window_s:g} ({n} windows): "
                            f"p50 {statistics.median(ms):.1f} ms, all "
                            + ", ".join(f"{x:.1f}" for x in ms)
                        )
                    # The same near the cap, split: the server's answer (the bytes received)
                    # and the client's parse of them, which the figures above include.
                    got, parsed = [], []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        resp = client.get(url, params={"window_s": args.window_s})
                        t1 = time.perf_counter()
                        json.loads(resp.content)
                        got.append((t1 - t) * 1e3)
                        parsed.append((time.perf_counter() - t1) * 1e3)
                    print(
                        f"http rolling window_s={args.window_s:g}, split: answer p50 "
                        f"{statistics.median(got):.1f} ms, parse p50 "
                        f"{statistics.median(parsed):.1f} ms ({len(resp.content):,} bytes)"
                    )


if __name__ == "__main__":
    main()
