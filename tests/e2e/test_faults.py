"""Fault tests (issue 12, "Proof"): what broke on the way never shows in what is stored.

- The service SIGKILLed while a 2-process torchrun training (gloo, CPU) posts to it, then
  restarted on the same port and SQLite file: after the training ends and its spools are
  replayed, every step, span, routing row and observation each rank wrote to its spool is
  stored exactly once (content compared field by field), the rollups agree (a resend of
  everything changes nothing), and the run and both attempt ranks are `completed`.
- PostgreSQL (a throwaway cluster this test starts itself) stopped and started while a sink
  posts: the service answers 503 with Retry-After while the database is down, never a 500,
  recovers by itself, and once the sink has drained every record is stored exactly once; a
  restart while the service is idle is not even seen by the next request (pool_pre_ping).

The spool on a tiny filesystem is tests/trainer_hooks/test_spool_full_disk.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.conftest import free_port
from trainer_hooks.sink import SpoolSink, to_payload
from trainer_hooks.spool import Spool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
GOODPUT = [sys.executable, "-m", "service.cli"]


# -- processes --


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> None:
    """Poll `cond` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (torchrun starts its workers in sessions of their own, so
    killing its process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc: subprocess.Popen[Any]) -> None:
    """Stop a child started in a session of its own, with its process group and whatever
    runs under it: SIGTERM, then SIGKILL for what is left after 10 s. Never raises."""
    if proc.poll() is not None:
        return
    pids = [proc.pid, *descendants(proc.pid)]  # found first: they outlive their parent
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


class Service:
    """`goodput serve` as a child process in a session of its own, on a fixed loopback port:
    killed and started again, it comes back where clients left it."""

    def __init__(self, db_url: str, log: Path, port: int | None = None) -> None:
        self.db_url = db_url
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        cmd = [*GOODPUT, "serve", "--port", str(self.port), "--db", self.db_url]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"goodput serve exited {proc.returncode}: {self.log.read_text()}")
            try:
                return httpx.get(self.base + "/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("goodput serve to answer /healthz", up, timeout_s)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to open connections or transactions."""
        assert self.proc is not None and self.proc.poll() is None, "the service already died"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc)
            self.proc = None

    def get(self, path: str, **params: Any) -> httpx.Response:
        resp = httpx.get(self.base + path, params=params, timeout=30)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:2000])
        return resp


# -- what was written locally, and what is stored --

# Per kind: its natural key beyond (attempt, rank), and the content compared: every column
# of the CSV export that the wire record has.
COMPARED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "steps": (
        ("step",),
        (
            "start",
            "end",
            "tokens",
            "loss",
            "device_time_s",
            "hook_overhead_s",
            "flops",
            "mem_allocated_peak",
            "mem_reserved_peak",
            "alloc_retries",
        ),
    ),
    "spans": (("category", "start"), ("end", "overlapped", "step")),
    "routing": (
        ("step", "layer"),
        (
            "num_steps",
            "num_tokens",
            "top_k",
            "null_slot",
            "capacity",
            "shared_only_tokens",
            "aux_loss",
            "z_loss",
            "tokens_per_expert",
            "dropped_per_expert",
        ),
    ),
    "observations": (("seam", "observed"), ("requested", "reason", "time", "step")),
}
KIND_OF = {"steps": "step", "spans": "span", "routing": "routing", "observations": "observation"}
Row = dict[str, Any]


def spooled(spool_dir: Path) -> list[Row]:
    """Every record of the spools under `spool_dir`, as written (acknowledged or not). A
    finished sink keeps its newest segment, and these runs fit one segment each."""
    out: list[Row] = []
    for seg_dir in sorted({p.parent for p in spool_dir.rglob("*.seg")}):
        for seg in Spool(seg_dir).segments():
            out += [json.loads(p) for p in seg.read(0, 10_000_000).payloads]
    return out


def _cell(column: str, text: str) -> Any:
    """A CSV cell as the wire record held it."""
    if text == "":
        return None
    if column in ("category", "seam", "observed", "requested", "reason"):
        return text
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("["):
        return json.loads(text)
    return float(text)


