"""Ingest and query speed of our service against an MLflow tracking server, both on SQLite.

    .venv/bin/python bench/ingest.py                       # part 1: the MLflow comparison
    .venv/bin/python bench/ingest.py --part scale          # part 2: one run of 1,000,000 steps
    .venv/bin/python bench/ingest.py --quick --no-mlflow --part all   # the smoke test's run

Part 1 (`--part mlflow`) serves both systems from this machine as real HTTP servers with one
worker each: `python -m service.cli serve` on a fresh SQLite file, and `mlflow server
--workers 1` (pinned MLFLOW_VERSION, installed by this script into `bench/.mlflow-venv` and
reused from there; `--no-serve-artifacts`, its job runner off) on another. This process is the
client of both, through their REST APIs. The workload is one run of `--steps` (20,000) steps
carrying 12 scalars each: loss, step time, tokens/s, goodput fraction, badput seconds of
data_stall, checkpoint_save and eval, peak memory, drop rate, aux loss, z loss and MaxVio.

- MLflow gets the 12 scalars of every step as metrics (a zero when a step had no checkpoint or
  eval; goodput fraction computed by the client) through `runs/log-batch`, 1000 metrics per
  request (its limit).
- Ours gets the typed records the hooks send (trainer_hooks/records.py), up to 10,000 records
  per batch (MAX_BATCH_RECORDS), a step never split between batches: `run`, `attempt_start`
  and a `startup` span, then per step a `step` (start/end give step time, tokens give tokens/s,
  loss, mem_allocated_peak), a blocking `data_stall` span and one `routing` record of one E
  layer (64-expert tokens and dropped histograms, from which the server derives MaxVio and
  drop rate; aux and z loss); every `--checkpoint-every` (100) steps an `eval` span, a
  `checkpoint_save` span and a `checkpoint` commit; finally `attempt_end`. The goodput
  fraction is derived by the server, not sent. Our rows carry more than MLflow's: the two
  histograms behind MaxVio and drop rate, and every span's start and end.

Values are seeded (`--seed`) and shaped like a real run: 0.35 s steps of 32,768 tokens,
a few ms of data stall with rare spikes, a power-law loss, 58 GiB peaks, 64 experts top-8
with a skewed router and capacity factor 1.25. Request bodies are serialized before the clock
starts. Figures:
- rows/s: steps fully stored per second of wall time, first request sent to last response,
  the median of `--ingest-reps` (3) ingests of the workload, each into a fresh server (the
  first one's database is the one queried and measured);
- history: the whole `--steps`-point series of one scalar, `--reps` times after `--warmup`,
  p50 and p95: MLflow `metrics/get-history` of `loss` (pages followed); ours both
  `GET .../steps?max_points=N` (every field of each step) and, where the server has it,
  `GET .../series?metric=loss&max_points=N` (one scalar, as MLflow answers);
- downsampled: 320 points (ours `.../steps` and `.../series` with `max_points=320`, MLflow's
  `ajax-api/.../metrics/get-history-bulk-interval?max_results=320`), likewise;
- bytes per scalar: SQLite file plus WAL after the servers stop and a TRUNCATE checkpoint,
  over steps * 12 (also shown net of each freshly migrated, empty database).
Ratios: rows/s ours over MLflow, latencies MLflow over ours (p50; ours from `/series` when
there is one, else `/steps`), bytes ours over MLflow.

Part 2 (`--part scale`) ingests one run of `--scale-steps` (1,000,000) steps into our service
alone, in two attempts: the first fails partway through (its steps after the last checkpoint
become wasted progress, the gap to the restart infra recovery), the second restores the last
checkpoint and finishes. Routing records come every `--routing-every` (10) steps for 12 E
layers, each summing its 10 steps. Batches are built by a producer thread while the previous
one is in flight. It then times the goodput summary and the downsampled step and routing
queries, up to `--scale-reps` (50) times after a warm-up each, stopping a query early once it
has spent `--query-budget-s` (and run at least 3 times); `/series?metric=loss` is timed too,
and, with no target, the goodput of a one-hour window (`?start=&end=`) in the middle of the run
and the whole run's goodput in rolling one-hour windows (`/goodput/rolling?window_s=3600`).

The last line is always `ingest: rows_per_s_ratio=<x> history_ratio=<y> bytes_ratio=<z>`
(`n/a` for what was not measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer_hooks.records import MAX_BATCH_RECORDS, SCHEMA_VERSION  # noqa: E402

MLFLOW_VERSION = "3.17.2"
MLFLOW_VENV = ROOT / "bench" / ".mlflow-venv"
MLFLOW_BATCH = 1000  # runs/log-batch: at most 1000 metrics per request
SCALARS = (
    "loss",
    "step_time_s",
    "tokens_per_s",
    "goodput_fraction",
    "badput_data_stall_s",
    "badput_checkpoint_save_s",
    "badput_eval_s",
    "mem_peak_bytes",
    "drop_rate",
    "aux_loss",
    "z_loss",
    "max_vio",
)
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
STEP_TIME_S = 0.35
STARTUP_S = 30.0
RESTORE_S = 15.0
RECOVERY_S = 240.0
BLOCK_STEPS = 2000  # values are generated (and seeded) per block of this many steps
DOWNSAMPLED = 320


@dataclass(frozen=True, kw_only=True)
class Workload:
    steps: int
    layers: tuple[int, ...]
    routing_every: int = 1
    checkpoint_every: int = 100
    fail_at: int | None = None
    experts: int = 64
    top_k: int = 8
    tokens_per_step: int = 32_768
    capacity_factor: float = 1.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 2 * self.checkpoint_every:
            raise ValueError(f"steps={self.steps} must be >= 2 * checkpoint_every")
        if self.fail_at is not None and not self.checkpoint_every <= self.fail_at < self.steps:
            raise ValueError(f"fail_at={self.fail_at} must lie in [checkpoint_every, steps)")

    def attempts(self) -> list[tuple[int, np.ndarray]]:
        """(attempt, its step numbers): a failed attempt resumes after its last checkpoint."""
        if self.fail_at is None:
            return [(0, np.arange(self.steps))]
        resume = self.fail_at // self.checkpoint_every * self.checkpoint_every
        return [(0, np.arange(self.fail_at)), (1, np.arange(resume, self.steps))]


class Timeline(NamedTuple):
    """Per step, in order: data stall, the step, eval, checkpoint save (zero-length if none)."""

    steps: np.ndarray
    stall_start: np.ndarray
    step_start: np.ndarray
    step_end: np.ndarray
    eval_end: np.ndarray
    ckpt_end: np.ndarray
    loss: np.ndarray
    mem_peak: np.ndarray

    def part(self, lo: int, hi: int) -> Timeline:
        return Timeline(*(a[lo:hi] for a in self))


def timeline(w: Workload, attempt: int, steps: np.ndarray, t0: float) -> Timeline:
    rng = np.random.default_rng([w.seed, attempt, 1])
    n = len(steps)
    stall = 0.004 * rng.lognormal(0, 0.5, n) + np.where(rng.random(n) < 0.005, 0.3, 0.0)
    slow = np.where(rng.random(n) < 0.01, 1.5, 1.0)
    step_s = STEP_TIME_S * rng.lognormal(0, 0.03, n) * slow
    checkpointed = (steps + 1) % w.checkpoint_every == 0
    eval_s = np.where(checkpointed, 1.6 * rng.lognormal(0, 0.05, n), 0.0)
    ckpt_s = np.where(checkpointed, 2.5 * rng.lognormal(0, 0.05, n), 0.0)
    block = stall + step_s + eval_s + ckpt_s
    begin = t0 + np.concatenate(([0.0], np.cumsum(block)[:-1]))
    step_end = begin + stall + step_s
    loss = 1.8 + 9.0 * (1 + steps / 200) ** -0.35 + rng.normal(0, 0.02, n)
    mem = (58 * 2**30 + rng.normal(0, 64 * 2**20, n)).astype(np.int64)
    eval_end = step_end + eval_s
    return Timeline(steps, begin, begin + stall, step_end, eval_end, eval_end + ckpt_s, loss, mem)


class Routing(NamedTuple):
    """Routing records of a block: R routing steps x L layers x E experts."""

    steps: np.ndarray  # R
    tokens_RLE: np.ndarray
    dropped_RLE: np.ndarray
    aux_RL: np.ndarray
    z_RL: np.ndarray


def routing(w: Workload, attempt: int, block: int, steps: np.ndarray) -> Routing:
    base_LE = np.random.default_rng([w.seed, 3]).normal(0, 0.15, (len(w.layers), w.experts))
    rng = np.random.default_rng([w.seed, attempt, 2, block])
    rsteps = steps[(steps + 1) % w.routing_every == 0]
    logits = base_LE[None] + rng.normal(0, 0.08, (len(rsteps), *base_LE.shape))
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    assignments = w.tokens_per_step * w.routing_every * w.top_k
    tokens = rng.poisson(probs * assignments)
    capacity = int(np.ceil(w.capacity_factor * w.tokens_per_step * w.top_k / w.experts))
    dropped = np.clip(tokens - capacity * w.routing_every, 0, None)
    frac = tokens / np.maximum(tokens.sum(-1, keepdims=True), 1)
    aux = 0.01 * w.experts * (frac * probs).sum(-1)
    z = 0.004 * rng.lognormal(0, 0.05, aux.shape)
    return Routing(rsteps, tokens, dropped, aux, z)


class Block(NamedTuple):
    attempt: int
    t0: float  # the attempt's start
    tl: Timeline
    routing: Routing


class AttemptEdge(NamedTuple):
    """An attempt's start (end is None) or its end."""

    attempt: int
    start: float
    end: float | None
    failed: bool


