"""Smoke test of bench/load.py: 4 ranks post for 5 s to a real server on SQLite, and the
line it prints says that every acknowledged record was stored once, with no error."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
    r"^load: setup=sqlite ranks=4 runs=(\d+) errors=(\d+) lost=(\d+) dup=(\d+) "
    r"rows_per_s=(\d+) p99_ms=(\d+) n503=(\d+) .* batches=(\d+)/(\d+) stored_rows=(\d+) "
)


def test_four_ranks_for_five_seconds_lose_nothing() -> None:
    cmd = [sys.executable, "bench/load.py", "--setups", "sqlite", "--ranks", "4"]
    cmd += ["--runs", "2", "--duration", "5"]
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("load: ")]
    assert len(lines) == 1, done.stdout
    m = LINE.match(lines[0])
    assert m is not None, lines[0]
    runs, errors, lost, dup, rows_per_s, _p99, _n503, sent, _scheduled, stored = map(
        int, m.groups()
    )
    assert (runs, errors, lost, dup) == (2, 0, 0, 0), lines[0]
    assert sent >= 20 and rows_per_s > 0, lines[0]  # 4 ranks x 10 batches are due in 5 s
    # Every batch's 20 records, plus per rank its attempt and startup span, per run its run.
    assert stored >= sent * 20 + 4 * 2 + 2, lines[0]
    assert time.monotonic() - began < 30
