"""Screenshots of the dashboards of a run trained on a GPU machine (issue 16 part 2).

    .venv/bin/python bench/gpu_run_screenshots.py /work/.device/1/spools.tgz \
        --spool spool_eager --out bench/results/gpu_dashboards

The tarball holds trainer spools (bench/gpu_model_breakdown.py writes one with
`SpoolSink(DIR, None)`: offline, nothing sent). This unpacks it to a temporary directory,
starts `goodput serve` on a fresh temporary SQLite file on a free loopback port, replays the
chosen spool into it with `goodput spool replay --all`, waits until the run's steps are
stored, then opens each page that shows the run in headless Chromium (Debian's
/usr/bin/chromium, through Playwright) and saves a full-page PNG of each into the output
directory:

- runs.png          `/`                           the runs table (goodput, tokens/s, ...)
- goodput.png       `/runs/{id}/goodput`          the run page: goodput, badput, timeline
- performance.png   `/runs/{id}/performance`      step time, tokens/s, TFLOP/s, MFU, device
                                                  vs host, peak memory
- routing.png       `/runs/{id}/routing`          the first E layer: tokens per expert
- routing_layer<n>  `/runs/{id}/routing?layer=n`  each further E layer
- routing_all.png   `/runs/{id}/routing?layer=all` drop rate and MaxVio of every E layer
- receipt.png       `/runs/{id}/receipt`          model plan, policy, environment, seams
- trends.png        `/trends`                     the run over calendar time

A page is shot once the shared page script has drawn its data (`body[data-draws] >= 1`, as
tests/e2e/pages waits) and every visible `.chart` holds a Plotly SVG. Problems the browser
saw (console errors, failed requests) are printed per page. The server is stopped at the
end, and the temporary directory removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
GOODPUT = str(Path(sys.executable).with_name("goodput"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WIDTH = 1400

# drawn: the first draw done and a Plotly SVG in every visible chart
DRAWN_JS = """() => {
  if (Number(document.body.dataset.draws || 0) < 1) { return false; }
  const charts = Array.from(document.querySelectorAll(".chart"))
    .filter((el) => el.offsetParent !== null);
  return charts.every((el) => el.querySelector(".main-svg") !== null);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def unpack(tarball: Path, into: Path, spool: str) -> Path:
    with tarfile.open(tarball) as tar:
        tar.extractall(into, filter="data")
    found = into / spool
    if not found.is_dir():
        names = sorted(p.name for p in into.iterdir())
        raise SystemExit(f"no spool {spool!r} in {tarball} (it holds {names})")
    (found / "spool.lock").unlink(missing_ok=True)  # the trainer's lock file, not held here
    return found


def serve(db: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [GOODPUT, "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--db", f"sqlite:///{db}"]
    out = log.open("wb")
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def replay(spool: Path, base: str) -> None:
    cmd = [GOODPUT, "spool", "replay", str(spool), "--server", base, "--all"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(done.stdout.strip())
    if done.stderr.strip():
        print(done.stderr.strip(), file=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"spool replay failed (exit {done.returncode})")


def wait_ingested(base: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """The one run the spool held, once its steps are stored and the count stops moving."""
    deadline = time.monotonic() + timeout_s
    last = -1
    while time.monotonic() < deadline:
        runs = httpx.get(f"{base}/api/v1/runs", timeout=10).json()["runs"]
        if runs:
            run = httpx.get(f"{base}/api/v1/runs/{runs[0]['run_id']}", timeout=10).json()
            steps = int(run.get("num_steps") or 0)
            if steps > 0 and steps == last:
                if len(runs) > 1:
                    print(f"note: {len(runs)} runs stored; showing the newest", file=sys.stderr)
                return dict(run)
            last = steps
        time.sleep(1.0)
    raise TimeoutError(f"no run ingested within {timeout_s} s")


def pages(base: str, run: dict[str, Any]) -> list[tuple[str, str]]:
    rid = run["run_id"]
    shots = [
        ("runs", "/"),
        ("goodput", f"/runs/{rid}/goodput"),
        ("performance", f"/runs/{rid}/performance"),
        ("routing", f"/runs/{rid}/routing"),
    ]
    page = httpx.get(f"{base}/ui/data/runs/{rid}/routing", params={"layer": "all"}, timeout=30)
    layers = page.json().get("layers") or []
    shots += [(f"routing_layer{n}", f"/runs/{rid}/routing?layer={n}") for n in layers[1:]]
    shots += [
        ("routing_all", f"/runs/{rid}/routing?layer=all"),
        ("receipt", f"/runs/{rid}/receipt"),
        ("trends", "/trends"),
    ]
    return shots


def shoot(base: str, shots: list[tuple[str, str]], out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        for name, path in shots:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda e, p=problems: p.append(str(e)))
            page.on(
                "console",
                lambda m, p=problems: p.append(m.text) if m.type == "error" else None,
            )
            page.on("requestfailed", lambda r, p=problems: p.append(f"failed: {r.url}"))
            answer = page.goto(base + path)
            status = answer.status if answer else None
            try:
                page.wait_for_function(DRAWN_JS, timeout=60_000)
            except Exception as e:  # shoot it anyway: what a user would see
                problems.append(f"not drawn within 60 s: {type(e).__name__}")
            page.wait_for_timeout(500)  # Plotly's last relayout
            target = out / f"{name}.png"
            page.screenshot(path=str(target), full_page=True)
            written.append(target)
            failed = page.evaluate("document.body.dataset.failed || ''")
            if failed:
                problems.append(f"data: {failed}")
            size = target.stat().st_size // 1024
            print(f"{name:16s} {path}  HTTP {status}  {size} KiB  problems={problems or 'none'}")
            page.close()
        browser.close()
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tarball", type=Path, help="a .tgz of trainer spools")
    ap.add_argument("--spool", default="spool_eager", help="which spool in it (default: eager)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_dashboards")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-shots-") as tmp:
        work = Path(tmp)
        spool = unpack(a.tarball, work / "spools", a.spool)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve(work / "goodput.db", port, work / "serve.log")
        try:
            wait_http(base + "/healthz")
            replay(spool, base)
            run = wait_ingested(base)
            print(
                f"run {run['run_id']} ({run.get('name')}): {run.get('num_steps')} steps, "
                f"status {run.get('status')}"
            )
            shoot(base, pages(base, run), a.out)
        finally:
            stop(server)
            log = (work / "serve.log").read_text(errors="replace")
            errors = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
            if errors:
                print("server log:\n" + log[-4000:], file=sys.stderr)
    print(f"screenshots in {a.out}")


if __name__ == "__main__":
    main()
