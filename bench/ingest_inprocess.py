"""Where an ingest batch's time goes, inside one process, without HTTP:

    .venv/bin/python bench/ingest_inprocess.py            # the 20,000-step workload, 3 rounds
    .venv/bin/python bench/ingest_inprocess.py --quick    # the smoke test's run

The workload and its request bodies are bench/ingest.py's (part 1). Each round stores them
into a fresh SQLite file the way `POST /api/v1/ingest` does (`parse_batch`: pydantic-core
validates the body's bytes; then `store.ingest.ingest` in one transaction per batch) and times
the two parts. Rounds alternate between the cyclic garbage collector left running (default
thresholds) and paused for each batch as the server pauses it (`service.services.gc_pause`), each
after `gc.freeze()` as the server does; the best round of each is printed, and the last line
is `ingest_inprocess: collector_steps_per_s=<x> paused_steps_per_s=<y> ratio=<y/x>`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import Workload, our_batches, seeded_id  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3, help="per GC setting")
    p.add_argument("--quick", action="store_true", help="500 steps, one round each")
    args = p.parse_args(argv)
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