def workload_blocks(w: Workload) -> Iterator[Block | AttemptEdge]:
    """Attempt starts, blocks of steps and attempt ends, in time order."""
    t0 = T0
    for attempt, steps in w.attempts():
        yield AttemptEdge(attempt, t0, None, False)
        first = t0 + STARTUP_S + (RESTORE_S if attempt else 0.0)
        tl = timeline(w, attempt, steps, first)
        for b, lo in enumerate(range(0, len(steps), BLOCK_STEPS)):
            part = tl.part(lo, lo + BLOCK_STEPS)
            yield Block(attempt, t0, part, routing(w, attempt, b, part.steps))
        failed = attempt == 0 and w.fail_at is not None
        end = float(tl.ckpt_end[-1]) + (0.21 if failed else 1.0)  # crash: a partial step
        yield AttemptEdge(attempt, t0, end, failed)
        t0 = end + RECOVERY_S


# -- our records --


def _span(base: dict[str, Any], category: str, start: float, end: float, step: int | None) -> Any:
    return {**base, "kind": "span", "category": category, "start": start, "end": end, "step": step}


def run_record(w: Workload, run_id: str, name: str) -> dict[str, Any]:
    pattern = "AE" * (max(w.layers) // 2 + 1)
    return {
        "kind": "run",
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "name": name,
        "project": "bench-ingest",
        "created_at": T0,
        "model_plan": {"pattern": pattern, "num_experts": w.experts, "top_k": w.top_k},
        "runtime_policy": {"dispatch": "grouped", "capacity_factor": w.capacity_factor},
        "environment": {"source": "bench/ingest.py", "seed": w.seed},
        "tags": ["bench"],
    }


def edge_records(run_id: str, edge: AttemptEdge) -> list[dict[str, Any]]:
    base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "attempt": edge.attempt}
    if edge.end is not None:
        status = "failed" if edge.failed else "completed"
        cause = "NCCL watchdog timeout (simulated)" if edge.failed else None
        return [{**base, "kind": "attempt_end", "end": edge.end, "status": status, "cause": cause}]
    out = [
        {**base, "kind": "attempt_start", "world_size": 1, "start": edge.start},
        _span(base, "startup", edge.start, edge.start + STARTUP_S, None),
    ]
    if edge.attempt:
        restore = edge.start + STARTUP_S
        out.append(_span(base, "checkpoint_restore", restore, restore + RESTORE_S, None))
    return out


