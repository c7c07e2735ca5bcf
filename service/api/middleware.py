"""The app's middleware, each one ASGI, outside the routes (app.py adds them in order):

- `HeadAsGet`: HEAD answered wherever GET is;
- `BodyLimit`: bodies over the limit refused with 413 before they are parsed, gzip decoded as
  it streams in;
- `IngestRefusals`: refused ingest requests counted by their status;
- `AdmissionLimit`: a bounded wait for a worker thread, the last wait of a request that
  nothing else bounds.

The routes run in the server's thread pool (anyio's, 40 threads a process). Under more load
than the threads can take, a request would wait for one without limit, past the sink's 10 s
request timeout, and the client would see no answer at all. AdmissionLimit lets at most
`limit` requests inside the app at once; one that finds no room within `wait_s` is answered
503 with `Retry-After` (which the hooks' sink honours) without running. `/healthz` is never
held.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import RETRY_AFTER_S
from service.api.security import route_path
from service.services.metrics import IngestMetrics

DEFAULT_LIMIT = 40  # anyio's default thread pool: one request a thread
DEFAULT_WAIT_S = 5.0
_FREE_PATHS = ("/healthz",)
INGEST_PATH = "/api/v1/ingest"
REFUSED_STATUSES = frozenset({400, 409, 413, 415, 422})


class AdmissionLimit:
    """At most `limit` requests inside the app at once; the others wait `wait_s`, then 503."""

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


class IngestRefusals:
    """Count refused POST /api/v1/ingest requests by the status of their answer (the body is
    not looked at), so that refusals made before the route runs (the body limit's 413, a
    request validation 422) are counted with the route's own."""

    def __init__(self, app: ASGIApp, metrics: IngestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_ingest = scope["type"] == "http" and scope["method"] == "POST"
        if not is_ingest or route_path(scope) != INGEST_PATH:
            await self.app(scope, receive, send)
            return

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in REFUSED_STATUSES:
                self.metrics.rejected.inc()
            await send(message)

        await self.app(scope, receive, watching)


class HeadAsGet:
    """Answer HEAD wherever GET is answered: the request runs as a GET and its body is
    dropped, its headers (Content-Length and Content-Type included) kept. FastAPI routes
    declare GET alone, which would make HEAD a 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before they are parsed. A gzip body
    (`Content-Encoding: gzip`) is decompressed as it streams in: at most `compressed_limit`
    bytes on the wire and `limit` once decompressed (a zip bomb stops at the limit)."""

    def __init__(self, app: ASGIApp, limit: int, compressed_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.compressed_limit = compressed_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        # Several Content-Encoding headers make one list, as HTTP says.
        coding = b",".join(v for k, v in scope.get("headers", []) if k == b"content-encoding")
        gzipped = _is_gzip(coding)
        if gzipped is None:
            await _respond(send, 415, _unsupported(coding), {"Accept-Encoding": "gzip"})
            return
        wire_limit = self.compressed_limit if gzipped else self.limit
        wire_msg = _too_large("compressed request body" if gzipped else "request body", wire_limit)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > wire_limit:
            await _respond(send, 413, wire_msg)
            return
        receive = _limited(receive, wire_limit, wire_msg)
        if gzipped:
            scope = _without(scope, (b"content-encoding", b"content-length"))
            receive = _gunzipping(receive, _Gunzip(self.limit))
        await self.app(scope, receive, send)


def _is_gzip(header: bytes) -> bool | None:
    """True for gzip, False for identity (or none), None for any other coding."""
    codings = [c.strip() for c in header.decode("latin-1").lower().split(",")]
    codings = [c for c in codings if c not in ("", "identity")]
    if not codings:
        return False
    return True if codings in (["gzip"], ["x-gzip"]) else None


def _unsupported(header: bytes) -> str:
    shown = header.decode("latin-1")[:40]
    return f"Content-Encoding {shown!r} is not supported: send gzip or identity"


def _too_large(what: str, limit: int) -> str:
    return f"{what} larger than the limit of {limit} bytes"


def _without(scope: Scope, names: tuple[bytes, ...]) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k not in names]
    return {**scope, "headers": headers}


def _limited(receive: Receive, limit: int, message: str) -> Receive:
    seen = 0

    async def limited() -> Message:
        # A body without Content-Length (chunked) is counted as it streams in; the
        # HTTPException passes through FastAPI's body parsing and becomes the 413.
        nonlocal seen
        msg = await receive()
        seen += len(msg.get("body", b""))
        if seen > limit:
            raise HTTPException(413, detail=message)
        return msg

    return limited


class _Gunzip:
    """Incremental gzip decoder (several members allowed) that stops past `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.produced = 0
        self.fed = 0
        self.zobj = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        self.fed += len(data)
        chunks = []
        while data:
            if self.zobj.eof:
                self.zobj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            # At most one byte past the limit is ever produced.
            chunk = self._decompress(data, self.limit - self.produced + 1)
            self.produced += len(chunk)
            if self.produced > self.limit:
                detail = _too_large("request body", self.limit) + " once decompressed"
                raise HTTPException(413, detail=detail)
            chunks.append(chunk)
            data = self.zobj.unused_data if self.zobj.eof else self.zobj.unconsumed_tail
        return b"".join(chunks)

    def _decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self.zobj.decompress(data, max_length)
        except zlib.error as exc:
            raise HTTPException(400, detail=f"request body is not valid gzip: {exc}") from exc

    def finish(self) -> None:
        if self.fed and not self.zobj.eof:
            raise HTTPException(
                400, detail="request body is not valid gzip: the stream is cut short"
            )


def _gunzipping(receive: Receive, gunzip: _Gunzip) -> Receive:
    async def gunzipping() -> Message:
        msg = await receive()
        if msg["type"] != "http.request":
            return msg
        body = gunzip.feed(msg.get("body", b""))
        if not msg.get("more_body", False):
            gunzip.finish()
        return {**msg, "body": body}

    return gunzipping


async def _respond(
    send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    resp = JSONResponse({"detail": detail}, status, headers=headers)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
