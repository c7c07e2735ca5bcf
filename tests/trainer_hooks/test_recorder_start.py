"""When an attempt starts: the process's start, the recorder's own startup span, the fallback
where /proc cannot tell, several recorders in one process, and explicit starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import trainer_hooks
from tests.conftest import LiveServer
from tests.trainer_hooks.list_sink import ListSink as BaseListSink
from trainer_hooks import Recorder, SpoolSink
from trainer_hooks import recorder as recorder_mod

ROOT = Path(__file__).resolve().parents[2]


class ListSink(BaseListSink):
    def startups(self) -> list[dict[str, Any]]:
        return [s for s in self.of("span") if s["category"] == "startup"]


@pytest.fixture
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if no recorder had been built in this process yet."""
    monkeypatch.setattr(recorder_mod, "_STARTS", recorder_mod._Starts())


def build(**kw: Any) -> tuple[Recorder, ListSink]:
    sink = ListSink()
    kw.setdefault("run_name", "start")
    kw.setdefault("heartbeat_s", 0)
    return Recorder(sink=sink, environment={}, **kw), sink


def fake_proc(root: Path, comm: str, starttime: int, btime: int) -> str:
    """A /proc with the two files process_start_time reads; fields 3..21 are filler."""
    (root / "self").mkdir(parents=True)
    fields = ["S", *[str(i) for i in range(4, 22)], str(starttime), "1000", "2000"]
    (root / "self" / "stat").write_text(f"4242 ({comm}) {' '.join(fields)}\n")
    (root / "stat").write_text(f"cpu  1 2 3 4\nintr 5\nbtime {btime}\nprocesses 77\n")
    return str(root)


# ---------------------------------------------------------------- the process start


def test_the_first_recorder_starts_at_the_process_start_and_charges_it_to_startup(
    fresh_process: None,
) -> None:
    before = time.time()
    rec, sink = build()
    after = time.time()
    proc_start = recorder_mod.process_start_time()
    assert proc_start is not None  # Linux
    assert rec.attempt_start == pytest.approx(proc_start, abs=1e-3)
    assert rec.attempt_start <= before  # the process began before this test did
    [start] = sink.of("attempt_start")
    [startup] = sink.startups()
    assert start["start"] == rec.attempt_start == startup["start"]
    assert sink.of("run")[0]["created_at"] == rec.attempt_start
    # the span ends when the recorder is ready: after its set-up, before anything it records
    assert startup["end"] == rec.ready_at and before <= rec.ready_at <= after
    assert [k for k, _ in sink.records] == ["run", "attempt_start", "span"]
    with rec.step(0):
        pass
    rec.close()
    assert sink.of("step")[0]["start"] >= startup["end"]


def test_process_start_is_read_from_proc(tmp_path: Path) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    proc = fake_proc(tmp_path, "python (worker) 3", starttime=12_345, btime=1_700_000_000)
    # a btime far from this machine's boot is taken as it is (no refinement from the clocks)
    assert recorder_mod.process_start_time(proc) == 1_700_000_000 + 12_345 / hz
    assert recorder_mod.default_attempt_start(2e9, proc) == 1_700_000_000 + 12_345 / hz


def test_the_real_proc_agrees_with_btime_to_the_second() -> None:
    btime = next(
        int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )  # fmt: skip
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    coarse = btime + ticks / os.sysconf("SC_CLK_TCK")
    start = recorder_mod.process_start_time()
    assert start is not None and coarse - 1.0 <= start <= coarse + 2.0 and start <= time.time()


@pytest.mark.parametrize("case", ["missing", "garbage", "no btime", "in the future", "before 2000"])
def test_without_a_usable_proc_the_start_is_when_the_hooks_were_imported(
    tmp_path: Path, case: str
) -> None:
    now = time.time()
    if case == "missing":
        proc = str(tmp_path / "nothing-here")
    elif case == "garbage":
        (tmp_path / "self").mkdir()
        (tmp_path / "self" / "stat").write_text("4242 (x) S 1 2\n")
        (tmp_path / "stat").write_text("btime 1700000000\n")
        proc = str(tmp_path)
    elif case == "no btime":
        proc = fake_proc(tmp_path, "x", 100, 1_700_000_000)
        (tmp_path / "stat").write_text("cpu 1 2 3\n")
    elif case == "in the future":
        proc = fake_proc(tmp_path, "x", 100, int(now) + 3600)
    else:
        proc = fake_proc(tmp_path, "x", 100, 1_000)
    imported = recorder_mod.hooks_imported_at()
    assert imported <= now
    assert recorder_mod.default_attempt_start(now, proc) == imported


def test_the_fallback_reaches_the_recorder_and_prefers_the_package_import_time(
    fresh_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_mod, "process_start_time", lambda proc="/proc": None)
    rec, sink = build()
    assert rec.attempt_start == trainer_hooks.IMPORTED_AT  # the package's own import time
    assert sink.startups()[0]["start"] == trainer_hooks.IMPORTED_AT
    assert trainer_hooks.IMPORTED_AT <= recorder_mod._IMPORTED_AT
    # without it (a package that does not record it), the recorder module's import time
    monkeypatch.delattr(trainer_hooks, "IMPORTED_AT")
    assert recorder_mod.hooks_imported_at() == recorder_mod._IMPORTED_AT


