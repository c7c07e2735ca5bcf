"""Keep/drop calibration on real runs: how often A/A pairs get a verdict, and how often a known
slowdown is found, through the service's REST API.

    .venv/bin/python bench/compare_calibration.py [--pairs 20] [--steps 60] [--runs-per-side 3]

The real app (service.app.create_app on a fresh SQLite file, build/compare_calibration/ by
default, `--db` otherwise) is served on a loopback port by uvicorn in a child process, as
`goodput serve` would be; the runs are the bundled loop, `moe_core.train.main(argv)` called in
this process (the same code as `goodput train`, so the hooks, the spool and its sender thread
post to the service over HTTP exactly as a user's run does; a child process per run would only
add seconds of imports). The server is a process of its own rather than a thread of this one:
in a thread, its request handling would take the GIL from the training thread and add the
service's own noise to the step times being calibrated. Torch runs one intra-op thread
(`--threads 1`): on this 2-core machine shared at a load average of 8 to 13, a step of this
model took a median 32 ms with one thread and 459 ms with torch's default two (OpenMP threads
that wait for each other on oversubscribed cores), with run medians spreading in proportion.

Each of `--pairs` blocks trains `--runs-per-side` runs of each of four sides, interleaved so
that drift of the shared machine falls on all sides alike, each round starting one side further
(A, A', B5, B10, then A', B5, B10, A, ...): the run after a slowed one was measured slower, and
with a fixed order A's run medians had a median of 9.47 ms against 9.28 ms for A' (45 runs
each, a quiet machine). Every run has its own seed, or with `--paired` A, B5 and B10 share
each round's seed as `goodput ablate`'s cells do (the A/B verdicts are then paired t
intervals; A' keeps seeds of its own):
  A, A'   the same config (small CPU model: --pattern AE --d-model 64 --seq-len 64
          --batch-size 8, eval every 10 steps), other seeds: replicates of one lane
  B5, B10 the same with --slowdown 0.05 / 0.10: a real sleep inside every step of that
          fraction of its compute (moe_core.loop._delay)
and asks `GET /api/v1/compare` for A/A (baseline=A's runs, candidate=A''s, no knob) and A/B
(baseline=A's runs, candidate=B's, knob=slowdown), at the default margin. Per block: each
verdict with its step-time ratio and 95% interval, and the spread of each side's run medians.
At the end, `compare_calibration: aa_false_verdicts=<rate> power_5pct=<rate> power_10pct=<rate>`
(A/A pairs given keep or drop; A/B pairs given drop), the counts, the run-to-run noise seen
(CV of the runs' median step times within a side, and the pooled SD of their logs, what the
t interval estimates), the same rates at other margins (`--margins`, the API's `margin`
parameter on the same runs), the machine's load average and the versions. Everything printed
goes to `--out` (bench/results/compare_calibration.txt) as well; the runs' own output to
build/compare_calibration/runs.log.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = ("A", "A'", "B5", "B10")
SLOWDOWN = {"A": 0.0, "A'": 0.0, "B5": 0.05, "B10": 0.10}
PAIRS: tuple[tuple[str, str, list[str]], ...] = (
    ("aa", "A'", []),
    ("b5", "B5", ["slowdown"]),
    ("b10", "B10", ["slowdown"]),
)
MODEL_ARGS = ["--pattern", "AE", "--d-model", "64", "--seq-len", "64", "--batch-size", "8"]
PROJECT = "calibration"


def _serve(sock: socket.socket, db_url: str) -> None:
    """The child process: the real app on the listening socket the parent bound."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=db_url))
    uvicorn.Server(uvicorn.Config(application, log_level="warning")).run(sockets=[sock])


@contextlib.contextmanager
def served(db_path: Path) -> Any:
    """Serve db_path from a child process on a free loopback port; yields its URL. The port is
    bound here and the socket handed over, so no other process can take it in between."""
    import httpx

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(sock, f"sqlite:///{db_path}"), name="goodput-server", daemon=True
    )
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start (exit code {proc.exitcode})")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.join(10)
        sock.close()


@dataclass
class Block:
    runs: dict[str, list[str]] = field(default_factory=lambda: {s: [] for s in SIDES})
    medians: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # pair -> CompareRead
    load: float = 0.0
    seconds: float = 0.0


class Tee:
    """Print to stdout and to the results file."""

    def __init__(self, fh: TextIO) -> None:
        self.fh = fh

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.fh.write(line + "\n")
        self.fh.flush()


