"""The environment part of a receipt: what software and hardware the run really had."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from typing import Any


def git_sha(cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=2
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def collect_environment() -> dict[str, Any]:
    """Versions, device and host. Called once per run, never on the step path."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git_sha": git_sha(),
        "argv0": sys.argv[0] if sys.argv else None,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
        else:
            env["device"] = "cpu"
        from trainer_hooks.flops import peak_flops

        # The MFU denominator: dense bf16 peak of this device, or None (never a guess).
        env["peak_flops_per_s"] = peak_flops(env["device"] if env["device"] != "cpu" else None)
    except Exception:  # torch is optional for non-torch loops
        env["torch"] = None
    return env
