"""Reads and writes behind ablations, keep/drop comparisons and the feature ledger: declared
ablations, the runs that name one, and a run's metric values (eval_loss). Callers pass a
Session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.store.models import Ablation, Metric, Run
from service.store.rollups.common import core_rows

ABLATION_FIELDS = (
    "name",
    "project",
    "created_at",
    "knobs",
    "cells",
    "baseline_cell",
    "repeats",
    "settings",
)


def stored_ablation(session: Session, ablation_id: str) -> dict[str, Any] | None:
    row = session.get(Ablation, ablation_id)
    if row is None:
        return None
    return {"ablation_id": row.ablation_id, **{f: getattr(row, f) for f in ABLATION_FIELDS}}


def add_ablation(session: Session, values: dict[str, Any]) -> None:
    """Store a declared ablation (the caller checked that its id is free); flushed, so that
    a concurrent declaration of the same id fails here, inside the caller's unit of work."""
    session.add(Ablation(**values))
    session.flush()


def declared_ablations(session: Session, project: str | None) -> list[dict[str, Any]]:
    stmt = select(Ablation).order_by(Ablation.created_at.desc(), Ablation.ablation_id)
    if project is not None:
        stmt = stmt.where(Ablation.project == project)
    return [
        {"ablation_id": a.ablation_id, **{f: getattr(a, f) for f in ABLATION_FIELDS}}
        for a in session.scalars(stmt)
    ]


class AblationRun(NamedTuple):
    run_id: str
    name: str
    project: str
    ablation_id: str
    cell: str
    created_at: float
    seed: Any
    model_plan: dict[str, Any]
    runtime_policy: dict[str, Any]
    environment: dict[str, Any]


def ablation_runs(
    session: Session, ablation_ids: Sequence[str] | None = None, project: str | None = None
) -> list[AblationRun]:
    """The runs that name an ablation (these ids, or any), oldest first."""
    stmt = (
        select(
            Run.run_id,
            Run.name,
            Run.project,
            Run.ablation_id,
            Run.ablation_cell,
            Run.created_at,
            Run.model_plan,
            Run.runtime_policy,
            Run.environment,
        )
        .where(Run.ablation_id.is_not(None))
        .order_by(Run.created_at, Run.run_id)
    )
    if ablation_ids is not None:
        stmt = stmt.where(Run.ablation_id.in_(list(ablation_ids)))
    if project is not None:
        stmt = stmt.where(Run.project == project)
    out = []
    for run_id, name, proj, abl, cell, created, plan, policy, env in core_rows(session, stmt):
        seed = policy.get("seed") if isinstance(policy, dict) else None
        out.append(AblationRun(run_id, name, proj, abl, cell, created, seed, plan, policy, env))
    return out


def metric_values(session: Session, run_id: str, name: str) -> dict[int, float]:
    """A run's values of one metric by step, from its lowest rank that sent any; a step
    measured again by a later attempt (after a restart) keeps the newest attempt's value."""
    rank = session.scalar(
        select(func.min(Metric.rank)).where(Metric.run_id == run_id, Metric.name == name)
    )
    if rank is None:
        return {}
    stmt = (
        select(Metric.step, Metric.value)
        .where(Metric.run_id == run_id, Metric.name == name, Metric.rank == rank)
        .order_by(Metric.attempt)
    )
    return {int(step): float(value) for step, value in core_rows(session, stmt)}


def newest_environments(session: Session, project: str | None) -> dict[str, Any] | None:
    """The environment of the newest declared run (of the project)."""
    stmt = select(Run.environment).where(Run.declared.is_(True))
    if project is not None:
        stmt = stmt.where(Run.project == project)
    env = session.scalar(stmt.order_by(Run.created_at.desc(), Run.run_id.desc()).limit(1))
    return env if isinstance(env, dict) else None
