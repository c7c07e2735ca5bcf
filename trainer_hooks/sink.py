"""Sinks: where the recorder's records go.

`SpoolSink` never blocks the training thread: `emit` appends to an in-memory deque (bounded;
overflow is counted, never waited on). A background thread serialises the records, appends them
to the on-disk spool, and, when a server URL is set, sends unacknowledged frames in batches to
`POST /api/v1/ingest`. Ingest is idempotent on natural keys, so a batch resent after a lost
reply stores nothing twice, and a 200 means the batch is committed.

What the service answers decides what happens to a batch (`classify`):
- 200: acknowledged, the spool moves on;
- a connection error, any 5xx, 408, 429, or a 409 marked retriable (`Retry-After`, or a JSON
  body with `"retriable": true`): kept and sent again with backoff, after the `Retry-After`
  the service asks for (capped at `max_retry_after_s`);
- 400, 413, 415, 422, and a 409 marked `"retriable": false` (a record that contradicts a
  stored one: the records can never be valid for this service): moved to the spool's
  `rejected/` folder with the service's answer, and said loudly (a warning naming the count,
  the file and the message); `goodput spool replay DIR --rejected` resends them after an
  upgrade of the service;
- anything else (401 or 403, a wrong token; 404; a 409 without a marker...): kept, retried
  at the slowest pace, a warning once, until an operator fixes it.

When the spool cannot be written (a full disk, a quota, a read-only mount), nothing is given
up while the service takes records: the control records (run, attempt start and end,
checkpoint commits, excluded windows) go to the room the spool reserved for them, and the
records still in memory are sent straight to the service (records may arrive in any order).
Only what neither the disk nor the service took, past `max_pending` records, is dropped, the
oldest non-control records first, and counted (`records_dropped`, which the attempt's end
record carries). So that the count is whole, an attempt's end waits in memory until the
records ahead of it are settled (written, sent, or dropped: at once when the disk or the
service takes them, else at the close deadline), and then carries the sink's count of the
records it dropped, the drops of its last moments included.
"""

from __future__ import annotations

import email.utils
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import TypeAdapter

from trainer_hooks.device import is_ready, settle
from trainer_hooks.records import Record
from trainer_hooks.routing import (
    BATCH_KIND,
    ROUTING,
    batch_size,
    expand_batch,
    finish_routing_fields,
)
from trainer_hooks.spool import (
    HEADER_SIZE,
    REJECTED_DIR,
    RESERVE_BYTES,
    SEGMENT_SUFFIX,
    Segment,
    Spool,
    rejected_reason_path,
)

log = logging.getLogger("trainer_hooks.sink")

INGEST_PATH = "/api/v1/ingest"
PendingRecord = tuple[str, dict[str, Any]]
Serialized = tuple[str, bytes]  # (kind, payload)
# Kept first when the disk is full: without them a run stays open or its progress unsaved.
CONTROL_KINDS = frozenset({"run", "attempt_start", "attempt_end", "checkpoint", "excluded_window"})
RESERVE_RETRY_S = 5.0

REJECTED_STATUSES = frozenset({400, 413, 415, 422})  # the records can never be valid
RETRIED_STATUSES = frozenset({408, 429})  # and every 5xx, and a 409 marked retriable
RETRY_AFTER_CAP_S = 30.0
Outcome = Literal["sent", "rejected", "retry", "held"]


@dataclass
class SinkStats:
    """What a sink did; `records_dropped` and `errors` are the losses, shown, never hidden."""

    records_spooled: int = 0
    records_sent: int = 0
    records_rejected: int = 0
    records_dropped: int = 0
    records_sent_unspooled: int = 0  # sent straight to the service: the disk would not take them
    spool_write_failures: int = 0
    corrupt_frames: int = 0  # damaged stretches of a spool skipped
    corrupt_bytes: int = 0  # their bytes (a stretch may have held many records)
    send_failures: int = 0
    errors: int = 0
    pending_bytes: int = 0
    last_error: str | None = None
    rejected_files: list[str] = field(default_factory=list)  # batches moved to rejected/
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


def retry_after_s(value: str | None, cap: float = RETRY_AFTER_CAP_S) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date), between
    0 and `cap`; None when absent or unreadable."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(cap, max(0.0, seconds))


def _marked_retriable(resp: httpx.Response) -> bool:
    """A 409 the service marks as worth retrying: a `Retry-After`, or `"retriable": true` in
    its JSON body (at the top or in `detail`)."""
    if "retry-after" in resp.headers:
        return True
    try:
        body = resp.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    detail = body.get("detail")
    return body.get("retriable") is True or (
        isinstance(detail, dict) and detail.get("retriable") is True
    )


