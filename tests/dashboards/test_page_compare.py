"""The compare page's routes (service/api/routes/page_compare.py) over stored runs: the
picker, the verdict's data (one run a side, replicates, two cells of an ablation), refusals
answered as data with what would fix them, errors."""

from __future__ import annotations

import random
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests import factories as f

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
KNOB = "runtime_policy.dispatch_requested"  # the field the dispatch knob reads


def timed_run(run_id: str, step_s: float, seed: int, steps: int = 40, **policy: Any) -> list:
    """A complete loop-shaped run whose steps take about step_s seconds; its E layers
    observed the dispatch its policy asked for."""
    rng = random.Random(seed)
    records = f.loop_run(run_id, steps=0, name=f"run <{run_id}>")
    end = records.pop()
    for r in records:
        if r["kind"] == "observation" and r["seam"].startswith("moe_dispatch."):
            r["observed"] = policy.get("dispatch_requested", "grouped")
    t = f.T0 + 10
    for i in range(steps):
        dur = step_s * (1 + rng.uniform(-0.03, 0.03))
        records.append(f.step(i, run_id, start=t, dur=dur, loss=2.0 - 0.01 * i))
        records.append(f.routing(i, layer=0, run_id=run_id))
        t += dur + 0.01
    records[0]["runtime_policy"].update({"seed": seed, **policy})
    records.append({**end, "end": t + 1})
    return records


def post(client: Any, records: list) -> None:
    resp = client.post("/api/v1/ingest", json={"records": records})
    assert resp.status_code == 200, resp.text


def pair(client: Any, cand_end: bool = True) -> None:
    post(client, timed_run("base", 0.10, 1, dispatch_requested="grouped"))
    cand = timed_run("cand", 0.08, 2, dispatch_requested="padded")
    post(client, cand if cand_end else cand[:-1])


