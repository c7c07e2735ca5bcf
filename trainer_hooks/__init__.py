"""Hooks a PyTorch training run attaches to record goodput, badput and receipts.

Importing this package does not import torch; only `Recorder` reads it, lazily.
"""

from trainer_hooks.recorder import Recorder
from trainer_hooks.records import SCHEMA_VERSION
from trainer_hooks.sink import SinkStats, SpoolSink, replay

__all__ = ["Recorder", "SpoolSink", "SinkStats", "replay", "SCHEMA_VERSION"]
