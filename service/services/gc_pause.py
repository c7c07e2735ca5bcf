"""Pausing the cyclic garbage collector while a batch is ingested.

An ingest batch of 10,000 records holds tens of thousands of container objects until it is
stored (validating one makes about 30,000), nearly all freed by reference counting once it
is. With the collector running, it passes over them again and again while they are built
(with little outside the frozen start-up heap, often as full collections). Pausing it for
the batch skips that work; queries, which allocate little, keep the default thresholds and
so short collections (bench/ingest_inprocess.py compares the two; BENCHMARKS.md).

Callers let the batch go before the pause ends (it lives in a function called inside the
pause): the collection that runs once the collector is back then finds little, where one
over the live batch would do the work the pause skipped.

The pause is counted across threads: the collector resumes when the last concurrent batch
is done, and is left alone if something else had disabled it.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_paused = 0  # batches inside `paused()` now, when this module disabled the collector


@contextmanager
def paused() -> Iterator[None]:
    global _paused
    with _lock:
        mine = _paused > 0 or gc.isenabled()
        if mine:
            _paused += 1
            gc.disable()
    try:
        yield
    finally:
        if mine:
            with _lock:
                _paused -= 1
                if _paused == 0:
                    gc.enable()