def train_run(
    url: str, work: Path, args: argparse.Namespace, side: str, seed: int, log: TextIO, name: str
) -> str:
    """One run of the bundled loop, in this process, posting to url; returns its run id."""
    from moe_core import train

    run_id = uuid.uuid4().hex
    argv = [
        "--server",
        url,
        "--spool",
        str(work / "spool"),
        "--checkpoint-dir",
        str(work / "checkpoints" / run_id),
        "--run-id",
        run_id,
        "--run-name",
        name,
        "--project",
        PROJECT,
        "--tag",
        "calibration",
        "--steps",
        str(args.steps),
        "--eval-every",
        str(args.eval_every),
        "--seed",
        str(seed),
        "--no-progress",
        *shlex.split(args.model),
    ]
    if SLOWDOWN[side]:
        argv += ["--slowdown", str(SLOWDOWN[side])]
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        rc = train.main(argv)
    if rc != 0:
        raise RuntimeError(f"run {name} failed with exit code {rc}; see {log.name}")
    return run_id


def run_median(client: Any, run_id: str) -> float:
    """The run's median steady step time (its warm-up left out as /compare leaves it out)."""
    from service.calc.compare import steady

    resp = client.get(f"/api/v1/runs/{run_id}/steps", params={"max_points": 100_000})
    resp.raise_for_status()
    points = sorted(resp.json()["points"], key=lambda p: (p["attempt"], p["step"]))
    return statistics.median(steady([p["step_time_s"] for p in points]))


def ask(
    client: Any, base: list[str], cand: list[str], knobs: list[str], margin: float | None = None
) -> dict[str, Any]:
    params: list[tuple[str, str]] = [("baseline", ",".join(base)), ("candidate", ",".join(cand))]
    params += [("knob", k) for k in knobs]
    if margin is not None:
        params.append(("margin", repr(margin)))
    resp = client.get("/api/v1/compare", params=params)
    if resp.status_code != 200:
        raise RuntimeError(f"/compare answered {resp.status_code}: {resp.text[:500]}")
    return dict(resp.json())


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values)


def log_sd(values: list[float]) -> float:
    return statistics.stdev([math.log(v) for v in values])


def power(sd: float, n: int, slowdown: float, margin: float) -> float:
    """About how often n runs a side find `slowdown` (drop: the step-time interval wholly
    above 1 + margin) when run medians spread by `sd` in log: /compare's t interval, with the
    sample SD taken as the true one (normal approximation)."""
    from service.calc.compare import t_quantile

    se = sd * math.sqrt(2 / n)
    z = (math.log1p(slowdown) - math.log1p(margin)) / se - t_quantile(0.975, 2 * n - 2)
    return statistics.NormalDist().cdf(z)


def noise_needs(sd: float, slowdown: float = 0.10, margin: float = 0.02) -> str:
    """What the observed noise implies: runs a side for 80% power, and the noise at which
    3 runs a side would have it."""
    from service.calc.compare import t_quantile

    n = next((n for n in range(2, 1001) if power(sd, n, slowdown, margin) >= 0.8), None)
    z80 = statistics.NormalDist().inv_cdf(0.8)
    sd3 = (math.log1p(slowdown) - math.log1p(margin)) / (
        math.sqrt(2 / 3) * (t_quantile(0.975, 4) + z80)
    )
    return (
        f"at a log SD of {sd:.2%} a run, a {slowdown:.0%} slowdown at margin {margin:g} is "
        f"found about {power(sd, 3, slowdown, margin):.0%} of the time with 3 runs a side; 80% "
        f"needs {n if n else '> 1000'} runs a side, or 3 a side a run-to-run SD of at most "
        f"{sd3:.2%} (t interval arithmetic, normal run medians)"
    )


def short(answer: dict[str, Any]) -> str:
    r = answer["step_time_ratio"]
    if r["value"] is None:
        return f"{answer['verdict']} (no step-time ratio)"
    return f"{answer['verdict']:<12} {r['value']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def is_false(verdict: str) -> bool:
    return verdict in ("keep", "drop")


def rates(answers: list[dict[str, dict[str, Any]]]) -> dict[str, tuple[int, int]]:
    """(hits, pairs) of each pair kind over blocks' answers: A/A keep or drop, A/B drop."""
    out = {}
    for pair, _, _ in PAIRS:
        verdicts = [a[pair]["verdict"] for a in answers]
        hits = sum(is_false(v) for v in verdicts) if pair == "aa" else verdicts.count("drop")
        out[pair] = (hits, len(verdicts))
    return out


