from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import LiveServer, free_port
from tests.trainer_hooks.list_sink import ListSink
from trainer_hooks import Recorder, SpoolSink, replay
from trainer_hooks.spool import Spool

SLEEP_STALL = 0.05
SLEEP_STEP = 0.03


class ExplodingSink(ListSink):
    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        raise OSError("disk on fire")

    def close(self, timeout_s: float = 10.0) -> None:
        raise OSError("still on fire")


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test as its own process: a run id reused by another test (the SQLite and the
    PostgreSQL case) would otherwise be a second recorder of that attempt, which sends no
    startup span of its own."""
    from trainer_hooks import recorder as recorder_mod

    monkeypatch.setattr(recorder_mod, "_STARTS", recorder_mod._Starts())


def scripted_loop(rec: Recorder, steps: int = 3) -> None:
    for i in range(steps):
        with rec.span("data_stall", step=i):
            time.sleep(SLEEP_STALL)
        with rec.step(i, tokens=64) as s:
            time.sleep(SLEEP_STEP)
            s.loss = torch.tensor(2.0 - i)


def spooled_kinds(directory: Path) -> list[str]:
    import json

    seg = Spool(directory).segments()[0]
    return [json.loads(p)["kind"] for p in seg.read(0, 10_000).payloads]


def test_scripted_loop_records_exactly_its_steps_and_spans() -> None:
    sink = ListSink()
    rec = Recorder(run_name="scripted", sink=sink, environment={})
    scripted_loop(rec)
    rec.close()
    kinds = [k for k, _ in sink.records]
    assert kinds == ["run", "attempt_start", "span"] + ["span", "step"] * 3 + ["attempt_end"]
    startup = sink.records[2][1]  # the recorder's own: from the attempt's start until ready
    assert startup["category"] == "startup" and startup["start"] == sink.records[1][1]["start"]
    for kind, fields in sink.records[3:]:
        if kind in ("span", "step"):
            want = SLEEP_STALL if kind == "span" else SLEEP_STEP
            assert want <= fields["end"] - fields["start"] < want + 0.25
    assert sink.closed


def test_scripted_loop_goodput_matches_the_sleeps(live_server: LiveServer, tmp_path: Path) -> None:
    sink = SpoolSink(tmp_path, live_server.base)
    rec = Recorder(run_name="scripted", sink=sink, run_id="scripted-1", environment={})
    scripted_loop(rec)
    stats = rec.close()
    assert stats.pending_bytes == 0 and stats.records_sent == 10
    g = httpx.get(f"{live_server.base}/api/v1/runs/scripted-1/goodput").json()
    assert 3 * SLEEP_STALL <= g["badput_s"]["data_stall"] < 3 * SLEEP_STALL + 0.3
    assert 3 * SLEEP_STEP <= g["goodput_s"] < 3 * SLEEP_STEP + 0.3
    assert g["steps"] == 3
    parts = g["goodput_s"] + sum(g["badput_s"].values()) + g["other_s"]
    assert abs(parts - g["total_s"]) < 1e-9


def test_training_error_propagates_and_its_step_is_not_recorded() -> None:
    sink = ListSink()
    rec = Recorder(run_name="x", sink=sink, environment={})
    with pytest.raises(RuntimeError, match="boom"), rec.step(0):
        raise RuntimeError("boom")
    assert [k for k, _ in sink.records] == ["run", "attempt_start", "span"]  # span: startup


def test_a_sink_that_raises_never_stops_training() -> None:
    rec = Recorder(run_name="x", sink=ExplodingSink(), environment={})
    scripted_loop(rec, steps=2)
    assert rec.close() is None
    # run, attempt_start, the startup span, 4 records, attempt_end, close
    assert rec.errors == 3 + 4 + 1 + 1


def test_rank_world_and_attempt_come_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    rec = Recorder(run_name="x", sink=ListSink(), environment={})
    assert (rec.rank, rec.world_size, rec.attempt) == (3, 8, 2)


def test_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    sink = SpoolSink(tmp_path, None, max_pending=5, flush_interval_s=60)
    for i in range(20):
        sink.emit("step", {"run_id": "r", "step": i, "start": 1.8e9, "end": 1.8e9})
    stats = sink.close()
    assert stats.records_dropped == 15 and stats.records_spooled == 5


def test_invalid_record_is_rejected_on_the_sink_thread_not_spooled(tmp_path: Path) -> None:
    sink = SpoolSink(tmp_path, None)
    rec = Recorder(run_name="x", sink=sink, environment={})
    with rec.span("not-a-category"):
        pass
    with rec.step(0) as s:
        s.loss = torch.tensor(float("nan"))  # kept, as a step without loss
    stats = rec.close()
    assert stats.records_rejected == 1
    assert spooled_kinds(tmp_path) == ["run", "attempt_start", "span", "step", "attempt_end"]


def test_service_down_loses_nothing_and_replay_stores_it_once(
    migrated_url: str, tmp_path: Path
) -> None:
    server = LiveServer(migrated_url)  # not started yet: the service is down
    sink = SpoolSink(tmp_path, server.base)
    rec = Recorder(run_name="outage", sink=sink, run_id="outage-1", environment={})
    t0 = time.monotonic()
    scripted_loop(rec, steps=4)
    train_time = time.monotonic() - t0
    stats = rec.close(flush_timeout_s=0.5)
    assert train_time < 4 * (SLEEP_STALL + SLEEP_STEP) + 0.5  # training never waited
    assert stats.pending_bytes > 0 and stats.send_failures > 0
    server.start()
    try:
        first = replay(tmp_path, server.base)
        assert first["inserted"] == 12 and first["duplicates"] == 0
        again = replay(tmp_path, server.base, from_start=True)
        assert again["inserted"] == 0 and again["duplicates"] == 12
        steps = httpx.get(f"{server.base}/api/v1/runs/outage-1/steps").json()["points"]
        assert [p["step"] for p in steps] == [0, 1, 2, 3]
    finally:
        server.stop()


def test_sink_catches_up_when_the_service_comes_back(migrated_url: str, tmp_path: Path) -> None:
    server = LiveServer(migrated_url)
    server.start()
    sink = SpoolSink(tmp_path, server.base, max_backoff_s=0.2)
    rec = Recorder(run_name="flap", sink=sink, run_id="flap-1", environment={})
    scripted_loop(rec, steps=2)
    server.stop()
    scripted_loop_from(rec, 2, 5)
    server.start()
    try:
        stats = rec.close(flush_timeout_s=20)
        assert stats.pending_bytes == 0
        steps = httpx.get(f"{server.base}/api/v1/runs/flap-1/steps").json()["points"]
        assert [p["step"] for p in steps] == [0, 1, 2, 3, 4]
    finally:
        server.stop()


def scripted_loop_from(rec: Recorder, first: int, last: int) -> None:
    for i in range(first, last):
        with rec.step(i, tokens=1) as s:
            s.loss = 1.0


def test_replay_refuses_a_spool_in_use(tmp_path: Path) -> None:
    from trainer_hooks.spool import SpoolLockedError

    sink = SpoolSink(tmp_path, None)
    sink.emit("run", {"run_id": "r", "name": "n", "created_at": 1.8e9})
    time.sleep(0.5)
    with pytest.raises(SpoolLockedError):
        replay(tmp_path, f"http://127.0.0.1:{free_port()}")
    sink.close()


def test_full_disk_keeps_training_and_records_land_once_it_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    real_append = Spool.append
    disk_full = {"on": True}

    def append(self: Spool, payloads: list[bytes], sync: bool = True) -> int:
        if disk_full["on"]:
            # a partial write first, as a real ENOSPC mid-frame leaves behind
            self._writable_segment()
            assert self._fh is not None
            self._fh.write(b"GP\x10\x00")
            self._fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_append(self, payloads, sync)

    monkeypatch.setattr(Spool, "append", append)
    sink = SpoolSink(tmp_path, None, flush_interval_s=0.02)
    rec = Recorder(run_name="disk", sink=sink, run_id="disk-1", environment={}, heartbeat_s=0)
    scripted_loop(rec, steps=3)  # training goes on while nothing can be written
    time.sleep(0.1)
    assert sink.stats.records_spooled == 0 and "No space" in (sink.stats.last_error or "")
    disk_full["on"] = False
    stats = rec.close()
    assert stats.records_dropped == 0 and stats.records_spooled == 10


def test_records_behind_a_torn_frame_are_replayed_after_recovery(
    live_server: LiveServer, tmp_path: Path
) -> None:
    sink = SpoolSink(tmp_path, None)
    rec = Recorder(run_name="torn", sink=sink, run_id="torn-1", environment={}, heartbeat_s=0)
    scripted_loop(rec, steps=2)
    rec.close()
    seg = Spool(tmp_path).segments()[0]
    with open(seg.path, "ab") as f:
        f.write(b"GP\xff\x00\x00\x00garbage")  # a crash mid-append: a torn tail
    result = replay(tmp_path, live_server.base)
    assert result["inserted"] == 8 and result["corrupt_frames"] == 1
    steps = httpx.get(f"{live_server.base}/api/v1/runs/torn-1/steps").json()["points"]
    assert [p["step"] for p in steps] == [0, 1]


def test_sink_sends_the_write_token_and_keeps_records_when_refused(
    migrated_url: str, tmp_path: Path
) -> None:
    server = LiveServer(migrated_url, write_token="w-secret", read_token="r-secret")
    server.start()
    try:
        wrong = SpoolSink(tmp_path / "a", server.base, token="nope", max_backoff_s=0.1)
        rec = Recorder(run_name="tok", sink=wrong, run_id="tok-1", environment={}, heartbeat_s=0)
        scripted_loop(rec, steps=1)
        stats = rec.close(flush_timeout_s=0.5)
        assert stats.records_sent == 0 and stats.pending_bytes > 0 and "403" in stats.last_error
        assert replay(tmp_path / "a", server.base, token="w-secret")["inserted"] == 6
        right = SpoolSink(tmp_path / "b", server.base, token="w-secret")
        rec = Recorder(run_name="tok", sink=right, run_id="tok-2", environment={}, heartbeat_s=0)
        scripted_loop(rec, steps=1)
        assert rec.close().records_sent == 6
        headers = {"authorization": "Bearer r-secret"}
        got = httpx.get(f"{server.base}/api/v1/runs/tok-2/steps", headers=headers).json()
        assert [p["step"] for p in got["points"]] == [0]
    finally:
        server.stop()
