"""Smoke tests of the two benches behind a structural change: bench/read_paths.py (the read
paths of one tree, timed in process) and bench/openapi_diff.py (the API document of two
commits)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_read_paths_times_every_query() -> None:
    cmd = [sys.executable, "bench/read_paths.py", "--steps", "400", "--reps", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("# read_paths: git HEAD ")
    assert len(lines) == 6 and all(re.search(r": [\d.]+ ms$", line) for line in lines[1:])


def test_openapi_diff_of_a_commit_with_itself_is_empty() -> None:
    cmd = [sys.executable, "bench/openapi_diff.py", "--before", "HEAD"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.findall(r"^# (.+): (\w+) \(\d+ lines\)$", done.stdout, re.M) == [
        ("no tokens", "identical"),
        ("read and write tokens", "identical"),
    ]
