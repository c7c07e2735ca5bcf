"""Optional tokens on every route, the dashboards' cookie, and CORS closed unless configured."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.routing import Mount

from service.api.security import COOKIE_NAME
from service.app import create_app
from service.settings import Settings
from tests import factories as f
from tests.conftest import free_port, wait_http

READ = "read-token-1234"
WRITE = "write-token-5678"
WRONG = "not-the-token-9999"
OPEN = {"/healthz"}
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
KNOWN_PARAMS = {"run_id": "run-a"}
ORIGIN = "http://dash.example:8080"

AppFactory = Callable[..., FastAPI]


@pytest.fixture
def make_app(migrated_url: str) -> Iterator[AppFactory]:
    apps: list[FastAPI] = []

    def make(**settings: Any) -> FastAPI:
        apps.append(create_app(Settings(database_url=migrated_url, **settings)))
        return apps[-1]

    yield make
    for app in apps:
        app.state.engine.dispose()


@pytest.fixture
def secured(make_app: AppFactory) -> Iterator[TestClient]:
    with TestClient(make_app(read_token=READ, write_token=WRITE)) as client:
        resp = client.post(
            "/api/v1/ingest", json={"records": f.full_run(steps=3)}, headers=bearer(WRITE)
        )
        assert resp.status_code == 200, resp.text
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def every_request(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) for every method of every route in `app.routes`, included routers
    flattened, with path parameters filled in."""
    out = []
    for route in iter_route_contexts(app.routes):
        path = re.sub(
            r"\{([^}:]+)(:[^}]*)?\}", lambda m: KNOWN_PARAMS.get(m.group(1), "x"), route.path or ""
        )
        if isinstance(route.original_route, Mount):
            out.append(("GET", path.rstrip("/") + "/x"))
            continue
        out += [(m, path) for m in sorted(route.methods or {"GET"})]
    return out


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    client.cookies.clear()
    return client.request(method, path, headers=headers)


def test_every_route_needs_the_right_token(secured: TestClient) -> None:
    requests = every_request(secured.app)  # type: ignore[arg-type]
    assert ("POST", "/api/v1/ingest") in requests and ("GET", "/metrics") in requests
    assert len(requests) >= 10
    for method, path in requests:
        where = f"{method} {path}"
        anonymous = call(secured, method, path, {})
        if path in OPEN:
            assert anonymous.status_code not in (401, 403), where
            continue
        assert anonymous.status_code == 401, where
        assert anonymous.headers["www-authenticate"] == "Bearer", where
        wrong = call(secured, method, path, bearer(WRONG))
        assert wrong.status_code == 403, where
        assert WRONG not in wrong.text, where
        by_reader = call(secured, method, path, bearer(READ))
        if method in READ_METHODS:
            assert by_reader.status_code not in (401, 403), where
        else:
            assert by_reader.status_code == 403, where
        by_writer = call(secured, method, path, bearer(WRITE))
        assert by_writer.status_code not in (401, 403), where
        assert by_writer.status_code < 500, where


def test_tokens_also_travel_in_x_goodput_token(secured: TestClient) -> None:
    assert secured.get("/api/v1/runs", headers={"X-Goodput-Token": READ}).status_code == 200
    resp = secured.post(
        "/api/v1/ingest", json={"records": [f.run("run-b")]}, headers={"X-Goodput-Token": WRITE}
    )
    assert resp.status_code == 200
    lower = secured.get("/api/v1/runs", headers={"Authorization": f"bearer {READ}"})
    assert lower.status_code == 200


def test_other_authorization_schemes_count_as_no_token(secured: TestClient) -> None:
    resp = secured.get("/api/v1/runs", headers={"Authorization": f"Basic {READ}"})
    assert resp.status_code == 401


def test_healthz_never_needs_a_token(secured: TestClient) -> None:
    assert secured.get("/healthz").status_code == 200


def test_without_tokens_the_service_is_open(client: TestClient) -> None:
    assert client.post("/api/v1/ingest", json={"records": [f.run()]}).status_code == 200
    assert client.get("/api/v1/runs/run-a").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_only_a_write_token_guards_reads_too(make_app: AppFactory) -> None:
    with TestClient(make_app(write_token=WRITE)) as client:
        assert client.get("/api/v1/runs").status_code == 401
        assert client.get("/api/v1/runs", headers=bearer(WRITE)).status_code == 200


def test_only_a_read_token_makes_the_service_read_only(make_app: AppFactory) -> None:
    with TestClient(make_app(read_token=READ)) as client:
        assert client.get("/api/v1/runs", headers=bearer(READ)).status_code == 200
        resp = client.post("/api/v1/ingest", json={"records": [f.run()]}, headers=bearer(READ))
        assert resp.status_code == 403
        assert "write token" in resp.json()["detail"]


