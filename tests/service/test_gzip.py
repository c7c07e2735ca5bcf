"""gzip request bodies: decompressed before parsing, limited on the wire and once
decompressed; other codings refused."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests import factories as f

MIB = 1 << 20
LIMIT = 64 * 1024
COMPRESSED_LIMIT = 512 * 1024


@pytest.fixture
def small(migrated_url: str) -> Iterator[TestClient]:
    """A client of an app with small body limits."""
    settings = Settings(
        database_url=migrated_url, max_body_bytes=LIMIT, max_compressed_body_bytes=COMPRESSED_LIMIT
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.engine.dispose()


def gzip_bomb(mib: int) -> bytes:
    """A gzip stream of `mib` MiB of zeros, made without compressing them all: after a full
    flush, one MiB of zeros compresses to the same self-contained block every time."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * MIB
    first = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    return first + block * (mib - 1)


def post_gz(client: Any, body: bytes, encoding: str = "gzip", **headers: str) -> Any:
    headers = {"content-type": "application/json", "content-encoding": encoding, **headers}
    return client.post("/api/v1/ingest", content=body, headers=headers)


def records_json(records: list[dict[str, Any]]) -> bytes:
    return json.dumps({"records": records}).encode()


def stored_steps(client: Any) -> list[int]:
    resp = client.get("/api/v1/runs/run-a/steps")
    return [p["step"] for p in resp.json()["points"]] if resp.status_code == 200 else []


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "GZIP", "identity, gzip"])
def test_gzip_body_is_decompressed_and_stored(client: Any, encoding: str) -> None:
    batch = f.full_run(steps=3)
    resp = post_gz(client, gzip.compress(records_json(batch)), encoding)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"inserted": len(batch), "duplicates": 0}
    assert stored_steps(client) == [0, 1, 2]


def test_identity_encoding_is_a_plain_body(client: Any) -> None:
    resp = post_gz(client, records_json(f.full_run(steps=2)), "identity")
    assert resp.status_code == 200, resp.text


def test_several_gzip_members_are_one_body(client: Any) -> None:
    raw = records_json(f.full_run(steps=2))
    body = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    assert post_gz(client, body).status_code == 200


def test_a_streamed_gzip_body_is_decompressed(client: Any) -> None:
    packed = gzip.compress(records_json(f.full_run(steps=2)))
    chunks = iter([packed[i : i + 50] for i in range(0, len(packed), 50)])
    assert post_gz(client, chunks).status_code == 200  # type: ignore[arg-type]
    assert stored_steps(client) == [0, 1]


def test_zip_bomb_gets_413_naming_the_limit_without_inflating_it(small: TestClient) -> None:
    bomb = gzip_bomb(256)  # 256 MiB of zeros in about 260 KB
    assert len(bomb) < COMPRESSED_LIMIT
    tracemalloc.start()
    try:
        resp = post_gz(small, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resp.status_code == 413
    assert str(LIMIT) in resp.json()["detail"] and "decompressed" in resp.json()["detail"]
    assert peak < 16 * MIB


def test_body_just_under_the_limit_once_decompressed_passes_the_limit(small: TestClient) -> None:
    body = records_json([f.run()])
    padded = body + b" " * (LIMIT - len(body))
    assert post_gz(small, gzip.compress(padded)).status_code == 200
    assert post_gz(small, gzip.compress(padded + b" ")).status_code == 413


def test_compressed_body_over_its_own_limit_gets_413(small: TestClient) -> None:
    noise = bytes(range(256)) * (COMPRESSED_LIMIT // 256 + 1)  # does not compress
    resp = post_gz(small, noise)
    assert resp.status_code == 413
    assert str(COMPRESSED_LIMIT) in resp.json()["detail"]
    streamed = post_gz(small, iter([noise[:1000], noise[1000:]]))  # type: ignore[arg-type]
    assert streamed.status_code == 413
    assert str(COMPRESSED_LIMIT) in streamed.json()["detail"]


@pytest.mark.parametrize("encoding", ["br", "deflate", "compress", "gzip, gzip", "zstd"])
def test_unknown_content_encoding_gets_415(client: Any, encoding: str) -> None:
    resp = post_gz(client, gzip.compress(records_json([f.run()])), encoding)
    assert resp.status_code == 415
    assert "gzip" in resp.json()["detail"]
    assert resp.headers["accept-encoding"] == "gzip"


def test_two_content_encoding_headers_are_one_list(client: Any) -> None:
    body = gzip.compress(records_json([f.run()]))
    headers = [("content-encoding", "br"), ("content-encoding", "gzip")]
    resp = client.post("/api/v1/ingest", content=body, headers=headers)
    assert resp.status_code == 415


def test_corrupt_gzip_gets_400_saying_so(client: Any) -> None:
    resp = post_gz(client, b"this is not gzip at all")
    assert resp.status_code == 400
    assert "not valid gzip" in resp.json()["detail"]


def test_corrupt_gzip_data_after_a_valid_header_gets_400(client: Any) -> None:
    packed = bytearray(gzip.compress(records_json(f.full_run(steps=50))))
    packed[20:40] = b"\xff" * 20
    resp = post_gz(client, bytes(packed))
    assert resp.status_code == 400
    assert "not valid gzip" in resp.json()["detail"]


def test_truncated_gzip_gets_400_and_stores_nothing(client: Any) -> None:
    packed = gzip.compress(records_json(f.full_run(steps=3)))
    resp = post_gz(client, packed[: len(packed) // 2])
    assert resp.status_code == 400
    assert "cut short" in resp.json()["detail"]
    assert client.get("/api/v1/runs/run-a").status_code == 404


def test_gzip_of_invalid_json_is_a_422_not_a_server_error(client: Any) -> None:
    resp = post_gz(client, gzip.compress(b'{"records": [}'))
    assert resp.status_code == 422
