"""Optional tokens, checked by one FastAPI dependency (`TokenCheck`) on every route.

With neither `GOODPUT_WRITE_TOKEN` nor `GOODPUT_READ_TOKEN` set, the service is open and
nothing here is installed. With either set, app.py adds `TokenCheck` to every router but the
health one (`/healthz` stays open), to the routes that serve /openapi.json, /docs and /redoc
and to the app's answer for a path no route matches, so a route added later is guarded too:

- methods that change data (POST, PUT, PATCH, DELETE: ingest and imports) need the write
  token; every other request (queries, dashboards, /metrics, /docs, /static) takes the read
  token or the write token. With only a read token set, nothing can be written.
- the token travels as `Authorization: Bearer <token>` (`HTTPBearer`) or
  `X-Goodput-Token: <token>` (`APIKeyHeader`); FastAPI documents both in the OpenAPI
  document (`securitySchemes` `bearer` and `tokenHeader`, each operation's `security`).
- browsers: open a page once with `?token=<token>` (`/?token=...`, `/runs/<id>/goodput?token=`,
  any page api/negotiation.py lists, or the old `/dashboards/goodput`). The page is
  served and a cookie (HttpOnly, SameSite=Strict, Path=/, Secure over https, gone when the
  browser closes) is set by `SessionCookie`, a small middleware, since a page returned as an
  HTMLResponse carries no header a dependency sets; the page's own fetches and plotly.js then
  carry it. The cookie holds an HMAC of the token, not the token, and it only ever grants
  reading (GET, HEAD, OPTIONS), so it cannot be used to write, from this site or any other.
  `?token=` is read on dashboard pages only; elsewhere it is ignored. The cookie is read from
  the request, not declared as an `APIKeyCookie`: the document would then offer it for
  writes too.

Tokens are compared in constant time (`hmac.compare_digest`). A missing token is a 401 with
`WWW-Authenticate: Bearer`, a wrong one a 403; no response repeats what was sent. The check is
the first dependency of every route, solved before the route's own (`json_body` included), so
no body is read and no database touched before it; a path no route matches is a 401 or 403
without the right token and a 404 with it. What the middleware outside the routes answers
from the headers alone comes first: a declared Content-Length over the body limit (413), a
Content-Encoding other than gzip (415), a full server (503), a CORS preflight (which needs no
token), a known path asked with a method it does not take (405) and the redirect of a path
with a trailing slash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dashboards.pages import RUN_TABS

READ = 1
WRITE = 2
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
COOKIE_NAME = "goodput_session"
_COOKIE_CONTEXT = b"goodput dashboard cookie v1"
# the pages' paths (the run's tabs from dashboards/pages.py), where `?token=` is read and where
# a browser gets HTML errors (api/negotiation.py); the goodput page's first address too
PAGE_PATHS = re.compile(
    r"^/(?:|runs|trends|compare|ledger|ablations(?:/[^/]+)?"
    r"|runs/[^/]+(?:/(?:" + "|".join(k for k, _ in RUN_TABS) + r"))?)/?$"
)
_OLD_PAGE = re.compile(r"^/dashboards/[^/]+/?$")
TOKEN_DOC = (
    "GOODPUT_WRITE_TOKEN (any route) or GOODPUT_READ_TOKEN (GET and HEAD), as "
    "`Authorization: Bearer <token>` or `X-Goodput-Token: <token>`; a missing token is a 401, "
    "a wrong one (or the read token on a write) a 403"
)

BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description=TOKEN_DOC)
TOKEN_HEADER = APIKeyHeader(name="X-Goodput-Token", auto_error=False, scheme_name="tokenHeader")


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


def _bytes(text: str) -> bytes:
    return text.strip().encode("utf-8", "surrogatepass")


def _page_token(request: Request) -> bytes | None:
    path = route_path(request.scope)
    if request.method not in ("GET", "HEAD") or not (
        PAGE_PATHS.match(path) or _OLD_PAGE.match(path)
    ):
        return None
    tokens = [v for v in request.query_params.getlist("token") if v]
    return _bytes(tokens[-1]) if tokens else None


class TokenCheck:
    """The dependency: refuse a request without the token its method needs (see the module
    docstring); on a dashboard page opened with a valid `?token=`, ask SessionCookie to set
    the cookie."""

    def __init__(self, write_token: str | None, read_token: str | None) -> None:
        tokens = [(write_token, WRITE), (read_token, READ)]
        self.tokens = [(t.encode(), lvl) for t, lvl in tokens if t is not None]
        self.cookies = [(cookie_value(t).encode(), READ) for t, _ in self.tokens]

    async def __call__(
        self,
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        header: Annotated[str | None, Depends(TOKEN_HEADER)],
    ) -> None:
        needed = READ if request.method in READ_METHODS else WRITE
        sent = [_bytes(bearer.credentials) if bearer else b"", _bytes(header or "")]
        levels = [_grant(token, self.tokens) for token in sent if token]
        page_token = _page_token(request)
        page_level = _grant(page_token, self.tokens) if page_token is not None else 0
        if page_token is not None:
            levels.append(page_level)
        cookie = request.cookies.get(COOKIE_NAME) if needed == READ else None
        if cookie:
            levels.append(_grant(_bytes(cookie), self.cookies))
        granted = max(levels, default=0)
        if granted < needed:
            raise _refusal(bool(levels), granted)
        if page_level:
            assert page_token is not None
            request.state.goodput_set_cookie = _set_cookie(page_token, request)

    def guard_unmatched(self, app: FastAPI) -> None:
        """A path no route matches: 401 or 403 without the right token, as on every route,
        and the router's 404 with it."""
        not_found = app.router.default

        async def default(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                request = Request(scope)
                await self(request, await BEARER(request), await TOKEN_HEADER(request))
            await not_found(scope, receive, send)

        app.router.default = default


def _refusal(presented: bool, granted: int) -> HTTPException:
    if not presented:
        detail = "a token is needed: send Authorization: Bearer <token> or X-Goodput-Token"
        return HTTPException(401, detail=detail, headers={"WWW-Authenticate": "Bearer"})
    if granted:
        return HTTPException(403, detail="this route needs the write token")
    return HTTPException(403, detail="the token was not accepted")


def _set_cookie(token: bytes, request: Request) -> str:
    cookie = f"{COOKIE_NAME}={cookie_value(token)}; Path=/; HttpOnly; SameSite=Strict"
    return cookie + ("; Secure" if request.url.scheme in ("https", "wss") else "")


class SessionCookie:
    """Send the cookie TokenCheck asked for (`request.state`), whatever response the route
    returns; keep the URL's token out of referrers and caches."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # shared with the copies of scope inside

        async def sending(message: Message) -> None:
            cookie = state.get("goodput_set_cookie")
            if message["type"] == "http.response.start" and cookie is not None:
                kept = [(k, v) for k, v in message.get("headers", []) if k != b"cache-control"]
                extra = [
                    (b"set-cookie", cookie.encode()),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, sending)
