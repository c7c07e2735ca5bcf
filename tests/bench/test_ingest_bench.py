"""Smoke test of bench/ingest.py: the tiny workload runs end to end against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"^ingest: rows_per_s_ratio=(\S+) history_ratio=(\S+) bytes_ratio=(\S+)$")


def test_quick_run_without_mlflow_prints_every_figure_and_the_last_line() -> None:
    cmd = [sys.executable, "bench/ingest.py", "--quick", "--no-mlflow", "--part", "all"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    last = LAST_LINE.match(lines[-1])
    assert last is not None, lines[-1]
    assert last.groups() == ("n/a", "n/a", "n/a")  # nothing to compare with, no MLflow
    assert any(line.startswith("rows/s: ours=") for line in lines)
    scale = [line for line in lines if line.startswith("scale: ")]
    assert len(scale) >= 5 and all(re.search(r" p50=[\d.]+ p95=[\d.]+ ", s) for s in scale)
    assert re.search(r"wasted_progress': [1-9]", done.stdout), "the failed attempt is accounted"


def test_in_process_split_runs_and_prints_its_last_line() -> None:
    cmd = [sys.executable, "bench/ingest_inprocess.py", "--quick"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    last = r"ingest_inprocess: collector_steps_per_s=\d+ paused_steps_per_s=\d+ ratio=[\d.]+"
    assert re.fullmatch(last, lines[-1]), lines[-1]
    assert sum(line.startswith("round 0 gc ") for line in lines) == 2