def rate_text(counts: dict[str, tuple[int, int]]) -> str:
    f = {k: (h / n if n else float("nan")) for k, (h, n) in counts.items()}
    return (
        f"aa_false_verdicts={f['aa']:.3f} power_5pct={f['b5']:.3f} power_10pct={f['b10']:.3f}"
        f" (A/A keep or drop {counts['aa'][0]}/{counts['aa'][1]}, 5% drop "
        f"{counts['b5'][0]}/{counts['b5'][1]}, 10% drop {counts['b10'][0]}/{counts['b10'][1]})"
    )


def git_state() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    dirty = " + uncommitted edits" if git("status", "--porcelain", "--untracked-files=no") else ""
    return git("rev-parse", "--short", "HEAD").strip() + dirty


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="blocks of A, A', B5, B10 sides")
    p.add_argument("--steps", type=int, default=60, help="steps per run")
    p.add_argument("--runs-per-side", type=int, default=3, help="replicates per side and block")
    p.add_argument("--eval-every", type=int, default=10, help="eval loss every N steps")
    p.add_argument(
        "--db",
        type=Path,
        default=None,
        help="SQLite file (default: a fresh one under build/compare_calibration/)",
    )
    p.add_argument(
        "--margins",
        default="0,0.01,0.02,0.03,0.05",
        help="margins to re-ask /compare at on the same runs (empty: none)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default, one per core)",
    )
    p.add_argument(
        "--model",
        default=" ".join(MODEL_ARGS),
        help="the model's goodput train flags, one string (default: %(default)s)",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="A, B5 and B10 share each round's seed, as `goodput ablate` runs its cells "
        "(A' keeps seeds of its own: the A/A question is about other seeds)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/compare_calibration.txt")
    args = p.parse_args()
    if args.runs_per_side < 2:
        p.error("--runs-per-side needs 2 or more (the A/A question is about replicates)")

    import httpx
    import torch

    import trainer_hooks.environment as hooks_env

    if args.threads:
        torch.set_num_threads(args.threads)
    # Every run's receipt names the commit it ran; this process runs the code it imported at
    # the start, so that is the commit for all of them, even if the shared tree gets a new
    # commit meanwhile (which would make replicates differ in environment.git_sha: a 409).
    sha = hooks_env.git_sha()
    hooks_env.git_sha = lambda cwd=None: sha

    work = ROOT / "build" / "compare_calibration"
    work.mkdir(parents=True, exist_ok=True)
    db = args.db
    if db is None:
        db = work / "calibration.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        [".venv/bin/python", "bench/compare_calibration.py", *map(shlex.quote, sys.argv[1:])]
    )
    blocks: list[Block] = []
    loads = [os.getloadavg()]
    started = time.perf_counter()
    with (
        args.out.open("w") as fh,
        (work / "runs.log").open("w") as log,
        served(db.resolve()) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        say = Tee(fh)
        say(f"# command: {command}")
        say(f"# tree: {git_state()}; service {url} on {db}")
        say(
            f"# machine: {os.cpu_count()} cores, load average at start "
            f"{', '.join(f'{v:.2f}' for v in loads[0])}; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"{platform.platform()}"
        )
        seeds = "A, B5 and B10 share each round's seed" if args.paired else "a seed per run"
        say(
            f"# {args.pairs} blocks x {len(SIDES)} sides x {args.runs_per_side} runs of "
            f"{args.steps} steps ({args.model} --eval-every {args.eval_every}), "
            f"interleaved A, A', B5, B10, each round starting one side further; {seeds}; "
            "verdicts at margin 0.02 (the default)"
        )
        # One run before the blocks, not compared: this process's first run pays for the
        # imports, torch's lazy initialisation and the service's first requests.
        train_run(url, work, args, "A", 10**6, log, "calib-warmup")
        seed = 0
        say(
            "block  load |  A/A: verdict, step-time ratio [95%]     |  5% slowdown"
            "                          |  10% slowdown                         | CV of run "
            "medians A, A', B5, B10"
        )
        for b in range(args.pairs):
            block = Block()
            t0 = time.perf_counter()
            for r in range(args.runs_per_side):
                seed += 1
                shared = seed  # this round's seed for A, B5 and B10 with --paired, no one else's
                # Each round starts one side further along (A A' B5 B10, then A' B5 B10 A, ...):
                # the run after a slowed one was measured slower here, so a fixed order
                # would put that on A's side every time and bias A/A.
                turn = (b * args.runs_per_side + r) % len(SIDES)
                for side in SIDES[turn:] + SIDES[:turn]:
                    seed += 1
                    seed_of_run = shared if args.paired and side != "A'" else seed
                    name = f"calib-{b}-{side.replace(chr(39), 'p')}-{r}"
                    run_id = train_run(url, work, args, side, seed_of_run, log, name)
                    block.runs[side].append(run_id)
            for side in SIDES:
                block.medians[side] = [run_median(client, rid) for rid in block.runs[side]]
            for pair, cand, knobs in PAIRS:
                block.answers[pair] = ask(client, block.runs["A"], block.runs[cand], knobs)
            block.load = os.getloadavg()[0]
            block.seconds = time.perf_counter() - t0
            blocks.append(block)
            cvs = " ".join(f"{cv(block.medians[s]):.1%}" for s in SIDES)
            say(
                f"{b + 1:>3}/{args.pairs} {block.load:4.1f} | "
                + " | ".join(short(block.answers[k]) for k, _, _ in PAIRS)
                + f" | {cvs}  ({block.seconds:.0f} s)"
            )
            aa = block.answers["aa"]
            if is_false(aa["verdict"]):
                say(f"      A/A {aa['verdict']}: {'; '.join(aa['reasons'])}")
        loads.append(os.getloadavg())

        say()
        say(
            f"# {len(blocks) * len(SIDES) * args.runs_per_side} runs in "
            f"{time.perf_counter() - started:.0f} s ({statistics.fmean(b.seconds for b in blocks) / (len(SIDES) * args.runs_per_side):.1f} s a run); "  # noqa: E501
            f"load average at end {', '.join(f'{v:.2f}' for v in loads[-1])}, per block "
            f"{min(b.load for b in blocks):.1f} to {max(b.load for b in blocks):.1f}"
        )
        verdicts = {k: Counter(b.answers[k]["verdict"] for b in blocks) for k, _, _ in PAIRS}
        for k, label in (("aa", "A/A"), ("b5", "5% slowdown"), ("b10", "10% slowdown")):
            ratios = [b.answers[k]["step_time_ratio"]["value"] for b in blocks]
            widths = [
                b.answers[k]["step_time_ratio"]["high"] / b.answers[k]["step_time_ratio"]["low"]
                for b in blocks
            ]
            say(
                f"# {label}: verdicts {dict(verdicts[k])}; step-time ratio median "
                f"{statistics.median(ratios):.3f} (range {min(ratios):.3f} to {max(ratios):.3f}),"
                f" interval high/low median {statistics.median(widths):.3f}"
            )
        side_cvs = [cv(b.medians[s]) for b in blocks for s in SIDES]
        pooled = math.sqrt(
            statistics.fmean(log_sd(b.medians[s]) ** 2 for b in blocks for s in SIDES)
        )
        noise = [b.answers["aa"]["run_noise"] for b in blocks if b.answers["aa"]["run_noise"]]
        all_a = [m for b in blocks for s in ("A", "A'") for m in b.medians[s]]
        say(
            f"# run-to-run noise: CV of run medians within a side median {statistics.median(side_cvs):.2%}"  # noqa: E501
            f" (mean {statistics.fmean(side_cvs):.2%}, max {max(side_cvs):.2%}, "
            f"{len(side_cvs)} sides of {args.runs_per_side}); pooled SD of log run medians "
            f"{pooled:.2%}; /compare's A/A run_noise median {statistics.median(noise):.2%}; "
            f"A and A' run medians {statistics.median(all_a) * 1e3:.2f} ms (CV over all blocks "
            f"{cv(all_a):.2%})"
        )
        say(f"# what the noise implies: {noise_needs(pooled)}")
        margins = [float(m) for m in args.margins.split(",") if m.strip()]
        for m in margins:
            again = [
                {
                    pair: ask(client, b.runs["A"], b.runs[cand], knobs, margin=m)
                    for pair, cand, knobs in PAIRS
                }
                for b in blocks
            ]
            say(f"# at margin {m:g}: {rate_text(rates(again))}")
        say()
        say(f"compare_calibration: {rate_text(rates([b.answers for b in blocks]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