def test_heavy_imports_run_inside_the_startup_span(tmp_path: Path) -> None:
    """A fresh interpreter: importing the recorder imports no torch; building it imports
    torch._dynamo (compile callbacks) inside the startup span, even from attempt_start="now"."""
    script = tmp_path / "probe.py"
    script.write_text(
        """
import json, sys, time
import importlib.abc

seen = {}

class Clock(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "torch._dynamo") and name not in seen:
            seen[name] = time.time()
        return None

sys.meta_path.insert(0, Clock())
from trainer_hooks.recorder import Recorder
light = "torch" not in sys.modules

class Sink:
    records = []
    def emit(self, kind, fields):
        self.records.append((kind, dict(fields)))
    def close(self, timeout_s=0):
        pass

rec = Recorder(run_name="p", sink=Sink(), environment={}, heartbeat_s=0, attempt_start="now")
[span] = [f for k, f in Sink.records if k == "span"]
print(json.dumps({"light": light, "seen": seen, "span": [span["start"], span["end"]]}))
"""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    start, end = got["span"]
    assert got["light"] is True
    assert start <= got["seen"]["torch"] <= got["seen"]["torch._dynamo"] <= end


# ---------------------------------------------------------------- several recorders, overrides


def test_a_second_recorder_of_the_same_attempt_sends_no_second_startup(
    fresh_process: None,
) -> None:
    first, a = build(run_id="same-run")
    second, b = build(run_id="same-run", attempt_start="now")  # ignored: already started
    assert second.attempt_start == first.attempt_start
    assert b.of("attempt_start") == a.of("attempt_start")  # a harmless duplicate
    assert len(a.startups()) == 1 and b.startups() == []
    other_rank, c = build(run_id="same-run", rank=1)  # another attempt key: its own start
    assert other_rank.attempt_start > first.attempt_start and len(c.startups()) == 1


def test_later_recorders_of_a_process_start_when_they_are_built(fresh_process: None) -> None:
    first, _ = build(run_id="notebook-1")
    before = time.time()
    later, sink = build(run_id="notebook-2")
    assert first.attempt_start < before <= later.attempt_start <= later.ready_at
    [startup] = sink.startups()
    assert (startup["start"], startup["end"]) == (later.attempt_start, later.ready_at)


def test_a_forked_child_is_a_process_of_its_own(fresh_process: None) -> None:
    parent, _ = build(run_id="parent")
    before_fork = time.time()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's teardown
        try:
            built_at = time.time()
            child, sink = build(run_id="child")
            out = {
                "start": child.attempt_start,
                "proc": recorder_mod.process_start_time(),
                "built_at": built_at,
                "startups": len(sink.startups()),
            }
            os.write(write, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        got = json.loads(f.read())
    os.waitpid(pid, 0)
    # the child's own start (the fork, to the clock tick), not its construction's "now"
    assert got["startups"] == 1
    assert got["start"] == pytest.approx(got["proc"], abs=1e-3)
    assert parent.attempt_start < before_fork - 0.05 <= got["start"] < got["built_at"]


def test_attempt_start_now_and_an_explicit_time(fresh_process: None) -> None:
    before = time.time()
    now, sink = build(run_id="a", attempt_start="now")  # the first of the process, even so
    assert before <= now.attempt_start <= sink.startups()[0]["end"] <= time.time()
    at = before - 3600.0
    explicit, sink = build(run_id="b", attempt_start=at)
    assert explicit.attempt_start == at == sink.of("attempt_start")[0]["start"]
    assert sink.startups()[0]["start"] == at and sink.startups()[0]["end"] >= before


@pytest.mark.parametrize(
    ("value", "error"),
    [("soon", TypeError), (True, TypeError), (time.time() + 3600, ValueError), (5.0, ValueError)],
    ids=["a-string", "a-bool", "an-hour-ahead", "before-2000"],  # the same in every process
)
def test_an_impossible_attempt_start_is_refused(
    fresh_process: None, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="attempt_start"):
        build(attempt_start=value)


def test_startup_before_the_recorder_is_charged_to_startup_not_other(
    live_server: LiveServer, tmp_path: Path, fresh_process: None
) -> None:
    at = time.time() - 2.0  # as if the process had spent 2 s importing and building
    sink = SpoolSink(tmp_path, live_server.base)
    rec = Recorder(
        run_name="s", sink=sink, run_id="startup-1", environment={}, heartbeat_s=0, attempt_start=at
    )
    for i in range(3):
        with rec.step(i, tokens=8):
            time.sleep(0.02)
    assert rec.close().records_sent == 7
    g = httpx.get(f"{live_server.base}/api/v1/runs/startup-1/goodput").json()
    assert g["badput_s"]["startup"] >= 2.0
    assert g["other_s"] < 0.2  # nothing before the first step is left unexplained
    assert g["total_s"] == pytest.approx(rec.now() - at, abs=0.5)