def step_groups(w: Workload, run_id: str, blk: Block) -> Iterator[list[dict[str, Any]]]:
    """Each step's records: step, data stall, then eval, checkpoint and routing if due."""
    base = {"schema_version": SCHEMA_VERSION, "run_id": run_id, "attempt": blk.attempt}
    tl = blk.tl
    cols = [a.tolist() for a in tl]
    rt = blk.routing
    by_step = {int(s): i for i, s in enumerate(rt.steps)}
    num_tokens = w.tokens_per_step * w.routing_every
    for step, stall, start, end, eval_end, ckpt_end, loss, mem in zip(*cols, strict=True):
        group = [
            {
                **base,
                "kind": "step",
                "step": step,
                "start": start,
                "end": end,
                "tokens": w.tokens_per_step,
                "loss": loss,
                "mem_allocated_peak": mem,
            },
            _span(base, "data_stall", stall, start, step),
        ]
        if ckpt_end > eval_end:
            group.append(_span(base, "eval", end, eval_end, step))
            group.append(_span(base, "checkpoint_save", eval_end, ckpt_end, step))
            group.append({**base, "kind": "checkpoint", "step": step, "time": ckpt_end})
        r = by_step.get(step)
        if r is not None:
            for j, layer in enumerate(w.layers):
                group.append(
                    {
                        **base,
                        "kind": "routing",
                        "step": step,
                        "layer": layer,
                        "num_steps": w.routing_every,
                        "num_tokens": num_tokens,
                        "top_k": w.top_k,
                        "tokens_per_expert": rt.tokens_RLE[r, j].tolist(),
                        "dropped_per_expert": rt.dropped_RLE[r, j].tolist(),
                        "aux_loss": float(rt.aux_RL[r, j]),
                        "z_loss": float(rt.z_RL[r, j]),
                    }
                )
        yield group


class Batch(NamedTuple):
    body: bytes
    records: int
    steps: int


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def our_batches(w: Workload, run_id: str, name: str) -> Iterator[Batch]:
    """Batches of at most MAX_BATCH_RECORDS records; a step's records stay together."""
    records: list[dict[str, Any]] = [run_record(w, run_id, name)]
    steps = 0
    for item in workload_blocks(w):
        groups = [edge_records(run_id, item)] if isinstance(item, AttemptEdge) else None
        for group in groups or step_groups(w, run_id, item):  # type: ignore[arg-type]
            if len(records) + len(group) > MAX_BATCH_RECORDS:
                yield Batch(_dumps({"records": records}), len(records), steps)
                records, steps = [], 0
            records.extend(group)
            steps += group[0]["kind"] == "step"
    yield Batch(_dumps({"records": records}), len(records), steps)


