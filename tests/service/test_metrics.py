"""/metrics: Prometheus text format 0.0.4, per-run figures that agree with the REST API,
ingest counters (exact under concurrent ingest), label escaping."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.services.metrics import METRICS_RUNS
from service.settings import Settings
from tests import factories as f

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad labels at {text[pos:]!r}"
        labels[m.group(1)] = re.sub(r"\\.", lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return labels


def parse(text: str) -> Samples:
    """Samples by (name, labels); checks that each family is one group after its TYPE."""
    assert text.endswith("\n")
    samples: Samples = {}
    typed: list[str] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("gauge", "counter") and name not in typed
            typed.append(name)
        elif not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1) == typed[-1], f"{m.group(1)} outside its family"
            key = (m.group(1), frozenset(parse_labels(m.group(2) or "").items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(m.group(3))
    return samples


def scrape(client: Any) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(resp.text)


def run_value(samples: Samples, name: str, run_id: str, **labels: str) -> float | None:
    for (n, pairs), value in samples.items():
        found = dict(pairs)
        if n == name and found.get("run_id") == run_id and labels.items() <= found.items():
            return value
    return None


def counter(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def ingest(client: Any, records: list[dict[str, Any]]) -> Any:
    return client.post("/api/v1/ingest", json={"records": records})


def test_goodput_metrics_equal_the_rest_goodput(client: Any) -> None:
    records = f.full_run(steps=6)
    records.append(f.span("data_stall", f.T0 + 12.2, f.T0 + 12.6))
    assert ingest(client, records).status_code == 200
    rest = client.get("/api/v1/runs/run-a/goodput").json()
    samples = scrape(client)
    labels = {"run_name": "alpha", "project": "default"}
    assert run_value(samples, "goodput_fraction", "run-a") == rest["goodput_fraction"]
    assert run_value(samples, "goodput_fraction", "run-a", **labels) is not None
    for category, seconds in rest["badput_s"].items():
        found = run_value(samples, "goodput_badput_seconds", "run-a", category=category)
        assert found == seconds, category


def test_metrics_follow_new_records_of_a_run(client: Any) -> None:
    assert ingest(client, [f.run(), f.attempt_start(), f.step(0), f.step(1)]).status_code == 200
    first = run_value(scrape(client), "goodput_fraction", "run-a")
    assert run_value(scrape(client), "goodput_fraction", "run-a") == first  # cached
    changes = [
        [f.step(2)],
        [f.span("eval", f.T0 + 16, f.T0 + 18)],
        [f.heartbeat(f.T0 + 40)],
        [f.attempt_end(end=f.T0 + 50, status="failed")],
    ]
    for change in changes:
        assert ingest(client, change).status_code == 200
        rest = client.get("/api/v1/runs/run-a/goodput").json()
        assert run_value(scrape(client), "goodput_fraction", "run-a") == rest["goodput_fraction"]


def test_tokens_per_second_covers_rank_0s_last_20_steps(client: Any) -> None:
    slow = [f.step(i, dur=2.0) for i in range(10)]  # older steps, left out
    fast = [f.step(i, dur=1.0) for i in range(10, 30)]
    other_rank = [f.step(i, rank=1, dur=0.5, tokens=9) for i in range(30)]
    assert ingest(client, [f.run(), *slow, *fast, *other_rank]).status_code == 200
    assert run_value(scrape(client), "goodput_tokens_per_second", "run-a") == 512.0


def test_drop_rate_is_the_mean_over_the_newest_routing_steps_layers(client: Any) -> None:
    routing = [
        f.routing(3, layer=0, dropped_per_expert=[0, 0, 0, 0]),
        f.routing(5, layer=0),  # 20 of 200 assignments dropped
        f.routing(5, layer=1, dropped_per_expert=[40, 0, 0, 0]),
    ]
    assert ingest(client, [f.run(), *routing]).status_code == 200
    found = run_value(scrape(client), "goodput_routing_drop_rate", "run-a")
    assert found == pytest.approx(0.15)


def test_a_run_without_data_has_only_what_it_can_have(client: Any) -> None:
    assert ingest(client, [f.run()]).status_code == 200
    samples = scrape(client)
    assert run_value(samples, "goodput_fraction", "run-a") is None
    assert run_value(samples, "goodput_tokens_per_second", "run-a") is None
    assert run_value(samples, "goodput_routing_drop_rate", "run-a") is None
    assert run_value(samples, "goodput_badput_seconds", "run-a", category="startup") == 0.0


def test_only_the_newest_runs_are_listed(client: Any) -> None:
    runs = [f.run(f"r{i:03d}", created_at=f.T0 + i) for i in range(METRICS_RUNS + 1)]
    assert ingest(client, runs).status_code == 200
    listed = {
        dict(labels)["run_id"]
        for name, labels in scrape(client)
        if name == "goodput_badput_seconds"
    }
    assert len(listed) == METRICS_RUNS and "r000" not in listed


def test_ingest_counters_move(client: Any) -> None:
    start = scrape(client)
    assert counter(start, "goodput_ingest_batches_total") == 0
    batch = f.full_run(steps=3)
    assert ingest(client, batch).status_code == 200
    assert ingest(client, batch).status_code == 200
    assert ingest(client, [f.run("run-b"), f.step(0, dur=-1.0)]).status_code == 422
    too_big = client.post(
        "/api/v1/ingest", content=b" " * (client.app.state.settings.max_body_bytes + 1)
    )
    assert too_big.status_code == 413
    samples = scrape(client)
    assert counter(samples, "goodput_ingest_batches_total") == 2
    assert counter(samples, "goodput_ingest_records_total", result="inserted") == len(batch)
    assert counter(samples, "goodput_ingest_records_total", result="duplicate") == len(batch)
    assert counter(samples, "goodput_ingest_rejected_total") == 2


def test_refused_tokens_are_not_counted_as_rejected_ingest(migrated_url: str) -> None:
    app = create_app(Settings(database_url=migrated_url, write_token="w-token"))
    try:
        with TestClient(app) as client:
            assert ingest(client, [f.run()]).status_code == 401
            resp = client.get("/metrics", headers={"Authorization": "Bearer w-token"})
            assert counter(parse(resp.text), "goodput_ingest_rejected_total") == 0
    finally:
        app.state.engine.dispose()


def test_label_values_are_escaped(client: Any) -> None:
    name = 'say "hi" \\ back\\slash\nnew line'
    assert ingest(client, [f.run(name=name, project='p"\\')]).status_code == 200
    resp = client.get("/metrics")
    assert 'run_name="say \\"hi\\" \\\\ back\\\\slash\\nnew line"' in resp.text
    assert 'project="p\\"\\\\"' in resp.text
    samples = parse(resp.text)
    assert any(dict(labels).get("run_name") == name for _, labels in samples)


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [("plain", "plain"), ('a"b', 'a\\"b'), ("a\\b", "a\\\\b"), ("a\nb", "a\\nb"), ("\\n", "\\\\n")],
)
def test_escape_label(client: Any, raw: str, escaped: str) -> None:
    assert ingest(client, [f.run(name=raw)]).status_code == 200
    assert f'run_name="{escaped}"' in client.get("/metrics").text


@pytest.mark.fresh_db
def test_counters_are_exact_under_concurrent_ingest(client: Any) -> None:
    """Threads ingest at once through the app: the counters hold exactly what was sent and
    what was refused (by the route's 409, by validation's 422 and by the body limit's 413)."""
    threads, batches, steps = 6, 4, 5
    limit = client.app.state.settings.max_body_bytes

    def send(t: int) -> list[int]:
        run_id = f"run-t{t}"
        statuses = []
        for b in range(batches):
            # each batch: `steps` new steps, the previous batch's steps resent (duplicates)
            new = [f.step(b * steps + i, run_id) for i in range(steps)]
            old = [f.step((b - 1) * steps + i, run_id) for i in range(steps)] if b else []
            head = [f.run(run_id), f.attempt_start(run_id)] if b == 0 else []
            statuses.append(ingest(client, [*head, *new, *old]).status_code)
            statuses.append(ingest(client, [f.step(0, run_id, dur=-1.0)]).status_code)
            statuses.append(ingest(client, [f.step(0, run_id, dur=3.0)]).status_code)  # 409
            statuses.append(client.post("/api/v1/ingest", content=b" " * (limit + 1)).status_code)
        return statuses

    with ThreadPoolExecutor(threads) as pool:
        sent = [s for statuses in pool.map(send, range(threads)) for s in statuses]
    assert sorted(set(sent)) == [200, 409, 413, 422]
    samples = scrape(client)
    assert counter(samples, "goodput_ingest_batches_total") == threads * batches
    inserted = threads * (2 + batches * steps)
    assert counter(samples, "goodput_ingest_records_total", result="inserted") == inserted
    duplicates = threads * (batches - 1) * steps
    assert counter(samples, "goodput_ingest_records_total", result="duplicate") == duplicates
    assert counter(samples, "goodput_ingest_rejected_total") == threads * batches * 3
