"""The same queries against the same database, served by this tree and by an earlier commit,
side by side in one run.

    .venv/bin/python bench/query_before_after.py --before 25b355a

It loads the scale workload of bench/ingest.py (`--steps`, 1,000,000 by default) into one
SQLite database with this tree's server, then serves that file with each tree in turn (the
earlier one from a `git worktree` of `--before`, run by this interpreter with its directory
as its working directory, so `python -m` imports its packages; checked before timing) and
times each query, `--reps` times after one warm-up, alternating the
trees `--rounds` times. The commit must read the schema this tree writes (same migrations).
Prints per query and tree the p50 over all rounds, and the ratio before / after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as bench  # noqa: E402  (bench/ingest.py: the workload and the server handling)

ROOT = Path(__file__).resolve().parents[1]


def queries(run_id: str, steps: int) -> list[tuple[str, str, dict[str, Any]]]:
    runs = f"/api/v1/runs/{run_id}"
    mid = bench.T0 + steps * bench.STEP_TIME_S * bench.WINDOW_AT
    return [
        ("goodput", f"{runs}/goodput", {}),
        ("goodput?start=&end= (one hour)", f"{runs}/goodput", {"start": mid, "end": mid + 3600}),
        ("goodput/rolling?window_s=3600", f"{runs}/goodput/rolling", {"window_s": 3600.0}),
        ("goodput/rolling?window_s=600", f"{runs}/goodput/rolling", {"window_s": 600.0}),
        # near the cap of 10,000 windows (9,984 on the default 1,000,000 steps)
        ("goodput/rolling?window_s=40", f"{runs}/goodput/rolling", {"window_s": 40.0}),
    ]


def imported_from(tree: Path) -> Path:
    """Where `python -m` run in `tree` finds the service package."""
    code = "import service, pathlib; print(pathlib.Path(service.__file__).parent.parent)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip()).resolve()


def serve(stack: ExitStack, db: Path, log: Path, tree: Path) -> str:
    if imported_from(tree) != tree.resolve():
        raise RuntimeError(f"a server started in {tree} would not run its code")
    port = bench.free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--db", f"sqlite:///{db}"]
    server = bench.Server("goodput", argv, bench._child_env("GOODPUT_"), log, cwd=tree)
    stack.callback(server.stop)
    server.start(f"http://127.0.0.1:{port}/healthz")
    return f"http://127.0.0.1:{port}"


def timed(client: httpx.Client, url: str, params: dict[str, Any], reps: int) -> list[float]:
    fetch: Callable[[], Any] = lambda: bench._get_json(client, url, params)  # noqa: E731
    fetch()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fetch()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="the earlier commit")
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    before = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", args.before],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    bench.header()
    scale_args = bench.parse(["--part", "scale", "--scale-steps", str(args.steps)])
    w = bench.scale_workload(scale_args)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-before-after-")))
        old = tmp / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), before],
            check=True,
        )
        stack.callback(
            subprocess.run, ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)]
        )
        db = tmp / "goodput.db"
        run_id = bench.seeded_id(w.seed, 2)
        with ExitStack() as loading:
            base = serve(loading, db, tmp / "load.log", ROOT)
            with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
                batches = bench.prefetched(bench.our_batches(w, run_id, "bench-scale"))
                secs, steps, _, _ = bench.send_all(
                    client, "/api/v1/ingest", batches, bench._all_inserted
                )
        print(f"loaded {steps} steps in {secs:.1f} s; before = {before}, after = this tree")
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for name, tree in (("before", old), ("after", ROOT)):
                with ExitStack() as serving:
                    base = serve(serving, db, tmp / f"{name}.log", tree)
                    with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
                        for label, url, params in queries(run_id, w.steps):
                            ms = timed(client, url, params, args.reps)
                            times.setdefault((label, name), []).extend(ms)
        for label, _, _ in queries(run_id, w.steps):
            b = statistics.median(times[label, "before"])
            a = statistics.median(times[label, "after"])
            n = len(times[label, "after"])
            print(
                f"{label}: before p50={b:.1f} ms, after p50={a:.1f} ms, "
                f"before/after={b / a:.2f} (n={n} each)"
            )


if __name__ == "__main__":
    main()
