"""GET /healthz: liveness and database reachability, open without a token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from service.api.errors import RETRY_AFTER_S, error_response
from service.schemas import Health
from service.services import runs

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: error_response(503, "the database is unreachable: retry later")},
)
def healthz(request: Request) -> Any:
    """Liveness and database reachability; never needs a token."""
    try:
        return runs.health(request.app.state.engine)
    except Exception as exc:
        raise HTTPException(
            503,
            detail=f"database unreachable: {type(exc).__name__}",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
