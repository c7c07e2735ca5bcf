"""Reads behind the runs list and the trends (services/fleet.py): the receipt parts of many
runs at once, the choices of the filters, the routing sums of a run per coarse block, and
a rank's newest steps with their FLOPs. Callers pass a Session; nothing here writes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.models import RoutingBlock, RoutingRow, Run, RunTag, Step, StepBlock
from service.store.queries import plan_pattern, policy_lane
from service.store.rollups.common import COARSE, attempts_with, core_rows


def any_run(session: Session) -> bool:
    """Whether the service holds any run at all."""
    return session.scalar(select(Run.run_id).limit(1)) is not None


class RunParts(NamedTuple):
    pattern: str | None  # model_plan.pattern
    lane: str | None  # runtime_policy.dispatch_requested
    environment: dict[str, Any]


def run_parts(session: Session, run_ids: Sequence[str]) -> dict[str, RunParts]:
    """Per run: its plan's pattern, its requested dispatch and its environment."""
    if not run_ids:
        return {}
    stmt = select(Run.run_id, plan_pattern(session), policy_lane(session), Run.environment).where(
        Run.run_id.in_(run_ids)
    )
    out = {}
    for run_id, pattern, lane, env in core_rows(session, stmt):
        out[run_id] = RunParts(
            pattern if isinstance(pattern, str) else None,
            lane if isinstance(lane, str) else None,
            env if isinstance(env, dict) else {},
        )
    return out


class Choices(NamedTuple):
    """The values the filters can take, for the forms' suggestions."""

    projects: list[str]
    patterns: list[str]
    lanes: list[str]
    tags: list[str]


def choices(session: Session, limit: int = 500) -> Choices:
    """Distinct projects, patterns, lanes and tags of the stored runs (at most `limit` each)."""

    def distinct(column: Any) -> list[str]:
        stmt = select(column).where(column.is_not(None)).distinct().order_by(column).limit(limit)
        return [v for v in session.scalars(stmt) if isinstance(v, str)]

    return Choices(
        projects=distinct(Run.project),
        patterns=distinct(plan_pattern(session)),
        lanes=distinct(policy_lane(session)),
        tags=distinct(RunTag.tag),
    )


def routing_ranks(session: Session, run_id: str) -> list[int]:
    """The ranks of the run that sent routing records, ascending."""
    stmt = (
        select(RoutingBlock.rank)
        .where(RoutingBlock.run_id == run_id, RoutingBlock.level == COARSE)
        .group_by(RoutingBlock.rank)
    )
    return sorted(session.scalars(stmt).all())


def routing_counts(session: Session, run_ids: Sequence[str]) -> dict[str, int]:
    """Per run: how many routing records it stored (every rank), from the routing rollup."""
    if not run_ids:
        return {}
    b = RoutingBlock
    stmt = (
        select(b.run_id, func.sum(b.n))
        .where(b.run_id.in_(run_ids), b.level == COARSE)
        .group_by(b.run_id)
    )
    return {run_id: int(n) for run_id, n in core_rows(session, stmt)}


def routing_block_counts(session: Session, run_id: str, rank: int) -> dict[int, dict[int, int]]:
    """attempt -> coarse block -> how many routing records (every layer) the rank stored
    there, from the routing rollup. Routing rows are only ever inserted, so a block whose
    count is unchanged holds the same rows."""
    b = RoutingBlock
    stmt = (
        select(b.attempt, b.block, func.sum(b.n))
        .where(b.run_id == run_id, b.rank == rank, b.level == COARSE)
        .group_by(b.attempt, b.block)
    )
    out: dict[int, dict[int, int]] = {}
    for attempt, blk, n in core_rows(session, stmt):
        out.setdefault(attempt, {})[blk] = int(n)
    return out


class RoutingSums(NamedTuple):
    """Sums over routing records: dropped and routed token-choices, MaxVio and how many
    records have one."""

    records: int
    dropped: float  # sum of drop_rate * num_tokens * top_k: the dropped assignments
    assignments: int  # sum of num_tokens * top_k
    max_vio_sum: float
    max_vio_n: int

    def plus(self, o: RoutingSums) -> RoutingSums:
        return RoutingSums(
            self.records + o.records,
            self.dropped + o.dropped,
            self.assignments + o.assignments,
            self.max_vio_sum + o.max_vio_sum,
            self.max_vio_n + o.max_vio_n,
        )


NO_ROUTING = RoutingSums(0, 0.0, 0, 0.0, 0)


def routing_sums(
    session: Session, run_id: str, rank: int, attempt: int, first_block: int, last_block: int
) -> RoutingSums:
    """Sums of the rank's routing records of one attempt in coarse blocks [first_block,
    last_block]: one range of the routing table's key, summed without grouping (a GROUP BY
    would sort every row). A record's dropped assignments are its stored drop rate times
    its assignments (num_tokens * top_k), which is how ingest derived the rate
    (calc/routing_stats.py)."""
    r = RoutingRow
    assignments = r.num_tokens * r.top_k
    stmt = select(
        func.count(),
        func.coalesce(func.sum(r.drop_rate * assignments), 0.0),
        func.coalesce(func.sum(assignments), 0),
        func.coalesce(func.sum(r.max_vio), 0.0),
        func.count(r.max_vio),
    ).where(
        r.run_id == run_id,
        r.attempt == attempt,
        r.rank == rank,
        r.step.between(first_block * COARSE, (last_block + 1) * COARSE - 1),
    )
    records, dropped, choices, vio_sum, vio_n = core_rows(session, stmt).one()
    return RoutingSums(int(records), float(dropped), int(choices), float(vio_sum), int(vio_n))


class StepWork(NamedTuple):
    seconds: float  # end - start
    flops: int | None


def newest_step_work(session: Session, run_id: str, rank: int, limit: int) -> list[StepWork]:
    """Step time and FLOPs of the rank's newest `limit` steps (newest attempt first, then
    highest step): one index range per attempt."""
    out: list[StepWork] = []
    where = [StepBlock.run_id == run_id, StepBlock.rank == rank]
    for attempt in reversed(attempts_with(session, StepBlock, where)):
        if len(out) >= limit:
            break
        stmt = (
            select(Step.end - Step.start, Step.flops)
            .where(Step.run_id == run_id, Step.attempt == attempt, Step.rank == rank)
            .order_by(Step.step.desc())
            .limit(limit - len(out))
        )
        out += [StepWork(float(s), f) for s, f in core_rows(session, stmt)]
    return out
