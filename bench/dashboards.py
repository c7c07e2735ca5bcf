"""Time until every chart of each dashboard page is drawn in Chromium, for a 1,000,000-step run.

    .venv/bin/python bench/dashboards.py --db build/bench-dashboards.db  # a 2nd run reuses it
    .venv/bin/python bench/dashboards.py --steps 2000 --reps 1           # the smoke test's run

The run is bench/ingest.py's scale workload (`--part scale`: `--steps` steps in two attempts,
the first failing partway through; 12 E layers with routing every 10 steps; eval and
checkpoint every 100 steps), built by its functions and posted through `POST /api/v1/ingest`
to `goodput serve` (bench/ingest.py `start_ours`: a uvicorn process on 127.0.0.1, SQLite).
Beside it, a small run of the same lane but for `runtime_policy.dispatch_requested` (padded,
not grouped; min(3000, steps / 2) steps, one attempt) gives the compare page its pair. Both
runs' receipts are made complete (receipt fields in the run record, one dispatch observation
per E layer) so that the compare page gives a verdict. With `--db FILE` the database is kept
in FILE: a second run finds both runs there and skips the ingest.

Each page is first fetched as HTML (its HTTP status: a page not built yet, a 404, is reported
as such and not timed); its data URL (`body[data-data-url]`) is then fetched `--reps` times
after a warm-up: the median server time (request to last byte, from this process) and the
payload's size, as JSON and as sent (less if the server compressed it). Then Chromium
(Debian's, `/usr/bin/chromium`, headless, through Playwright) loads the page `--reps` + 1
times in one browser context: the first load with an empty cache (plotly.js fetched and
compiled), the others warm, as a user moving between pages has it. A load is timed from the
navigation's start to the moment every chart is drawn, by the page's clock
(`performance.now()`): the shared script's first draw done (`body[data-ready='1']`) and a
Plotly SVG in every visible `.chart` element and in every element the data's `figures` name.
Console errors and failed requests are counted.

`--only TEXT` measures only the pages whose path holds TEXT (e.g. `--only /compare`).

Prints one row per page, then `dashboards: slowest_page_s=<x> pages=<n>`: the largest warm
median over the pages drawn, and how many were.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import ingest as bench  # noqa: E402  (bench/ingest.py: the scale workload and the server)

from trainer_hooks.records import SCHEMA_VERSION  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SMALL_STEPS = 3000
KNOB = "runtime_policy.dispatch_requested"
PROJECT = "bench-dashboards"
HTML_ACCEPT = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
DATA_URL = re.compile(r'data-data-url="([^"]*)"')

# Ready: the first draw is done and every chart that should hold data holds a Plotly SVG.
DRAWN_JS = """([needReady, ids]) => {
  if (needReady && document.body.dataset.ready !== "1") { return false; }
  const charts = new Set(Array.from(document.querySelectorAll(".chart"))
    .filter((el) => el.offsetParent !== null));
  ids.forEach((id) => { const el = document.getElementById(id); if (el) { charts.add(el); } });
  for (const el of charts) { if (!el.querySelector(".main-svg")) { return false; } }
  return {t: performance.now(), charts: charts.size};
}"""
UNDRAWN_JS = """(ids) => Array.from(new Set([
    ...Array.from(document.querySelectorAll(".chart")).filter((el) => el.offsetParent !== null),
    ...ids.map((id) => document.getElementById(id)).filter(Boolean)]))
  .filter((el) => !el.querySelector(".main-svg")).map((el) => el.id || el.className)"""


# -- the runs --


class Planned(NamedTuple):
    run_id: str
    workload: bench.Workload
    dispatch: str


def plan(steps: int) -> list[Planned]:
    """The scale run (bench/ingest.py --part scale) and the small run of its lane."""
    scale = bench.scale_workload(bench.parse(["--part", "scale", "--scale-steps", str(steps)]))
    small = bench.Workload(
        steps=min(SMALL_STEPS, max(2 * scale.checkpoint_every, steps // 2)),
        layers=scale.layers,
        routing_every=scale.routing_every,
        checkpoint_every=scale.checkpoint_every,
        seed=1,
    )
    return [
        Planned(f"dash-scale-{steps}", scale, "grouped"),
        Planned(f"dash-small-{steps}", small, "padded"),
    ]


def run_record(p: Planned) -> dict[str, Any]:
    """bench/ingest.py's run record with a complete receipt: the plan's E layer count, the
    policy and environment fields a receipt needs; the lane differs only in the dispatch."""
    record = bench.run_record(p.workload, p.run_id, p.run_id)
    pattern = record["model_plan"]["pattern"]
    record["project"] = PROJECT
    record["model_plan"]["family_counts"] = {"A": pattern.count("A"), "E": pattern.count("E")}
    record["runtime_policy"] |= {
        "world_size": 1,
        "dtype": "bfloat16",
        "compile": "eager",
        "dispatch_requested": p.dispatch,
    }
    record["environment"] = {"torch": "2.13.0", "device": "bench", "host": "bench"}
    return record


def observations(p: Planned) -> list[dict[str, Any]]:
    """One dispatch observation per E layer (what the hooks' receipts part sends)."""
    num_e = run_record(p)["model_plan"]["family_counts"]["E"]
    base = {"schema_version": SCHEMA_VERSION, "run_id": p.run_id, "attempt": 0}
    return [
        {**base, "kind": "observation", "seam": f"moe_dispatch.layer{j}",
         "requested": p.dispatch, "observed": p.dispatch, "time": bench.T0 + 1.0, "step": 0}
        for j in range(num_e)
    ]  # fmt: skip


def batches(p: Planned) -> Iterator[bench.Batch]:
    """bench/ingest.py's batches, the first one's run record made complete, then the
    observations."""
    for i, batch in enumerate(bench.our_batches(p.workload, p.run_id, p.run_id)):
        if i == 0:
            body = json.loads(batch.body)
            body["records"][0] = run_record(p)
            batch = batch._replace(body=bench._dumps(body))
        yield batch
    obs = observations(p)
    yield bench.Batch(bench._dumps({"records": obs}), len(obs), 0)


def step_records(w: bench.Workload) -> int:
    return sum(len(steps) for _, steps in w.attempts())


def ensure_runs(client: httpx.Client, planned: list[Planned]) -> None:
    """Ingest each run the database lacks; refuse one stored partly (an interrupted ingest)."""
    for p in planned:
        got = client.get(f"/api/v1/runs/{p.run_id}")
        want = step_records(p.workload)
        if got.status_code == 200:
            stored = got.json()
            if stored["num_steps"] != want or stored["status"] != "completed":
                raise SystemExit(
                    f"{p.run_id} is stored with {stored['num_steps']} of {want} steps, status "
                    f"{stored['status']}: an ingest was interrupted; delete the --db file"
                )
            print(f"# {p.run_id}: already stored ({want} step records), ingest skipped")
            continue
        began = time.perf_counter()
        secs, steps, records, reqs = bench.send_all(
            client, "/api/v1/ingest", bench.prefetched(batches(p)), bench._all_inserted
        )
        print(
            f"# {p.run_id}: ingested {steps} steps, {records} records in {reqs} requests, "
            f"{time.perf_counter() - began:.1f} s",
            flush=True,
        )


def pages(scale: str, small: str) -> list[tuple[str, str]]:
    """(label, path) of each page, the scale run's as {id}."""
    compare = urlencode({"baseline": scale, "candidate": small, "knob": KNOB})
    run = f"/runs/{scale}"
    return [
        ("/", "/"),
        ("/runs/{id}/goodput", f"{run}/goodput"),
        ("/runs/{id}/performance", f"{run}/performance"),
        ("/runs/{id}/routing", f"{run}/routing"),
        ("/runs/{id}/routing?layer=all", f"{run}/routing?layer=all"),
        ("/runs/{id}/receipt", f"{run}/receipt"),
        ("/compare?baseline={id}&candidate={small}&knob=...", f"/compare?{compare}"),
        ("/trends", "/trends"),
    ]


# -- measuring --


class Row(NamedTuple):
    path: str
    status: str
    data_bytes: int | None = None
    wire_bytes: int | None = None
    server_ms: float | None = None
    first_s: float | None = None
    median_s: float | None = None
    charts: int | None = None
    errors: int = 0
    note: str = ""


def data_figures(
    client: httpx.Client, url: str, reps: int
) -> tuple[int, int, float, list[str], str]:
    """The data URL's size (JSON, as sent), median server time, the figures it names, and a
    note when it did not answer 200."""
    client.get(url)  # warm-up
    times, resp = [], None
    for _ in range(reps):
        t = time.perf_counter()
        resp = client.get(url)
        times.append((time.perf_counter() - t) * 1000)
    assert resp is not None
    note = "" if resp.status_code == 200 else f"data HTTP {resp.status_code}"
    ids = list((resp.json().get("figures") or {}).keys()) if resp.status_code == 200 else []
    return len(resp.content), resp.num_bytes_downloaded, statistics.median(times), ids, note


def load_times(
    browser: Any, url: str, need_ready: bool, ids: list[str], reps: int, timeout_s: float
) -> tuple[list[float], int, int, str]:
    """(seconds to drawn per load, the first cold; charts drawn; errors; a note)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    times: list[float] = []
    charts, note = 0, ""
    try:
        for _ in range(reps + 1):
            page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            try:
                page.goto(url, wait_until="commit")
                done = page.wait_for_function(
                    DRAWN_JS, arg=[need_ready, ids], polling="raf", timeout=timeout_s * 1000
                ).json_value()
            except Exception as exc:  # a timeout, a crash: report it, go on with the next page
                left = page.evaluate(UNDRAWN_JS, ids) if not page.is_closed() else []
                note = f"not drawn in {timeout_s:.0f} s: {left}" if left else type(exc).__name__
                page.close()
                break
            times.append(done["t"] / 1000)
            charts = int(done["charts"])
            page.close()
    finally:
        context.close()
    return times, charts, len(errors), note


def measure(
    client: httpx.Client, browser: Any, base: str, path: str, reps: int, timeout_s: float
) -> Row:
    page = client.get(path, headers=HTML_ACCEPT)
    if page.status_code != 200:
        return Row(path, str(page.status_code), note="page not measured")
    found = DATA_URL.search(page.text)
    ids: list[str] = []
    size = wire = server = None
    note = ""
    if found:
        size, wire, server, ids, note = data_figures(client, html.unescape(found.group(1)), reps)
    times, charts, errors, drawn_note = load_times(
        browser, base + path, found is not None, ids, reps, timeout_s
    )
    note = "; ".join(n for n in (note, drawn_note) if n)
    if len(times) < reps + 1:
        return Row(path, "not-drawn", size, wire, server, errors=errors, note=note)
    return Row(
        path,
        "200",
        size,
        wire,
        server,
        times[0],
        statistics.median(times[1:]),
        charts,
        errors,
        note,
    )


def _f(x: float | int | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(rows: list[Row]) -> None:
    width = max(len(r.path) for r in rows)
    print(
        f"{'page':<{width}}  {'status':>9}  {'data_B':>9}  {'sent_B':>8}  {'server_ms':>9}  "
        f"{'cold_s':>7}  {'warm_s':>7}  {'charts':>6}  {'errors':>6}  note"
    )
    for r in rows:
        print(
            f"{r.path:<{width}}  {r.status:>9}  {_f(r.data_bytes, 'd'):>9}  "
            f"{_f(r.wire_bytes, 'd'):>8}  {_f(r.server_ms, '.1f'):>9}  {_f(r.first_s, '.3f'):>7}  "
            f"{_f(r.median_s, '.3f'):>7}  {_f(r.charts, 'd'):>6}  {r.errors:>6}  {r.note}",
            flush=True,
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000, help="the scale run's steps")
    p.add_argument("--db", type=Path, help="keep the database here; reused when it holds the runs")
    p.add_argument("--reps", type=int, default=3, help="warm loads (and data fetches) per page")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per load, until drawn")
    p.add_argument("--only", default="", help="only the pages whose path holds this text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    bench.header()
    from playwright.sync_api import sync_playwright

    planned = plan(args.steps)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-dashboards-")))
        db = args.db.resolve() if args.db else tmp / "goodput.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        _, base = bench.start_ours(stack, db, tmp / "goodput.log")
        client = stack.enter_context(httpx.Client(base_url=base, timeout=900, trust_env=False))
        ensure_runs(client, planned)
        scale, small = (p.run_id for p in planned)
        print(
            f"# scale run {scale}: {planned[0].workload.steps} steps, attempt 0 fails at step "
            f"{planned[0].workload.fail_at} (= {{id}} below); small run {small}: "
            f"{planned[1].workload.steps} "
            f"steps; database {db}; {args.reps} warm loads per page after one cold",
            flush=True,
        )
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        rows = []
        for label, path in pages(scale, small):
            if args.only not in label:
                continue
            try:
                row = measure(client, browser, base, path, args.reps, args.timeout_s)
            except Exception as exc:  # one broken page must not hide the others' figures
                row = Row(path, "error", note=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row._replace(path=label))
    table(rows)
    drawn = [r.median_s for r in rows if r.median_s is not None]
    slowest = _f(max(drawn) if drawn else None, ".3f")
    print(f"dashboards: slowest_page_s={slowest} pages={len(drawn)}")


if __name__ == "__main__":
    main()
