"""Hooks a PyTorch training run attaches to record goodput, badput, routing and receipts.

Importing this package imports neither torch nor the recorder: `trainer_hooks.records` (the
wire contract) is what the service needs, and it stays light. The names below load on use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from trainer_hooks.records import SCHEMA_VERSION

# When the hooks were first imported: a Recorder's attempt starts at the process's start, or,
# where that cannot be read, at this time (trainer_hooks.recorder.default_attempt_start).
IMPORTED_AT = time.time()

if TYPE_CHECKING:
    from trainer_hooks.recorder import Recorder
    from trainer_hooks.sink import SinkStats, SpoolSink, replay

__all__ = ["Recorder", "SpoolSink", "SinkStats", "replay", "SCHEMA_VERSION"]
_LAZY = {
    "Recorder": "trainer_hooks.recorder",
    "SpoolSink": "trainer_hooks.sink",
    "SinkStats": "trainer_hooks.sink",
    "replay": "trainer_hooks.sink",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer_hooks' has no attribute {name!r}")
