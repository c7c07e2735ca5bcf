"""The token check as a FastAPI dependency (security.TokenCheck): it runs before any body is
read, guards the docs and unknown paths, and leaves the service as it was without tokens."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.security import TOKEN_DOC
from service.app import create_app
from service.settings import Settings

READ = "read-token-1234"
WRITE = "write-token-5678"
BODY_ROUTES = ["/api/v1/ingest", "/api/v1/import/ml-goodput"]
DOCS = [
    "/docs",
    "/docs/oauth2-redirect",
    "/openapi.json",
    "/redoc",
    "/static/docs/swagger-ui-bundle.js",
]


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[TestClient]:
    """Tokens are checked before any database is read: SQLite suffices."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'goodput.db'}",
        read_token=READ,
        write_token=WRITE,
        max_body_bytes=1024,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.engine.dispose()


def chunks(total: int, size: int = 256) -> Iterator[bytes]:
    """A body without Content-Length (sent chunked): counted only as it is read."""
    for _ in range(total // size):
        yield b"x" * size


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_the_token_is_checked_before_the_body_is_read(secured: TestClient, path: str) -> None:
    json = {"Content-Type": "application/json"}
    huge = secured.post(path, content=chunks(1 << 20), headers=json)
    assert huge.status_code == 401, huge.text
    invalid = secured.post(path, content=b"{not json", headers=json)
    assert invalid.status_code == 401, invalid.text
    bomb = gzip.compress(b"x" * (1 << 20))
    gzipped = secured.post(path, content=bomb, headers={**json, "Content-Encoding": "gzip"})
    assert gzipped.status_code == 401, gzipped.text
    as_reader = secured.post(
        path, content=b"{not json", headers={**json, "Authorization": f"Bearer {READ}"}
    )
    assert as_reader.status_code == 403, as_reader.text
    # The writer's request gets as far as the body, which is refused.
    as_writer = secured.post(
        path, content=chunks(1 << 20), headers={**json, "Authorization": f"Bearer {WRITE}"}
    )
    assert as_writer.status_code == 413, as_writer.text


def test_a_declared_length_over_the_limit_is_refused_before_the_token(
    secured: TestClient,
) -> None:
    """The body limit answers from the headers alone, outside the routes, reading nothing."""
    resp = secured.post("/api/v1/ingest", content=b"x" * 2048)
    assert resp.status_code == 413


def test_bad_parameters_without_a_token_are_a_401(secured: TestClient) -> None:
    assert secured.get("/api/v1/runs", params={"limit": "many"}).status_code == 401


@pytest.mark.parametrize("path", DOCS)
def test_the_docs_need_a_token(secured: TestClient, path: str) -> None:
    assert secured.get(path).status_code == 401
    assert secured.get(path, headers={"X-Goodput-Token": READ}).status_code == 200


@pytest.mark.parametrize("path", DOCS)
def test_without_tokens_the_docs_are_open(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_the_openapi_document_is_the_same_from_the_route(secured: TestClient) -> None:
    served = secured.get("/openapi.json", headers={"Authorization": f"Bearer {READ}"})
    assert served.json() == secured.app.openapi()  # type: ignore[attr-defined]


def test_an_unknown_path_needs_a_token_before_its_404(secured: TestClient) -> None:
    anonymous = secured.get("/no/such/path")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    wrong = secured.post("/no/such/path", headers={"X-Goodput-Token": "nope"})
    assert wrong.status_code == 403
    assert secured.post("/no/such/path", headers={"X-Goodput-Token": READ}).status_code == 403
    assert secured.get("/no/such/path", headers={"X-Goodput-Token": READ}).status_code == 404


def test_without_tokens_an_unknown_path_is_a_404(client: TestClient) -> None:
    assert client.get("/no/such/path").status_code == 404


def test_fastapi_documents_the_tokens(secured: TestClient) -> None:
    schema = secured.app.openapi()  # type: ignore[attr-defined]
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": TOKEN_DOC},
        "tokenHeader": {"type": "apiKey", "in": "header", "name": "X-Goodput-Token"},
    }
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if path == "/healthz":
                assert "security" not in operation and "401" not in operation["responses"]
                continue
            where = f"{method} {path}"
            assert operation["security"] == [{"bearer": []}, {"tokenHeader": []}], where
            assert {"401", "403"} <= operation["responses"].keys(), where
            assert not [p for p in operation.get("parameters", []) if p["in"] == "header"], where


def test_without_tokens_the_document_declares_none(client: TestClient) -> None:
    schema = client.app.openapi()  # type: ignore[attr-defined]
    assert "securitySchemes" not in schema["components"]
    assert all("security" not in op for item in schema["paths"].values() for op in item.values())


def test_the_page_cookie_comes_with_an_error_page_too(secured: TestClient) -> None:
    """SessionCookie sets what the check asked for, whatever the route answers."""
    page = secured.get("/runs/no-such-run/goodput", params={"token": READ})
    assert page.status_code == 404
    assert page.headers["set-cookie"].startswith("goodput_session=")
    assert secured.get("/api/v1/runs").status_code == 200  # with the cookie alone
