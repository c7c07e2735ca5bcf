"""Smoke test of bench/dashboards.py: a 1,000-step scale run and its compare page opened in
Chromium (the other pages have browser tests of their own), its row and the last line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^dashboards: slowest_page_s=(\d+\.\d{3}|n/a) pages=(\d+)$")


def bench(*args: str) -> list[str]:
    cmd = [sys.executable, "bench/dashboards.py", "--steps", "1000", "--reps", "1", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def table(lines: list[str]) -> list[list[str]]:
    """The rows' columns: page, status, data_B, sent_B, server_ms, cold_s, warm_s, charts,
    errors, then the note."""
    header = next(i for i, line in enumerate(lines) if line.startswith("page "))
    return [line.split() for line in lines[header + 1 : -1]]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is absent")
def test_tiny_scale_run_times_the_compare_page_and_prints_the_last_line(tmp_path: Path) -> None:
    db = str(tmp_path / "dash.db")
    lines = bench("--db", db, "--only", "/compare")
    last = LAST_LINE.match(lines[-1])
    assert last is not None, lines[-1]
    rows = table(lines)
    assert len(rows) == 1, rows
    timed = [r for r in rows if r[1] == "200" and r[6] != "n/a"]
    assert int(last.group(2)) == len(timed)
    assert last.group(1) == max((r[6] for r in timed), key=float)
    compare = next(r for r in rows if r[0].startswith("/compare?"))
    # the compare page (built with this bench) is drawn: 5 charts, no console error
    assert compare[1] == "200" and compare[7:9] == ["5", "0"], compare
    assert int(compare[2]) > 10_000 and float(compare[4]) > 0
