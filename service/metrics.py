"""Prometheus metrics at /metrics, in the text exposition format 0.0.4, written here.

Per run, for the newest `METRICS_RUNS` runs (labels run_id, run_name, project):
goodput_fraction, goodput_badput_seconds{category}, goodput_run_status{status} (1 for the
run's status: running, completed, failed or stalled), goodput_tokens_per_second (rank 0's last
`RECENT_STEPS` steps: their tokens over their step time) and goodput_routing_drop_rate (mean
over the layers of rank 0's newest routing step). A figure a run does not have yet is left out.

Service counters, kept in this process (they restart at zero): goodput_ingest_batches_total,
goodput_ingest_records_total{result="inserted"|"duplicate"} and goodput_ingest_rejected_total
(ingest requests refused for their content: 400, 409, 413, 415, 422). `IngestCounting` counts them
from the responses of POST /api/v1/ingest, so the route itself knows nothing of metrics.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Hashable, Iterable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import accounting
from service import repository as repo
from service.api import get_session, run_status
from service.models import Run
from service.security import route_path

METRICS_RUNS = 200
RECENT_STEPS = 20
INGEST_PATH = "/api/v1/ingest"
REFUSED_STATUSES = frozenset({400, 409, 413, 415, 422})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_RESULT_BODY_LIMIT = 4096

Labels = Mapping[str, str]
Sample = tuple[Labels, float]

router = APIRouter()


class IngestCounters:
    """Counters of the ingest route; safe to update from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0
        self.inserted = 0
        self.duplicates = 0
        self.rejected = 0

    def accepted(self, inserted: int, duplicates: int) -> None:
        with self._lock:
            self.batches += 1
            self.inserted += inserted
            self.duplicates += duplicates

    def refused(self) -> None:
        with self._lock:
            self.rejected += 1

    def snapshot(self) -> tuple[int, int, int, int]:
        with self._lock:
            return self.batches, self.inserted, self.duplicates, self.rejected


