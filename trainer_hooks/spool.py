"""Append-only, CRC-framed on-disk spool.

A spool is a directory of numbered segment files. Each record is one frame:

    magic b"GP" | length: uint32 LE | crc32(payload): uint32 LE | payload (UTF-8 JSON)

Beside each segment, `<n>.ack` holds the byte offset up to which the service has acknowledged
the segment, written atomically (temp file + rename), so a replay resumes where the last one
stopped. A frame cut short at the end of a segment (a torn tail, e.g. after a crash) ends the
read; a frame whose checksum fails is skipped and counted, and reading resynchronises on the
next magic. Fully acknowledged segments are deleted, except the newest.

Batches the service refused for good (a 400, 413, 415 or 422: records it can never accept)
are kept beside the segments, in `rejected/`: `<stamp>.json` is the request body as sent,
`<stamp>.reason.txt` the service's answer. `goodput spool replay --rejected` sends them
again (after an upgrade of the service) and deletes each one the service takes.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GP"
_HEADER = struct.Struct("<2sII")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = 16 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"
LOCK_NAME = "spool.lock"
REJECTED_DIR = "rejected"
_REJECTED_BODY = ".json"
_REJECTED_REASON = ".reason.txt"


class SpoolLockedError(RuntimeError):
    """Another process (a training run or a replay) is using this spool."""


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass
class ReadResult:
    payloads: list[bytes]
    end_offset: int
    corrupt: int
    torn_tail: bool


def read_frames(data: bytes, offset: int, max_records: int) -> ReadResult:
    """Decode up to `max_records` frames of `data` starting at byte `offset`."""
    payloads: list[bytes] = []
    corrupt = 0
    pos = offset
    while len(payloads) < max_records and pos < len(data):
        if len(data) - pos < HEADER_SIZE:
            return ReadResult(payloads, pos, corrupt, torn_tail=True)
        magic, length, crc = _HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if magic == MAGIC and length <= MAX_FRAME_BYTES and end > len(data):
            return ReadResult(payloads, pos, corrupt, torn_tail=True)
        if magic == MAGIC and length <= MAX_FRAME_BYTES:
            payload = data[pos + HEADER_SIZE : end]
            if zlib.crc32(payload) == crc:
                payloads.append(payload)
                pos = end
                continue
        corrupt += 1
        nxt = data.find(MAGIC, pos + 1)
        pos = len(data) if nxt < 0 else nxt
    return ReadResult(payloads, pos, corrupt, torn_tail=False)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rejected_reason_path(body: Path) -> Path:
    return body.with_name(body.name[: -len(_REJECTED_BODY)] + _REJECTED_REASON)


class Segment:
    """One segment file and its acknowledgement offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ack_path = path.with_suffix(ACK_SUFFIX)

    @property
    def index(self) -> int:
        return int(self.path.stem)

    def acked(self) -> int:
        try:
            return int(self.ack_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def set_acked(self, offset: int) -> None:
        _atomic_write(self.ack_path, str(offset))

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, offset: int, max_records: int) -> ReadResult:
        with open(self.path, "rb") as f:
            data = f.read()
        return read_frames(data, offset, max_records)

    def delete(self) -> None:
        for p in (self.path, self.ack_path):
            p.unlink(missing_ok=True)


class Spool:
    """A spool directory: one writer appends frames; readers walk unacknowledged frames."""

    def __init__(self, directory: str | os.PathLike[str], segment_bytes: int = 8 << 20) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self._lock_fd: int | None = None
        self._active: Segment | None = None
        self._fh: BinaryIO | None = None

    # -- locking: one owner at a time (the trainer's sink, or a replay) --
    def lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SpoolLockedError(f"spool {self.dir} is in use by another process") from exc
        self._lock_fd = fd

    def unlock(self) -> None:
        self.close_writer()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def segments(self) -> list[Segment]:
        if not self.dir.is_dir():
            return []
        paths = [p for p in self.dir.glob("*" + SEGMENT_SUFFIX) if p.stem.isdigit()]
        return sorted((Segment(p) for p in paths), key=lambda s: s.index)

    # -- writing --
    def append(self, payloads: list[bytes], sync: bool = True) -> int:
        """Append frames to the active segment; returns the bytes written."""
        if not payloads:
            return 0
        seg = self._writable_segment()
        blob = b"".join(encode_frame(p) for p in payloads)
        fh = self._fh
        assert fh is not None
        fh.write(blob)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
        if seg.size() >= self.segment_bytes:
            self.close_writer()
        return len(blob)

    def _writable_segment(self) -> Segment:
        if self._active is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = self.segments()
            index = existing[-1].index + 1 if existing else 1
            self._active = Segment(self.dir / f"{index:08d}{SEGMENT_SUFFIX}")
            self._fh = open(self._active.path, "ab")  # noqa: SIM115 (held across appends)
        return self._active

    def close_writer(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self._active = None

    def is_active(self, seg: Segment) -> bool:
        return self._active is not None and seg.path == self._active.path

    # -- batches the service refused for good --
    def reject(self, body: bytes, reason: str) -> Path:
        """Keep a refused request body (and the service's answer) in `rejected/`; returns
        the body's path. Names sort in the order batches were refused."""
        folder = self.dir / REJECTED_DIR
        folder.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.time():.6f}"
        n = 0
        while (folder / f"{stamp}-{n}{_REJECTED_BODY}").exists():
            n += 1
        path = folder / f"{stamp}-{n}{_REJECTED_BODY}"
        _atomic_write_bytes(path, body)
        _atomic_write(rejected_reason_path(path), reason)
        return path

    def rejected(self) -> list[Path]:
        """The refused request bodies in `rejected/`, oldest first."""
        folder = self.dir / REJECTED_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*" + _REJECTED_BODY) if p.is_file())

    @staticmethod
    def forget_rejected(path: Path) -> None:
        """Delete a refused body, and its reason, once the service has taken it."""
        path.unlink(missing_ok=True)
        rejected_reason_path(path).unlink(missing_ok=True)

    # -- reading --
    def pending(self) -> int:
        """Unacknowledged bytes across all segments."""
        return sum(max(0, s.size() - s.acked()) for s in self.segments())

    def collect_garbage(self) -> None:
        """Delete fully acknowledged segments, except the newest: it stays, so a finished run's
        spool still holds its last records for a by-hand `replay --all`."""
        for seg in self.segments()[:-1]:
            if not self.is_active(seg) and seg.acked() >= seg.size():
                seg.delete()