def stored(service_base: str, run_id: str, what: str) -> list[Row]:
    resp = httpx.get(
        f"{service_base}/api/v1/runs/{run_id}/export.csv", params={"what": what}, timeout=60
    )
    assert resp.status_code == 200, resp.text[:2000]
    return [
        {k: _cell(k, v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(resp.text))
    ]


def _num(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def keyed(rows: list[Row], what: str, wire: bool) -> Counter[tuple[Any, ...]]:
    """(attempt, rank, key..., content...) of each row, counted: a row stored twice, or
    once with other content, shows as a difference."""
    key, content = COMPARED[what]
    columns = ("attempt", "rank", *key, *content)
    if wire:
        rows = [r for r in rows if r["kind"] == KIND_OF[what]]
    return Counter(tuple(_num(r.get(c)) for c in columns) for r in rows)


def assert_same(
    local: Counter[tuple[Any, ...]], remote: Counter[tuple[Any, ...]], what: str
) -> None:
    """Each record written locally is stored, once, with the same content; nothing else."""
    assert sum(local.values()) > 0, f"no {what} written locally: nothing was compared"
    twice = [k for k, n in local.items() if n > 1]
    assert not twice, f"{what}: written twice locally: {twice[:5]}"
    missing, extra = local - remote, remote - local
    assert not missing and not extra, (
        f"{what}: {sum(missing.values())} written but not stored (first: "
        f"{sorted(missing, key=repr)[:3]}), {sum(extra.values())} stored but not written, "
        f"or stored twice (first: {sorted(extra, key=repr)[:3]})"
    )


# -- 1. the service SIGKILLed during a 2-rank torchrun training --

STEPS = 500  # about 25 ms each here: the kill and the restart land mid-run
TRAIN_FLAGS = [
    "--no-progress",
    "--d-model",
    "32",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--eval-every",
    "0",
    "--dispatch",
    "loop",
    "--flush-timeout",
    "60",
]


def local_steps(spool_dir: Path) -> dict[int, int]:
    """Steps each rank has written to its spool so far (read while it writes: a torn tail
    just ends the read)."""
    counts: dict[int, int] = {}
    with contextlib.suppress(FileNotFoundError):
        for rec in spooled(spool_dir):
            if rec["kind"] == "step":
                counts[rec["rank"]] = counts.get(rec["rank"], 0) + 1
    return counts


def stored_steps(service: Service, run_id: str) -> int:
    try:
        resp = httpx.get(f"{service.base}/api/v1/runs/{run_id}", timeout=2)
    except httpx.HTTPError:
        return 0
    return int(resp.json()["num_steps"]) if resp.status_code == 200 else 0


def replay(spool_dir: Path, base: str, *extra: str) -> dict[str, int]:
    done = subprocess.run(
        [*GOODPUT, "spool", "replay", str(spool_dir), "--server", base, *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", done.stdout)}


def test_service_sigkilled_mid_training_stores_every_record_once(tmp_path: Path) -> None:
    run_id = f"faults-{uuid.uuid4().hex[:12]}"
    spool_dir = tmp_path / "spool"
    service = Service(f"sqlite:///{tmp_path / 'goodput.db'}", tmp_path / "serve.log")
    train_log = tmp_path / "train.log"
    trainer: subprocess.Popen[bytes] | None = None
    try:
        service.start()
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "moe_core.train",
            *TRAIN_FLAGS,
            "--steps",
            str(STEPS),
            "--run-id",
            run_id,
            # Named here: without it each rank names the run after its own clock's second,
            # and ranks that straddle a second send conflicting run records (a 409 that
            # rejects the later rank's first batch; see the issue-12 report).
            "--run-name",
            "faults",
            "--spool",
            str(spool_dir),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--server",
            service.base,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(train_log, "wb") as log:
            trainer = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=env,
                start_new_session=True,
            )
        running = trainer

        def training(cond: Callable[[], bool]) -> Callable[[], bool]:
            """`cond`, failing at once when the training has ended."""

            def check() -> bool:
                if running.poll() is not None:
                    pytest.fail(f"training ended too soon: {train_log.read_text()[-3000:]}")
                return cond()

            return check

        # Both ranks are posting: the service holds some steps of the run.
        posting = training(lambda: stored_steps(service, run_id) >= 20)
        wait_for("steps to reach the service", posting, 120)
        at_kill = local_steps(spool_dir)
        service.kill()
        # The training goes on without the service, spooling, for a while.
        went_on = training(
            lambda: all(local_steps(spool_dir).get(r, 0) >= at_kill.get(r, 0) + 30 for r in (0, 1))
        )
        wait_for("the training to go on while the service is dead", went_on, 60)
        service.start()
        assert trainer.poll() is None, "the service came back after the training ended"
        trainer.wait(180)
        out = train_log.read_text()
        assert trainer.returncode == 0, out[-3000:]

        # Each rank's sink delivered everything after the restart, and dropped nothing.
        tallies = re.findall(
            r"records: spooled (\d+), sent (\d+), dropped (\d+), rejected (\d+)", out
        )
        assert len(tallies) == 2, out[-3000:]
        for spooled_n, sent_n, dropped_n, rejected_n in tallies:
            assert dropped_n == rejected_n == "0", out[-3000:]
            assert spooled_n == sent_n, out[-3000:]
        local = spooled(spool_dir)
        assert Counter(r["rank"] for r in local if r["kind"] == "step") == {0: STEPS, 1: STEPS}
        assert sum(int(t[0]) for t in tallies) == len(local)  # the spools hold every record

        # Replay whatever is left (nothing: the sinks drained at close).
        first = replay(spool_dir, service.base)
        assert first["inserted"] == 0, first

        for what in COMPARED:
            assert_same(
                keyed(local, what, wire=True),
                keyed(stored(service.base, run_id, what), what, wire=False),
                what,
            )

        # The rollups agree with the rows, and a resend of everything changes nothing.
        def figures() -> list[Any]:
            run = service.get(f"/api/v1/runs/{run_id}").json()
            per_rank = [
                service.get(f"/api/v1/runs/{run_id}/steps", rank=r, max_points=100_000).json()
                for r in (0, 1)
            ]
            routing = [service.get(f"/api/v1/runs/{run_id}/routing", rank=r).json() for r in (0, 1)]
            goodput = service.get(f"/api/v1/runs/{run_id}/goodput").json()
            return [run, per_rank, routing, goodput]

        before = figures()
        run, per_rank, routing, _ = before
        assert run["num_steps"] == 2 * STEPS
        for r, series in enumerate(per_rank):
            assert [p["step"] for p in series["points"]] == list(range(STEPS)), r
            assert series["total"] == STEPS
        for r, layers in enumerate(routing):
            wrote = Counter(
                rec["layer"] for rec in local if rec["kind"] == "routing" and rec["rank"] == r
            )
            assert {ly["layer"]: ly["total"] for ly in layers["layers"]} == dict(wrote)
        assert run["status"] == "completed"
        assert sorted((a["attempt"], a["rank"], a["status"]) for a in run["attempts"]) == [
            (0, 0, "completed"),
            (0, 1, "completed"),
        ]
        assert all(a["counters"]["records_dropped"] == 0 for a in run["attempts"])

        again = replay(spool_dir, service.base, "--all")
        assert again["inserted"] == 0 and again["duplicates"] == len(local), again
        after = figures()
        assert after == before
    finally:
        if trainer is not None:
            stop_tree(trainer)
        service.close()


# -- 2. PostgreSQL restarted during ingest --


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster in a temporary folder, run by `owner` (root may not)."""

    bin: Path
    root: Path
    port: int
    as_owner: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/goodput"

    def run(self, tool: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_owner, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", *args)

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        done = self.ctl("-l", str(self.root / "postgres.log"), "-o", opts, "start")
        assert done.returncode == 0, done.stdout + done.stderr + self.log()

    def stop(self, mode: str = "fast") -> None:
        done = self.ctl("-m", mode, "stop")
        assert done.returncode == 0, done.stdout + done.stderr + self.log()

    def log(self) -> str:
        try:
            return (self.root / "postgres.log").read_text()[-3000:]
        except OSError:
            return ""


def _postgres_bin() -> Path | None:
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def pg_cluster() -> Iterator[Cluster]:
    """A cluster of our own, on a free port, stopped and deleted at the end (the shared
    cluster of the other tests is never touched)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    as_owner: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and there is no runuser to run PostgreSQL as postgres")
        as_owner = [runuser, "-u", "postgres", "--"]
    # Not under tmp_path: its parents are private to root, and the cluster runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="goodput-pg-"))
    cluster = Cluster(bin_dir, root, free_port(), as_owner)
    started = False
    try:
        if owner is not None:
            os.chown(root, owner.pw_uid, owner.pw_gid)
        init = cluster.run(
            "initdb",
            "-D",
            str(cluster.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        if init.returncode != 0:
            pytest.skip(f"initdb cannot make a cluster here: {init.stderr.strip()[-500:]}")
        cluster.start()
        started = True
        made = cluster.run(
            "createdb", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "goodput"
        )
        assert made.returncode == 0, made.stderr
        yield cluster
    finally:
        if started:
            cluster.ctl("-m", "immediate", "stop")
        pid_file = cluster.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


class Prober:
    """Requests of our own beside the sink's while the database is down: a small ingest
    batch and a read. Keeps every status and whether each 503 said when to retry."""

    def __init__(self, base: str, run_id: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=30)
        self.run_id = run_id
        self.statuses: list[int] = []
        self.retry_after_missing = 0
        self.body = {"records": [f.run(f"probe-{run_id}", "probe")]}

    def close(self) -> None:
        self.client.close()

    def probe(self) -> tuple[int, int]:
        answers = (
            self.client.post("/api/v1/ingest", json=self.body),
            self.client.get(f"/api/v1/runs/{self.run_id}"),
        )
        for resp in answers:
            self.statuses.append(resp.status_code)
            if resp.status_code == 503 and "retry-after" not in resp.headers:
                self.retry_after_missing += 1
        return answers[0].status_code, answers[1].status_code


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_during_ingest_is_503_then_every_record_once(
    pg_cluster: Cluster, tmp_path: Path, mode: str
) -> None:
    """`fast`: PostgreSQL ends every session (transactions in flight fail) and stops;
    `immediate`: it dies as in a crash and recovers from its log when started."""
    upgraded = subprocess.run(
        [*GOODPUT, "db", "upgrade", "--db", pg_cluster.url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    service = Service(pg_cluster.url, tmp_path / "serve.log")
    run_id = f"pg-{uuid.uuid4().hex[:12]}"
    t0 = time.time() - 3600.0
    emitted: list[Row] = []
    sink_statuses: list[int] = []
    restarted, quit_producing = threading.Event(), threading.Event()
    producer_error: list[BaseException] = []
    sink: SpoolSink | None = None
    probers: list[Prober] = []
    try:
        service.start()
        sink = SpoolSink(
            tmp_path / "spool",
            service.base,
            flush_interval_s=0.02,
            batch_records=60,
            max_backoff_s=0.5,
        )
        sender = sink._sender
        assert sender is not None
        sender.client.event_hooks["response"] = [lambda r: sink_statuses.append(r.status_code)]

        def emit(rec: Row) -> None:
            emitted.append(json.loads(to_payload(rec["kind"], rec)))  # as the wire has it
            assert sink is not None
            sink.emit(rec["kind"], {k: v for k, v in rec.items() if k != "kind"})

        def produce() -> None:
            """A trainer's stream: a step, its data stall and its routing every 10 ms, until
            100 steps after the database is back."""
            try:
                n, after = 0, None
                while (after is None or n < after + 100) and not quit_producing.is_set():
                    if after is None and restarted.is_set():
                        after = n
                    s = t0 + 2.0 * n
                    emit(f.step(n, run_id, start=s, dur=1.0))
                    emit(f.span("data_stall", s + 1.2, s + 1.7, run_id, step=n))
                    emit(f.routing(n, 0, run_id))
                    n += 1
                    time.sleep(0.01)
            except BaseException as exc:  # seen by the test's thread
                producer_error.append(exc)

        emit(f.run(run_id, "pg-restart"))
        emit(f.attempt_start(run_id, start=t0 - 5.0))
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        wait_for("steps to reach the service", lambda: stored_steps(service, run_id) >= 50, 60)

        pg_cluster.stop(mode)  # mid-ingest: the sink is posting every 20 ms
        prober = Prober(service.base, run_id)
        probers.append(prober)
        deadline = time.monotonic() + 30
        # Down until both routes answered 503 twice and the sink met it twice (it waits the
        # Retry-After second in between).
        while prober.statuses.count(503) < 4 or sink_statuses.count(503) < 2:
            assert time.monotonic() < deadline, (prober.statuses, Counter(sink_statuses))
            assert set(prober.probe()) <= {200, 503}, prober.statuses
            time.sleep(0.05)
        pg_cluster.start()
        restarted.set()
        producer.join(60)
        assert not producer.is_alive() and not producer_error, producer_error
        steps = sum(1 for r in emitted if r["kind"] == "step")
        emit(f.attempt_end(run_id, end=t0 + 2.0 * steps + 10.0))
        stats = sink.close(timeout_s=60)
        sink = None
        assert stats.records_dropped == stats.records_rejected == stats.errors == 0, stats
        assert stats.pending_bytes == 0, stats  # drained: nothing left for a replay

        # 503 while down, with Retry-After; a 500 never, to the probes or the sink.
        assert 503 in prober.statuses and prober.retry_after_missing == 0, prober.statuses
        assert set(prober.statuses) <= {200, 503}, prober.statuses
        assert 503 in sink_statuses, "the sink never met the outage"
        assert set(sink_statuses) <= {200, 503}, Counter(sink_statuses)

        for what in ("steps", "spans", "routing"):
            wrote = keyed(emitted, what, wire=True)
            assert_same(wrote, keyed(stored(service.base, run_id, what), what, wire=False), what)
        run = service.get(f"/api/v1/runs/{run_id}").json()
        assert run["num_steps"] == steps  # the rollups count each step once
        assert run["status"] == "completed", run

        # A restart while the service is idle: its pooled connections are all dead, and the
        # next requests never see it (pool_pre_ping replaces them).
        pg_cluster.stop(mode)
        pg_cluster.start()
        again = Prober(service.base, run_id)
        probers.append(again)
        for _ in range(3):
            assert again.probe() == (200, 200), again.statuses
    finally:
        quit_producing.set()
        for p in probers:
            p.close()
        if sink is not None:
            sink.close(timeout_s=1)
        service.close()
