"""Append-only, CRC-framed on-disk spool.

A spool is a directory of numbered segment files. Each record is one frame:

    magic b"GP" | length: uint32 LE | crc32(payload): uint32 LE | payload (UTF-8 JSON)

Beside each segment, `<n>.ack` holds the byte offset up to which the service has acknowledged
the segment, written atomically (temp file + rename), so a replay resumes where the last one
stopped. A frame cut short at the end of a segment (a torn tail, e.g. after a crash) ends the
read; a frame whose checksum fails is skipped and counted, and reading resynchronises on the
next magic. Fully acknowledged segments are deleted, except the newest.

A full disk loses nothing the service can still take. The acknowledged offsets are kept in
memory too, so an ack file that cannot be written (no room for its temporary copy) never makes
the sink send acknowledged frames again; the file is then overwritten in place, which needs
no new blocks. While a sink writes a spool, it keeps `reserve.bin` (`reserve_bytes`, 256 KiB)
of room there: when the disk is full, as much of it as they need is given up for the control
records (run, attempt start and end, checkpoint commits, excluded windows), the rest kept for
the next ones; it is taken whole again once the disk has room, and given back when the sink
closes.

Batches the service refused for good (a 400, 413, 415 or 422: records it can never accept)
are kept beside the segments, in `rejected/`: `<stamp>.json` is the request body as sent,
`<stamp>.reason.txt` the service's answer. `goodput spool replay --rejected` sends them
again (after an upgrade of the service) and deletes each one the service takes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("trainer_hooks.spool")

MAGIC = b"GP"
_HEADER = struct.Struct("<2sII")
HEADER_SIZE = _HEADER.size
MAX_FRAME_BYTES = 16 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"
LOCK_NAME = "spool.lock"
RESERVE_NAME = "reserve.bin"
RESERVE_BYTES = 256 * 1024
_ACK_WIDTH = 20  # an ack file's digits, zero-padded: rewritten in place, it keeps its size
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
    corrupt: int  # damaged stretches skipped
    torn_tail: bool
    corrupt_bytes: int = 0  # and their bytes: one stretch may have held many records


def read_frames(data: bytes, offset: int, max_records: int) -> ReadResult:
    """Decode up to `max_records` frames of `data` starting at byte `offset`."""
    payloads: list[bytes] = []
    corrupt = corrupt_bytes = 0
    pos = offset
    while len(payloads) < max_records and pos < len(data):
        if len(data) - pos < HEADER_SIZE:
            return ReadResult(payloads, pos, corrupt, True, corrupt_bytes)
        magic, length, crc = _HEADER.unpack_from(data, pos)
        end = pos + HEADER_SIZE + length
        if magic == MAGIC and length <= MAX_FRAME_BYTES and end > len(data):
            return ReadResult(payloads, pos, corrupt, True, corrupt_bytes)
        if magic == MAGIC and length <= MAX_FRAME_BYTES:
            payload = data[pos + HEADER_SIZE : end]
            if zlib.crc32(payload) == crc:
                payloads.append(payload)
                pos = end
                continue
        corrupt += 1
        nxt = data.find(MAGIC, pos + 1)
        skipped_to = len(data) if nxt < 0 else nxt
        corrupt_bytes += skipped_to - pos
        pos = skipped_to
    return ReadResult(payloads, pos, corrupt, torn_tail=False, corrupt_bytes=corrupt_bytes)


def _atomic_write(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _block_size(directory: Path) -> int:
    """The filesystem's allocation unit under `directory` (4 KiB where it cannot say)."""
    try:
        size = os.statvfs(directory).f_bsize
    except OSError:
        return 4096
    return size if size > 0 else 4096


def rejected_reason_path(body: Path) -> Path:
    return body.with_name(body.name[: -len(_REJECTED_BODY)] + _REJECTED_REASON)


