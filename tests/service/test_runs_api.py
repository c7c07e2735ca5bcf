from __future__ import annotations

import re
from typing import Any

from tests import factories as f


def ingest(client: Any, records: list[dict[str, Any]]) -> None:
    resp = client.post("/api/v1/ingest", json={"records": records})
    assert resp.status_code == 200, resp.text


def test_runs_filter_by_name_newest_first(client: Any) -> None:
    for i, name in enumerate(["a", "b", "a"]):
        ingest(client, [f.run(f"r{i}", name, created_at=f.T0 + i)])
    body = client.get("/api/v1/runs", params={"name": "a"}).json()
    assert [r["run_id"] for r in body["runs"]] == ["r2", "r0"]
    assert body["next_cursor"] is None


def test_runs_page_through_with_the_cursor(client: Any) -> None:
    ingest(client, [f.run(f"r{i:02d}", "x", created_at=f.T0 + i // 2) for i in range(7)])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = client.get("/api/v1/runs", params=params).json()
        seen += [r["run_id"] for r in body["runs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"r{i:02d}" for i in reversed(range(7))]


def test_bad_cursor_is_a_422_naming_cursor(client: Any) -> None:
    resp = client.get("/api/v1/runs", params={"cursor": "!!!"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "cursor"


def test_run_detail_has_receipt_parts_attempts_and_status(client: Any) -> None:
    ingest(client, f.full_run(steps=4) + [])
    run = client.get("/api/v1/runs/run-a").json()
    assert run["num_steps"] == 4
    assert run["status"] == "completed"
    assert run["attempts"][0]["attempt"] == 0


def test_failed_attempt_marks_the_run_failed(client: Any) -> None:
    ingest(client, [f.run(), f.attempt_start(), f.attempt_end(status="failed", cause="OOM")])
    assert client.get("/api/v1/runs/run-a").json()["status"] == "failed"


def test_unknown_run_is_404_everywhere(client: Any) -> None:
    for path in ("", "/steps", "/goodput"):
        assert client.get(f"/api/v1/runs/nope{path}").status_code == 404


def test_steps_returns_every_step_when_max_points_is_large(client: Any) -> None:
    ingest(client, [f.run(), *[f.step(i) for i in range(300)]])
    body = client.get("/api/v1/runs/run-a/steps", params={"max_points": 1000}).json()
    assert [p["step"] for p in body["points"]] == list(range(300))
    assert body["points"][0]["step_time_s"] == 1.0
    assert {"step", "loss", "step_time_s", "tokens"} <= set(body["points"][0])


def test_steps_downsampled_keep_the_slowest_step(client: Any) -> None:
    steps = [f.step(i) for i in range(300)]
    steps[123] = f.step(123, dur=1.9)
    ingest(client, [f.run(), *steps])
    body = client.get("/api/v1/runs/run-a/steps", params={"max_points": 20}).json()
    assert len(body["points"]) <= 20 and body["total"] == 300
    assert 123 in [p["step"] for p in body["points"]]


def test_goodput_endpoint_parts_add_up_to_total(client: Any) -> None:
    ingest(client, f.full_run(steps=5))
    g = client.get("/api/v1/runs/run-a/goodput").json()
    parts = g["goodput_s"] + sum(g["badput_s"].values()) + g["other_s"]
    assert abs(parts - g["total_s"]) < 1e-9
    assert g["badput_s"]["startup"] == 10.0
    assert g["goodput_s"] == 5.0


def test_healthz_reports_the_schema_revision(client: Any) -> None:
    from service.store.migrate import head_revision

    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["revision"] == head_revision()


def test_openapi_docs_are_served(client: Any) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/api/v1/ingest" in paths and "/api/v1/runs/{run_id}/goodput" in paths


def test_the_docs_load_nothing_from_another_site(client: Any) -> None:
    """/docs and /redoc name only this server's files (from a CDN they are blank pages
    offline), and those are the real scripts, with their media types."""
    for page, script in [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")]:
        html = client.get(page).text
        assert "http" not in html.lower(), html
        urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
        urls += re.findall(r"""(?:url: |spec-url=)["']([^"']+)""", html)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert f"/static/docs/{script}" in urls and "/openapi.json" in urls, urls
    for name, kind in [
        ("swagger-ui-bundle.js", "javascript"),
        ("swagger-ui.css", "text/css"),
        ("redoc.standalone.js", "javascript"),
    ]:
        resp = client.get(f"/static/docs/{name}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"]
        assert len(resp.content) > 100_000  # the real file, not a placeholder
    redoc = client.get("/static/docs/redoc.standalone.js").content
    assert b"cdn.redoc.ly" not in redoc and b"/static/docs/favicon.png" in redoc  # its logo
    assert client.get("/static/docs/core.py").status_code == 404  # only what the pages load


def test_runs_filter_by_status_pattern_and_tag(client: Any) -> None:
    plan = {"pattern": "AEME"}
    ingest(
        client,
        [
            f.run("done", "x", created_at=f.T0 + 1, tags=["ablation", "grouped"], model_plan=plan),
            f.attempt_start("done"),
            f.attempt_end("done"),
            f.run("broke", "x", created_at=f.T0 + 2, tags=["ablation"]),
            f.attempt_start("broke"),
            f.attempt_end("broke", status="failed"),
            f.run("busy", "x", created_at=f.T0 + 3),
            f.attempt_start("busy"),
            f.run("fresh", "x", created_at=f.T0 + 4),
        ],
    )

    def ids(**params: Any) -> list[str]:
        return [r["run_id"] for r in client.get("/api/v1/runs", params=params).json()["runs"]]

    assert ids(status="completed") == ["done"]
    assert ids(status="failed") == ["broke"]
    assert ids(status="running") == ["fresh", "busy"]
    assert ids(tag="ablation") == ["broke", "done"]
    assert ids(tag="ablation", status="failed") == ["broke"]
    assert ids(pattern="AEME") == ["done"]
    run = client.get("/api/v1/runs/done").json()
    assert run["tags"] == ["ablation", "grouped"]
    bad = client.get("/api/v1/runs", params={"status": "sleeping"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "status"


def test_a_run_sent_again_may_only_add_tags(client: Any) -> None:
    ingest(client, [f.run("r", "x", tags=["a"])])
    again = client.post("/api/v1/ingest", json={"records": [f.run("r", "x", tags=["a", "b"])]})
    assert again.json() == {"inserted": 1, "duplicates": 0}
    fewer = client.post("/api/v1/ingest", json={"records": [f.run("r", "x", tags=["b"])]})
    assert fewer.status_code == 409  # a tag is never removed by a re-send (issue 12)
    assert sorted(client.get("/api/v1/runs/r").json()["tags"]) == ["a", "b"]
