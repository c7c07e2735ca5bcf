"""Keep/drop: a candidate against a baseline, each side one run or several replicates (runs
of one lane that differ only in their seed), or two cells of an ablation.

The sides are checked before any figure is compared:
- every receipt complete (else `incomplete_receipt`, what each run lacks);
- the replicates of a side in one lane: their receipts differ only in replicate-only fields
  (`calc.knobs.REPLICATE_ONLY`: seed, host, ...), else `replicates_differ`;
- the two sides differ only in the declared knobs' fields (`calc.knobs`), else
  `lane_mismatch`. Lanes are compared as they ran: a dispatch that asked for `auto` and ran
  grouped is the grouped lane.
Each a 409 (`Refused`) saying what would fix it; an unknown knob is a 422 (`Invalid`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from service.calc import compare as calc
from service.calc.knobs import REPLICATE_ONLY, UnknownKnob, covered_fields, lane_parts
from service.schemas import AxisRead, CompareRead, Pair, RatioRead
from service.services.errors import Invalid, NotFound, Refused
from service.services.fleet import FleetCache
from service.services.receipts import ReceiptCheck, receipt_check
from service.services.runs import statuses
from service.store import ablations as store
from service.store.rollups import read as rollup_read
from trainer_hooks.records import ID_PATTERN

# Receipt fields that say nothing about the lane: how the process was started.
INCIDENTAL = ("environment.argv0",)
MAX_SIDE_RUNS = 32
EVAL_METRIC = "eval_loss"


def parse_side(field: str, text: str) -> list[str]:
    """`a,b,c` -> its run ids (each a valid id, at most MAX_SIDE_RUNS, no repeats)."""
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise Invalid.field("query", field, "name at least one run id")
    if len(ids) > MAX_SIDE_RUNS:
        raise Invalid.field("query", field, f"at most {MAX_SIDE_RUNS} runs a side")
    bad = [i for i in ids if not re.match(ID_PATTERN, i)]
    if bad:
        raise Invalid.field("query", field, f"not a run id: {bad[0]!r} (must match {ID_PATTERN})")
    if len(set(ids)) != len(ids):
        raise Invalid.field("query", field, "a run is named twice")
    return ids


def knob_fields(knob: Sequence[str]) -> list[str]:
    """The fields the knobs cover; an unknown knob is a 422 listing the known ones."""
    try:
        return covered_fields(knob)
    except UnknownKnob as exc:
        raise Invalid.field("query", "knob", str(exc)) from None


def _figures(session: Session, fleet: FleetCache, got: ReceiptCheck) -> calc.RunFigures:
    """The newest COMPARE_STEPS steps of the last attempt of the receipt's reference rank, in
    step order (the statistics' cost grows with the steps; their answer barely does), the
    run's eval losses, and its whole-run figures (goodput, badput, memory, routing: the
    fleet cache's, reused while the run is unchanged)."""
    mine = rollup_read.newest_attempt_steps(session, got.run_id, got.rank or 0, calc.COMPARE_STEPS)
    whole = fleet.figures(session, [got.run_id])[got.run_id]
    return calc.RunFigures(
        run_id=got.run_id,
        step_times_s=[s.end - s.start for s in mine],
        tokens=[s.tokens for s in mine],
        steps=[s.step for s in mine],
        eval_loss=store.metric_values(session, got.run_id, EVAL_METRIC),
        final_loss=mine[-1].loss if mine else None,
        goodput_fraction=whole.goodput_fraction,
        badput_s=whole.badput_s,
        total_s=whole.total_s,
        peak_memory_bytes=whole.peak_memory_bytes,
        drop_rate=whole.drop_rate,
        max_vio=whole.max_vio,
        pair=_seed(got.runtime_policy),
    )


def _seed(policy: dict[str, Any]) -> Any:
    """The run's seed, its pair key (runs of the two sides with one seed are compared pair by
    pair; calc/compare.py, PAIRED); None when the run does not say."""
    seed = policy.get("seed") if isinstance(policy, dict) else None
    return seed if isinstance(seed, int | str) and not isinstance(seed, bool) else None


def lane(got: ReceiptCheck) -> dict[str, Any]:
    """The receipt's parts as the lane it ran in."""
    parts = {
        "model_plan": got.model_plan,
        "runtime_policy": got.runtime_policy,
        "environment": got.environment,
    }
    return lane_parts(parts, got.observed)


def _refuse_incomplete(receipts: dict[str, ReceiptCheck]) -> None:
    missing = {r.run_id: r.missing for r in receipts.values() if not r.complete}
    if missing:
        raise Refused(
            {
                "error": "incomplete_receipt",
                "message": "a keep/drop verdict needs complete receipts; each run listed lacks "
                "these keys (Recorder takes them as arguments; see README, 'Receipts')",
                "missing": missing,
            }
        )


def _refuse_mixed_replicates(side: str, got: list[ReceiptCheck]) -> None:
    first = lane(got[0])
    for other in got[1:]:
        diff = calc.lane_diff(first, lane(other), ignore_prefixes=INCIDENTAL + REPLICATE_ONLY)
        if diff:
            raise Refused(
                {
                    "error": "replicates_differ",
                    "message": f"the {side}'s runs are not replicates of one lane: runs "
                    f"{got[0].run_id} and {other.run_id} differ in {', '.join(diff)} (only "
                    f"{', '.join(REPLICATE_ONLY)} may differ); compare them as two sides",
                    "fields": list(diff),
                    "runs": [got[0].run_id, other.run_id],
                }
            )


def _axis(a: calc.Axis) -> AxisRead:
    return AxisRead(
        name=a.name,
        kind=a.kind,  # type: ignore[arg-type]
        value=a.value,
        low=a.low,
        high=a.high,
        baseline=a.baseline,
        candidate=a.candidate,
        better=a.better,  # type: ignore[arg-type]
        finding=a.finding,  # type: ignore[arg-type]
        reason=a.reason,
    )


def _ratio(r: calc.Ratio) -> RatioRead:
    return RatioRead(value=r.value, low=r.low, high=r.high)


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None


def compare_sets(
    session: Session,
    fleet: FleetCache,
    baseline: Sequence[str],
    candidate: Sequence[str],
    knob: Sequence[str],
    allow_lane_mismatch: bool = False,
    margin: float = 0.02,
    loss_tolerance: float = 0.01,
    asked: tuple[str, str] | None = None,
    ablation: str | None = None,
) -> CompareRead:
    """The verdict of candidate against baseline (run ids each; replicates where several),
    with every axis and its interval; refused as the module's docstring says."""
    fields = knob_fields(knob)
    overlap = sorted(set(baseline) & set(candidate))
    if overlap:
        raise Invalid.field("query", "candidate", f"run {overlap[0]} is on both sides")
    receipts = {r: receipt_check(session, r) for r in [*baseline, *candidate]}
    _refuse_incomplete(receipts)
    base = [receipts[r] for r in baseline]
    cand = [receipts[r] for r in candidate]
    _refuse_mixed_replicates("baseline", base)
    _refuse_mixed_replicates("candidate", cand)
    ignored = INCIDENTAL + REPLICATE_ONLY
    diff = calc.lane_diff(lane(base[0]), lane(cand[0]), ignore_prefixes=ignored)
    extra = calc.unexplained(diff, fields)
    if extra and not allow_lane_mismatch:
        raise Refused(
            {
                "error": "lane_mismatch",
                "message": "the sides differ beyond the declared knob(s): name the knob "
                "(knob=, see GET /api/v1/knobs) or pass allow_lane_mismatch=true",
                "fields": extra,
            }
        )
    b = [_figures(session, fleet, g) for g in base]
    c = [_figures(session, fleet, g) for g in cand]
    result = calc.compare(b, c, margin=margin, loss_tolerance=loss_tolerance)
    axes = {a.name: a for a in result.axes.values()}
    evals = axes.get("eval_loss")
    categories = sorted({k for f in [*b, *c] for k in f.badput_s})
    return CompareRead(
        baseline=asked[0] if asked else ",".join(baseline),
        candidate=asked[1] if asked else ",".join(candidate),
        baseline_runs=list(baseline),
        candidate_runs=list(candidate),
        ablation=ablation,
        verdict=result.verdict,  # type: ignore[arg-type]
        reasons=result.reasons,
        axes=[_axis(a) for a in result.axes.values()],
        run_noise=result.run_noise,
        step_time_ratio=_ratio(result.step_time_ratio),
        tokens_per_s_ratio=_ratio(result.tokens_per_s_ratio),
        runs=Pair(baseline=len(b), candidate=len(c)),
        steady_steps=Pair(baseline=result.steady_steps[0], candidate=result.steady_steps[1]),
        goodput_fraction=Pair(
            baseline=_mean([f.goodput_fraction for f in b]),
            candidate=_mean([f.goodput_fraction for f in c]),
        ),
        badput_s={
            k: Pair(
                baseline=_mean([f.badput_s.get(k) for f in b]),
                candidate=_mean([f.badput_s.get(k) for f in c]),
            )
            for k in categories
        },
        peak_memory_bytes=Pair(
            baseline=_max([f.peak_memory_bytes for f in b]),
            candidate=_max([f.peak_memory_bytes for f in c]),
        ),
        final_loss=Pair(
            baseline=_mean([f.final_loss for f in b]), candidate=_mean([f.final_loss for f in c])
        ),
        eval_loss=Pair(
            baseline=evals.baseline if evals else None,
            candidate=evals.candidate if evals else None,
        ),
        lane_diff={k: Pair(**v) for k, v in diff.items()},
        knobs=list(knob),
        knob_fields=fields,
    )


def _max(values: list[int | None]) -> int | None:
    got = [v for v in values if v is not None]
    return max(got) if got else None


def compare_cells(
    session: Session,
    fleet: FleetCache,
    ablation_id: str,
    baseline_cell: str,
    candidate_cell: str,
    knob: Sequence[str] = (),
    allow_lane_mismatch: bool = False,
    margin: float = 0.02,
    loss_tolerance: float = 0.01,
) -> CompareRead:
    """Two cells of an ablation: their completed runs as replicates, the ablation's knobs
    (those its runs' cells name, and `knob`) declared. A 404 for a cell with no run."""
    runs = store.ablation_runs(session, [ablation_id])
    if not runs:
        raise NotFound(f"ablation {ablation_id} not found (no run names it)")
    status = statuses(session, [x.run_id for x in runs])
    sides = []
    for cell in (baseline_cell, candidate_cell):
        mine = [r.run_id for r in runs if r.cell == cell]
        if not mine:
            cells = ", ".join(sorted({r.cell for r in runs}))
            raise NotFound(f"ablation {ablation_id} has no run in cell {cell!r} (cells: {cells})")
        done = [r for r in mine if status[r] == "completed"]
        if not done:
            raise Refused(
                {
                    "error": "incomplete_receipt",
                    "message": f"no run of cell {cell!r} has completed yet",
                    "missing": {r: ["attempt_end"] for r in mine},
                }
            )
        sides.append(done)
    declared = store.stored_ablation(session, ablation_id)
    knobs = list(declared["knobs"]) if declared else []
    for cell in (baseline_cell, candidate_cell):
        knobs += [k for k in _cell_knob_names(cell) if k not in knobs]
    knobs += [k for k in knob if k not in knobs]
    return compare_sets(
        session,
        fleet,
        sides[0],
        sides[1],
        knobs,
        allow_lane_mismatch=allow_lane_mismatch,
        margin=margin,
        loss_tolerance=loss_tolerance,
        asked=(baseline_cell, candidate_cell),
        ablation=ablation_id,
    )


def _cell_knob_names(cell: str) -> list[str]:
    """`dispatch=padded,compile=on` -> ["dispatch", "compile"]."""
    return [p.partition("=")[0].strip() for p in cell.split(",") if "=" in p]