# -- MLflow metrics --


def mlflow_metrics(w: Workload) -> Iterator[dict[str, Any]]:
    """The 12 scalars of every step, as MLflow metrics (one attempt, one E layer)."""
    assert w.fail_at is None and w.routing_every == 1 and len(w.layers) == 1
    stepped = 0.0
    for blk in workload_blocks(w):
        if isinstance(blk, AttemptEdge):
            continue
        tl, rt = blk.tl, blk.routing
        step_s = tl.step_end - tl.step_start
        busy = stepped + np.cumsum(step_s)
        stepped = float(busy[-1])
        tokens, dropped = rt.tokens_RLE[:, 0], rt.dropped_RLE[:, 0]
        values = {
            "loss": tl.loss,
            "step_time_s": step_s,
            "tokens_per_s": w.tokens_per_step / step_s,
            "goodput_fraction": busy / (tl.step_end - blk.t0),
            "badput_data_stall_s": tl.step_start - tl.stall_start,
            "badput_checkpoint_save_s": tl.ckpt_end - tl.eval_end,
            "badput_eval_s": tl.eval_end - tl.step_end,
            "mem_peak_bytes": tl.mem_peak.astype(float),
            "drop_rate": dropped.sum(-1) / (w.tokens_per_step * w.top_k),
            "aux_loss": rt.aux_RL[:, 0],
            "z_loss": rt.z_RL[:, 0],
            "max_vio": tokens.max(-1) / tokens.mean(-1) - 1,
        }
        cols = [values[k].tolist() for k in SCALARS]
        stamps = (tl.step_end * 1000).astype(np.int64).tolist()
        for i, step in enumerate(tl.steps.tolist()):
            for key, col in zip(SCALARS, cols, strict=True):
                yield {"key": key, "value": col[i], "timestamp": stamps[i], "step": step}


def mlflow_batches(w: Workload, run_id: str) -> list[Batch]:
    """log-batch bodies of MLFLOW_BATCH metrics; a step is counted in the batch that ends it."""
    metrics = list(mlflow_metrics(w))
    out = []
    for lo in range(0, len(metrics), MLFLOW_BATCH):
        chunk = metrics[lo : lo + MLFLOW_BATCH]
        hi = lo + len(chunk)
        steps = hi // len(SCALARS) - lo // len(SCALARS)
        out.append(Batch(_dumps({"run_id": run_id, "metrics": chunk}), len(chunk), steps))
    return out


# -- servers --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server process in its own session, stopped with its children at exit."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
    ) -> None:
        self.name, self.argv, self.env, self.log, self.cwd = name, argv, env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, health_url: str, timeout_s: float = 180.0) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(health_url, timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not answer {health_url}; its log ends:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _child_env(drop_prefix: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefix)}


def start_ours(stack: ExitStack, db: Path, log: Path) -> tuple[Server, str]:
    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--db", f"sqlite:///{db}"]
    server = Server("goodput", argv, _child_env("GOODPUT_"), log)
    stack.callback(server.stop)
    base = f"http://127.0.0.1:{port}"
    server.start(base + "/healthz")
    return server, base


