"""A bounded wait for a worker thread: the last wait of a request that nothing else bounds.

The routes run in the server's thread pool (anyio's, 40 threads a process). Under more load
than the threads can take, a request would wait for one without limit, past the sink's 10 s
request timeout, and the client would see no answer at all. Here at most `limit` requests
are inside the app at once; one that finds no room within `wait_s` is answered 503 with
`Retry-After` (which the hooks' sink honours) without running. `/healthz` is never held.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import RETRY_AFTER_S

DEFAULT_LIMIT = 40  # anyio's default thread pool: one request a thread
DEFAULT_WAIT_S = 5.0
_FREE_PATHS = ("/healthz",)


class AdmissionLimit:
    def __init__(
        self, app: ASGIApp, limit: int = DEFAULT_LIMIT, wait_s: float = DEFAULT_WAIT_S
    ) -> None:
        if limit < 1 or not wait_s > 0:
            raise ValueError(f"admission needs limit >= 1 and wait_s > 0, got {limit}, {wait_s}")
        self.app, self.limit, self.wait_s = app, limit, wait_s
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _FREE_PATHS:
            await self.app(scope, receive, send)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_s)
        except TimeoutError:
            self.refused += 1
            busy = JSONResponse(
                {"detail": f"server busy: no worker free within {self.wait_s:g} s, retry later"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            await busy(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()