def test_dashboard_page_token_sets_a_strict_http_only_cookie(secured: TestClient) -> None:
    page = secured.get("/runs/run-a/goodput", params={"token": READ})
    assert page.status_code == 200
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert READ not in cookie and "Secure" not in cookie  # plain http here
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["cache-control"] == "no-store"
    # The page's fetch() and plotly.js go with the cookie only.
    data = secured.get("/ui/data/runs/run-a/goodput")
    assert data.status_code == 200
    assert secured.get("/static/plotly.min.js").status_code == 200


def test_the_dashboard_cookie_never_writes(secured: TestClient) -> None:
    secured.get("/", params={"token": WRITE})
    assert secured.cookies.get(COOKIE_NAME)
    resp = secured.post("/api/v1/ingest", json={"records": [f.run("run-b")]})
    assert resp.status_code == 401


def test_a_forged_cookie_is_refused(secured: TestClient) -> None:
    secured.cookies.set(COOKIE_NAME, READ)
    assert secured.get("/api/v1/runs").status_code == 403


def test_wrong_page_token_is_403_and_sets_no_cookie(secured: TestClient) -> None:
    resp = secured.get("/runs/run-a/goodput", params={"token": WRONG})
    assert resp.status_code == 403
    assert "set-cookie" not in resp.headers and WRONG not in resp.text


@pytest.mark.parametrize("path", ["/api/v1/runs", "/metrics", "/ui/data/runs/run-a/goodput"])
def test_query_token_is_ignored_outside_dashboard_pages(secured: TestClient, path: str) -> None:
    sep = "&" if "?" in path else "?"
    assert secured.get(f"{path}{sep}token={READ}").status_code == 401


@pytest.mark.parametrize("token", ["", " ", "has space", "tab\there", "naïve"])
def test_malformed_tokens_are_refused_at_start(token: str) -> None:
    with pytest.raises(ValidationError, match="read_token") as info:
        Settings(read_token=token)
    assert token.strip() == "" or token not in str(info.value)


def test_tokens_never_show_in_the_settings_repr() -> None:
    settings = Settings(read_token=READ, write_token=WRITE)
    assert READ not in repr(settings) and WRITE not in str(settings)


def test_settings_read_tokens_and_origins_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOODPUT_WRITE_TOKEN", WRITE)
    monkeypatch.setenv("GOODPUT_CORS_ORIGINS", f"{ORIGIN}, https://b.example")
    settings = Settings()
    assert settings.write_token is not None and settings.write_token.get_secret_value() == WRITE
    assert settings.read_token is None
    assert settings.cors_origins == [ORIGIN, "https://b.example"]


def test_an_origin_with_a_path_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="cors_origins"):
        Settings(cors_origins=["https://b.example/"])


def test_no_cors_headers_by_default(client: TestClient) -> None:
    resp = client.get("/api/v1/runs", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in resp.headers
    preflight = client.options(
        "/api/v1/ingest",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_configured_origin_gets_cors_headers_and_others_do_not(make_app: AppFactory) -> None:
    with TestClient(make_app(cors_origins=[ORIGIN])) as client:
        ok = client.get("/api/v1/runs", headers={"Origin": ORIGIN})
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        other = client.get("/api/v1/runs", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_preflight_needs_no_token_and_a_401_is_readable(make_app: AppFactory) -> None:
    app = make_app(cors_origins=[ORIGIN], read_token=READ, write_token=WRITE)
    with TestClient(app) as client:
        preflight = client.options(
            "/api/v1/ingest",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        refused = client.get("/api/v1/runs", headers={"Origin": ORIGIN})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.browser
@pytest.mark.e2e
def test_a_browser_opens_the_dashboard_with_a_page_token(migrated_url: str, browser: Any) -> None:
    app = create_app(Settings(database_url=migrated_url, read_token=READ, write_token=WRITE))
    with served(app) as base:
        records = {"records": f.full_run(steps=5)}
        httpx.post(f"{base}/api/v1/ingest", json=records, headers=bearer(WRITE)).raise_for_status()
        page = browser.new_page()
        page.goto(f"{base}/runs/run-a/goodput?token={READ}")
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)  # fetch() got in
        assert page.context.cookies()[0]["httpOnly"]
        other = browser.new_page()  # a context of its own: no cookie
        assert other.goto(f"{base}/runs/run-a/goodput").status == 401
        page.close()
        other.close()


@contextmanager
def served(app: FastAPI) -> Iterator[str]:
    """`app` on a loopback port, from a thread."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{config.port}"
    try:
        wait_http(f"{base}/healthz")
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.engine.dispose()