def ensure_mlflow(venv: Path) -> Path:
    """The pinned mlflow in its own venv, created (from PyPI) unless it is already there."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import mlflow; print(mlflow.__version__)"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
        if found == MLFLOW_VERSION:
            return venv / "bin" / "mlflow"
    print(f"# installing mlflow=={MLFLOW_VERSION} into {venv}", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q", f"mlflow=={MLFLOW_VERSION}"]
    subprocess.run(pip, check=True)
    return venv / "bin" / "mlflow"


def start_mlflow(stack: ExitStack, tmp: Path, log: Path) -> tuple[Server, str]:
    port = free_port()
    argv = [str(ensure_mlflow(MLFLOW_VENV)), "server", "--backend-store-uri"]
    argv += [f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root", str(tmp / "artifacts")]
    argv += ["--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = _child_env("MLFLOW_")
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes beside it
    server = Server("mlflow", argv, env, log)
    stack.callback(server.stop)
    base = f"http://127.0.0.1:{port}"
    server.start(base + "/health")
    return server, base


# -- measuring --


def send_all(
    client: httpx.Client, url: str, batches: Iterable[Batch], check: Callable[[Batch, Any], None]
) -> tuple[float, int, int, int]:
    """Posts the batches in order; (seconds from first send to last response, steps, records,
    requests)."""
    steps = records = requests = 0
    started: float | None = None
    headers = {"Content-Type": "application/json"}
    for batch in batches:
        started = started or time.perf_counter()
        resp = client.post(url, content=batch.body, headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"POST {url}: HTTP {resp.status_code}: {resp.text[:2000]}")
        check(batch, resp.json())
        steps, records, requests = steps + batch.steps, records + batch.records, requests + 1
    return time.perf_counter() - (started or 0.0), steps, records, requests


def prefetched(items: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """Items built by a thread while the caller waits on the network."""
    q: queue.Queue[Batch | BaseException | None] = queue.Queue(depth)

    def produce() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(None)
        except BaseException as exc:
            q.put(exc)

    threading.Thread(target=produce, name="batches", daemon=True).start()
    while (item := q.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _all_inserted(batch: Batch, answer: Any) -> None:
    if answer.get("inserted") != batch.records:
        raise RuntimeError(f"{batch.records} records sent, the service answered {answer}")


class Latency(NamedTuple):
    p50: float
    p95: float
    n: int


def time_get(
    client: httpx.Client,
    fetch: Callable[[httpx.Client], int],
    reps: int,
    warmup: int,
    budget_s: float = float("inf"),
) -> Latency:
    """Milliseconds per call of `fetch` (which returns how many points it got)."""
    for _ in range(warmup):
        fetch(client)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - began < budget_s):
        t = time.perf_counter()
        fetch(client)
        times.append((time.perf_counter() - t) * 1000)
    return Latency(float(np.percentile(times, 50)), float(np.percentile(times, 95)), len(times))


def _get_json(client: httpx.Client, url: str, params: dict[str, Any]) -> Any:
    resp = client.get(url, params=params)
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url} {params}: HTTP {resp.status_code}: {resp.text[:2000]}")
    return resp.json()


def sqlite_bytes(db: Path) -> int:
    """File size with its WAL, after folding the WAL into the file."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def table_bytes(db: Path, top: int = 6) -> str:
    """The largest tables and indexes (SQLite's dbstat), for the log."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC LIMIT ?", (top,)
        ).fetchall()
    except sqlite3.OperationalError:
        return "(dbstat not available)"
    finally:
        conn.close()
    return " ".join(f"{name}={size / 2**20:.1f}MiB" for name, size in rows)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# -- part 1: the MLflow comparison --


class Figures(NamedTuple):
    rows_per_s: float
    history: Latency
    downsampled: Latency
    bytes_per_scalar: float
    net_bytes_per_scalar: float
    series_history: Latency | None = None  # ours: /series?metric=loss, where the server has it
    series_downsampled: Latency | None = None


def _ingest_line(
    who: str, secs: float, steps: int, records: int, requests: int, unit: str = "records"
) -> None:
    print(
        f"{who} ingest: {steps} steps, {records} {unit} in {requests} requests, {secs:.2f} s: "
        f"{steps / secs:.0f} steps/s, {records / secs:.0f} {unit}/s",
        flush=True,
    )


def _bytes_figures(who: str, server: Server, db: Path, empty: int, scalars: int) -> list[float]:
    server.stop()
    size = sqlite_bytes(db)
    print(f"{who} database: {size} bytes ({empty} empty); largest: {table_bytes(db)}")
    return [size / scalars, (size - empty) / scalars]


def seeded_id(seed: int, salt: int) -> str:
    return f"{np.random.default_rng([seed, salt]).integers(0, 2**63):016x}" * 2


def ours_figures(args: argparse.Namespace, stack: ExitStack, tmp: Path) -> Figures:
    w = Workload(steps=args.steps, layers=(1,), checkpoint_every=args.checkpoint_every)
    db = tmp / "goodput.db"
    server, base = start_ours(stack, db, tmp / "goodput.log")
    empty = sqlite_bytes(db)
    run_id = seeded_id(w.seed, 1)
    batches = list(our_batches(w, run_id, "bench-ingest"))
    with httpx.Client(base_url=base, timeout=600, trust_env=False) as client:
        secs, steps, records, reqs = send_all(client, "/api/v1/ingest", batches, _all_inserted)
        _ingest_line("ours", secs, steps, records, reqs)
        runs = f"/api/v1/runs/{run_id}"
        steps_url, series_url = f"{runs}/steps", f"{runs}/series"
        history = time_get(client, _ours_fetch(steps_url, steps, steps), args.reps, args.warmup)
        down = time_get(client, _ours_fetch(steps_url, steps, DOWNSAMPLED), args.reps, args.warmup)
        one: list[Latency | None] = [None, None]
        if client.get(series_url, params={"metric": "loss"}).status_code != 404:
            for i, points in enumerate((steps, DOWNSAMPLED)):
                fetch = _ours_fetch(series_url, steps, points, metric="loss")
                one[i] = time_get(client, fetch, args.reps, args.warmup)
    per, net = _bytes_figures("ours", server, db, empty, steps * len(SCALARS))
    rates = [steps / secs]
    for rep in range(1, args.ingest_reps):  # more timed ingests, each into a fresh server
        where = tmp / f"ours-rep{rep}"
        where.mkdir()
        again, base = start_ours(stack, where / "goodput.db", where / "goodput.log")
        with httpx.Client(base_url=base, timeout=600, trust_env=False) as client:
            secs, steps, records, reqs = send_all(client, "/api/v1/ingest", batches, _all_inserted)
        _ingest_line(f"ours (again, {rep + 1} of {args.ingest_reps})", secs, steps, records, reqs)
        again.stop()
        rates.append(steps / secs)
    return Figures(statistics.median(rates), history, down, per, net, *one)


def _ours_fetch(url: str, steps: int, points: int, **params: Any) -> Callable[[httpx.Client], int]:
    """GET /steps (`points`: every field of each step) or /series (`value`: one scalar)."""

    def fetch(c: httpx.Client) -> int:
        answer = _get_json(c, url, {**params, "max_points": points})
        got = len(answer["value"] if "metric" in params else answer["points"])
        if not (got == steps if points >= steps else 2 <= got <= points):
            raise RuntimeError(f"{url}?max_points={points} answered {got} points")
        return got

    return fetch


def _mlflow_run(client: httpx.Client) -> str:
    body = {"experiment_id": "0", "run_name": "bench-ingest", "start_time": int(T0 * 1000)}
    return str(_post_json(client, "/api/2.0/mlflow/runs/create", body)["run"]["info"]["run_id"])


def _post_json(client: httpx.Client, url: str, body: Any) -> Any:
    resp = client.post(url, json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"POST {url}: HTTP {resp.status_code}: {resp.text[:2000]}")
    return resp.json()


def _mlflow_history(run_id: str, steps: int) -> Callable[[httpx.Client], int]:
    def fetch(c: httpx.Client) -> int:
        params = {"run_id": run_id, "metric_key": "loss", "max_results": 25_000}
        got = 0
        while True:
            page = _get_json(c, "/api/2.0/mlflow/metrics/get-history", params)
            got += len(page.get("metrics", []))
            if not page.get("next_page_token"):
                break
            params["page_token"] = page["next_page_token"]
        if got != steps:
            raise RuntimeError(f"mlflow get-history answered {got} points, not {steps}")
        return got

    return fetch


def _mlflow_interval(run_id: str) -> Callable[[httpx.Client], int]:
    url = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval"
    params = {"run_ids": run_id, "metric_key": "loss", "max_results": DOWNSAMPLED}

    def fetch(c: httpx.Client) -> int:
        got = len(_get_json(c, url, params).get("metrics", []))
        if not 2 <= got <= DOWNSAMPLED:
            raise RuntimeError(f"mlflow get-history-bulk-interval answered {got} points")
        return got

    return fetch


def _empty_answer(batch: Batch, answer: Any) -> None:
    if answer != {}:
        raise RuntimeError(f"mlflow log-batch answered {answer}")


def mlflow_figures(args: argparse.Namespace, stack: ExitStack, tmp: Path) -> Figures:
    w = Workload(steps=args.steps, layers=(1,), checkpoint_every=args.checkpoint_every)
    server, base = start_mlflow(stack, tmp, tmp / "mlflow.log")
    db = tmp / "mlflow.db"
    empty = sqlite_bytes(db)
    with httpx.Client(base_url=base, timeout=600, trust_env=False) as client:
        run_id = _mlflow_run(client)
        batches = mlflow_batches(w, run_id)
        url = "/api/2.0/mlflow/runs/log-batch"
        secs, steps, records, reqs = send_all(client, url, batches, _empty_answer)
        _ingest_line("mlflow", secs, steps, records, reqs, "metrics")
        end = {"run_id": run_id, "status": "FINISHED", "end_time": int(T0 * 1000) + 1}
        _post_json(client, "/api/2.0/mlflow/runs/update", end)
        history = time_get(client, _mlflow_history(run_id, steps), args.reps, args.warmup)
        down = time_get(client, _mlflow_interval(run_id), args.reps, args.warmup)
    per, net = _bytes_figures("mlflow", server, db, empty, steps * len(SCALARS))
    rates = [steps / secs]
    for rep in range(1, args.ingest_reps):  # more timed ingests, each into a fresh server
        where = tmp / f"mlflow-rep{rep}"
        where.mkdir()
        again, base = start_mlflow(stack, where, where / "mlflow.log")
        with httpx.Client(base_url=base, timeout=600, trust_env=False) as client:
            batches = mlflow_batches(w, _mlflow_run(client))
            url = "/api/2.0/mlflow/runs/log-batch"
            secs, steps, records, reqs = send_all(client, url, batches, _empty_answer)
        label = f"mlflow (again, {rep + 1} of {args.ingest_reps})"
        _ingest_line(label, secs, steps, records, reqs, "metrics")
        again.stop()
        rates.append(steps / secs)
    return Figures(statistics.median(rates), history, down, per, net)


def _lat(x: Latency | None) -> str:
    return "n/a" if x is None else f"p50={x.p50:.1f} ms p95={x.p95:.1f} ms"


def _compare_lines(what: str, ours: Latency | None, theirs: Latency | None, target: int) -> None:
    ratio = _ratio(theirs and theirs.p50, ours and ours.p50)
    print(
        f"{what}: ours {_lat(ours)}; mlflow {_lat(theirs)}; ratio={_times(ratio)} "
        f"(mlflow/ours, p50; target >= {target}x)"
    )


def compare(args: argparse.Namespace) -> dict[str, float | None]:
    """Part 1; returns the three ratios of the last line."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ingest-")))
        ours = ours_figures(args, stack, tmp)
        m = None if args.no_mlflow else mlflow_figures(args, stack, tmp)
    rows = _ratio(ours.rows_per_s, m and m.rows_per_s)
    print(
        f"rows/s: ours={ours.rows_per_s:.0f} mlflow={_fmt(m and m.rows_per_s, 0)} "
        f"ratio={_times(rows)} (ours/mlflow, medians of {args.ingest_reps} ingests each; "
        "target >= 20x)"
    )
    n, d = args.steps, DOWNSAMPLED
    mh, md = (m.history, m.downsampled) if m else (None, None)
    _compare_lines(f"history ({n} points), ours /steps (every step field)", ours.history, mh, 10)
    _compare_lines(f"downsampled ({d} points), ours /steps", ours.downsampled, md, 5)
    one = ours.series_history is not None
    if one:
        _compare_lines(
            f"history ({n} points), ours /series?metric=loss", ours.series_history, mh, 10
        )
        _compare_lines(f"downsampled ({d} points), ours /series", ours.series_downsampled, md, 5)
    oh, od = (
        (ours.series_history, ours.series_downsampled) if one else (ours.history, ours.downsampled)
    )
    hist, down = _ratio(mh and mh.p50, oh and oh.p50), _ratio(md and md.p50, od and od.p50)
    size = _ratio(ours.bytes_per_scalar, m and m.bytes_per_scalar)
    net = _ratio(ours.net_bytes_per_scalar, m and m.net_bytes_per_scalar)
    mb, mn = (m.bytes_per_scalar, m.net_bytes_per_scalar) if m else (None, None)
    print(
        f"bytes/scalar: ours={ours.bytes_per_scalar:.1f} mlflow={_fmt(mb, 1)} "
        f"ratio={_fmt(size, 3)} (ours/mlflow; target <= 0.2); net of the empty schema: "
        f"ours={ours.net_bytes_per_scalar:.1f} mlflow={_fmt(mn, 1)} ratio={_fmt(net, 3)}"
    )
    print(f"latency ratios below use ours {'/series?metric=loss' if one else '/steps'}")
    print(f"downsampled_ratio={_fmt(down)} (target >= 5)", flush=True)
    return {"rows_per_s_ratio": rows, "history_ratio": hist, "bytes_ratio": size}


