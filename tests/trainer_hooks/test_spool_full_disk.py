"""A full spool disk loses nothing the service can take (issue 12): the spool on a real tiny
filesystem (a tmpfs this test mounts; skipped where it cannot mount one), a real service on
loopback, and a recorder's worth of records: every step stored once, the attempt end (with
its counters) stored, and no acknowledged frame sent twice. Without the service, only data
records past the sink's bound are dropped; the control records keep their reserved room (a
first one takes only what it needs, so data records cannot fill the rest), and the attempt's
end counts every record dropped, which a replay then reports to the service."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import factories as f
from tests.conftest import free_port
from tests.e2e.test_commit_before_ack import Served
from trainer_hooks import Recorder
from trainer_hooks.sink import SpoolSink, replay
from trainer_hooks.spool import Segment, Spool


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, or a skip where this machine cannot mount one."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    from service.store.migrate import prepare_database

    url = f"sqlite:///{tmp_path / 'goodput.db'}"
    prepare_database(url).dispose()
    with Served(url) as server:
        yield server


def fill(disk: Path) -> None:
    """Take every free byte of the disk but the spool's reserve."""
    with open(disk / "ballast", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(bytes(4096))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def emit(sink: SpoolSink, rec: dict[str, Any]) -> None:
    sink.emit(rec["kind"], {k: v for k, v in rec.items() if k != "kind"})


def test_a_full_disk_loses_nothing_while_the_service_is_up(tiny_disk: Path, served: Served) -> None:
    run_id = uuid.uuid4().hex
    spool_dir = tiny_disk / "spool"
    sink = SpoolSink(
        spool_dir, served.base, flush_interval_s=0.01, reserve_bytes=32 * 1024, fsync=False
    )
    assert (spool_dir / "reserve.bin").stat().st_size == 32 * 1024
    emit(sink, f.run(run_id))
    emit(sink, f.attempt_start(run_id))
    assert sink.flush(5.0)
    fill(tiny_disk)  # from here on, the spool cannot grow
    steps = 150
    for n in range(steps):
        emit(sink, f.step(n, run_id, loss=1.0 / (n + 1)))
        if n == 99:
            emit(sink, f.checkpoint(99, f.T0 + 200, run_id))
    emit(sink, f.attempt_end(run_id, end=f.T0 + 400, counters={"records_dropped": 0}))
    stats = sink.close(timeout_s=20.0)
    assert stats.spool_write_failures > 0  # the disk really was full
    assert not (spool_dir / "reserve.bin").exists()  # given back at close
    assert stats.records_dropped == 0 and stats.errors == 0, stats
    assert sink._sender is not None and sink._sender.duplicates == 0  # nothing sent twice
    with httpx.Client(base_url=served.base) as client:
        run = client.get(f"/api/v1/runs/{run_id}").json()
        assert run["num_steps"] == steps
        assert run["status"] == "completed"  # the attempt's end arrived
        assert run["attempts"][0]["counters"] == {"records_dropped": 0}
    assert stats.records_sent_unspooled > 0


def test_records_past_the_bound_drop_data_first_and_keep_the_control_records(
    tiny_disk: Path,
) -> None:
    """No service and a full disk: the control records go to the reserved room; only data
    records past max_pending are dropped, and counted."""
    run_id = uuid.uuid4().hex
    spool_dir = tiny_disk / "spool"
    sink = SpoolSink(spool_dir, None, flush_interval_s=0.01, max_pending=20, reserve_bytes=32768)
    fill(tiny_disk)
    for n in range(60):
        emit(sink, f.step(n, run_id))
    emit(sink, f.checkpoint(59, f.T0 + 100, run_id))
    emit(sink, f.attempt_end(run_id, end=f.T0 + 200))
    stats = sink.close(timeout_s=2.0)
    assert stats.records_dropped >= 40  # data records only: counted, never hidden
    spool = Spool(spool_dir)
    kinds = [
        payload.split(b'"kind":"', 1)[1].split(b'"', 1)[0]
        for seg in spool.segments()
        for payload in seg.read(0, 10_000).payloads
    ]
    assert b"attempt_end" in kinds and b"checkpoint" in kinds


def test_an_ack_that_cannot_be_written_is_still_never_sent_again(tmp_path: Path) -> None:
    """The ack file's temporary copy cannot be made (a full disk): the offset is kept in
    memory, and the file overwritten in place."""
    spool = Spool(tmp_path)
    spool.append([b"{}"] * 3)
    seg = spool.segments()[0]
    assert seg.set_acked(5)
    real = os.replace

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        os.replace = full  # type: ignore[assignment]
        assert seg.set_acked(12)  # in place
        assert Segment(seg.path).acked() == 12
        seg.ack_path.chmod(0o400)  # and not even that: memory alone
        if os.geteuid() != 0:  # root writes through the mode bits
            assert not seg.set_acked(20)
            assert spool.segments()[0].acked() == 20
    finally:
        os.replace = real
        seg.ack_path.chmod(0o600)


def test_a_conflicting_resend_goes_to_rejected_not_round_and_round(
    served: Served, tmp_path: Path
) -> None:
    """The service answers a record that contradicts a stored one with a 409 marked final:
    the sink keeps that batch in rejected/ and goes on with the next."""
    run_id = uuid.uuid4().hex
    with httpx.Client(base_url=served.base) as client:
        first = [f.run(run_id), f.attempt_start(run_id), f.step(0, run_id, dur=1.0)]
        assert client.post("/api/v1/ingest", json={"records": first}).status_code == 200
    sink = SpoolSink(tmp_path / "spool", served.base, flush_interval_s=0.01, batch_records=1)
    emit(sink, f.step(0, run_id, dur=2.0))  # the same key, another end: a conflict
    emit(sink, f.step(1, run_id, start=f.T0 + 5, dur=1.0))
    stats = sink.close(timeout_s=10.0)
    assert stats.records_rejected == 1 and len(stats.rejected_files) == 1
    with httpx.Client(base_url=served.base) as client:
        assert client.get(f"/api/v1/runs/{run_id}").json()["num_steps"] == 2


def test_damage_is_measured_in_bytes_and_a_damaged_ack_never_skips_a_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from trainer_hooks.spool import read_frames

    spool = Spool(tmp_path)
    spool.append([b'{"a":1}'] * 10)
    seg = spool.segments()[0]
    data = bytearray(seg.path.read_bytes())
    frame = len(data) // 10
    data[frame : frame * 9] = b"\xff" * (frame * 8)  # 8 frames wiped
    got = read_frames(bytes(data), 0, 100)
    assert len(got.payloads) == 2 and got.corrupt == 1
    assert got.corrupt_bytes == frame * 8  # the stretch: not "one frame"
    seg.ack_path.write_text(str(seg.size() + 1000))  # points past the end: damaged
    with caplog.at_level("WARNING"):
        assert seg.acked() == 0
    assert "damaged" in caplog.text
    seg.ack_path.write_text("garbage")
    assert seg.acked() == 0


def test_the_attempt_end_reports_the_whole_loss_and_replay_brings_it_to_the_service(
    tiny_disk: Path, served: Served
) -> None:
    """A full disk and no service while a recorder trains: the sink drops what is past its
    bound, and the attempt's end (kept in the reserved room) counts every record dropped,
    those dropped while the sink closes too. Replayed once the service is up, it reports
    that loss there: stored steps + reported loss = the steps taken."""
    run_id = uuid.uuid4().hex
    spool_dir = tiny_disk / "spool"
    nobody = f"http://127.0.0.1:{free_port()}"
    sink = SpoolSink(
        spool_dir,
        nobody,
        flush_interval_s=0.01,
        max_pending=50,
        reserve_bytes=4096,  # one page: the control records, and few others after them
        max_backoff_s=0.1,
    )
    rec = Recorder(
        run_name="full-disk",
        sink=sink,
        run_id=run_id,
        rank=0,
        world_size=1,
        attempt=0,
        environment={},
        heartbeat_s=0,
        watch_compile=False,
        attempt_start="now",
    )
    assert sink.flush(5.0)  # the run and the attempt's start are on disk
    fill(tiny_disk)
    steps = 150
    for n in range(steps):
        with rec.step(n, tokens=64):
            pass
    stats = rec.close(flush_timeout_s=1.0)
    assert stats.records_dropped >= steps - 50, stats  # the bound held, the loss counted
    records = [
        json.loads(payload)
        for seg in Spool(spool_dir).segments()
        for payload in seg.read(0, 10_000).payloads
    ]
    ends = [r for r in records if r["kind"] == "attempt_end"]
    assert len(ends) == 1, [r["kind"] for r in records]
    assert ends[0]["counters"]["records_dropped"] == stats.records_dropped

    assert replay(spool_dir, served.base)["rejected"] == 0
    with httpx.Client(base_url=served.base) as client:
        run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "completed"
    assert run["attempts"][0]["counters"]["records_dropped"] == stats.records_dropped
    assert run["num_steps"] + stats.records_dropped == steps


def test_data_records_never_take_the_room_kept_for_later_control_records(
    tiny_disk: Path,
) -> None:
    """A full disk and no service for a whole run: a first checkpoint commit takes only the
    room it needs from the reserve, so the data records that come next cannot fill it, and
    the last checkpoint commit and the attempt's end (with the count of what was lost) are
    still written."""
    run_id = uuid.uuid4().hex
    spool_dir = tiny_disk / "spool"
    sink = SpoolSink(
        spool_dir, None, flush_interval_s=0.01, max_pending=10_000, reserve_bytes=32768
    )
    fill(tiny_disk)
    emit(sink, f.checkpoint(0, f.T0 + 5, run_id))
    assert sink.flush(5.0)
    for n in range(300):  # some 60 KB: more than the whole reserve
        emit(sink, f.step(n, run_id))
    assert sink.flush(5.0)
    emit(sink, f.checkpoint(299, f.T0 + 700, run_id))
    emit(sink, f.attempt_end(run_id, end=f.T0 + 800, counters={"records_dropped": 0}))
    stats = sink.close(timeout_s=1.0)
    records = [
        json.loads(payload)
        for seg in Spool(spool_dir).segments()
        for payload in seg.read(0, 10_000).payloads
    ]
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [0, 299]
    ends = [r for r in records if r["kind"] == "attempt_end"]
    assert len(ends) == 1
    steps_kept = sum(r["kind"] == "step" for r in records)
    assert stats.records_dropped == 300 - steps_kept > 0
    assert ends[0]["counters"]["records_dropped"] == stats.records_dropped
