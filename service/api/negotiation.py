"""Which answers are pages: the routes a browser opens (`/`, `/trends`, `/compare`,
`/ablations`, `/ablations/{id}`, `/ledger`, `/runs/{id}` and
`/runs/{id}/{goodput,performance,routing,receipt}`, beside the API under
`/api/v1`), and errors a browser asked for. Such errors are answered as an HTML page with a
link home (api/errors.py); API clients keep their JSON errors. The pages' data (figure
JSON their script fetches) lives under `/ui/data`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Scope

from service.api.security import PAGE_PATHS, route_path

UI_DATA = "/ui/data"  # where the pages' data routes are


def _quality(accept: str, media: str) -> float:
    """The q `accept` gives `media` by its most specific matching range (0: none)."""
    kind = media.split("/")[0]
    best, best_rank = 0.0, -1
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        rng = fields[0].lower()
        rank = 2 if rng == media else 1 if rng == f"{kind}/*" else 0 if rng == "*/*" else -1
        if rank < best_rank or rank < 0:
            continue
        q = 1.0
        for f in fields[1:]:
            name, _, value = f.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        best, best_rank = q, rank
    return best


def prefers_html(accept: str | None) -> bool:
    """`Accept` names text/html itself (not through a wildcard) and ranks it above JSON:
    what browsers send when they open a page; curl, httpx and fetch() send */* (JSON)."""
    if not accept or "text/html" not in accept.lower():
        return False
    html = _quality(accept, "text/html")
    return html > 0 and html > _quality(accept, "application/json")


def is_page(scope: Scope) -> bool:
    """The request is for a page (not for its data, not for the API)."""
    return bool(PAGE_PATHS.match(route_path(scope)))


def wants_html(request: Request) -> bool:
    """An error for this request is answered as a page: it is for a page, or it is a GET
    from a browser for something that is not the API or a page's data."""
    if is_page(request.scope):
        return True
    path = route_path(request.scope)
    if path.startswith(("/api/", UI_DATA + "/")):
        return False
    return request.method in ("GET", "HEAD") and prefers_html(request.headers.get("accept"))
