"""End to end over real sockets: `goodput serve` and `goodput train` as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.e2e
GOODPUT = [sys.executable, "-m", "service.cli"]


class Served:
    """`goodput serve` in a child process; stop() and start() play an outage."""

    def __init__(self, db_url: str, tmp: Path) -> None:
        self.db_url = db_url
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*GOODPUT, "serve", "--port", str(self.port), "--db", self.db_url],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_http(self.base + "/healthz")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        self.proc = None

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(self.base + path, params=params, timeout=30)


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[Served]:
    if not db_url.startswith("sqlite"):  # PostgreSQL is migrated by the operator, by hand
        subprocess.run([*GOODPUT, "db", "upgrade", "--db", db_url], check=True)
    server = Served(db_url, tmp_path)
    server.start()
    yield server
    server.stop()


def train(server_url: str, spool: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [*GOODPUT, "train", "--server", server_url, "--spool", str(spool), "--no-progress", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=spool.parent
    )  # checkpoints land in the tmp dir


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def all_steps(server: Served, run_id: str) -> list[int]:
    body = server.get(f"/api/v1/runs/{run_id}/steps", max_points=100_000).json()
    return [p["step"] for p in body["points"]]


def test_train_30_steps_reach_the_service_and_goodput_adds_up(
    served: Served, tmp_path: Path
) -> None:
    out = finish(
        train(
            served.base,
            tmp_path / "spool",
            "--steps",
            "30",
            "--run-name",
            "e2e",
            "--run-id",
            "e2e-30",
        )
    )
    assert "run_id e2e-30" in out
    runs = served.get("/api/v1/runs", name="e2e").json()["runs"]
    assert [r["run_id"] for r in runs] == ["e2e-30"]
    assert runs[0]["status"] == "completed"
    assert all_steps(served, "e2e-30") == list(range(30))
    g = served.get("/api/v1/runs/e2e-30/goodput").json()
    parts = g["goodput_s"] + sum(g["badput_s"].values()) + g["other_s"]
    assert abs(parts - g["total_s"]) < 1e-9
    assert g["total_s"] > 0 and 0 < g["goodput_fraction"] < 1
    assert g["badput_s"]["startup"] > 0 and g["badput_s"]["data_stall"] > 0
    assert g["badput_s"]["eval"] > 0
    run = served.get("/api/v1/runs/e2e-30").json()
    assert run["model_plan"]["pattern"] == "AE"
    assert run["runtime_policy"]["dispatch_requested"] == "auto"
    assert run["environment"]["torch"].startswith("2.")


def test_outage_during_training_loses_nothing_and_stores_each_step_once(
    served: Served, tmp_path: Path
) -> None:
    steps = 400
    proc = train(
        served.base,
        tmp_path / "spool",
        "--steps",
        str(steps),
        "--run-id",
        "outage",
        "--eval-every",
        "0",
        "--flush-timeout",
        "120",
    )
    deadline = time.monotonic() + 120
    while (
        len(
            all_steps(served, "outage")
            if served.get("/api/v1/runs/outage").status_code == 200
            else []
        )
        < 20
    ):
        assert time.monotonic() < deadline and proc.poll() is None, "training ended too soon"
        time.sleep(0.1)
    served.stop()
    time.sleep(1.5)
    assert proc.poll() is None, "training should outlive the outage"
    served.start()
    finish(proc)
    stored = all_steps(served, "outage")
    assert stored == list(range(steps))
    replay = subprocess.run(
        [*GOODPUT, "spool", "replay", str(tmp_path / "spool"), "--server", served.base, "--all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inserted=0" in replay.stdout, replay.stdout
    assert all_steps(served, "outage") == stored


def test_training_without_a_service_finishes_and_replay_delivers_once(
    served: Served, tmp_path: Path
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    out = finish(
        train(
            nobody,
            tmp_path / "spool",
            "--steps",
            "12",
            "--run-id",
            "offline",
            "--flush-timeout",
            "1",
        )
    )
    assert time.monotonic() - t0 < 120
    assert "goodput spool replay" in out
    cmd = [*GOODPUT, "spool", "replay", str(tmp_path / "spool"), "--server", served.base]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    second = subprocess.run([*cmd, "--all"], capture_output=True, text=True, check=True).stdout
    assert "inserted=0" not in first and "duplicates=0" in first
    assert "inserted=0" in second
    assert all_steps(served, "offline") == list(range(12))
