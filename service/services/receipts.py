"""A run's receipt (plan, policy, environment, observed backends, summary, what it lacks),
its routing series and its records as CSV."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from sqlalchemy.orm import Session, sessionmaker

from service.calc.receipts import (
    AttemptEndIn,
    RankSteps,
    SeamReceipt,
    csv_lines,
    is_fallback,
    missing_parts,
    observed_seams,
    recompile_count,
    reference_rank,
    summarize_steps,
)
from service.calc.step_stats import RECENT_STEPS
from service.schemas import (
    AttemptRead,
    ObservationRead,
    ObservedSeamRead,
    ReceiptGoodput,
    ReceiptRead,
    ReceiptSummary,
    ReceiptThroughput,
    RoutingHistogram,
    RoutingPoint,
)
from service.services import accounting
from service.services.runs import run_or_404, run_status
from service.store import queries
from service.store.db import session_scope
from service.store.models import Attempt, Run
from service.store.queries import ExportWhat
from service.store.rollups import common as rollup_common
from service.store.rollups import read as rollup_read
from service.store.rollups import series as rollup_series

__all__ = ["ExportWhat", "ReceiptCheck", "csv_chunks", "receipt", "receipt_check", "routing"]


def _seam_read(seam: SeamReceipt) -> ObservedSeamRead:
    return ObservedSeamRead(
        requested=seam.requested,
        observed=seam.observed,
        reason=seam.reason,
        fallback=seam.fallback,
        multiple=seam.multiple,
        observations=[
            ObservationRead(**o._asdict(), fallback=is_fallback(o.requested, o.observed, o.reason))
            for o in seam.observations
        ],
    )


def _ends(attempts: list[Attempt]) -> list[AttemptEndIn]:
    return [AttemptEndIn(a.attempt, a.rank, a.end, a.status, a.counters) for a in attempts]


def _summary(session: Session, run_id: str, recompiles: int) -> ReceiptSummary:
    """From the rollups: the same figures at any run length."""
    g = accounting.whole_run(session, run_id).goodput
    per_rank = {
        r: RankSteps(*sums) for r, sums in rollup_read.rank_step_sums(session, run_id).items()
    }
    ref = reference_rank(r for r, v in per_rank.items() if v.steps > 0)
    recent, final_loss = [], None
    if ref is not None:
        recent = rollup_read.newest_step_times(session, run_id, ref, RECENT_STEPS)
        newest = rollup_read.newest_attempt_steps(session, run_id, ref, 1)
        final_loss = newest[-1].loss if newest else None
    steps = summarize_steps(per_rank, recent, final_loss)
    return ReceiptSummary(
        goodput=ReceiptGoodput.model_validate(g, from_attributes=True),
        throughput=ReceiptThroughput(
            **steps._asdict(),
            peak_memory_bytes=queries.peak_memory_of(session, run_id),
            recompiles=recompiles,
        ),
    )


class ReceiptCheck(NamedTuple):
    """What keep/drop checks of a receipt before comparing: whether it is complete (and what
    it lacks), its parts, what each seam observed, and its reference rank."""

    run_id: str
    complete: bool
    missing: list[str]
    model_plan: dict[str, Any]
    runtime_policy: dict[str, Any]
    environment: dict[str, Any]
    observed: dict[str, str]  # seam -> the newest observed backend
    rank: int | None  # the reference rank of the step figures (receipt.summary.throughput)


class _Stored(NamedTuple):
    run: Run
    attempts: list[Attempt]
    observations: list[Any]
    seams: dict[str, SeamReceipt]
    missing: list[str]


def _stored(session: Session, run_id: str) -> _Stored:
    """The run, its attempts and observations, the seams they show, what the receipt lacks."""
    run = run_or_404(session, run_id)
    attempts = queries.attempts_of(session, [run_id])
    observations = queries.observations_of(session, run_id)
    seams = observed_seams(observations)
    missing = missing_parts(
        run.model_plan,
        run.runtime_policy,
        run.environment,
        seams.keys(),
        queries.count_steps(session, run_id),
        _ends(attempts),
    )
    return _Stored(run, attempts, observations, seams, missing)


def receipt_check(session: Session, run_id: str) -> ReceiptCheck:
    """The receipt's completeness and parts without its summary (whose figures read the
    newest 10,000 steps; a comparison reads its own): `receipt` without `summary`."""
    got = _stored(session, run_id)
    ranks = rollup_read.rank_step_sums(session, run_id)
    return ReceiptCheck(
        run_id=got.run.run_id,
        complete=not got.missing,
        missing=got.missing,
        model_plan=got.run.model_plan,
        runtime_policy=got.run.runtime_policy,
        environment=got.run.environment,
        observed={name: seam.observed for name, seam in got.seams.items()},
        rank=reference_rank(r for r, sums in ranks.items() if RankSteps(*sums).steps > 0),
    )


def receipt(session: Session, run_id: str) -> ReceiptRead:
    """The run's receipt: plan, policy, environment, observed backends, summary, and what
    it lacks to be complete."""
    run, attempts, observations, seams, missing = _stored(session, run_id)
    summary = _summary(session, run_id, recompile_count(observations, _ends(attempts)))
    return ReceiptRead(
        run_id=run.run_id,
        name=run.name,
        project=run.project,
        created_at=run.created_at,
        status=run_status(attempts),
        complete=not missing,
        missing=missing,
        model_plan=run.model_plan,
        runtime_policy=run.runtime_policy,
        environment=run.environment,
        observed={name: _seam_read(s) for name, s in seams.items()},
        summary=summary,
        attempts=[AttemptRead.model_validate(a, from_attributes=True) for a in attempts],
    )


_POINT_FIELDS = ("step", "attempt", *rollup_common.POINT_FIELDS)  # ROUTING_POINT less its layer
# `routing` writes points as plain dicts: their keys are RoutingPoint's fields, in order.
assert tuple(RoutingPoint.model_fields) == _POINT_FIELDS, "RoutingPoint and rollups disagree"


def routing(
    session: Session, run_id: str, layer: int | None, max_points: int, rank: int
) -> dict[str, Any]:
    """Routing figures per E layer over steps, with each layer's newest histogram, as the
    plain dicts and lists of a RoutingSeries (thousands of points for all layers, where a
    model per point costs more than reading them). Past `max_points` a layer is downsampled
    like the step series by max_vio; the layers share one step range and one set of buckets."""
    run_or_404(session, run_id)
    series = rollup_series.routing_series(session, run_id, rank, layer, max_points)
    hists = queries.newest_histograms(
        session, run_id, rank, {n: s.newest_attempt for n, s in series.items()}
    )
    layers = [
        {
            "layer": n,
            "total": s.total,
            "points": [dict(zip(_POINT_FIELDS, p[1:], strict=True)) for p in s.rows],
            "histogram": (
                RoutingHistogram(**hist._asdict()).model_dump()
                if (hist := hists.get(n)) is not None
                else None
            ),
        }
        for n, s in series.items()
    ]
    return {"run_id": run_id, "rank": rank, "layers": layers}


def csv_chunks(
    factory: sessionmaker[Session], run_id: str, what: ExportWhat, page_rows: int
) -> Iterator[str]:
    """The header, then one chunk per keyset page of at most `page_rows` rows; each page is
    read in a short transaction of its own, so a slow reader holds nothing open."""
    yield csv_lines([queries.export_header(what)])
    after = None
    while True:
        with session_scope(factory) as session:
            page = queries.export_page(session, run_id, what, after, page_rows)
        if page.rows:
            yield csv_lines(page.rows)
        if len(page.rows) < page_rows:
            return
        after = page.after
