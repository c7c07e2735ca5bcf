"""Optional tokens, checked by a pure ASGI middleware in front of every route.

With neither `GOODPUT_WRITE_TOKEN` nor `GOODPUT_READ_TOKEN` set, the service is open. With
either set, every route except `/healthz` needs a token, routes added later included:

- methods that change data (POST, PUT, PATCH, DELETE: ingest and imports) need the write
  token; every other request (queries, dashboards, /metrics, /docs, /static) takes the read
  token or the write token. With only a read token set, nothing can be written.
- the token travels as `Authorization: Bearer <token>` or `X-Goodput-Token: <token>`.
- browsers: open a dashboard page once as `GET /dashboards/<name>?token=<token>`. The page is
  served and a cookie (HttpOnly, SameSite=Strict, Path=/, Secure over https, gone when the
  browser closes) is set; the page's own fetches and plotly.js then carry it. The cookie holds
  an HMAC of the token, not the token, and it only ever grants reading (GET, HEAD, OPTIONS),
  so it cannot be used to write, from this site or any other. `?token=` is read on dashboard
  pages only; elsewhere it is ignored.

Tokens are compared in constant time (`hmac.compare_digest`). A missing token is a 401 with
`WWW-Authenticate: Bearer`, a wrong one a 403; no response repeats what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from urllib.parse import parse_qsl

from fastapi.responses import JSONResponse
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

READ = 1
WRITE = 2
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz"})
COOKIE_NAME = "goodput_session"
_COOKIE_CONTEXT = b"goodput dashboard cookie v1"
_DASHBOARD_PAGE = re.compile(r"^/dashboards/[^/]+/?$")
TOKEN_DOC = (
    "GOODPUT_WRITE_TOKEN (any route) or GOODPUT_READ_TOKEN (GET and HEAD), as "
    "`Authorization: Bearer <token>` or `X-Goodput-Token: <token>`; a missing token is a 401, "
    "a wrong one (or the read token on a write) a 403"
)


def cookie_value(token: bytes) -> str:
    """What the browser keeps: an HMAC of the token, useless as a bearer token."""
    return hmac.new(token, _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


def route_path(scope: Scope) -> str:
    """The path the router matches: without the app's root_path, as Starlette strips it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _grant(presented: bytes, table: list[tuple[bytes, int]]) -> int:
    """The highest level whose secret equals `presented` (0: none); compares every entry."""
    level = 0
    for secret, lvl in table:
        if hmac.compare_digest(presented, secret):
            level = max(level, lvl)
    return level


def _header_tokens(scope: Scope) -> Iterator[bytes]:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                yield token.strip()
        elif name == b"x-goodput-token" and value.strip():
            yield value.strip()


def _cookie(scope: Scope) -> bytes | None:
    raw = "; ".join(v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"cookie")
    value = cookie_parser(raw).get(COOKIE_NAME) if raw else None
    return value.encode("latin-1", "replace") if value else None


def _page_token(scope: Scope) -> bytes | None:
    if scope.get("method") not in ("GET", "HEAD") or not _DASHBOARD_PAGE.match(route_path(scope)):
        return None
    query = scope.get("query_string", b"").decode("latin-1")
    tokens = [v for k, v in parse_qsl(query, encoding="latin-1") if k == "token" and v]
    return tokens[-1].encode("latin-1") if tokens else None


class TokenAuth:
    """Refuse requests without the token their method needs (see the module docstring)."""

    def __init__(self, app: ASGIApp, write_token: str | None, read_token: str | None) -> None:
        self.app = app
        tokens = [(write_token, WRITE), (read_token, READ)]
        self.tokens = [(t.encode(), lvl) for t, lvl in tokens if t is not None]
        self.cookies = [(cookie_value(t).encode(), READ) for t, _ in self.tokens]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        needed = READ if scope.get("method", "GET") in READ_METHODS else WRITE
        page_token = _page_token(scope)
        presented, granted = self._check(scope, needed, page_token)
        if granted >= needed:
            if page_token is not None and _grant(page_token, self.tokens):
                send = _with_cookie(send, page_token, scope.get("scheme") in ("https", "wss"))
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _refuse(send, presented, granted)

    def _check(self, scope: Scope, needed: int, page_token: bytes | None) -> tuple[bool, int]:
        """(was any credential presented, the highest level one of them grants)."""
        levels = [_grant(t, self.tokens) for t in _header_tokens(scope)]
        if page_token is not None:
            levels.append(_grant(page_token, self.tokens))
        cookie = _cookie(scope) if needed == READ else None
        if cookie is not None:
            levels.append(_grant(cookie, self.cookies))
        return bool(levels), max(levels, default=0)


async def _refuse(send: Send, presented: bool, granted: int) -> None:
    if not presented:
        detail = "a token is needed: send Authorization: Bearer <token> or X-Goodput-Token"
        resp = JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})
    elif granted:
        resp = JSONResponse({"detail": "this route needs the write token"}, 403)
    else:
        resp = JSONResponse({"detail": "the token was not accepted"}, 403)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _with_cookie(send: Send, token: bytes, secure: bool) -> Send:
    """Add the session cookie to the response; keep the URL's token out of referrers and
    caches."""
    cookie = f"{COOKIE_NAME}={cookie_value(token)}; Path=/; HttpOnly"
    cookie += "; SameSite=Strict" + ("; Secure" if secure else "")
    extra = [
        (b"set-cookie", cookie.encode()),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-store"),
    ]

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k != b"cache-control"]
            message = {**message, "headers": kept + extra}
        await send(message)

    return sending
