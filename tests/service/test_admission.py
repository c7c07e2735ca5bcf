"""A request waits a bounded time for a place in the app (service/api/middleware.py): past the
limit, 503 with Retry-After, and /healthz is never held."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.api.middleware import AdmissionLimit


async def slow(_request: Request) -> JSONResponse:
    await asyncio.sleep(1.0)
    return JSONResponse({"ok": True})


async def health(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def test_a_request_past_the_limit_is_a_503_after_the_wait() -> None:
    inner = Starlette(routes=[Route("/slow", slow), Route("/healthz", health)])
    app = AdmissionLimit(inner, limit=2, wait_s=0.2)

    async def scenario() -> tuple[list[int], float, int, list[int]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = [asyncio.create_task(client.get("/slow")) for _ in range(2)]
            while app._slots is None or not app._slots.locked():  # both inside the app
                await asyncio.sleep(0.005)
            t = time.monotonic()
            refused = await client.get("/slow")
            waited = time.monotonic() - t
            health_status = (await client.get("/healthz")).status_code
            done = [r.status_code for r in await asyncio.gather(*first)]
            assert refused.headers["retry-after"] == "1"
            assert "retry later" in refused.json()["detail"]
            after = (await client.get("/slow")).status_code  # places free again
            return [refused.status_code, after], waited, health_status, done

    codes, waited, health_status, done = asyncio.run(scenario())
    assert codes == [503, 200] and done == [200, 200] and health_status == 200
    assert 0.18 <= waited < 0.9, waited  # refused after its 0.2 s, before a place freed
    assert app.refused == 1


def test_a_limit_must_make_sense() -> None:
    with pytest.raises(ValueError, match="limit >= 1"):
        AdmissionLimit(Starlette(), limit=0)
