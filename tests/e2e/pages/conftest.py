"""What the pages' browser tests share: one server on loopback holding runs made by the
bundled training loop (`goodput train`, real processes), pages that can reach nothing but
that server (in the session's one Chromium: tests/conftest.py `browser`), and screenshots of
what it drew.

Runs (`Site` attributes are their ids):
- `crashed`: crashes at step 18 (`--fail-at-step`), resumes from its step-15 checkpoint as
  attempt 1; evals and checkpoints; pattern AEME.
- `dropping`: a null slot and capacity factor 1.0, so tokens are dropped, routing sent every
  step; its name holds `<script>alert(1)</script>`.
- `baseline`, `candidate`: a compare pair, the same lane but for the dispatch
  (`runtime_policy.dispatch_requested`: grouped, then padded), project "ab".

Screenshots go to $GOODPUT_SCREENSHOTS (default build/screenshots/), one PNG per name.

While working on a page, set GOODPUT_PAGES_SITE_DB=/some/file.db: the first session trains
the runs and keeps a copy of the database there, later sessions start from that copy
instead of training again. CI leaves it unset and trains once: under pytest-xdist the
workers share one copy (`_cached_db`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from filelock import FileLock

from moe_core.loop import FAIL_EXIT_CODE
from tests.conftest import LiveServer

SCREENSHOTS = Path(os.environ.get("GOODPUT_SCREENSHOTS", "build/screenshots"))
TRAIN = [sys.executable, "-m", "service.cli", "train", "--no-progress"]
COMMON = ["--pattern", "AEME", "--eval-every", "10", "--flush-timeout", "30"]


@dataclass
class Site:
    base: str
    crashed: str = "crash-resume"
    dropping: str = "drops"
    baseline: str = "ab-grouped"
    candidate: str = "ab-padded"
    hostile_name: str = "drops <script>alert(1)</script>"
    work: Path = field(default_factory=Path)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.base + path, params=params, timeout=30)


def _train(site: Site, name: str, *args: str) -> subprocess.Popen[str]:
    work = site.work / name
    work.mkdir(exist_ok=True)
    cmd = [*TRAIN, "--server", site.base, "--spool", str(work / "spool"), *COMMON, *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=work,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _done(proc: subprocess.Popen[str], ok: tuple[int, ...] = (0,)) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode in ok, out


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The server and its runs, made once for every page test (two trainings at a time on
    this 2-core machine)."""
    work = tmp_path_factory.mktemp("pages")
    db = work / "pages.db"
    cached = _cached_db(tmp_path_factory)
    with FileLock(f"{cached}.lock") if cached else nullcontext():
        if cached and cached.exists():
            shutil.copyfile(cached, db)
        server = LiveServer(f"sqlite:///{db}", page_refresh_s=1.0)  # live pages: every 1 s
        server.start()
        s = Site(base=server.base, work=work)
        if not (cached and cached.exists()):
            _make_runs(s)
            if cached:
                with sqlite3.connect(db) as src, sqlite3.connect(cached) as dst:
                    src.backup(dst)
    yield s
    server.stop()


def _cached_db(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """Where the site's database is kept for reuse: GOODPUT_PAGES_SITE_DB, else, under
    pytest-xdist, beside the workers' temporary directories (the first worker to need the
    site trains its runs, the others wait for it and copy them); None: train here."""
    if os.environ.get("GOODPUT_PAGES_SITE_DB"):
        return Path(os.environ["GOODPUT_PAGES_SITE_DB"])
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent / "pages-site.db"
    return None


def _make_runs(s: Site) -> None:
    crash = ["--run-id", s.crashed, "--run-name", "crash and resume", "--steps", "30"]
    crash += ["--checkpoint-every", "8"]
    first = _train(s, "crash", *crash, "--fail-at-step", "18")
    drops = _train(
        s,
        "drops",
        "--run-id",
        s.dropping,
        "--run-name",
        s.hostile_name,
        "--steps",
        "24",
        "--null-slot",
        "--capacity-factor",
        "1.0",
        "--routing-every",
        "1",
    )
    _done(first, ok=(FAIL_EXIT_CODE,))  # a real crash, at step 18
    resume = _train(s, "crash", *crash, "--resume")
    _done(drops)
    pair = ["--steps", "40", "--project", "ab", "--seed", "3"]
    base = _train(
        s,
        "base",
        "--run-id",
        s.baseline,
        "--run-name",
        "ab grouped",
        *pair,
        "--dispatch",
        "grouped",
    )
    _done(resume)
    cand = _train(
        s, "cand", "--run-id", s.candidate, "--run-name", "ab padded", *pair, "--dispatch", "padded"
    )
    _done(base)
    _done(cand)


@dataclass
class Opened:
    """A page, what went wrong on it (console errors, page errors, failed requests) and the
    addresses it asked for elsewhere than the server (each refused)."""

    page: Any
    problems: list[str]
    elsewhere: list[str]

    def ready(self, draws: int = 1, timeout_ms: int = 30_000) -> None:
        """Wait until the page's script drew its data `draws` times."""
        self.page.wait_for_function(
            f"Number(document.body.dataset.draws || 0) >= {draws}", timeout=timeout_ms
        )

    def shoot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def clean(self) -> None:
        """No console error, no failed request, nothing asked of another site."""
        assert self.problems == [] and self.elsewhere == [], (self.problems, self.elsewhere)


def open_page(browser: Any, base: str, path: str, width: int = 1400) -> Opened:
    page = browser.new_page(viewport={"width": width, "height": 900})
    opened = Opened(page, [], [])

    def only_here(route: Any) -> None:
        if route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            opened.elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_here)
    page.on("pageerror", lambda e: opened.problems.append(str(e)))
    page.on("console", lambda m: opened.problems.append(m.text) if m.type == "error" else None)
    page.on("requestfailed", lambda r: opened.problems.append(f"failed: {r.url}"))
    page.goto(base + path)
    return opened