class Segment:
    """One segment file and its acknowledgement offset. `acks` (the spool's) remembers the
    offsets this process set, whether or not their file could be written."""

    def __init__(self, path: Path, acks: dict[Path, int] | None = None) -> None:
        self.path = path
        self.ack_path = path.with_suffix(ACK_SUFFIX)
        self._acks = acks if acks is not None else {}

    @property
    def index(self) -> int:
        return int(self.path.stem)

    def acked(self) -> int:
        """The acknowledged offset. An ack file that cannot be read, or that points past the
        end of its segment, is damaged: the segment is sent again whole (the service stores
        nothing twice), with a warning, never skipped."""
        try:
            text = self.ack_path.read_text().strip()
        except FileNotFoundError:
            text = ""
        try:
            on_disk = int(text or 0)
        except ValueError:
            on_disk = -1
        if on_disk < 0 or on_disk > self.size():
            log.warning(
                "spool ack file %s is damaged (%r for a segment of %d bytes): sending the "
                "segment again from its start",
                self.ack_path,
                text[:40],
                self.size(),
            )
            on_disk = 0
            self._acks.pop(self.path, None)
        return max(on_disk, self._acks.get(self.path, 0))

    def set_acked(self, offset: int) -> bool:
        """Remember the offset, then write it down; False when no file could take it (a full
        disk): this process still never sends those frames again."""
        self._acks[self.path] = max(offset, self._acks.get(self.path, 0))
        text = str(offset).zfill(_ACK_WIDTH)
        try:
            _atomic_write(self.ack_path, text)
            return True
        except OSError:
            pass
        try:  # the same number of bytes over the old ones: no new block needed
            with open(self.ack_path, "r+") as f:
                f.write(text)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            return True
        except OSError:
            return False

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
        self._acks.pop(self.path, None)


class Spool:
    """A spool directory: one writer appends frames; readers walk unacknowledged frames."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        segment_bytes: int = 8 << 20,
        reserve_bytes: int = RESERVE_BYTES,
    ) -> None:
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.reserve_bytes = reserve_bytes
        self._lock_fd: int | None = None
        self._active: Segment | None = None
        self._fh: BinaryIO | None = None
        self._acks: dict[Path, int] = {}

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

    # -- room kept for the control records when the disk is full --
    @property
    def reserve_path(self) -> Path:
        return self.dir / RESERVE_NAME

    def take_reserve(self) -> bool:
        """Hold `reserve_bytes` of the disk (a file of zeros), if it is not held already and
        the disk has room; True when it is held."""
        if self.reserve_bytes <= 0:
            return False
        path = self.reserve_path
        try:
            if path.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        try:
            _atomic_write_bytes(path, bytes(self.reserve_bytes))
            return True
        except OSError:
            path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
            return False

    def give_up_reserve(self, nbytes: int | None = None) -> bool:
        """Free reserved room for what must be written; False when none was held. With
        `nbytes`, only the blocks that many bytes of frames can need (and one more, for a
        new segment's first block) are freed, by shortening the file: the rest stays held
        for the next control records, instead of being filled by data records."""
        path = self.reserve_path
        try:
            held = path.stat().st_size
        except FileNotFoundError:
            return False
        if nbytes is not None:
            block = _block_size(self.dir)
            keep = held - (-(-nbytes // block) + 1) * block
            if keep >= block:
                try:
                    os.truncate(path, keep)
                    return True
                except OSError:
                    pass  # then free it all
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

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
        return sorted((Segment(p, self._acks) for p in paths), key=lambda s: s.index)

    # -- writing --
    def append(self, payloads: list[bytes], sync: bool = True) -> int:
        """Append frames to the active segment; returns the bytes written."""
        if not payloads:
            return 0
        seg = self._writable_segment()
        blob = b"".join(encode_frame(p) for p in payloads)
        fh = self._fh
        assert fh is not None
        before = os.lseek(fh.fileno(), 0, os.SEEK_END)
        view = memoryview(blob)
        try:
            while view:  # an unbuffered write may land in part (a disk filling up)
                n = fh.write(view)
                if not n:
                    raise OSError(errno.ENOSPC, "no byte of the frame could be written")
                view = view[n:]
        except OSError:
            try:  # take the part that landed back: no torn frame, the room freed
                os.ftruncate(fh.fileno(), before)
            except OSError:
                self.close_writer()  # the next append starts a new segment
            raise
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
            self._active = Segment(self.dir / f"{index:08d}{SEGMENT_SUFFIX}", self._acks)
            # Unbuffered: a write lands whole or raises; nothing waits in a buffer that a
            # full disk would refuse later. noqa: held across appends.
            self._fh = open(self._active.path, "ab", buffering=0)  # noqa: SIM115
        return self._active

    def close_writer(self) -> None:
        """Close the active segment; never raises (a full disk may refuse the last flush:
        the next append starts a new segment either way)."""
        fh, self._fh, self._active = self._fh, None, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()

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