class IngestCounting:
    """Count POST /api/v1/ingest outcomes from the status and the (small) JSON result."""

    def __init__(self, app: ASGIApp, counters: IngestCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_ingest = scope["type"] == "http" and scope["method"] == "POST"
        if not is_ingest or route_path(scope) != INGEST_PATH:
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()

        async def watching(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(body) <= _RESULT_BODY_LIMIT:
                body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, watching)
        self._count(status, bytes(body))

    def _count(self, status: int, body: bytes) -> None:
        if status in REFUSED_STATUSES:
            self.counters.refused()
        elif status == 200:
            try:
                result = json.loads(body)
                self.counters.accepted(int(result["inserted"]), int(result["duplicates"]))
            except (ValueError, TypeError, KeyError):
                self.counters.accepted(0, 0)


class GoodputCache:
    """Each listed run's goodput, reused while its rows are unchanged: step, span and
    checkpoint rows are only ever inserted (so their counts move) and attempt rows carry their
    own updates. Holds only the runs of the last scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[Hashable, accounting.Accounted]] = {}

    def goodput(self, session: Session, run_ids: list[str]) -> dict[str, accounting.Accounted]:
        keys = _change_keys(session, run_ids)  # before the rows: a figure is never older
        with self._lock:
            items = dict(self._items)
        out: dict[str, accounting.Accounted] = {}
        for run_id in run_ids:
            hit = items.get(run_id)
            if hit is not None and hit[0] == keys[run_id]:
                out[run_id] = hit[1]
            else:
                out[run_id] = accounting.whole_run(session, run_id)
        with self._lock:
            self._items = {r: (keys[r], out[r]) for r in run_ids}
        return out


def _change_keys(session: Session, run_ids: list[str]) -> dict[str, Hashable]:
    """What a run's figures depend on: its row counts, its attempt rows and, since a run
    stalls with time alone, its status now."""
    attempts: dict[str, list[tuple[object, ...]]] = {r: [] for r in run_ids}
    rows: dict[str, list[Any]] = {r: [] for r in run_ids}
    for a in repo.attempts_of(session, run_ids):
        rows[a.run_id].append(a)
        attempts[a.run_id].append(
            (a.attempt, a.rank, a.start, a.end, a.status, a.last_seen, a.heartbeat_s)
        )
    counts = repo.goodput_row_counts(session, run_ids)
    return {r: (counts[r], tuple(attempts[r]), run_status(rows[r])) for r in run_ids}


def escape_label(value: str) -> str:
    """Label value escaping of the text format: backslash, double quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    pairs = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
    return f"{name}{{{pairs}}} {format_value(value)}"


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """One metric family: HELP, TYPE, then its samples, as lines."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    return lines + [_sample(name, labels, value) for labels, value in samples]


def _run_labels(run: Run) -> dict[str, str]:
    return {"run_id": run.run_id, "run_name": run.name, "project": run.project}


def _goodput_samples(
    session: Session, runs: list[Run], cache: GoodputCache
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    fractions: list[Sample] = []
    badput: list[Sample] = []
    statuses: list[Sample] = []
    accounted = cache.goodput(session, [r.run_id for r in runs])
    for run in runs:
        labels = _run_labels(run)
        acc = accounted[run.run_id]
        g = acc.goodput
        if g.goodput_fraction is not None:
            fractions.append((labels, g.goodput_fraction))
        badput += [({**labels, "category": c}, s) for c, s in g.badput_s.items()]
        now = acc.status()
        statuses += [({**labels, "status": s}, float(s == now)) for s in repo.RUN_STATUSES]
    return fractions, badput, statuses


def _rate_samples(session: Session, runs: list[Run]) -> tuple[list[Sample], list[Sample]]:
    ids = [r.run_id for r in runs]
    totals = repo.recent_step_totals(session, ids, last=RECENT_STEPS)
    drops = repo.latest_drop_rates(session, ids)
    rates: list[Sample] = [
        (_run_labels(r), totals[r.run_id][0] / totals[r.run_id][1])
        for r in runs
        if r.run_id in totals and totals[r.run_id][1] > 0
    ]
    drop_rates: list[Sample] = [
        (_run_labels(r), drops[r.run_id]) for r in runs if r.run_id in drops
    ]
    return rates, drop_rates


def _dropped_samples(session: Session, runs: list[Run]) -> list[Sample]:
    totals = {r.run_id: 0 for r in runs}
    for a in repo.attempts_of(session, list(totals)):
        totals[a.run_id] += a.dropped
    return [(_run_labels(r), float(totals[r.run_id])) for r in runs]


def _run_lines(session: Session, cache: GoodputCache) -> list[str]:
    runs, _ = repo.list_runs(session, limit=METRICS_RUNS)
    fractions, badput, statuses = _goodput_samples(session, runs, cache)
    rates, drops = _rate_samples(session, runs)
    return [
        *family(
            "goodput_records_dropped",
            "gauge",
            "Records the run's hooks dropped (never stored), as their heartbeats and attempt "
            "ends said.",
            _dropped_samples(session, runs),
        ),
        *family(
            "goodput_fraction", "gauge", "Goodput over total wall time (slowest rank).", fractions
        ),
        *family("goodput_badput_seconds", "gauge", "Badput of the run by category.", badput),
        *family(
            "goodput_run_status",
            "gauge",
            "1 for the run's status (running, completed, failed, stalled), 0 for the others.",
            statuses,
        ),
        *family(
            "goodput_tokens_per_second",
            "gauge",
            f"Tokens over step time of rank 0's last {RECENT_STEPS} steps.",
            rates,
        ),
        *family(
            "goodput_routing_drop_rate",
            "gauge",
            "Mean drop rate over the layers of rank 0's newest routing step.",
            drops,
        ),
    ]


def _counter_lines(counters: IngestCounters) -> list[str]:
    batches, inserted, duplicates, rejected = counters.snapshot()
    records: list[Sample] = [
        ({"result": "inserted"}, inserted),
        ({"result": "duplicate"}, duplicates),
    ]
    return [
        *family(
            "goodput_ingest_batches_total", "counter", "Ingest batches stored.", [({}, batches)]
        ),
        *family("goodput_ingest_records_total", "counter", "Ingested records by result.", records),
        *family(
            "goodput_ingest_rejected_total",
            "counter",
            "Ingest requests refused for their content (400, 409, 413, 415, 422).",
            [({}, rejected)],
        ),
    ]


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, session: Annotated[Session, Depends(get_session)]) -> Response:
    """Prometheus metrics of the newest runs and of this process's ingest."""
    state = request.app.state
    lines = _run_lines(session, state.goodput_cache) + _counter_lines(state.ingest_counters)
    return Response("\n".join(lines) + "\n", media_type=CONTENT_TYPE)
