"""The compare bootstrap before and after numpy, side by side in one process.

    .venv/bin/python bench/compare_bootstrap.py

The old pure-Python implementation is `service/compare.py` at `--before` (by default
4ee6a98, the last commit with it), read with `git show` into a temporary module; the new
one is this tree's. Both run `compare()` (two bootstraps: step time and tokens/s,
BOOTSTRAP_SAMPLES resamples each) on the same generated runs of `--steps` steps each (2000
by default: COMPARE_STEPS, what `/compare` reads of a long run, 1800 of them steady),
alternating old and new `--reps` times after one warm-up of the new. Prints per size the
median wall time of each, the ratio old / new, and both step-time intervals (they differ by
resampling noise only: another RNG stream).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.calc import compare as new  # noqa: E402


def load_old(commit: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{commit}:service/compare.py"],
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


def run_data(steps: int, step_s: float, seed: int) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    times = [5 * step_s] * 3 + [step_s * rng.lognormvariate(0, 0.05) for _ in range(steps - 3)]
    tokens = [4096 + rng.randrange(-64, 64) for _ in times]
    return times, tokens


def timed(mod: ModuleType, base: tuple, cand: tuple) -> tuple[float, Any]:
    def figures(data: tuple) -> Any:
        return mod.RunFigures(data[0], data[1], 0.9, {"data_stall": 1.0}, 10**9, 2.0)

    b, c = figures(base), figures(cand)
    t0 = time.perf_counter()
    result = mod.compare(b, c)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="4ee6a98", help="commit of the old implementation")
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 400, 2000])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    head = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    import numpy as np

    print(
        f"# before = {args.before} ({head}) service/compare.py, after = this tree; "
        f"samples={new.BOOTSTRAP_SAMPLES} per bootstrap, 2 bootstraps per compare()"
    )
    print(
        f"# machine: {os.cpu_count()} cores (load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}); Python {platform.python_version()},"
        f" numpy {np.__version__}, {platform.platform()}"
    )
    old = load_old(args.before)
    for steps in args.steps:
        base, cand = run_data(steps, 0.100, 1), run_data(steps, 0.095, 2)
        timed(new, base, cand)  # warm-up (numpy's first calls)
        t_old, t_new = [], []
        for _ in range(args.reps):
            dt, r_old = timed(old, base, cand)
            t_old.append(dt)
            dt, r_new = timed(new, base, cand)
            t_new.append(dt)
        a, b = statistics.median(t_old), statistics.median(t_new)
        o, n = r_old.step_time_ratio, r_new.step_time_ratio
        print(
            f"steps={steps} (steady {r_new.steady_steps[0]}): "
            f"old p50={a * 1e3:.1f} ms, new p50={b * 1e3:.1f} ms, old/new={a / b:.1f}x "
            f"(n={args.reps} each); step-time ratio {n.value:.4f}, interval "
            f"old [{o.low:.4f}, {o.high:.4f}] new [{n.low:.4f}, {n.high:.4f}]; verdict "
            f"old {r_old.verdict} new {r_new.verdict}"
        )


if __name__ == "__main__":
    main()