def _marked_final(resp: httpx.Response) -> bool:
    """A 409 the service marks as permanent: `"retriable": false` in its JSON body (a record
    that contradicts a stored one of the same key)."""
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("retriable") is False


def classify(resp: httpx.Response) -> Outcome:
    """What a response means for the batch: see the module's docstring."""
    code = resp.status_code
    if code == 200:
        return "sent"
    if code in REJECTED_STATUSES or (code == 409 and _marked_final(resp)):
        return "rejected"
    if code >= 500 or code in RETRIED_STATUSES or (code == 409 and _marked_retriable(resp)):
        return "retry"
    return "held"


class Sender:
    """Sends a spool's unacknowledged frames to the service; shared by the sink and replay.
    After a send that failed, `retriable` says whether waiting may help (False: the service
    refused in a way an operator must fix) and `retry_after` how long the service asked to
    wait (seconds, capped; None when it did not say)."""

    def __init__(
        self,
        server_url: str,
        batch_records: int = 2000,
        timeout_s: float = 10.0,
        token: str | None = None,
        max_retry_after_s: float = RETRY_AFTER_CAP_S,
    ):
        self.url = server_url.rstrip("/") + INGEST_PATH
        self.batch_records = batch_records
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.max_retry_after_s = max_retry_after_s
        self.inserted = 0
        self.duplicates = 0
        self.retriable = True
        self.retry_after: float | None = None
        self.last_answer = ""  # the body of the service's last refusal
        self._held_warned: int | None = None  # the status last warned about, once in a row

    def close(self) -> None:
        self.client.close()

    def send_segment(self, spool: Spool, seg: Segment, stats: SinkStats, from_start: bool) -> bool:
        """Send one segment from its ack offset; False when the service could not take it."""
        offset = 0 if from_start else seg.acked()
        while offset < seg.size():
            chunk = seg.read(offset, self.batch_records)
            stats.corrupt_frames += chunk.corrupt
            stats.corrupt_bytes += chunk.corrupt_bytes
            if not chunk.payloads:
                if chunk.end_offset > offset and not chunk.torn_tail:
                    seg.set_acked(chunk.end_offset)  # only corrupt frames: skip them for good
                    offset = chunk.end_offset
                break
            body = b'{"records":[' + b",".join(chunk.payloads) + b"]}"
            outcome = self.post(body, stats)
            if outcome == "rejected":
                self.reject(spool, body, len(chunk.payloads), stats)
            elif outcome != "sent":
                return False
            else:
                stats.records_sent += len(chunk.payloads)
            seg.set_acked(chunk.end_offset)
            offset = chunk.end_offset
            if chunk.torn_tail:
                break
        if offset < seg.size() and not spool.is_active(seg):
            # A torn tail nobody will finish (a failed write, a crash): skip it for good.
            stats.corrupt_frames += 1
            stats.corrupt_bytes += seg.size() - offset
            seg.set_acked(seg.size())
        return True

    def post(self, body: bytes, stats: SinkStats) -> Outcome:
        """POST one batch; counts what the service stored, or why it did not."""
        self.retriable, self.retry_after = True, None
        try:
            resp = self.client.post(
                self.url, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            stats.send_failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            return "retry"
        outcome = classify(resp)
        if outcome == "sent":
            result = resp.json()
            self.inserted += int(result.get("inserted", 0))
            self.duplicates += int(result.get("duplicates", 0))
            self._held_warned = None
            return outcome
        stats.last_error = f"HTTP {resp.status_code}: {resp.text[:500]}"
        self.last_answer = resp.text
        if outcome == "rejected":
            return outcome
        stats.send_failures += 1
        self.retry_after = retry_after_s(resp.headers.get("retry-after"), self.max_retry_after_s)
        if outcome == "held":
            self.retriable = False
            if self._held_warned != resp.status_code:
                self._held_warned = resp.status_code
                log.warning(
                    "the service refused a batch with HTTP %d (%s); its records stay in the "
                    "spool, to be sent again",
                    resp.status_code,
                    resp.text[:500],
                )
        return outcome

    def reject(self, spool: Spool, body: bytes, n: int, stats: SinkStats) -> None:
        """The service will never accept this batch: keep it beside the spool, say so
        loudly, move on."""
        path = spool.reject(body, self.last_answer)
        stats.records_rejected += n
        stats.rejected_files.append(str(path))
        log.warning(
            "the service refused %d records for good (%s); the batch is kept in %s. Once "
            "the service accepts them (an upgrade), resend with: goodput spool replay %s "
            "--server URL --rejected",
            n,
            stats.last_error,
            path,
            spool.dir,
        )


class SpoolSink:
    """Spool first, then send in the background. `server_url=None` is the offline mode.

    A step record may carry its routing batch (`trainer_hooks.routing`): its sink thread
    writes the step's routing records right after the step's, one per layer, and counts
    them as records (spooled, dropped) like any other. A `routing_batch` record (the
    windows read at close) stands for its routing records only."""

    expands_routing = True  # the recorder hands this sink one routing batch per step

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
        max_retry_after_s: float = RETRY_AFTER_CAP_S,
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        self.spool = Spool(spool_dir, reserve_bytes=reserve_bytes)
        self.spool.lock()
        self.spool.take_reserve()
        self._reserve_tried = time.monotonic()
        self._direct_next = 0.0  # when records the disk would not take may be sent again
        self._direct_wait = 0.0
        self.server_url = server_url
        self.stats = SinkStats()
        self._queue: deque[PendingRecord] = deque()
        self._unspooled: list[Serialized] = []  # serialised, waiting for the disk to take them
        self._ends: list[dict[str, Any]] = []  # attempt ends waiting for the count of drops
        self._max_pending = max_pending
        self._interval = flush_interval_s
        self._max_backoff = max_backoff_s
        self._fsync = fsync
        self._sender = (
            Sender(server_url, batch_records, token=token, max_retry_after_s=max_retry_after_s)
            if server_url
            else None
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._emitted = 0  # records accepted by emit (hot path: a plain int increment)
        self._handled = 0  # records the sink thread took off the queue (written or counted)
        self._deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="goodput-sink", daemon=True)
        self._thread.start()

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        """Hot path: O(1), no I/O, no lock beyond the deque's own. Past `max_pending` queued
        records a record is dropped (counted), but never a control record (rare by nature)."""
        if len(self._queue) >= self._max_pending and kind not in CONTROL_KINDS:
            self.stats.records_dropped += int(kind != BATCH_KIND) + batch_size(fields)
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
        self.spool.give_up_reserve()  # the run is over: its room is the disk's again
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
                backoff = 0.0 if sent else self._next_backoff(backoff)
                next_send = time.monotonic() + backoff
            if not stopping:
                self._wake.wait(self._interval)
                self._wake.clear()
                continue
            done = not self._queue and not self._unspooled and not self._ends
            if (done and (self._sender is None or sent)) or time.monotonic() >= self._deadline:
                break
            time.sleep(0.02)
        self._guard(self._spool_queue)
        self._guard(self._last_chance)

    def _last_chance(self) -> None:
        """Past the close deadline: the data records neither the disk nor the service took
        are lost, and counted; then the attempt ends, carrying that count, are written (to
        the reserved room) or sent one last time. What still finds no room is lost too."""
        data = [r for r in self._unspooled if r[0] not in CONTROL_KINDS]
        self.stats.records_dropped += len(data)
        self._unspooled = [r for r in self._unspooled if r[0] in CONTROL_KINDS]
        self._direct_next = 0.0  # one last straight send, whatever the backoff
        self._release_ends(final=True)
        self.stats.records_dropped += len(self._unspooled)  # not even the reserve took these
        self._unspooled = []

    def _next_backoff(self, backoff: float) -> float:
        """After a failed send: double the wait (0.1 s up to max_backoff_s); wait at least
        what the service asked for (Retry-After, capped), and the longest for a refusal
        that waiting will not cure (a wrong token)."""
        assert self._sender is not None
        wait = min(self._max_backoff, max(0.1, backoff * 2))
        if not self._sender.retriable:
            wait = self._max_backoff
        asked = self._sender.retry_after
        return wait if asked is None else max(wait, asked)

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
        payloads: list[Serialized] = []
        taken = 0
        while self._queue:
            kind, fields = self._queue[0]
            if not is_ready(fields):
                if not (self._stop.is_set() and time.monotonic() >= self._deadline):
                    break
                self._queue.popleft()  # never landed: lost, and counted
                taken += 1
                self.stats.records_dropped += int(kind != BATCH_KIND) + batch_size(fields)
                continue
            self._queue.popleft()
            taken += 1
            if kind == "attempt_end":  # serialised once what is ahead of it is settled
                self._ends.append(fields)
                continue
            time.sleep(0)  # hand the GIL to the training thread between records
            lost = int(kind != BATCH_KIND) + batch_size(fields)
            try:
                settle(fields)
                if kind == "routing":
                    finish_routing_fields(fields)
                records = [] if kind == BATCH_KIND else [(kind, fields)]
                if ROUTING in fields:  # a step's routing batch: a record per layer after it
                    records += [("routing", r) for r in expand_batch(fields)]
            except Exception as exc:
                self.stats.records_rejected += lost
                self.stats.last_error = f"invalid {kind} record: {exc}"
                continue
            for i, (kind_i, fields_i) in enumerate(records):
                if i:
                    time.sleep(0)
                try:
                    payloads.append((kind_i, to_payload(kind_i, fields_i)))
                except Exception as exc:
                    self.stats.records_rejected += 1
                    self.stats.last_error = f"invalid {kind_i} record: {exc}"
        self._unspooled.extend(payloads)
        try:
            self._write_unspooled()
            self._release_ends(final=False)
        finally:
            with self._progress:
                self._handled += taken
                self._progress.notify_all()

    def _release_ends(self, final: bool) -> None:
        """Serialise and write the attempt ends once no data record waits in memory (each
        was written, sent or dropped), or `final`ly: each then carries the sink's count of
        dropped records (`counters.records_dropped`, never lowered)."""
        if not self._ends:
            return
        if not final and any(kind not in CONTROL_KINDS for kind, _ in self._unspooled):
            return
        ends, self._ends = self._ends, []
        for fields in ends:
            counters = dict(fields.get("counters") or {})
            told = counters.get("records_dropped", 0)
            if self.stats.records_dropped or "records_dropped" in counters:
                counters["records_dropped"] = max(int(told), self.stats.records_dropped)
            try:
                payload = to_payload("attempt_end", {**fields, "counters": counters})
            except Exception as exc:
                self.stats.records_rejected += 1
                self.stats.last_error = f"invalid attempt_end record: {exc}"
                continue
            self._unspooled.append(("attempt_end", payload))
        self._write_unspooled()

    def _write_unspooled(self) -> None:
        if not self._unspooled:
            return
        try:
            self.spool.append([p for _, p in self._unspooled], sync=self._fsync)
        except OSError as exc:
            # Disk full, quota, read-only: never fatal, and nothing the service can still take
            # is given up (the module's docstring).
            self.stats.spool_write_failures += 1
            self.stats.last_error = f"spool write failed: {exc}"
            self._spool_control()
            self._send_unspooled()
            self._bound_unspooled()
            return
        self.stats.records_spooled += len(self._unspooled)
        self._unspooled = []
        if time.monotonic() - self._reserve_tried >= RESERVE_RETRY_S:
            self._reserve_tried = time.monotonic()
            self.spool.take_reserve()  # room again: hold it for the next full disk

    def _spool_control(self) -> None:
        """Write the control records in memory into the room the spool reserved: as much of
        it as they need (the rest stays reserved for the next ones), or all of it."""
        control = [r for r in self._unspooled if r[0] in CONTROL_KINDS]
        if not control:
            return
        needed = sum(HEADER_SIZE + len(p) for _, p in control)
        for room in (needed, None):  # None: the whole reserve, if a part was not enough
            if not self.spool.give_up_reserve(room):
                return
            try:
                self.spool.append([p for _, p in control], sync=self._fsync)
                break
            except OSError:
                continue
        else:
            return
        self.stats.records_spooled += len(control)
        self._unspooled = [r for r in self._unspooled if r[0] not in CONTROL_KINDS]

    def _send_unspooled(self) -> None:
        """Send what the disk would not take straight to the service, oldest first, until it
        cannot take more now."""
        sender = self._sender
        if sender is None or time.monotonic() < self._direct_next:
            return
        while self._unspooled:
            chunk = self._unspooled[: sender.batch_records]
            body = b'{"records":[' + b",".join(p for _, p in chunk) + b"]}"
            outcome = sender.post(body, self.stats)
            if outcome == "sent":
                self.stats.records_sent += len(chunk)
                self.stats.records_sent_unspooled += len(chunk)
            elif outcome == "rejected":
                try:
                    sender.reject(self.spool, body, len(chunk), self.stats)
                except OSError:  # not even room for that: lost, and said so
                    self.stats.records_rejected += len(chunk)
                    self.stats.records_dropped += len(chunk)
                    log.warning("the service refused %d records and the disk is full", len(chunk))
            else:  # not now: wait as the spool's sends do (Retry-After honoured)
                self._direct_wait = self._next_backoff(self._direct_wait)
                self._direct_next = time.monotonic() + self._direct_wait
                return
            self._direct_wait = 0.0
            del self._unspooled[: len(chunk)]

    def _bound_unspooled(self) -> None:
        """Past max_pending records in memory, drop the oldest non-control ones, counted."""
        excess = len(self._unspooled) - self._max_pending
        if excess <= 0:
            return
        keep: list[Serialized] = []
        for r in self._unspooled:
            if excess > 0 and r[0] not in CONTROL_KINDS:
                excess -= 1
                self.stats.records_dropped += 1
                continue
            keep.append(r)
        self._unspooled = keep

    def _send_all(self) -> bool:
        assert self._sender is not None
        for seg in self.spool.segments():
            if not self._sender.send_segment(self.spool, seg, self.stats, from_start=False):
                return False
        self.spool.collect_garbage()
        return True


REPLAY_RETRIES = 4  # a batch the service could not take now: tried again 4 times
REPLAY_FIRST_WAIT_S = 0.5  # then doubled: 0.5, 1, 2, 4 s, or what Retry-After asks
REPLAY_RETRY_AFTER_CAP_S = 10.0


def _retrying(
    sender: Sender, stats: SinkStats, retries: int, send: Callable[[], Outcome]
) -> Outcome:
    """Call `send` until the service answers for good ("sent" or "rejected"); a retriable
    failure is tried again `retries` times with backoff (Retry-After honoured, capped), then
    ConnectionError, as at once for a refusal that waiting will not cure."""
    wait = REPLAY_FIRST_WAIT_S
    for attempt in range(retries + 1):
        outcome = send()
        if outcome in ("sent", "rejected"):
            return outcome
        if outcome == "held" or attempt == retries:
            break
        asked = sender.retry_after
        time.sleep(wait if asked is None else max(wait, asked))
        wait *= 2
    raise ConnectionError(stats.last_error or "service unavailable")


def _send_segment(
    sender: Sender, spool: Spool, seg: Segment, stats: SinkStats, from_start: bool
) -> Outcome:
    # With from_start, a retry starts the segment over too (what was sent is a duplicate).
    if sender.send_segment(spool, seg, stats, from_start=from_start):
        return "sent"
    return "retry" if sender.retriable else "held"


@contextmanager
def _locked(directory: Path) -> Iterator[Spool]:
    spool = Spool(directory)
    spool.lock()
    try:
        yield spool
    finally:
        spool.unlock()


def replay(
    spool_dir: str | Path,
    server_url: str,
    from_start: bool = False,
    token: str | None = None,
    retries: int = REPLAY_RETRIES,
) -> dict[str, int]:
    """Send what a spool holds (every spool under `spool_dir`); safe to run twice. Batches
    the service refuses for good go to `rejected/`, with a warning (`replay_rejected`)."""
    stats = SinkStats()
    sender = Sender(server_url, token=token, max_retry_after_s=REPLAY_RETRY_AFTER_CAP_S)
    dirs = sorted({p.parent for p in Path(spool_dir).rglob("*" + SEGMENT_SUFFIX)})
    try:
        for d in dirs:
            with _locked(d) as spool:
                for seg in spool.segments():
                    send = partial(_send_segment, sender, spool, seg, stats, from_start)
                    _retrying(sender, stats, retries, send)
    finally:
        sender.close()
    return {
        "spools": len(dirs),
        "records_sent": stats.records_sent,
        "inserted": sender.inserted,
        "duplicates": sender.duplicates,
        "rejected": stats.records_rejected,
        "corrupt_frames": stats.corrupt_frames,
        "corrupt_bytes": stats.corrupt_bytes,
    }


def replay_rejected(
    spool_dir: str | Path,
    server_url: str,
    token: str | None = None,
    retries: int = REPLAY_RETRIES,
) -> dict[str, int]:
    """Send again the batches the service refused for good (each spool's `rejected/` under
    `spool_dir`), e.g. after an upgrade of the service; each one it takes is deleted. One it
    refuses again stays, its reason updated, with a warning."""
    stats = SinkStats()
    sender = Sender(server_url, token=token, max_retry_after_s=REPLAY_RETRY_AFTER_CAP_S)
    dirs = sorted({p.parent for p in Path(spool_dir).rglob(REJECTED_DIR) if p.is_dir()})
    sent = refused = 0
    try:
        for d in dirs:
            with _locked(d) as spool:
                for path in spool.rejected():
                    send = partial(sender.post, path.read_bytes(), stats)
                    if _retrying(sender, stats, retries, send) == "sent":
                        spool.forget_rejected(path)
                        sent += 1
                        continue
                    refused += 1
                    rejected_reason_path(path).write_text(sender.last_answer)
                    log.warning(
                        "the service refused %s again (%s); it stays where it is",
                        path,
                        stats.last_error,
                    )
    finally:
        sender.close()
    return {
        "spools": len(dirs),
        "batches_sent": sent,
        "inserted": sender.inserted,
        "duplicates": sender.duplicates,
        "still_rejected": refused,
    }
