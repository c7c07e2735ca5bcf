"""What the performance page reads besides the step series (services/runs.py): every rank's
step time and peak memory on a grid of buckets (step numbers or wall time), bounded at any
run length, and the run's recompiles with their reasons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from service.services.runs import run_or_404
from service.store import performance as reads
from service.store.rollups.common import COARSE, FINE

Axis = Literal["step", "time"]
COLUMNS = 240  # buckets across the run, at most (one more on the time axis' last edge)
MAX_RANKS = 128  # ranks on the grid, at most: the lowest ones
RAW_STEPS = 30_000  # up to this many steps (all ranks) the grid reads the steps themselves
MAX_BLOCK_ROWS = 200_000  # beyond this many fine blocks, the coarse ones
RECOMPILES_SHOWN = 200


@dataclass(frozen=True)
class GridPlan:
    origin: float  # the time axis' zero (the first step's start); 0 on the step axis
    width: float  # bucket width: step numbers (a multiple of `level`) or seconds
    level: int  # 1: read the steps; else the block level read


def grid_plan(
    spans: list[reads.RankSpan], axis: Axis, columns: int = COLUMNS, raw_steps: int | None = None
) -> GridPlan:
    """Buckets so that the run spans at most `columns` of them, read from the cheapest source
    that is exact (whole blocks per bucket on the step axis); the steps themselves up to
    `raw_steps` (default RAW_STEPS) of them."""
    total = sum(s.steps for s in spans)
    raw_steps = RAW_STEPS if raw_steps is None else raw_steps
    level = 1 if total <= raw_steps else FINE if total / FINE <= MAX_BLOCK_ROWS else COARSE
    if axis == "step":
        top = max((s.step_bound for s in spans), default=0)
        width = max(1, -(-(top + 1) // columns))
        if level > 1:
            width = -(-width // level) * level
        return GridPlan(0.0, float(width), level)
    origin = min((s.first_start for s in spans), default=0.0)
    extent = max((s.last_end for s in spans), default=origin) - origin
    # no narrower than a rank's mean step period: a bucket that no step starts in is a gap
    period = extent / max((s.steps for s in spans), default=1)
    return GridPlan(origin, max(extent / columns, period, 1e-6), level)


@dataclass
class StepGrid:
    axis: Axis
    plan: GridPlan
    ranks: list[int]  # the ranks on the grid
    ranks_total: int
    cells: list[reads.StepBucket]

    def plain(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "origin": self.plan.origin,
            "width": self.plan.width,
            "ranks": self.ranks,
            "ranks_total": self.ranks_total,
            "cells": [c._asdict() for c in self.cells],
        }


def step_grid(session: Session, run_id: str, axis: Axis, columns: int = COLUMNS) -> StepGrid:
    """Each rank's steps per attempt and bucket: count, summed step time, peak memory."""
    run_or_404(session, run_id)
    spans = reads.rank_spans(session, run_id)
    ranks = [s.rank for s in spans]
    shown = ranks[:MAX_RANKS]
    mine = [s for s in spans if s.rank in shown]
    plan = grid_plan(mine, axis, columns)
    cells = (
        reads.step_buckets(
            session,
            run_id,
            axis,
            plan.origin,
            plan.width,
            plan.level,
            shown if len(shown) < len(ranks) else None,
        )
        if mine
        else []
    )
    return StepGrid(axis, plan, shown, len(ranks), cells)


@dataclass
class Recompiles:
    observed: int  # recompile observations stored
    counted: int  # per attempt rank the larger of its observations and its end's counter
    rows: list[reads.RecompileRow]  # the first RECOMPILES_SHOWN, by time

    def plain(self) -> dict[str, Any]:
        return {
            "observed": self.observed,
            "counted": self.counted,
            "rows": [r._asdict() for r in self.rows],
        }


def recompiles(session: Session, run_id: str, limit: int = RECOMPILES_SHOWN) -> Recompiles:
    """The run's recompiles (the hooks observe each at seam `recompile`, with the guard that
    failed as its reason), as many as `limit`, and the count the receipt reports."""
    run_or_404(session, run_id)
    observed, rows = reads.recompiles(session, run_id, limit)
    counts = reads.recompile_counts(session, run_id)
    return Recompiles(observed, sum(max(seen, ended) for seen, ended in counts.values()), rows)


def peak_note(environment: dict[str, Any]) -> str | None:
    """Why MFU is absent, or None when the device's peak is known."""
    peak = environment.get("peak_flops_per_s")
    if isinstance(peak, int | float) and not isinstance(peak, bool) and peak > 0:
        return None
    device = environment.get("device") or "unknown"
    return (
        f"no MFU: the device's peak FLOP/s is not known (device {device}; the hooks record "
        "environment.peak_flops_per_s only for devices in their peak table)"
    )
