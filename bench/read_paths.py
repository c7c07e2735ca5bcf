"""The service's read paths timed inside one process, for side-by-side runs of two trees:

    .venv/bin/python bench/read_paths.py [--steps 20000] [--reps 60]

Builds the app of the tree it is run from (its own `service` package: run it with each tree's
interpreter, from that tree, to compare two commits) on a temporary SQLite file, ingests
bench/ingest.py's workload (`--steps` steps, 12 E layers with routing every 10 steps, one
failed attempt) through `POST /api/v1/ingest`, then times each GET below `--reps` times in
turn through FastAPI's TestClient (no network) and prints the medians in milliseconds, with the
git commit of the tree.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import ingest as bench  # noqa: E402  (bench/ingest.py: the workload)

QUERIES: dict[str, tuple[str, dict[str, str | int]]] = {
    "series?metric=loss&max_points=320": ("/series", {"metric": "loss", "max_points": 320}),
    "steps?max_points=320": ("/steps", {"max_points": 320}),
    "routing?max_points=320 (12 layers)": ("/routing", {"max_points": 320}),
    "goodput": ("/goodput", {}),
    "series?metric=loss (every step)": ("/series", {"metric": "loss", "max_points": 100_000}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    import service
    from service.app import create_app
    from service.settings import Settings

    if Path(service.__file__).resolve().parents[1] != ROOT:
        raise SystemExit(f"service imported from {service.__file__}, not from {ROOT}")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(database_url=f"sqlite:///{tmp}/reads.db"))
        with TestClient(app) as client:
            w = bench.Workload(
                steps=args.steps,
                layers=tuple(range(1, 24, 2)),
                routing_every=10,
                fail_at=args.steps * 3 // 5 + 37,
            )
            for batch in bench.our_batches(w, "reads", "reads"):
                sent = client.post(
                    "/api/v1/ingest",
                    content=batch.body,
                    headers={"content-type": "application/json"},
                )
                sent.raise_for_status()
            times: dict[str, list[float]] = {name: [] for name in QUERIES}
            for _ in range(args.reps):
                for name, (path, params) in QUERIES.items():
                    t0 = time.perf_counter()
                    client.get(f"/api/v1/runs/reads{path}", params=params).raise_for_status()
                    times[name].append(time.perf_counter() - t0)
            app.state.engine.dispose()
    print(f"# read_paths: git HEAD {head}, {args.steps} steps, median of {args.reps}")
    for name, ts in times.items():
        print(f"{name}: {1000 * statistics.median(ts):.2f} ms")


if __name__ == "__main__":
    main()
