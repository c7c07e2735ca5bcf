"""Sinks: where the recorder's records go.

`SpoolSink` never blocks the training thread: `emit` appends to an in-memory deque (bounded;
overflow is counted, never waited on). A background thread serialises the records, appends them
to the on-disk spool, and, when a server URL is set, sends unacknowledged frames in batches to
`POST /api/v1/ingest`, retrying with backoff while the service is down. Ingest is idempotent on
natural keys, so a batch resent after a lost reply stores nothing twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import TypeAdapter

from trainer_hooks.device import is_ready, settle
from trainer_hooks.records import Record
from trainer_hooks.routing import finish_routing_fields
from trainer_hooks.spool import Segment, Spool

log = logging.getLogger("trainer_hooks.sink")

INGEST_PATH = "/api/v1/ingest"
PendingRecord = tuple[str, dict[str, Any]]


@dataclass
class SinkStats:
    """What a sink did; `records_dropped` and `errors` are the losses, shown, never hidden."""

    records_spooled: int = 0
    records_sent: int = 0
    records_rejected: int = 0
    records_dropped: int = 0
    corrupt_frames: int = 0
    send_failures: int = 0
    errors: int = 0
    pending_bytes: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_RECORD = TypeAdapter(Record)


def _scalar(value: Any) -> Any:
    if hasattr(value, "detach"):  # a tensor handed over lazily: read it here, off the hot path
        value = value.detach().float().cpu().item()
    elif hasattr(value, "item") and not isinstance(value, int | float):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; the step is kept, its loss shown as missing
    return value


def to_payload(kind: str, fields: dict[str, Any]) -> bytes:
    """Validate and serialise a pending record. Runs on the sink thread, so a record the
    service would refuse is caught here and never poisons a batch in the spool."""
    out = {"kind": kind, **{k: _scalar(v) for k, v in fields.items()}}
    return _RECORD.validate_python(out).model_dump_json(exclude_none=True).encode()


class Sender:
    """Sends a spool's unacknowledged frames to the service; shared by the sink and replay."""

    def __init__(
        self,
        server_url: str,
        batch_records: int = 2000,
        timeout_s: float = 10.0,
        token: str | None = None,
    ):
        self.url = server_url.rstrip("/") + INGEST_PATH
        self.batch_records = batch_records
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.inserted = 0
        self.duplicates = 0

    def close(self) -> None:
        self.client.close()

    def send_segment(self, spool: Spool, seg: Segment, stats: SinkStats, from_start: bool) -> bool:
        """Send one segment from its ack offset; False when the service could not take it."""
        offset = 0 if from_start else seg.acked()
        while offset < seg.size():
            chunk = seg.read(offset, self.batch_records)
            stats.corrupt_frames += chunk.corrupt
            if not chunk.payloads:
                if chunk.end_offset > offset and not chunk.torn_tail:
                    seg.set_acked(chunk.end_offset)  # only corrupt frames: skip them for good
                    offset = chunk.end_offset
                break
            if not self._post(chunk.payloads, spool, stats):
                return False
            seg.set_acked(chunk.end_offset)
            offset = chunk.end_offset
            if chunk.torn_tail:
                break
        if offset < seg.size() and not spool.is_active(seg):
            # A torn tail nobody will finish (a failed write, a crash): skip it for good.
            stats.corrupt_frames += 1
            seg.set_acked(seg.size())
        return True

    def _post(self, payloads: list[bytes], spool: Spool, stats: SinkStats) -> bool:
        body = b'{"records":[' + b",".join(payloads) + b"]}"
        try:
            resp = self.client.post(
                self.url, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            stats.send_failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            return False
        if resp.status_code == 200:
            result = resp.json()
            self.inserted += int(result.get("inserted", 0))
            self.duplicates += int(result.get("duplicates", 0))
            stats.records_sent += len(payloads)
            return True
        if resp.status_code in (401, 403):  # a token problem: keep everything, retry later
            stats.send_failures += 1
            stats.last_error = f"HTTP {resp.status_code}: {resp.text[:500]}"
            return False
        if resp.status_code in (400, 413, 422):
            # The service will never accept this batch: keep it beside the spool, move on.
            self._dead_letter(spool, body, resp.text)
            stats.records_rejected += len(payloads)
            stats.last_error = f"HTTP {resp.status_code}: {resp.text[:500]}"
            return True
        stats.send_failures += 1
        stats.last_error = f"HTTP {resp.status_code}: {resp.text[:500]}"
        return False

    @staticmethod
    def _dead_letter(spool: Spool, body: bytes, reason: str) -> None:
        path = Path(spool.dir) / "rejected"
        path.mkdir(exist_ok=True)
        stamp = f"{time.time():.6f}"
        (path / f"{stamp}.json").write_bytes(body)
        (path / f"{stamp}.reason.txt").write_text(reason)


class SpoolSink:
    """Spool first, then send in the background. `server_url=None` is the offline mode."""

    def __init__(
        self,
        spool_dir: str | Path,
        server_url: str | None = None,
        *,
        max_pending: int = 100_000,
        flush_interval_s: float = 0.1,
        batch_records: int = 2000,
        max_backoff_s: float = 2.0,
        fsync: bool = True,
        token: str | None = None,
    ) -> None:
        self.spool = Spool(spool_dir)
        self.spool.lock()
        self.server_url = server_url
        self.stats = SinkStats()
        self._queue: deque[PendingRecord] = deque()
        self._unspooled: list[bytes] = []  # serialised, waiting for the disk to take them
        self._max_pending = max_pending
        self._interval = flush_interval_s
        self._max_backoff = max_backoff_s
        self._fsync = fsync
        self._sender = Sender(server_url, batch_records, token=token) if server_url else None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._emitted = 0  # records accepted by emit (hot path: a plain int increment)
        self._handled = 0  # records the sink thread took off the queue (written or counted)
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="goodput-sink", daemon=True)
        self._thread.start()

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        """Hot path: O(1), no I/O, no lock beyond the deque's own."""
        if len(self._queue) >= self._max_pending:
            self.stats.records_dropped += 1
            return
        self._queue.append((kind, fields))
        self._emitted += 1

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait until everything emitted so far is on disk (or counted lost). For rare,
        precious records such as checkpoint commits, which a hard crash right after them
        must not take along; never called per step. False on timeout."""
        target = self._emitted
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._handled >= target, timeout_s)

    def close(self, timeout_s: float = 10.0) -> SinkStats:
        """Spool everything still in memory and try to send it for up to `timeout_s` seconds.
        What is not sent by then stays in the spool for `goodput spool replay`."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + 5.0)
        self.stats.pending_bytes = self.spool.pending()
        if self._sender is not None:
            self._sender.close()
        self.spool.unlock()
        return self.stats

    # -- background thread --
    def _run(self) -> None:
        backoff = 0.0
        next_send = 0.0
        sent = True
        while True:
            stopping = self._stop.is_set()
            self._guard(self._spool_queue)
            if self._sender is not None and time.monotonic() >= next_send:
                sent = self._guard(self._send_all)
                backoff = 0.0 if sent else min(self._max_backoff, max(0.1, backoff * 2))
                next_send = time.monotonic() + backoff
            if not stopping:
                self._wake.wait(self._interval)
                self._wake.clear()
                continue
            done = not self._queue and not self._unspooled and (self._sender is None or sent)
            if done or time.monotonic() >= self._deadline:
                break
            time.sleep(0.02)
        self._guard(self._spool_queue)  # past the deadline: what never landed is counted
        self.stats.records_dropped += len(self._unspooled)  # the disk never took these
        self._unspooled = []

    def _guard(self, fn: Callable[[], bool | None]) -> bool:
        try:
            return fn() is not False
        except Exception as exc:  # the sink must never die: count, remember, go on
            self.stats.errors += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.debug("sink error", exc_info=True)
            return False

    def _spool_queue(self) -> None:
        """Serialise records in order; a record whose device copies are still in flight (its
        CUDA event not done) holds the queue until it lands, or until the close deadline."""
        payloads: list[bytes] = []
        taken = 0
        while self._queue:
            kind, fields = self._queue[0]
            if not is_ready(fields):
                if not (self._stop.is_set() and time.monotonic() >= self._deadline):
                    break
                self._queue.popleft()  # never landed: lost, and counted
                taken += 1
                self.stats.records_dropped += 1
                continue
            self._queue.popleft()
            taken += 1
            time.sleep(0)  # hand the GIL to the training thread between records
            try:
                settle(fields)
                if kind == "routing":
                    finish_routing_fields(fields)
                payloads.append(to_payload(kind, fields))
            except Exception as exc:
                self.stats.records_rejected += 1
                self.stats.last_error = f"invalid {kind} record: {exc}"
        self._unspooled.extend(payloads)
        try:
            self._write_unspooled()
        finally:
            with self._progress:
                self._handled += taken
                self._progress.notify_all()

    def _write_unspooled(self) -> None:
        if not self._unspooled:
            return
        try:
            self.spool.append(self._unspooled, sync=self._fsync)
        except OSError as exc:
            # Disk full, quota, read-only: keep the records in memory (bounded) and retry on
            # the next round; the oldest beyond the bound are lost, and counted. Never fatal.
            self.stats.last_error = f"spool write failed: {exc}"
            self.spool.close_writer()  # a torn frame stays behind; the retry starts afresh
            excess = len(self._unspooled) - self._max_pending
            if excess > 0:
                del self._unspooled[:excess]
                self.stats.records_dropped += excess
            return
        self.stats.records_spooled += len(self._unspooled)
        self._unspooled = []

    def _send_all(self) -> bool:
        assert self._sender is not None
        for seg in self.spool.segments():
            if not self._sender.send_segment(self.spool, seg, self.stats, from_start=False):
                return False
        self.spool.collect_garbage()
        return True


def replay(
    spool_dir: str | Path, server_url: str, from_start: bool = False, token: str | None = None
) -> dict[str, int]:
    """Send what a spool holds (every spool under `spool_dir`); safe to run twice."""
    stats = SinkStats()
    sender = Sender(server_url, token=token)
    dirs = sorted({p.parent for p in Path(spool_dir).rglob("*.seg")})
    try:
        for d in dirs:
            spool = Spool(d)
            spool.lock()
            try:
                for seg in spool.segments():
                    if not sender.send_segment(spool, seg, stats, from_start=from_start):
                        raise ConnectionError(stats.last_error or "service unavailable")
            finally:
                spool.unlock()
    finally:
        sender.close()
    return {
        "spools": len(dirs),
        "records_sent": stats.records_sent,
        "inserted": sender.inserted,
        "duplicates": sender.duplicates,
        "rejected": stats.records_rejected,
        "corrupt_frames": stats.corrupt_frames,
    }
