from __future__ import annotations

from pathlib import Path

import pytest

from trainer_hooks.spool import HEADER_SIZE, Spool, SpoolLockedError, encode_frame, read_frames


def payloads(n: int) -> list[bytes]:
    return [f'{{"i":{i}}}'.encode() for i in range(n)]


def test_frames_round_trip() -> None:
    data = b"".join(encode_frame(p) for p in payloads(5))
    res = read_frames(data, 0, 100)
    assert res.payloads == payloads(5)
    assert res.end_offset == len(data) and res.corrupt == 0 and not res.torn_tail


def test_torn_tail_stops_the_read_at_the_last_whole_frame() -> None:
    whole = b"".join(encode_frame(p) for p in payloads(3))
    torn = whole + encode_frame(b'{"i":3}')[:-2]
    res = read_frames(torn, 0, 100)
    assert res.payloads == payloads(3)
    assert res.end_offset == len(whole) and res.torn_tail


def test_torn_header_is_a_torn_tail_too() -> None:
    whole = encode_frame(b"{}")
    res = read_frames(whole + b"GP\x01", 0, 100)
    assert res.payloads == [b"{}"] and res.torn_tail


def test_corrupt_frame_is_skipped_and_counted() -> None:
    frames = [bytearray(encode_frame(p)) for p in payloads(3)]
    frames[1][HEADER_SIZE + 1] ^= 0xFF  # flip a payload byte: the CRC no longer matches
    res = read_frames(b"".join(frames), 0, 100)
    assert res.payloads == [payloads(3)[0], payloads(3)[2]]
    assert res.corrupt == 1


def test_garbage_between_frames_resynchronises() -> None:
    data = encode_frame(b"{}") + b"\x00garbage\x00" + encode_frame(b"[]")
    res = read_frames(data, 0, 100)
    assert res.payloads == [b"{}", b"[]"] and res.corrupt == 1


def test_read_resumes_from_the_acknowledged_offset(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.lock()
    spool.append(payloads(10))
    seg = spool.segments()[0]
    first = seg.read(0, 4)
    seg.set_acked(first.end_offset)
    rest = seg.read(seg.acked(), 100)
    assert first.payloads + rest.payloads == payloads(10)
    assert spool.pending() == seg.size() - first.end_offset
    spool.unlock()


def test_segments_rotate_and_acknowledged_old_ones_are_collected(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=200)
    spool.lock()
    for batch in range(5):
        spool.append(payloads(10)[batch * 2 : batch * 2 + 2] * 5)
    segs = spool.segments()
    assert len(segs) >= 3
    for s in segs:
        s.set_acked(s.size())
    spool.collect_garbage()
    assert [s.index for s in spool.segments()] == [segs[-1].index]
    spool.unlock()


def test_a_spool_has_one_owner_at_a_time(tmp_path: Path) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    a.lock()
    with pytest.raises(SpoolLockedError):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()