def data(client: Any, **params: Any) -> dict[str, Any]:
    resp = client.get(
        "/ui/data/compare", params={"baseline": "base", "candidate": "cand", **params}
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_without_both_sides_the_page_is_a_picker_of_recent_runs(client: Any) -> None:
    pair(client)
    page = client.get("/compare", params={"baseline": "base", "candidate": ""}, headers=HTML)
    assert page.status_code == 200 and "data-data-url" not in page.text
    assert 'id="compare-empty"' in page.text and "Pick the two sides" in page.text
    assert re.search(
        r'<input class="side" name="baseline" id="pick-baseline" value="base"', page.text
    )
    options = dict(re.findall(r'<option value="([^"]*)">([^<]*)</option>', page.text))
    assert options["base"].startswith("run &lt;base&gt; · ") and options["cand"].endswith(
        " · completed"
    )
    assert "<base>" not in page.text  # the run's name is escaped
    assert '<option value="dispatch"></option>' in page.text  # the knobs' names offered


def test_a_lane_mismatch_is_answered_as_data_with_links_that_fix_it(client: Any) -> None:
    pair(client)
    page = client.get("/compare", params={"baseline": "base", "candidate": "cand"}, headers=HTML)
    url = re.search(r'data-data-url="([^"]+)"', page.text)
    assert page.status_code == 200 and url is not None
    assert url.group(1) == "/ui/data/compare?baseline=base&amp;candidate=cand"
    # asked for while plotly.js loads; dashboard.js's fetch of it gets the preloaded answer
    assert f'<link rel="preload" href="{url.group(1)}" as="fetch" crossorigin="anonymous">' in (
        page.text
    )
    refused = data(client)
    assert refused["verdict"] is None and refused["refusal"]["error"] == "lane_mismatch"
    assert refused["tables"]["refusal-table"]["rows"] == [[KNOB, "grouped", "padded"]]
    as_knob, anyway = (
        dict(parse_qsl(urlsplit(x["href"]).query)) for x in refused["refusal"]["fixes"]
    )
    assert as_knob == {"baseline": "base", "candidate": "cand", "knob": "dispatch"}
    assert anyway == {"baseline": "base", "candidate": "cand", "allow_lane_mismatch": "true"}
    # the overlays are drawn even without a verdict
    assert {"step_time", "loss", "drop_rate"} <= set(refused["figures"])
    for fixed in (as_knob, anyway):
        params = {k: v for k, v in fixed.items() if k not in ("baseline", "candidate")}
        assert data(client, **params)["verdict"] is not None


def test_the_verdict_is_the_apis_with_every_figure(client: Any) -> None:
    pair(client)
    got = data(client, knob="dispatch")
    api = client.get(
        "/api/v1/compare", params={"baseline": "base", "candidate": "cand", "knob": "dispatch"}
    ).json()
    assert got["verdict"]["verdict"] == api["verdict"] == "keep"
    assert got["verdict"]["reasons"] == api["reasons"]
    assert got["verdict"]["meaning"].startswith("faster or leaner")
    assert set(got["figures"]) == {"ratios", "badput", "step_time", "loss", "drop_rate"}
    axes = got["tables"]["axes"]["rows"]
    assert [r[0]["text"] for r in axes[:2]] == ["step time", "tokens/s"]
    assert len(axes) >= len(api["axes"]) - 8  # idle badput categories share one row
    ratio = api["step_time_ratio"]
    assert got["figures"]["ratios"]["data"][0]["x"] == [ratio["value"]]
    assert got["texts"]["ratio-step_time"].startswith(f"{ratio['value']:.3f} (95%: ")
    assert got["tables"]["lane_diff"]["rows"] == [[KNOB, "grouped", "padded", "declared knob"]]
    assert got["live"] is False and got["statuses"] == {"base": "completed", "cand": "completed"}
    assert got["texts"]["replicates"] == "1 vs 1" and got["texts"]["knobs"] == "dispatch"
    drops = got["figures"]["drop_rate"]["data"]
    assert [t["name"] for t in drops] == ["baseline", "candidate"]
    assert drops[0]["y"][0] == 100 * 20 / (100 * 2)  # factories.routing: 20 of 100 x top-2 dropped


def test_an_incomplete_receipt_is_data_naming_what_the_run_lacks_and_stays_live(
    client: Any,
) -> None:
    pair(client, cand_end=False)
    got = data(client, knob="dispatch")
    assert got["refusal"]["error"] == "incomplete_receipt" and got["live"] is True
    rows = got["tables"]["refusal-table"]["rows"]
    assert [(r[0]["text"], r[1]) for r in rows] == [("candidate: run <cand>", "attempt_end")]
    assert got["refusal"]["fixes"][0]["href"] == "/runs/cand/receipt"


def test_unknown_runs_are_404s_and_bad_parameters_name_their_field(client: Any) -> None:
    pair(client)
    page = client.get("/compare", params={"baseline": "base", "candidate": "nope"}, headers=HTML)
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert "run_id &#39;nope&#39; not found" in page.text
    assert client.get(
        "/ui/data/compare", params={"baseline": "nope", "candidate": "cand"}
    ).json() == {"detail": "run_id 'nope' not found"}
    bad = client.get(
        "/ui/data/compare", params={"baseline": "base", "candidate": "cand", "margin": 3}
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "margin"
    for params in ({"margin": "3"}, {"baseline": "no good"}):
        page = client.get(
            "/compare", params={"baseline": "base", "candidate": "cand", **params}, headers=HTML
        )
        assert page.status_code == 422 and next(iter(params)) in page.text


def test_replicates_a_side_are_compared_together_each_drawn_as_its_own_trace(
    client: Any,
) -> None:
    for i in range(3):
        post(client, timed_run(f"b{i}", 0.10, 10 + i, dispatch_requested="grouped"))
        post(client, timed_run(f"c{i}", 0.08, 20 + i, dispatch_requested="padded"))
    sides = {"baseline": "b0,b1,b2", "candidate": "c0, c1,c2"}
    page = client.get("/compare", params={**sides, "knob": "dispatch"}, headers=HTML)
    assert page.status_code == 200 and page.text.count("data-run-status=") == 6
    got = data(client, **sides, knob="dispatch")
    assert got["verdict"]["verdict"] == "keep" and got["texts"]["replicates"] == "3 vs 3"
    names = [t["name"] for t in got["figures"]["step_time"]["data"]]
    assert names == [f"baseline · run &lt;b{i}&gt;" for i in range(3)] + [
        f"candidate · run &lt;c{i}&gt;" for i in range(3)
    ]
    assert set(got["statuses"]) == {"b0", "b1", "b2", "c0", "c1", "c2"}
    mixed = timed_run("b3", 0.10, 13, dispatch_requested="grouped", lr=0.5)
    post(client, mixed)
    refused = data(client, baseline="b0,b3", candidate="c0", knob="dispatch")
    assert refused["refusal"]["error"] == "replicates_differ"
    assert refused["tables"]["refusal-table"]["rows"] == [["runtime_policy.lr", None, "0.5"]]
    bad = client.get("/ui/data/compare", params={"baseline": "b0,,b0", "candidate": "c0"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "baseline"
