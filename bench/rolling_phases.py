"""Where the time of `/goodput/rolling` near its cap goes: the scale workload of
bench/ingest.py loaded into SQLite by this tree's server, then `accounting.rolling` over
40-second windows (9,984 on the default 1,000,000 steps) run in this process, its phases timed
in CPU seconds (`time.process_time`), which a machine busy with other work inflates less than
wall time.

    .venv/bin/python bench/rolling_phases.py [--steps 1000000] [--window-s 40] [--reps 3]
"""

from __future__ import annotations

import argparse
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
from service.store.db import make_engine, make_sessionmaker  # noqa: E402
from service.store.rollups import rolling as rr  # noqa: E402
from service.store.rollups import windows  # noqa: E402

PHASES = ("_edge_figures", "_blocked", "_span_sums", "_steps_of")


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
    args = p.parse_args()
    bench.header()
    w = bench.scale_workload(bench.parse(["--part", "scale", "--scale-steps", str(args.steps)]))
    run_id = bench.seeded_id(w.seed, 2)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rolling-")))
        db = tmp / "goodput.db"
        with ExitStack() as loading:
            base = qba.serve(loading, db, tmp / "load.log", qba.ROOT)
            with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
                batches = bench.prefetched(bench.our_batches(w, run_id, "bench-scale"))
                bench.send_all(client, "/api/v1/ingest", batches, bench._all_inserted)
        spent: dict[str, float] = {}
        for name in PHASES:
            setattr(rr._Many, name, timed(spent, name, getattr(rr._Many, name)))
        rr._values = timed(spent, "sql", rr._values)  # inside the phases above
        sessions = make_sessionmaker(make_engine(f"sqlite:///{db}"))
        for rep in range(args.reps):
            spent.clear()
            with sessions() as session:
                acc = accounting.whole_run(session, run_id)
                bounds = rolling(run_extent(acc.goodput), args.window_s, args.window_s)
                t, c = time.perf_counter(), time.process_time()
                accounting.rolling(windows.WindowReader(session, run_id, acc.decided), acc, bounds)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
            parts = ", ".join(f"{k} {v:.3f} s" for k, v in spent.items())
            print(
                f"rep {rep}: {len(bounds)} windows, wall {wall:.3f} s, cpu {cpu:.3f} s "
                f"(of it: {parts})"
            )


if __name__ == "__main__":
    main()
