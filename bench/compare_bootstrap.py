"""The keep/drop engine's cost, and its verdicts on generated replicates, in one process.

    .venv/bin/python bench/compare_bootstrap.py

Timing: `compare()` of this tree on generated runs of `--steps` steps (2000 by default:
COMPARE_STEPS, what `/compare` reads of a long run, 1800 of them steady), 3 runs a side (the
t interval on per-run medians: no resampling) and 1 run a side (the floor plus a within-run
block bootstrap of each run), and beside them the old engine (`service/calc/compare.py` at
`--before`, read with `git show` into a temporary module: one run a side, two percentile
bootstraps of BOOTSTRAP_SAMPLES=2000), alternating `--reps` times after one warm-up each.
Prints the median wall time of each and the ratio old / new.

Verdicts (`--triples`, 0 to skip): generated A/A and A/B pairs of sides, each run's step times
an AR(1) series (phi 0.8, 5% spread) on top of a run offset (`--offset`, the between-run noise:
normal, 2% by default), eval loss spread 1% between runs, `--sim-steps` steps a run, compared
with `--margin` (compare()'s default 0.02). Prints the share of A/A pairs given keep or drop
(false verdicts) and of 5% and 10% slowdowns given drop, for 3 runs and 1 run a side. A model
of real runs, not a measurement of them: bench/compare_calibration.py measures the bundled loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.calc import compare as new  # noqa: E402


def load_old(commit: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{commit}:service/calc/compare.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_compare_old.py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("compare_old", fh.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(fh.name)
    return module


def run_data(steps: int, step_s: float, rng: np.random.Generator) -> tuple[list[float], list[int]]:
    """Three slow warm-up steps, then lognormal step times (5%) and ~4096 tokens a step."""
    times = np.concatenate([[5 * step_s] * 3, step_s * rng.lognormal(0, 0.05, steps - 3)])
    tokens = 4096 + rng.integers(-64, 64, steps)
    return times.tolist(), tokens.tolist()


def new_figures(rid: str, data: tuple[list[float], list[int]]) -> new.RunFigures:
    n = len(data[0])
    return new.RunFigures(
        run_id=rid,
        step_times_s=data[0],
        tokens=data[1],
        steps=list(range(n)),
        eval_loss={n // 2: 3.0, n: 2.5},
        final_loss=2.5,
        goodput_fraction=0.9,
        badput_s={"startup": 10.0, "data_stall": 1.0, "other": 0.5},
        total_s=300.0,
        peak_memory_bytes=10**9,
        drop_rate=0.01,
        max_vio=0.3,
    )


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def timing(args: argparse.Namespace) -> None:
    old = load_old(args.before)
    rng = np.random.default_rng(1)
    for steps in args.steps:
        base = [run_data(steps, 0.100, rng) for _ in range(3)]
        cand = [run_data(steps, 0.095, rng) for _ in range(3)]
        b3 = [new_figures(f"b{i}", d) for i, d in enumerate(base)]
        c3 = [new_figures(f"c{i}", d) for i, d in enumerate(cand)]
        old_b, old_c = (
            old.RunFigures(d[0], d[1], 0.9, {"data_stall": 1.0}, 10**9, 2.5)
            for d in (base[0], cand[0])
        )
        cases = {
            "new 3 runs a side": (new.compare, b3, c3),
            "new 1 run a side": (new.compare, b3[:1], c3[:1]),
            "old 1 run a side": (old.compare, old_b, old_c),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        results: dict[str, Any] = {}
        for fn, b, c in cases.values():
            timed(fn, b, c)  # warm-up (numpy's first calls)
        for _ in range(args.reps):
            for name, (fn, b, c) in cases.items():
                dt, results[name] = timed(fn, b, c)
                times[name].append(dt)
        p50 = {name: statistics.median(t) for name, t in times.items()}
        old_p50 = p50["old 1 run a side"]
        for name in cases:
            r = results[name].step_time_ratio
            print(
                f"steps={steps} {name}: p50={p50[name] * 1e3:.1f} ms "
                f"(min {min(times[name]) * 1e3:.1f}, n={args.reps}), old/this="
                f"{old_p50 / p50[name]:.1f}x; step-time ratio {r.value:.4f} "
                f"[{r.low:.4f}, {r.high:.4f}], verdict {results[name].verdict}"
            )


def generated_side(
    rng: np.random.Generator, runs: int, step_s: float, steps: int, offset: float
) -> list[new.RunFigures]:
    """Runs of one lane: AR(1) log step times (phi 0.8, 5% spread) around a run offset."""
    phi, spread = 0.8, 0.05
    shocks = rng.normal(0, spread * math.sqrt(1 - phi**2), size=(runs, steps))
    series = np.empty((runs, steps))
    level = rng.normal(0, spread, runs)
    for i in range(steps):
        level = phi * level + shocks[:, i]
        series[:, i] = level
    times = step_s * np.exp(series + rng.normal(0, offset, size=(runs, 1)))
    loss = 3.0 * np.exp(rng.normal(0, 0.01, runs))
    return [
        new.RunFigures(
            run_id=f"r{i}",
            step_times_s=times[i].tolist(),
            tokens=[4096] * steps,
            steps=list(range(steps)),
            eval_loss={steps: float(loss[i])},
            peak_memory_bytes=10**9,
            drop_rate=0.01,
        )
        for i in range(runs)
    ]


def verdicts(args: argparse.Namespace) -> None:
    for runs in (3, 1):
        shares = []
        for slowdown in (1.0, 1.05, 1.10):
            rng = np.random.default_rng(7)
            got = Counter(
                new.compare(
                    generated_side(rng, runs, 0.1, args.sim_steps, args.offset),
                    generated_side(rng, runs, 0.1 * slowdown, args.sim_steps, args.offset),
                    margin=args.margin,
                ).verdict
                for _ in range(args.triples)
            )
            if slowdown == 1.0:
                shares.append(f"aa_false_verdicts={(got['keep'] + got['drop']) / args.triples:.3f}")
            else:
                shares.append(f"power_{slowdown - 1:.0%}={got['drop'] / args.triples:.3f}")
        print(
            f"generated, {runs} run(s) a side, {args.triples} pairs each, run offset "
            f"{args.offset:.0%}, {args.sim_steps} steps, margin {args.margin}: {' '.join(shares)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="f53bb73", help="commit of the old engine")
    parser.add_argument("--steps", type=int, nargs="+", default=[2000])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--triples", type=int, default=400, help="generated pairs per case")
    parser.add_argument("--offset", type=float, default=0.02, help="between-run noise")
    parser.add_argument("--sim-steps", type=int, default=200)
    parser.add_argument("--margin", type=float, default=0.02, help="compare()'s margin")
    args = parser.parse_args()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"# before = {args.before} service/calc/compare.py, this = the tree at {head} + edits")
    print(
        f"# machine: {os.cpu_count()} cores (load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}); Python {platform.python_version()},"
        f" numpy {np.__version__}, {platform.platform()}"
    )
    timing(args)
    if args.triples:
        verdicts(args)


if __name__ == "__main__":
    main()
