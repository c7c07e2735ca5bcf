"""The command line as an operator meets it: a configuration mistake is one line on stderr
that says what to fix, with exit status 2 (1 for a runtime failure), and `goodput serve
--workers N` serves PostgreSQL from N processes (and refuses SQLite, in one line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.conftest import free_port, wait_http

pytestmark = pytest.mark.e2e
GOODPUT = [sys.executable, "-m", "service.cli"]


def run_all(cases: dict[str, tuple[list[str], dict[str, str]]]) -> dict[str, Any]:
    """Run the commands side by side (each start imports the service: about a second)."""
    procs = {
        name: subprocess.Popen(
            [*GOODPUT, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for name, (args, env) in cases.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        out[name] = (proc.returncode, stdout, stderr)
    return out


def test_configuration_mistakes_are_one_line_and_exit_2_or_1(tmp_path: Path) -> None:
    dead = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x"
    sqlite = f"sqlite:///{tmp_path / 'goodput.db'}"
    port = str(free_port())
    cases = {
        "unknown dialect": (["serve", "--port", port, "--db", "nosuch://x"], {}),
        "sqlite folder missing": (
            ["serve", "--port", port, "--db", f"sqlite:///{tmp_path / 'no' / 'x.db'}"],
            {},
        ),
        "unreachable postgres": (["serve", "--port", port, "--db", dead], {}),
        "upgrade unreachable": (["db", "upgrade", "--db", dead], {}),
        "upgrade unknown revision": (["db", "upgrade", "--db", sqlite, "--revision", "zz"], {}),
        "bad settings": (
            ["serve", "--port", port, "--db", sqlite],
            {
                "GOODPUT_WRITE_TOKEN": "a b",
                "GOODPUT_CORS_ORIGINS": "https://ok.example,http://bad.example/",
                "GOODPUT_MAX_BODY_BYTES": "lots",
            },
        ),
        "workers on sqlite": (["serve", "--port", port, "--workers", "2", "--db", sqlite], {}),
        "upgrade bad pool setting": (
            ["db", "upgrade", "--db", sqlite],
            {"GOODPUT_DB_POOL_SIZE": "many"},
        ),
    }
    expected = {
        "unknown dialect": (2, "--db is not a database URL"),
        "sqlite folder missing": (2, "cannot open the SQLite database at sqlite:///"),
        "unreachable postgres": (1, "cannot reach the database at postgresql://postgres:***@"),
        "upgrade unreachable": (1, "connection refused; start it or pass --db"),
        "upgrade unknown revision": (2, "'zz'"),
        "bad settings": (2, "GOODPUT_WRITE_TOKEN: a token must be"),
        "workers on sqlite": (2, "--workers 2 needs PostgreSQL"),
        "upgrade bad pool setting": (2, "GOODPUT_DB_POOL_SIZE: Input should be a valid integer"),
    }
    results = run_all(cases)
    for var in ("GOODPUT_WRITE_TOKEN", "GOODPUT_CORS_ORIGINS", "GOODPUT_MAX_BODY_BYTES"):
        assert var in results["bad settings"][2]
    for name, (code, stdout, stderr) in results.items():
        want_code, want_text = expected[name]
        lines = stderr.splitlines()
        assert code == want_code, (name, code, stderr)
        assert len(lines) == 1 and lines[0].startswith("goodput: "), (name, stderr)
        assert want_text in lines[0], (name, stderr)
        assert "secret" not in stderr + stdout and "Traceback" not in stderr, name


def test_serve_with_two_workers_on_postgresql(migrated_url: str, tmp_path: Path) -> None:
    if migrated_url.startswith("sqlite"):
        pytest.skip("--workers is PostgreSQL's (SQLite's refusal is tested above)")
    db_url = migrated_url
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*GOODPUT, "serve", "--port", str(port), "--workers", "2", "--db", db_url],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_http(base + "/healthz")
        assert httpx.head(base + "/healthz").status_code == 200
        batch = {"records": f.full_run("two-workers", steps=7)}
        resp = httpx.post(base + "/api/v1/ingest", json=batch, timeout=30)
        assert resp.status_code == 200 and resp.json()["inserted"] == len(batch["records"])
        # Reads, on whichever worker answers, see what was committed.
        for _ in range(6):
            run = httpx.get(base + "/api/v1/runs/two-workers", timeout=30).json()
            assert run["run_id"] == "two-workers"
        steps = httpx.get(base + "/api/v1/runs/two-workers/steps", timeout=30).json()
        assert [p["step"] for p in steps["points"]] == list(range(7))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert "2 workers" in log.read_text()
