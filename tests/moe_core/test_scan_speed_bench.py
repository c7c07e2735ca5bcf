"""Smoke test of bench/scan_speed.py: it runs at a tiny size, and its copy of the old scans
gives the same blocks' outputs as the new ones (so its ratios compare like with like)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scan_speed_prints_a_ratio_per_block_and_chunk():
    cmd = [
        sys.executable,
        "bench/scan_speed.py",
        "--shapes",
        "2x37x16",
        "--chunks",
        "4,64",
        "--rounds",
        "1",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("scan_speed:")]
    found = [
        re.search(r"block=(\w) .* chunk=(\d+) .* ratio=[\d.]+ .*max_abs_diff=(\S+)", line)
        for line in lines
    ]
    assert all(found), lines
    assert [(m[1], m[2]) for m in found] == [("M", "4"), ("M", "64"), ("R", "4"), ("R", "64")]
    assert all(float(m[3]) < 1e-5 for m in found), lines
