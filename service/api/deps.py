"""What routes take: the request's unit of work, the session factory, validated run ids, and
JSON bodies read raw. The one place of api/ that holds a session (opened by the store)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from service.store.db import session_scope
from trainer_hooks.records import ID_PATTERN


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work (session_scope). Routes take it as `SessionDep`, whose
    scope "function" closes it when the route returns, before the response is sent: a
    commit that fails is the error response, and the database holds what a 200 said."""
    with session_scope(request.app.state.sessionmaker) as session:
        yield session


async def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    """For routes whose service opens its unit of work itself and commits it before they
    answer, as ingest does. Async, so that FastAPI does not send it to the thread pool (a
    sync dependency is one more trip there and back per request)."""
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionmakerDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]
RunIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="the run's id")]
RunIdQuery = Annotated[str, Query(pattern=ID_PATTERN, description="the run's id")]
CompareSide = Annotated[  # /compare's sides, the API's and the page's
    str,
    Query(
        min_length=1,
        max_length=4200,
        description="a run id, or replicates' ids comma-separated; with `ablation`, a cell",
    ),
]


async def json_body(request: Request) -> bytes:
    """The raw body of a JSON request (parsed by pydantic-core in one pass, not through
    Python objects first); any other declared media type is a 415."""
    kind = request.headers.get("content-type")
    if kind is not None:
        media = kind.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise HTTPException(415, detail=f"Content-Type {kind!r}: send application/json")
    return await request.body()
