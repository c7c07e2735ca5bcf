"""What the sink does with each answer of the service: retried with backoff (5xx, 408, 429, a
409 marked retriable, connection errors; Retry-After honoured, capped), moved to rejected/
loudly (400, 413, 415, 422: records that can never be valid), kept (anything else); and
`goodput spool replay --rejected`, which resends rejected/ after an upgrade of the service."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests import factories as f
from tests.conftest import LiveServer
from trainer_hooks.sink import (
    RETRY_AFTER_CAP_S,
    SpoolSink,
    classify,
    replay,
    replay_rejected,
    retry_after_s,
)
from trainer_hooks.spool import REJECTED_DIR, Spool, rejected_reason_path

Answer = tuple[int, dict[str, str], dict[str, Any]]


class Scripted:
    """An ingest endpoint on loopback that answers from a script, then 200 (counting every
    record as inserted); it keeps each request's time and records."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.requests: list[tuple[float, list[dict[str, Any]]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                records = json.loads(body)["records"]
                owner.requests.append((time.monotonic(), records))
                if owner.script:
                    status, headers, answer = owner.script.pop(0)
                else:
                    status, headers, answer = 200, {}, {"inserted": len(records), "duplicates": 0}
                data = json.dumps(answer).encode()
                self.send_response(status)
                for k, v in {"content-type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


def emit_run(sink: SpoolSink, run_id: str = "run-a", steps: int = 3) -> None:
    for rec in [f.run(run_id), *[f.step(i, run_id) for i in range(steps)]]:
        fields = {k: v for k, v in rec.items() if k != "kind"}
        sink.emit(rec["kind"], fields)


def rejected_files(spool: Path) -> list[Path]:
    return Spool(spool).rejected()


def test_each_answer_means_what_the_contract_says() -> None:
    def resp(code: int, headers: dict[str, str] | None = None, body: Any = None) -> Any:
        return httpx.Response(code, headers=headers, json=body if body is not None else {})

    assert classify(resp(200)) == "sent"
    for code in (400, 413, 415, 422):
        assert classify(resp(code)) == "rejected", code
    for code in (500, 502, 503, 504, 408, 429):
        assert classify(resp(code)) == "retry", code
    assert classify(resp(409, {"retry-after": "2"})) == "retry"
    assert classify(resp(409, body={"retriable": True})) == "retry"
    assert classify(resp(409, body={"detail": {"retriable": True, "msg": "busy"}})) == "retry"
    # a record contradicting a stored one of its key: permanent, kept in rejected/
    assert classify(resp(409, body={"detail": [{"type": "conflict"}], "retriable": False})) == (
        "rejected"
    )
    for code in (401, 403, 404, 405, 409):
        assert classify(resp(code, body={"detail": "no"})) == "held", code


def test_retry_after_is_read_as_seconds_or_a_date_and_capped() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s(" 0.5 ") == 0.5
    assert retry_after_s("-4") == 0.0
    assert retry_after_s("86400") == RETRY_AFTER_CAP_S
    assert retry_after_s("86400", cap=5.0) == 5.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 15.0 < (retry_after_s(soon) or 0.0) <= 20.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert retry_after_s(bad) is None, bad


@pytest.mark.parametrize(
    "answer",
    [
        (503, {"retry-after": "1"}, {"detail": "database unavailable, retry later"}),
        (500, {}, {"detail": "internal database error"}),
        (502, {}, {}),
        (429, {"retry-after": "1"}, {"detail": "slow down"}),
        (408, {}, {}),
        (409, {"retry-after": "1"}, {"detail": "a concurrent upgrade"}),
        (409, {}, {"detail": {"retriable": True}}),
    ],
    ids=["503", "500", "502", "429", "408", "409-retry-after", "409-retriable"],
)
def test_a_batch_the_service_cannot_take_now_is_sent_again(
    scripted: Scripted, tmp_path: Path, answer: Answer
) -> None:
    scripted.script = [answer]
    sink = SpoolSink(tmp_path, scripted.base, max_backoff_s=0.1, flush_interval_s=0.02)
    emit_run(sink)
    stats = sink.close(timeout_s=10)
    assert stats.records_sent == 4 and stats.records_rejected == 0 and stats.pending_bytes == 0
    assert stats.send_failures == 1 and str(answer[0]) in (stats.last_error or "")
    (t_refused, first), (t_sent, second) = scripted.requests
    assert first == second  # the same batch, whole
    if "retry-after" in answer[1]:  # honoured, though max_backoff_s is 0.1 s
        assert t_sent - t_refused >= 0.95
    assert not rejected_files(tmp_path)


def test_retry_after_is_capped(scripted: Scripted, tmp_path: Path) -> None:
    scripted.script = [(503, {"retry-after": "3600"}, {})]
    sink = SpoolSink(tmp_path, scripted.base, max_backoff_s=0.1, max_retry_after_s=0.5)
    emit_run(sink)
    started = time.monotonic()
    assert sink.close(timeout_s=10).records_sent == 4
    assert time.monotonic() - started < 5
    assert scripted.requests[1][0] - scripted.requests[0][0] >= 0.45


@pytest.mark.parametrize("code", [400, 413, 415, 422])
def test_records_that_can_never_be_valid_go_to_rejected_loudly(
    scripted: Scripted, tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    message = {"detail": [{"field": "records.1.step.loss", "msg": "not a number"}]}
    scripted.script = [(code, {}, message)]
    sink = SpoolSink(tmp_path, scripted.base, max_backoff_s=0.1)
    with caplog.at_level(logging.WARNING, logger="trainer_hooks.sink"):
        emit_run(sink)
        time.sleep(0.5)  # the first batch is refused ...
        emit_run(sink, "run-b", steps=1)  # ... and the sink goes on with the next
        stats = sink.close(timeout_s=10)
    (kept,) = rejected_files(tmp_path)
    assert stats.records_rejected == 4 and stats.rejected_files == [str(kept)]
    assert stats.records_sent == 2 and stats.pending_bytes == 0
    assert [r["run_id"] for r in json.loads(kept.read_bytes())["records"]] == ["run-a"] * 4
    assert "records.1.step.loss" in rejected_reason_path(kept).read_text()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    said = warning.getMessage()
    assert "refused 4 records" in said and str(kept) in said and f"HTTP {code}" in said
    assert "records.1.step.loss" in said and "--rejected" in said


def test_a_wrong_token_keeps_the_records_and_warns_once(
    scripted: Scripted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.script = [(403, {}, {"detail": "invalid token"})] * 3
    sink = SpoolSink(tmp_path, scripted.base, max_backoff_s=0.1)
    with caplog.at_level(logging.WARNING, logger="trainer_hooks.sink"):
        emit_run(sink)
        stats = sink.close(timeout_s=10)
    assert stats.records_sent == 4 and stats.records_rejected == 0
    assert not rejected_files(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0]


def test_replay_retries_a_busy_service_and_stops_at_a_refusal_waiting_cannot_cure(
    scripted: Scripted, tmp_path: Path
) -> None:
    sink = SpoolSink(tmp_path, None)
    emit_run(sink)
    sink.close()
    scripted.script = [(503, {"retry-after": "0"}, {}), (429, {}, {})]
    assert replay(tmp_path, scripted.base)["records_sent"] == 4
    assert len(scripted.requests) == 3
    scripted.script = [(401, {}, {"detail": "token needed"})]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="401"):
        replay(tmp_path, scripted.base, from_start=True)
    assert time.monotonic() - started < 0.5  # no waiting for what waiting cannot cure
    scripted.script = [(503, {}, {})] * 3
    with pytest.raises(ConnectionError, match="503"):
        replay(tmp_path, scripted.base, from_start=True, retries=2)


def test_replay_rejected_resends_and_removes_what_the_service_takes(
    scripted: Scripted, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scripted.script = [(422, {}, {"detail": "old server"})] * 2
    sink = SpoolSink(tmp_path / "spools" / "r0", scripted.base, max_backoff_s=0.1)
    emit_run(sink)
    time.sleep(0.5)
    emit_run(sink, "run-b", steps=1)
    sink.close(timeout_s=10)
    kept = rejected_files(tmp_path / "spools" / "r0")
    assert len(kept) == 2
    # The service is upgraded, but still refuses the second batch.
    scripted.script = [(200, {}, {"inserted": 4, "duplicates": 0}), (422, {}, {"detail": "no"})]
    with caplog.at_level(logging.WARNING, logger="trainer_hooks.sink"):
        result = replay_rejected(tmp_path / "spools", scripted.base)
    assert result == {
        "spools": 1,
        "batches_sent": 1,
        "inserted": 4,
        "duplicates": 0,
        "still_rejected": 1,
    }
    assert rejected_files(tmp_path / "spools" / "r0") == kept[1:]
    assert not rejected_reason_path(kept[0]).exists()
    assert rejected_reason_path(kept[1]).read_text() == '{"detail": "no"}'
    assert any(str(kept[1]) in r.getMessage() for r in caplog.records)
    assert replay_rejected(tmp_path / "spools", scripted.base)["batches_sent"] == 1
    assert not rejected_files(tmp_path / "spools" / "r0")


def test_cli_replay_rejected_against_a_real_service(
    live_server: LiveServer, tmp_path: Path
) -> None:
    from service.cli import app

    spool = Spool(tmp_path / "run-a")
    batch = {"records": [f.run(), f.attempt_start(), f.step(0), f.step(1)]}
    body = json.dumps(batch).encode()
    kept = spool.reject(body, '{"detail": "an older service refused it"}')
    assert kept.parent.name == REJECTED_DIR
    runner = CliRunner()
    args = ["spool", "replay", str(tmp_path), "--server", live_server.base]
    both = runner.invoke(app, [*args, "--rejected", "--all"])
    assert both.exit_code == 2
    out = runner.invoke(app, [*args, "--rejected"])
    assert out.exit_code == 0, out.output
    assert "batches_sent=1" in out.output and "inserted=4" in out.output
    assert not spool.rejected() and not kept.exists()
    got = httpx.get(f"{live_server.base}/api/v1/runs/run-a").json()
    assert got["num_steps"] == 2
    again = runner.invoke(app, [*args, "--rejected"])
    assert again.exit_code == 0 and "batches_sent=0" in again.output


def test_rejected_batches_of_an_older_sink_are_found_too(tmp_path: Path) -> None:
    """Earlier versions named them `<stamp>.json` and `<stamp>.reason.txt`."""
    folder = tmp_path / REJECTED_DIR
    folder.mkdir()
    (folder / "1000000000.123456.json").write_bytes(b'{"records": []}')
    (folder / "1000000000.123456.reason.txt").write_text("old")
    spool = Spool(tmp_path)
    newer = spool.reject(b'{"records": []}', "new")
    (older, found) = spool.rejected()
    assert found == newer and rejected_reason_path(older).read_text() == "old"
    spool.forget_rejected(older)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [newer.name, rejected_reason_path(newer).name]
    )
