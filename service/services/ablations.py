"""Ablations: a knob grid run as replicated cells, each cell judged against the baseline
cell; and the feature ledger, every verdict of every knob value ever ablated with where it
now stands.

An ablation is declared (`POST /api/v1/ablations`: its knobs, cells and baseline cell) and
its runs name it (`ablation_id`, `ablation_cell` on the run record). Runs may also name an
ablation nobody declared (a loop of one's own): its cells are then the cells its runs name,
the knob values read from the cell names (`knob=value,knob=value`) and the baseline the
cell of its oldest run. A cell is compared once both it and the baseline cell have ended
runs (completed ones; a failed run has no verdict to give)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.calc.knobs import UnknownKnob, covered_fields
from service.schemas import (
    AblationCellRead,
    AblationIn,
    AblationList,
    AblationRead,
    AblationRunRead,
    AblationSummary,
    CompareRead,
    LedgerEntry,
    LedgerRead,
    LedgerVerdict,
)
from service.services.compare import compare_sets
from service.services.errors import Conflict, Invalid, NotFound, Refused
from service.services.fleet import FleetCache
from service.services.runs import statuses
from service.store import ablations as store

ENDED = ("completed", "failed")
ENV_KEYS = ("torch", "cuda", "device", "git_sha")  # what a standing rests on
REVIEW_KEYS = ("torch", "cuda", "device")  # a change of any: the standing needs re-review
LANE_KEYS = (
    ("model_plan", "pattern"),
    ("runtime_policy", "world_size"),
    ("runtime_policy", "dtype"),
)
STANDING = {
    "keep": "default-on win",
    "tax": "measured tax",
    "drop": "dropped",
    "inconclusive": "unproven",
}


# -- declaring --


def _check(body: AblationIn) -> None:
    errors = []
    try:
        covered_fields(body.knobs)
    except UnknownKnob as exc:
        errors.append({"loc": ["body", "knobs"], "msg": str(exc), "type": "value_error"})
    if body.baseline_cell not in body.cells:
        errors.append(
            {
                "loc": ["body", "baseline_cell"],
                "msg": f"{body.baseline_cell!r} is not one of the cells ({', '.join(body.cells)})",
                "type": "value_error",
            }
        )
    for cell, values in body.cells.items():
        stray = sorted(set(values) - set(body.knobs))
        if stray:
            errors.append(
                {
                    "loc": ["body", "cells", cell],
                    "msg": f"sets {', '.join(stray)}, not among the knobs",
                    "type": "value_error",
                }
            )
    if errors:
        raise Invalid(errors)


def declare(session: Session, fleet: FleetCache, body: AblationIn) -> AblationRead:
    """Store the ablation; the same declaration again is harmless, another one under its id
    a conflict naming each differing field with both values (its `created_at` is the first
    sender's and may differ)."""
    _check(body)
    sent = body.model_dump()
    held = store.stored_ablation(session, body.ablation_id)
    if held is None:
        try:
            with session.begin_nested():
                store.add_ablation(session, sent)
        except IntegrityError:  # declared at the same moment by another request
            held = store.stored_ablation(session, body.ablation_id)
    if held is not None:
        diffs = {
            f: {"stored": held[f], "sent": sent[f]}
            for f in store.ABLATION_FIELDS
            if f != "created_at" and held[f] != sent[f]
        }
        if diffs:
            raise Conflict(
                [
                    {
                        "loc": ["body"],
                        "record": "ablation",
                        "key": {"ablation_id": body.ablation_id},
                        "fields": diffs,
                        "msg": f"ablation {body.ablation_id} is already declared otherwise",
                        "type": "conflict",
                    }
                ]
            )
    return read(session, fleet, body.ablation_id)


# -- reading --


def _cell_knobs(cell: str) -> dict[str, Any]:
    """`dispatch=padded,compile=on` -> {"dispatch": "padded", "compile": "on"} (what a cell
    of an undeclared ablation sets, read from its name)."""
    out: dict[str, Any] = {}
    for part in cell.split(","):
        key, eq, value = part.partition("=")
        if eq and key.strip():
            out[key.strip()] = value.strip()
    return out


def _shape(
    ablation_id: str, declared: Mapping[str, Any] | None, runs: Sequence[store.AblationRun]
) -> dict[str, Any]:
    """The ablation's name, project, knobs, cells and baseline: declared, else from its runs."""
    if declared is not None:
        cells = {c: dict(v) for c, v in declared["cells"].items()}
        for r in runs:
            cells.setdefault(r.cell, _cell_knobs(r.cell))
        return {**declared, "cells": cells, "declared": True}
    cells = {}
    for r in runs:
        cells.setdefault(r.cell, _cell_knobs(r.cell))
    knobs: dict[str, list[Any]] = {}
    for values in cells.values():
        for k, v in values.items():
            if v not in knobs.setdefault(k, []):
                knobs[k].append(v)
    first = runs[0]
    return {
        "ablation_id": ablation_id,
        "name": ablation_id,
        "project": first.project,
        "created_at": first.created_at,
        "knobs": knobs,
        "cells": cells,
        "baseline_cell": first.cell,
        "repeats": None,
        "settings": {},
        "declared": False,
    }


def _summary(shape: Mapping[str, Any], status_of: Mapping[str, str]) -> dict[str, Any]:
    repeats = shape["repeats"]
    return {
        "ablation_id": shape["ablation_id"],
        "name": shape["name"],
        "project": shape["project"],
        "created_at": shape["created_at"],
        "declared": shape["declared"],
        "knobs": shape["knobs"],
        "baseline_cell": shape["baseline_cell"],
        "repeats": repeats,
        "runs": len(status_of),
        "runs_ended": sum(s in ENDED for s in status_of.values()),
        "expected_runs": len(shape["cells"]) * repeats if repeats else None,
    }


def list_ablations(session: Session, project: str | None = None) -> AblationList:
    declared = {a["ablation_id"]: a for a in store.declared_ablations(session, project)}
    runs = store.ablation_runs(session, project=project)
    by_id: dict[str, list[store.AblationRun]] = {}
    for r in runs:
        by_id.setdefault(r.ablation_id, []).append(r)
    status_of = statuses(session, [r.run_id for r in runs])
    out = []
    for ablation_id in [*declared, *(i for i in by_id if i not in declared)]:
        mine = by_id.get(ablation_id, [])
        shape = _shape(ablation_id, declared.get(ablation_id), mine)
        out.append(
            AblationSummary(**_summary(shape, {r.run_id: status_of[r.run_id] for r in mine}))
        )
    out.sort(key=lambda a: (-a.created_at, a.ablation_id))
    return AblationList(ablations=out)


def read(session: Session, fleet: FleetCache, ablation_id: str, judge: bool = True) -> AblationRead:
    """The ablation, its cells and their runs, each cell's verdict against the baseline (with
    `judge` false no cell is compared: what a page's header needs)."""
    declared = store.stored_ablation(session, ablation_id)
    runs = store.ablation_runs(session, [ablation_id])
    if declared is None and not runs:
        raise NotFound(f"ablation {ablation_id} not found")
    shape = _shape(ablation_id, declared, runs)
    status_of = statuses(session, [r.run_id for r in runs])
    knob_names = list(shape["knobs"])
    base_cell = shape["baseline_cell"]
    completed = {
        cell: [r.run_id for r in runs if r.cell == cell and status_of[r.run_id] == "completed"]
        for cell in shape["cells"]
    }
    cells = []
    for cell, values in shape["cells"].items():
        comparison, refusal = None, None
        if judge and cell != base_cell:
            comparison, refusal = _judge(
                session, fleet, ablation_id, (base_cell, cell), completed, knob_names
            )
        cells.append(
            AblationCellRead(
                cell=cell,
                knobs=values,
                baseline=cell == base_cell,
                runs=[
                    AblationRunRead(
                        run_id=r.run_id,
                        name=r.name,
                        status=status_of[r.run_id],
                        seed=r.seed,
                        created_at=r.created_at,
                    )
                    for r in runs
                    if r.cell == cell
                ],
                comparison=comparison,
                refusal=refusal,
            )
        )
    return AblationRead(
        **_summary(shape, status_of),
        settings=shape["settings"],
        cells=cells,
    )


def _judge(
    session: Session,
    fleet: FleetCache,
    ablation_id: str,
    pair: tuple[str, str],
    completed: Mapping[str, list[str]],
    knobs: list[str],
) -> tuple[CompareRead | None, dict[str, Any] | None]:
    base_cell, cell = pair
    waiting = [c for c in pair if not completed.get(c)]
    if waiting:
        return None, {
            "error": "waiting",
            "message": f"no completed run in cell {waiting[0]!r} yet",
        }
    try:
        return (
            compare_sets(
                session,
                fleet,
                completed[base_cell],
                completed[cell],
                knobs,
                asked=(base_cell, cell),
                ablation=ablation_id,
            ),
            None,
        )
    except Refused as exc:
        return None, exc.detail
    except Invalid as exc:
        return None, {"error": "invalid", "message": "; ".join(e["msg"] for e in exc.errors)}


# -- the ledger --


def _env(run: store.AblationRun) -> dict[str, Any]:
    env = run.environment if isinstance(run.environment, dict) else {}
    return {k: env.get(k) for k in ENV_KEYS}


def _lane(run: store.AblationRun) -> dict[str, Any]:
    parts = {"model_plan": run.model_plan, "runtime_policy": run.runtime_policy}
    out = {}
    for part, key in LANE_KEYS:
        got = parts.get(part)
        out[key] = got.get(key) if isinstance(got, dict) else None
    return out


def ledger(session: Session, fleet: FleetCache, project: str | None = None) -> LedgerRead:
    """Every knob value ever ablated (in the project): its verdicts against its ablation's
    baseline, oldest first; its standing from the newest one; whether the project's newest
    run has moved to another torch, CUDA or device since that verdict's runs."""
    runs = store.ablation_runs(session, project=project)
    ids = list(dict.fromkeys(r.ablation_id for r in runs))
    ids += [
        a["ablation_id"]
        for a in store.declared_ablations(session, project)
        if a["ablation_id"] not in ids
    ]
    by_key: dict[tuple[str, str], tuple[str, Any, list[LedgerVerdict]]] = {}
    for ablation_id in ids:
        got = read(session, fleet, ablation_id)
        base = next((c for c in got.cells if c.baseline), None)
        for cell in got.cells:
            if cell.baseline or cell.comparison is None or base is None:
                continue
            mine = [r for r in runs if r.ablation_id == ablation_id and r.cell == cell.cell]
            verdict = LedgerVerdict(
                ablation_id=ablation_id,
                cell=cell.cell,
                baseline_cell=base.cell,
                date=max(r.created_at for r in mine),
                verdict=cell.comparison.verdict,
                reasons=cell.comparison.reasons,
                step_time_ratio=cell.comparison.step_time_ratio,
                environment=_env(mine[-1]),
                lane=_lane(mine[-1]),
                runs=cell.comparison.runs,
            )
            for knob, value in cell.knobs.items():
                if base.knobs.get(knob) == value:
                    continue  # not what this cell changes
                key = (knob, repr(value))
                by_key.setdefault(key, (knob, value, []))[2].append(verdict)
    newest = store.newest_environments(session, project)
    entries = [_entry(k, v, vs, newest) for k, v, vs in by_key.values()]
    entries.sort(key=lambda e: (e.knob, str(e.value)))
    return LedgerRead(project=project, entries=entries, newest_environment=newest)


def _entry(
    knob: str, value: Any, verdicts: list[LedgerVerdict], newest: Mapping[str, Any] | None
) -> LedgerEntry:
    verdicts.sort(key=lambda v: (v.date, v.ablation_id, v.cell))
    last = verdicts[-1]
    standing = STANDING[last.verdict]
    why = (
        f"the newest verdict ({last.verdict}, ablation {last.ablation_id}, "
        f"{last.runs.candidate} run(s) against {last.runs.baseline}): "
        f"{last.reasons[0] if last.reasons else 'no reasons given'}"
    )
    changed = []
    if newest is not None:
        for k in REVIEW_KEYS:
            was, now = last.environment.get(k), newest.get(k)
            if was != now:
                changed.append(f"{k} {was} -> {now}")
    return LedgerEntry(
        knob=knob,
        value=value,
        standing=standing,  # type: ignore[arg-type]
        standing_reason=why,
        needs_rereview=bool(changed),
        rereview_reason=(
            "the newest run's environment differs from the one this standing rests on: "
            + ", ".join(changed)
        )
        if changed
        else None,
        verdicts=verdicts,
    )
