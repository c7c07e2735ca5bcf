"""Time GET /api/v1/compare over 3 runs a side of 2,000 steps (issue 15's target: under
300 ms), through the whole app in process (routing, receipts, the store's reads, the
statistics, JSON), on SQLite and, given --postgres URL, on PostgreSQL.

    .venv/bin/python bench/compare_api.py [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]

Six complete loop-shaped runs (tests/factories.py's loop_run: receipts complete, routing per
E layer) of --steps steps each are ingested through the API; then --reps timed calls of
/compare (3 against 3, knob=dispatch) after one warm-up, and the same for 1 against 1.
Prints p50 and max per database and case. On PostgreSQL it creates (and re-creates) its own
database, goodput_bench_compare, on the server the URL names.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests import factories as f  # noqa: E402


def run_records(run_id: str, dispatch: str, step_s: float, steps: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    records = f.loop_run(run_id, steps=0)
    end = records.pop()
    for r in records:
        if r["kind"] == "observation" and r["seam"].startswith("moe_dispatch."):
            r["observed"] = dispatch
    records[0]["runtime_policy"].update(dispatch_requested=dispatch, seed=seed)
    t = f.T0 + 10
    for i in range(steps):
        dur = step_s * (1 + rng.gauss(0, 0.03))
        records.append(f.step(i, run_id, start=t, dur=dur, loss=2.0 - 1e-4 * i))
        t += dur + 0.001
        if i % 50 == 49:
            metric = {"kind": "metric", "run_id": run_id, "name": "eval_loss", "step": i}
            records.append({**metric, "value": 2.0 - 1e-4 * i, "time": t})
    records.append({**end, "end": t + 1})
    return records


def fill(client: TestClient, steps: int) -> None:
    for side, dispatch, step_s in (("a", "grouped", 0.10), ("b", "padded", 0.11)):
        for r in range(3):
            records = run_records(f"{side}{r}", dispatch, step_s, steps, seed=r)
            for j in range(0, len(records), 5000):
                got = client.post("/api/v1/ingest", json={"records": records[j : j + 5000]})
                assert got.status_code == 200, got.text


def timed(client: TestClient, params: dict[str, str], reps: int) -> list[float]:
    assert client.get("/api/v1/compare", params=params).status_code == 200  # warm-up
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = client.get("/api/v1/compare", params=params)
        out.append((time.perf_counter() - t0) * 1000)
        assert got.status_code == 200, got.text
    return out


def fresh_database(server_url: str) -> str:
    """A new, migrated database `goodput_bench_compare` on the server of `server_url` (dropped
    first if there): the bench never touches the database the URL names."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from service.store.migrate import upgrade

    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS goodput_bench_compare"))
        conn.execute(text("CREATE DATABASE goodput_bench_compare"))
    admin.dispose()
    url = make_url(server_url).set(database="goodput_bench_compare").render_as_string(False)
    upgrade(url)
    return url


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--postgres",
        default=None,
        help="a PostgreSQL server URL: the bench makes its own database there",
    )
    args = p.parse_args()
    print(f"# python {platform.python_version()}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        urls = [("sqlite", f"sqlite:///{tmp}/compare.db")]
        if args.postgres:
            urls.append(("postgresql", args.postgres))
        for name, url in urls:
            if name == "postgresql":
                url = fresh_database(url)
            with TestClient(create_app(Settings(database_url=url))) as client:
                fill(client, args.steps)
                cases = {
                    "3 against 3": {"baseline": "a0,a1,a2", "candidate": "b0,b1,b2"},
                    "1 against 1": {"baseline": "a0", "candidate": "b0"},
                }
                for case, params in cases.items():
                    ms = timed(client, {**params, "knob": "dispatch"}, args.reps)
                    print(
                        f"compare_api: db={name} case='{case}' steps={args.steps} "
                        f"p50_ms={statistics.median(ms):.1f} max_ms={max(ms):.1f} reps={args.reps}"
                    )


if __name__ == "__main__":
    main()
