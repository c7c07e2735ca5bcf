"""The Prometheus metrics of /metrics, written by `prometheus_client` (text format 0.0.4) from a
registry of the app's own (`ServiceMetrics`), never the process-wide one.

Per run, for the newest `METRICS_RUNS` runs (labels run_id, run_name, project), read from the
database at each scrape by `RunCollector`: goodput_records_dropped, goodput_fraction,
goodput_badput_seconds{category}, goodput_run_status{status} (1 for the run's status: running,
completed, failed or stalled), goodput_tokens_per_second (rank 0's last `RECENT_STEPS` steps:
their tokens over their step time) and goodput_routing_drop_rate (mean over the layers of rank
0's newest routing step). A figure a run does not have yet is left out.

Service counters, kept in this process (they restart at zero): goodput_ingest_batches_total,
goodput_ingest_records_total{result="inserted"|"duplicate"} and goodput_ingest_rejected_total
(ingest requests refused for their content: 400, 409, 413, 415, 422). The ingest route counts
what it stores (`IngestMetrics.accepted`); the API's `IngestRefusals` middleware counts refusals
by the status of the answer alone, wherever it was made (the body limit's 413, a 415, a 422 of
validation, a 409). The route is api/routes/metrics.py.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker

from service.services import accounting
from service.services.runs import run_status
from service.store import queries
from service.store.db import session_scope
from service.store.models import Run

METRICS_RUNS = 200
RECENT_STEPS = 20
RUN_LABELS = ("run_id", "run_name", "project")

# No `<counter>_created` series: one more family per counter that dashboards do not use.
disable_created_metrics()


class IngestMetrics:
    """The ingest counters (prometheus_client counters are safe to update from threads)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            "goodput_ingest_batches_total", "Ingest batches stored.", registry=registry
        )
        self.records = Counter(
            "goodput_ingest_records_total",
            "Ingested records by result.",
            ["result"],
            registry=registry,
        )
        self.rejected = Counter(
            "goodput_ingest_rejected_total",
            "Ingest requests refused for their content (400, 409, 413, 415, 422).",
            registry=registry,
        )
        self._inserted = self.records.labels(result="inserted")
        self._duplicates = self.records.labels(result="duplicate")

    def accepted(self, inserted: int, duplicates: int) -> None:
        """A batch stored (committed): called by the ingest route."""
        self.batches.inc()
        self._inserted.inc(inserted)
        self._duplicates.inc(duplicates)


class ServiceMetrics:
    """What /metrics answers: the ingest counters and the per-run gauges, in a registry of
    this app's own (an app built twice in one process counts twice, apart)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.goodput_cache = GoodputCache()
        self.registry.register(RunCollector(factory, self.goodput_cache))
        self.ingest = IngestMetrics(self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
    for a in queries.attempts_of(session, run_ids):
        rows[a.run_id].append(a)
        attempts[a.run_id].append(
            (a.attempt, a.rank, a.start, a.end, a.status, a.last_seen, a.heartbeat_s)
        )
    counts = queries.goodput_row_counts(session, run_ids)
    return {r: (counts[r], tuple(attempts[r]), run_status(rows[r])) for r in run_ids}


class RunCollector:
    """The per-run gauges, read from the database at each scrape (one session per scrape;
    each run's goodput reused from `GoodputCache` while its rows are unchanged)."""

    def __init__(self, factory: sessionmaker[Session], cache: GoodputCache) -> None:
        self._factory = factory
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        with session_scope(self._factory) as session:
            families = _run_families(session, self._cache)
        yield from families


def _gauge(name: str, help_text: str, *extra: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=[*RUN_LABELS, *extra])


def _run_labels(run: Run) -> list[str]:
    return [run.run_id, run.name, run.project]


def _run_families(session: Session, cache: GoodputCache) -> list[Metric]:
    runs, _ = queries.list_runs(session, limit=METRICS_RUNS)
    ids = [r.run_id for r in runs]
    dropped = _gauge(
        "goodput_records_dropped",
        "Records the run's hooks dropped (never stored), as their heartbeats and attempt ends "
        "said.",
    )
    fraction = _gauge("goodput_fraction", "Goodput over total wall time (slowest rank).")
    badput = _gauge("goodput_badput_seconds", "Badput of the run by category.", "category")
    status = _gauge(
        "goodput_run_status",
        "1 for the run's status (running, completed, failed, stalled), 0 for the others.",
        "status",
    )
    rate = _gauge(
        "goodput_tokens_per_second",
        f"Tokens over step time of rank 0's last {RECENT_STEPS} steps.",
    )
    drop_rate = _gauge(
        "goodput_routing_drop_rate",
        "Mean drop rate over the layers of rank 0's newest routing step.",
    )

    dropped_totals = dict.fromkeys(ids, 0)
    for a in queries.attempts_of(session, ids):
        dropped_totals[a.run_id] += a.dropped
    accounted = cache.goodput(session, ids)
    step_totals = queries.recent_step_totals(session, ids, last=RECENT_STEPS)
    drops = queries.latest_drop_rates(session, ids)
    for run in runs:
        labels = _run_labels(run)
        dropped.add_metric(labels, dropped_totals[run.run_id])
        acc = accounted[run.run_id]
        g = acc.goodput
        if g.goodput_fraction is not None:
            fraction.add_metric(labels, g.goodput_fraction)
        for category, seconds in g.badput_s.items():
            badput.add_metric([*labels, category], seconds)
        now = acc.status()
        for s in queries.RUN_STATUSES:
            status.add_metric([*labels, s], float(s == now))
        tokens, seconds = step_totals.get(run.run_id, (0, 0))
        if seconds > 0:
            rate.add_metric(labels, tokens / seconds)
        if run.run_id in drops:
            drop_rate.add_metric(labels, drops[run.run_id])
    return [dropped, fraction, badput, status, rate, drop_rate]
