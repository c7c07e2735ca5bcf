"""Ablations and the feature ledger: `POST /api/v1/ablations` (declare one),
`GET /api/v1/ablations[/{id}]` (with each cell's verdict), `GET /api/v1/knobs` (the knob name
table), `GET /api/v1/ledger` (every knob value ever ablated, where it stands)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from service.api.deps import SessionDep
from service.api.errors import BODY_ERRORS, READ_ERRORS, RUN_ERRORS, error_response, errors
from service.calc.knobs import KNOBS
from service.schemas import (
    AblationIn,
    AblationList,
    AblationRead,
    ImportConflictError,
    KnobRead,
    LedgerRead,
)
from service.services import ablations
from service.services.fleet import cache_of
from trainer_hooks.records import ID_PATTERN

router = APIRouter(prefix="/api/v1")

AblationIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="the ablation's id")]
Project = Annotated[str | None, Query(max_length=200, description="only this project's")]

_DECLARE_ERRORS: dict[int | str, dict[str, Any]] = {
    **errors(*BODY_ERRORS),
    409: error_response(
        409,
        "the id is declared with other knobs, cells, baseline, repeats or settings (each "
        "field with both values); nothing was stored",
        ImportConflictError,
    ),
}


@router.post("/ablations", response_model=AblationRead, responses=_DECLARE_ERRORS)
def declare_ablation(session: SessionDep, request: Request, body: AblationIn) -> AblationRead:
    """Declare an ablation before its runs: its knobs (each with its values), its cells (each
    the knob values it runs) and its baseline cell. The same declaration again is harmless;
    another one under the same id is a 409. Runs join it with `ablation_id` and
    `ablation_cell` on their run record (`Recorder(ablation=, cell=)`)."""
    return ablations.declare(session, cache_of(request.app.state), body)


@router.get("/ablations", response_model=AblationList, responses=errors(*READ_ERRORS))
def list_ablations(session: SessionDep, project: Project = None) -> AblationList:
    """Ablations, newest first: declared ones, and ones only their runs name."""
    return ablations.list_ablations(session, project)


@router.get("/ablations/{ablation_id}", response_model=AblationRead, responses=errors(*RUN_ERRORS))
def read_ablation(
    session: SessionDep, request: Request, ablation_id: AblationIdPath
) -> AblationRead:
    """The ablation's cells, their runs, and each cell's verdict against the baseline cell
    (from their completed runs, as replicates), or why there is none yet."""
    return ablations.read(session, cache_of(request.app.state), ablation_id)


@router.get("/knobs", response_model=list[KnobRead])
def list_knobs() -> list[KnobRead]:
    """The knob names compare, ablations and the ledger take, and the receipt fields each
    covers (its value is the first, or the backend observed at its seam)."""
    return [
        KnobRead(name=k.name, fields=list(k.fields), observed_seam=k.observed_seam, help=k.help)
        for k in KNOBS.values()
    ]


@router.get("/ledger", response_model=LedgerRead, responses=errors(*READ_ERRORS))
def read_ledger(session: SessionDep, request: Request, project: Project = None) -> LedgerRead:
    """The feature ledger: every knob value ever ablated, every verdict with its date,
    environment and lane, its standing (default-on win, measured tax, dropped, unproven) and
    whether it needs re-review (the newest run's torch, CUDA or device differs from the one
    its standing rests on)."""
    return ablations.ledger(session, cache_of(request.app.state), project)