# -- part 2: one large run --


def scale_workload(args: argparse.Namespace) -> Workload:
    every = args.checkpoint_every
    fail_at = int(args.scale_steps * 0.6) // every * every + every * 37 // 100
    return Workload(
        steps=args.scale_steps,
        layers=tuple(range(1, 24, 2)),
        routing_every=args.routing_every,
        checkpoint_every=every,
        fail_at=fail_at,
    )


def _accounting(client: httpx.Client, run_id: str) -> None:
    g = _get_json(client, f"/api/v1/runs/{run_id}/goodput", {})
    bad = {k: round(v, 1) for k, v in g["badput_s"].items() if v}
    print(
        f"scale accounting: total_s={g['total_s']:.1f} goodput_fraction="
        f"{g['goodput_fraction']:.4f} steps={g['steps']} other_s={g['other_s']:.3f} "
        f"disruptions={len(g.get('disruptions', []))} badput_s={bad}",
        flush=True,
    )


def scale_queries(run_id: str, steps: int) -> list[tuple[str, str, dict[str, Any]]]:
    lo = int(steps * 0.45)
    ranged = {"max_points": DOWNSAMPLED, "start_step": lo, "end_step": lo + steps // 10 - 1}
    runs = f"/api/v1/runs/{run_id}"
    return [
        ("goodput", f"{runs}/goodput", {}),
        ("steps?max_points=320", f"{runs}/steps", {"max_points": DOWNSAMPLED}),
        (
            f"steps?max_points=320&start_step={lo}&end_step={ranged['end_step']}",
            f"{runs}/steps",
            ranged,
        ),
        (
            "series?metric=loss&max_points=320",
            f"{runs}/series",
            {"metric": "loss", "max_points": 320},
        ),
        ("routing?layer=3&max_points=320", f"{runs}/routing", {"layer": 3, "max_points": 320}),
        ("routing?max_points=320 (12 layers)", f"{runs}/routing", {"max_points": DOWNSAMPLED}),
        (  # no target: a window's accounting sums the spans that overlap it
            f"goodput?start=&end= (one hour from {WINDOW_AT:.0%} of the run)",
            f"{runs}/goodput",
            {"start": (mid := T0 + steps * STEP_TIME_S * WINDOW_AT), "end": mid + 3600.0},
        ),
        (
            "goodput/rolling?window_s=3600 (every hour of the run)",
            f"{runs}/goodput/rolling",
            {"window_s": 3600.0},
        ),
    ]


WINDOW_AT = 0.45
UNTARGETED = ("goodput?start=", "goodput/rolling")


def scale(args: argparse.Namespace) -> None:
    w = scale_workload(args)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        db = tmp / "goodput.db"
        server, base = start_ours(stack, db, tmp / "goodput.log")
        run_id = seeded_id(w.seed, 2)
        print(
            f"scale workload: {w.steps} steps, E layers {list(w.layers)}, {w.experts} experts, "
            f"routing every {w.routing_every} steps, attempt 0 fails at step {w.fail_at}, "
            f"attempt 1 resumes at {w.attempts()[1][1][0]}",
            flush=True,
        )
        with httpx.Client(base_url=base, timeout=900, trust_env=False) as client:
            batches = prefetched(our_batches(w, run_id, "bench-scale"))
            secs, steps, records, reqs = send_all(client, "/api/v1/ingest", batches, _all_inserted)
            _ingest_line("scale", secs, steps, records, reqs)
            _accounting(client, run_id)
            for label, url, params in scale_queries(run_id, w.steps):

                def fetch(c: httpx.Client, url: str = url, params: Any = params) -> int:
                    return len(str(_get_json(c, url, params)))

                lat = time_get(client, fetch, args.scale_reps, 1, args.query_budget_s)
                target = "no target" if label.startswith(UNTARGETED) else "target p95 < 100 ms"
                print(
                    f"scale: {label} p50={lat.p50:.1f} p95={lat.p95:.1f} ({target}) n={lat.n}",
                    flush=True,
                )
        server.stop()
        size = sqlite_bytes(db)
        print(f"scale database: {size} bytes, {size / steps:.0f} bytes per step record")
        print(f"scale largest: {table_bytes(db)}", flush=True)


# -- main --


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout


def header() -> None:
    """The command, the tree it ran on and the machine, for the log."""
    python = Path(sys.executable)
    shown = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    print("# command: " + " ".join([str(shown), *sys.argv]))
    parts = ("service", "migrations", "trainer_hooks")
    if not _git("rev-parse", "--git-dir"):
        print(f"# {ROOT} is not a git checkout")
        _machine()
        return
    changed = _git("status", "--porcelain", "--", *parts).splitlines()
    diff = hashlib.sha256(_git("diff", "HEAD", "--", *parts).encode()).hexdigest()[:12]
    print(
        f"# git HEAD {_git('rev-parse', '--short', 'HEAD').strip()}; {len(changed)} uncommitted "
        f"files under {', '.join(parts)} (diff sha256 {diff}): {' '.join(changed)}"
    )
    _machine()


def _machine() -> None:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"# machine: {os.cpu_count()} cores, shared with other work (load average {load}); "
        f"Python {platform.python_version()}, {platform.platform()}, SQLite "
        f"{sqlite3.sqlite_version}, mlflow {MLFLOW_VERSION}",
        flush=True,
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("mlflow", "scale", "all"), default="mlflow")
    p.add_argument("--no-mlflow", action="store_true", help="part 1 on our service only")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--steps", type=int, default=20_000)
    p.add_argument("--checkpoint-every", type=int, default=100, help="eval and checkpoint")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument(
        "--ingest-reps", type=int, default=3, help="timed ingests per system, median reported"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--scale-steps", type=int, default=1_000_000)
    p.add_argument("--routing-every", type=int, default=10)
    p.add_argument("--scale-reps", type=int, default=50)
    p.add_argument("--query-budget-s", type=float, default=120.0, help="per scale query")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.scale_steps, args.reps, args.warmup, args.scale_reps = 500, 5000, 5, 1, 5
        args.ingest_reps = 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    header()
    ratios: dict[str, float | None] = dict.fromkeys(
        ("rows_per_s_ratio", "history_ratio", "bytes_ratio")
    )
    if args.part in ("mlflow", "all"):
        ratios = compare(args)
    if args.part in ("scale", "all"):
        scale(args)
    digits = {"bytes_ratio": 3}
    print("ingest: " + " ".join(f"{k}={_fmt(v, digits.get(k, 2))}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
