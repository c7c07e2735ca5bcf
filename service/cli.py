"""The `goodput` command line.

The service side never imports torch: `goodput train` hands over to `python -m moe_core.train`
(its flags are documented by `goodput train --help`), and `goodput demo` runs that loop as a
child process against a service it serves from a thread.

A mistake in the configuration (a bad `--db` URL, a database that refuses the connection, a
bad `GOODPUT_*` setting, a schema to upgrade, a port in use) is one line on stderr,
`goodput: <what is wrong>; <what to do>`, never a traceback. Exit status: 0 done, 1 a
runtime failure (a database that cannot be reached, a service that refused records), 2 a
usage or configuration error.
"""

from __future__ import annotations

import errno
import gc
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Protocol

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from service import ablate as runner
from service.settings import DEFAULT_DATABASE_URL

if TYPE_CHECKING:
    from service.settings import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Goodput and receipt observability for MoE training.",
)
spool_app = typer.Typer(no_args_is_help=True, help="Inspect and replay on-disk spools.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic) commands.")
app.add_typer(spool_app, name="spool")
app.add_typer(db_app, name="db")
console = Console()

DbOption = Annotated[
    str, typer.Option("--db", envvar="GOODPUT_DATABASE_URL", help="SQLAlchemy database URL")
]


USAGE = 2  # exit status of a usage or configuration error
FAILURE = 1  # exit status of a runtime failure


def fail(message: str, code: int = USAGE) -> NoReturn:
    """Say what is wrong in one line on stderr, `goodput: ...`, and exit with `code`."""
    line = " ".join(message.split())
    sys.stderr.write(f"goodput: {line}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def shown_url(db: str) -> str:
    """The URL as messages show it: without its password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(db).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


_URL_HELP = "pass --db sqlite:///PATH or --db postgresql://USER@HOST:PORT/DATABASE"


@contextmanager
def database_errors(db: str) -> Iterator[None]:
    """Turn what opening, checking or migrating the database at `db` raises into one line."""
    from alembic.util.exc import CommandError
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

    from service.store.migrate import SchemaError

    try:
        yield
    except SchemaError as exc:
        fail(str(exc))
    except ValidationError as exc:  # a GOODPUT_DB_* setting the engine reads
        fail(settings_message(exc))
    except ArgumentError as exc:  # NoSuchModuleError too: an unknown dialect
        fail(f"--db is not a database URL goodput can use ({_first_line(exc)}); {_URL_HELP}")
    except ImportError as exc:
        fail(
            f"no driver for the database at {shown_url(db)} ({exc}): goodput stores in "
            f"SQLite or PostgreSQL; {_URL_HELP}"
        )
    except DBAPIError as exc:
        message, code = _connect_error(db, exc)
        fail(message, code)
    except CommandError as exc:  # alembic: an unknown revision, say
        fail(f"{_first_line(exc)}; run goodput db upgrade without --revision to reach the newest")
    except SQLAlchemyError as exc:
        fail(f"the database at {shown_url(db)} failed: {_first_line(exc)}", FAILURE)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _connect_error(db: str, exc: Exception) -> tuple[str, int]:
    """The message and exit status for a database that refused to open or answer."""
    from service.store.db import is_sqlite

    where = shown_url(db)
    reason = _first_line(exc)
    if is_sqlite(db):
        return (
            f"cannot open the SQLite database at {where}: {reason}; check that its folder "
            f"exists and is writable, or pass --db",
            USAGE,
        )
    reason = reason.rsplit(" failed: ", 1)[-1].replace("FATAL:", "").strip()
    refused = ("does not exist", "authentication failed", "password", "permission denied")
    if any(word in reason.lower() for word in refused):
        return f"the database at {where} refused the connection: {reason}; fix --db", USAGE
    return (
        f"cannot reach the database at {where}: {reason[:1].lower() + reason[1:]}; start it "
        "or pass --db",
        FAILURE,
    )


def load_settings(db: str) -> Settings:
    """The service settings: `db`, and the rest from GOODPUT_* variables; a bad one is one
    line naming the variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from service.settings import Settings

    try:
        return Settings(database_url=db)
    except ValidationError as exc:
        fail(settings_message(exc))
    except SettingsError as exc:
        fail(f"a GOODPUT_* setting cannot be read: {_first_line(exc)}")


def settings_message(exc: Any) -> str:
    """`GOODPUT_<NAME>: <what is wrong>` for each setting the environment got wrong."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        name = str(err["loc"][0]) if err["loc"] else "setting"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"GOODPUT_{name.upper()}: {msg}")
    return "bad setting " + "; ".join(parts) + " (fix the environment variable or unset it)"


def _build_app(db: str) -> Any:
    from service.app import create_app

    settings = load_settings(db)
    with database_errors(db):
        application = create_app(settings)
    # The server's long-lived objects (modules, the app, SQLAlchemy's and pydantic's caches)
    # go to the permanent generation: a full collection then scans only what requests
    # allocate, instead of some 100k objects each time (60-75 ms per collection measured,
    # every few requests under load; bench/ingest.py and BENCHMARKS.md).
    gc.collect()
    gc.freeze()
    return application


def _check_port_free(host: str, port: int) -> None:
    if not 0 <= port <= 65535:
        fail(f"--port {port}: a TCP port is 0 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            fix = "choose another with --port" if exc.errno == errno.EADDRINUSE else "check --host"
            fail(f"cannot listen on {host}:{port}: {exc.strerror}; {fix}")


def _check_workers(workers: int, db: str) -> None:
    from service.store.db import is_sqlite

    if workers < 1:
        fail(f"--workers {workers}: give 1 or more")
    if workers > 1:
        with database_errors(db):
            sqlite = is_sqlite(db)
        if sqlite:
            fail(
                f"--workers {workers} needs PostgreSQL: SQLite takes one writer at a time, so "
                "one worker serves it best; drop --workers, or pass --db postgresql://..."
            )


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    db: DbOption = DEFAULT_DATABASE_URL,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="server processes (PostgreSQL only; SQLite is served by one)",
        ),
    ] = 1,
) -> None:
    """Serve the REST API and dashboards (SQLite is migrated automatically at start)."""
    import uvicorn

    _check_workers(workers, db)
    _check_port_free(host, port)
    application = _build_app(db)  # checks the settings and the database, whatever workers
    console.print(
        f"goodput serving on http://{host}:{port}  (dashboards: "
        f"http://{host}:{port}/, API docs: /docs)"
        + (f", {workers} workers" if workers > 1 else ""),
        soft_wrap=True,
    )
    if workers == 1:
        uvicorn.run(application, host=host, port=port, log_level="warning")
        return
    # Each worker process builds its own app from the environment (service.app.from_env).
    application.state.engine.dispose()
    os.environ["GOODPUT_DATABASE_URL"] = db
    uvicorn.run(
        "service.app:from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Run the bundled MoE training loop with hooks attached (see goodput train --help)."""
    argv = [sys.executable, "-m", "moe_core.train", *ctx.args]
    os.execv(sys.executable, argv)


@spool_app.command("replay")
def spool_replay(
    directory: Annotated[Path, typer.Argument(help="a spool, or a folder of spools")],
    server: Annotated[str, typer.Option("--server", help="service URL")],
    from_start: Annotated[bool, typer.Option("--all", help="resend acknowledged records")] = False,
    rejected: Annotated[
        bool,
        typer.Option(
            "--rejected",
            help="resend the batches the service refused for good (each spool's rejected/), "
            "e.g. after an upgrade of the service; each one it takes is deleted",
        ),
    ] = False,
    token: Annotated[
        str | None, typer.Option("--token", envvar="GOODPUT_TOKEN", help="write token")
    ] = None,
) -> None:
    """Send what a spool holds; records already stored are counted as duplicates. A batch
    the service cannot take now is tried again a few times; one it refuses for good is kept
    in the spool's rejected/ folder, with a warning, for `--rejected`."""
    from trainer_hooks.sink import replay, replay_rejected
    from trainer_hooks.spool import SpoolLockedError

    if not directory.is_dir():
        console.print(f"[red]error:[/red] {directory} is not a directory")
        raise typer.Exit(2)
    if rejected and from_start:
        console.print("[red]error:[/red] --rejected resends refused batches; --all does not apply")
        raise typer.Exit(2)
    try:
        if rejected:
            result = replay_rejected(directory, server, token=token)
        else:
            result = replay(directory, server, from_start=from_start, token=token)
    except (ConnectionError, SpoolLockedError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(" ".join(f"{k}={v}" for k, v in result.items()))
    if result.get("corrupt_bytes"):
        console.print(
            f"[yellow]warning:[/yellow] {result['corrupt_bytes']} bytes of the spools were "
            f"damaged ({result['corrupt_frames']} stretches) and skipped: the records they held "
            "are lost; the rest was sent"
        )
    if result.get("rejected") or result.get("still_rejected"):
        console.print(
            "[yellow]warning:[/yellow] the service refused some records for good; they are "
            f"kept in the spools' rejected/ folders under {directory} (the reasons beside "
            "them): resend them with --rejected once the service accepts them"
        )
        if result.get("still_rejected"):
            raise typer.Exit(1)


@app.command("import-mgm")
def import_mgm(
    file: Annotated[Path, typer.Argument(help="ml-goodput-measurement log: JSON array or lines")],
    server: Annotated[str, typer.Option("--server", help="service URL")],
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="run name (default: the job name)")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="GOODPUT_TOKEN", help="write token")
    ] = None,
) -> None:
    """Import an ml-goodput-measurement log as one run; importing it again stores nothing twice."""
    import gzip

    if not file.is_file():
        fail(f"{file} is not a file")
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params = {"run_name": run_name} if run_name else {}
    url = server.rstrip("/") + "/api/v1/import/ml-goodput"
    try:
        body = gzip.compress(file.read_bytes())
        resp = httpx.post(url, content=body, headers=headers, params=params, timeout=300)
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror or exc}")
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {server}: {exc}; start it or pass --server", FAILURE)
    if resp.status_code != 200:
        fail(f"the service answered HTTP {resp.status_code}: {resp.text[:2000]}", FAILURE)
    result = resp.json()
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    shown = ("run_id", "inserted", "duplicates", "ignored")
    console.print(" ".join(f"{k}={result[k]}" for k in shown), soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(db: DbOption = DEFAULT_DATABASE_URL, revision: str = "head") -> None:
    """Run the Alembic migrations up to REVISION (default: head); at the head, also build the
    rollups of runs stored before they existed."""
    from service.store.migrate import upgrade

    with database_errors(db):
        built = upgrade(db, revision)
    console.print(f"database at revision {revision}")
    if built:
        console.print(f"rollups built for {len(built)} run(s) stored before revision 0004")


@db_app.command("rebuild-rollups")
def db_rebuild_rollups(
    db: DbOption = DEFAULT_DATABASE_URL,
    run: Annotated[str | None, typer.Option(help="only this run (default: every run)")] = None,
) -> None:
    """Recompute the rollups (step blocks, span totals, routing blocks) from the stored
    records: of one run, or of every run."""
    from service.store.migrate import rebuild_rollups

    with database_errors(db):
        try:
            count = rebuild_rollups(db, run)
        except LookupError:
            fail(f"run {run!r} is not in the database at {shown_url(db)}")
    console.print(f"rollups rebuilt for {count} run(s)")


def print_goodput(summary: dict[str, Any]) -> None:
    table = Table(title=f"goodput of run {summary['run_id']}", show_header=True)
    table.add_column("part")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    total = summary["total_s"] or 0.0

    def row(name: str, secs: float) -> None:
        share = f"{100 * secs / total:.1f}%" if total else "-"
        table.add_row(name, f"{secs:.3f}", share)

    row("goodput", summary["goodput_s"])
    for name, secs in summary["badput_s"].items():
        if secs:
            row(f"badput: {name}", secs)
    row("other", summary["other_s"])
    row("total", total)
    console.print(table)


@app.command()
def demo(
    exit_: Annotated[
        bool, typer.Option("--exit", help="exit when done instead of serving")
    ] = False,
    host: str = "127.0.0.1",
    port: int = 8787,
    db: DbOption = DEFAULT_DATABASE_URL,
    steps: int = 60,
    spool: Path = Path("./goodput-spool"),
) -> None:
    """Serve on SQLite, train the bundled MoE model against it, print its goodput."""
    import uvicorn

    _check_port_free(host, port)
    server = uvicorn.Server(
        uvicorn.Config(_build_app(db), host=host, port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="goodput-server", daemon=True)
    thread.start()
    _wait_started(server, thread)
    base = f"http://{host}:{port}"
    run_id = uuid.uuid4().hex
    console.print(f"service on {base} ({db}); training {steps} steps...")
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "moe_core.train",
            "--server",
            base,
            "--steps",
            str(steps),
            "--run-name",
            "demo",
            "--run-id",
            run_id,
            "--spool",
            str(spool),
        ]
    )
    if rc != 0:
        server.should_exit = True
        raise typer.Exit(rc)
    summary = httpx.get(f"{base}/api/v1/runs/{run_id}/goodput", timeout=30).json()
    print_goodput(summary)
    print(f"dashboard: {base}/runs/{run_id}/goodput  (all runs: {base}/)")
    print(f"API docs:  {base}/docs", flush=True)
    if not exit_:
        console.print("serving; Ctrl-C to stop")
        try:
            while thread.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    server.should_exit = True
    thread.join(10)


def _wait_started(server: Any, thread: threading.Thread, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            fail("the service did not start", FAILURE)
        time.sleep(0.05)


# --- the terminal side of keep/drop: --version, runs, compare, ablate ----------------------


def package_version() -> str:
    """The installed package's version; "unknown" when run from a tree not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("goodput")
    except PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        console.print(f"goodput {package_version()}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="print goodput's version and exit",
        ),
    ] = False,
) -> None:
    """Goodput and receipt observability for MoE training."""


ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="ask the goodput service at this URL (default: none, read the --db database "
        "in this process)",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="GOODPUT_TOKEN",
        help="the service's token, with --server (default: $GOODPUT_TOKEN; none needed "
        "where the service has no tokens)",
    ),
]
ReadDbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="GOODPUT_DATABASE_URL",
        help="SQLAlchemy URL of the database to read without --server, as goodput serve's",
    ),
]


class ApiResponse(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def reason_phrase(self) -> str: ...
    def json(self) -> Any: ...


class ApiClient(Protocol):
    """What the commands ask of a client: httpx's, or the in-process app's (TestClient)."""

    def get(self, url: str, *, params: Any = None) -> ApiResponse: ...


@contextmanager
def service_client(server: str | None, db: str, token: str | None) -> Iterator[ApiClient]:
    """A client of the goodput API: the service at `server`, or, without one, the app itself
    on the `db` database in this process, so that both answer through the same routes.
    In process, tokens are not asked for: whoever can open the database can read it."""
    if server:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=120) as client:
            yield client
        return
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = load_settings(db).model_copy(update={"write_token": None, "read_token": None})
    with database_errors(db):
        application = create_app(settings)
    try:
        with TestClient(application, raise_server_exceptions=False) as client:
            yield client
    finally:
        application.state.engine.dispose()


def _detail(resp: ApiResponse) -> str:
    """An error answer's detail in one line: a message, field errors, or a refusal."""
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field') or '.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}"
            if isinstance(d, dict)
            else str(d)
            for d in detail
        )
    if isinstance(detail, dict):
        return refusal_text(detail)
    return str(detail)


def refusal_text(refusal: dict[str, Any]) -> str:
    """A refusal ({"error", "message", and "fields" or "missing"}) as one line: what is
    wrong, where, and (for the command line) what would fix it."""
    text = str(refusal.get("message") or refusal)
    error = refusal.get("error")
    if refusal.get("fields"):
        text += f"; fields: {', '.join(map(str, refusal['fields']))}"
    missing = refusal.get("missing")
    if isinstance(missing, dict) and missing:
        text += "; " + "; ".join(
            f"run {run} lacks {', '.join(map(str, keys))}" for run, keys in missing.items()
        )
    if error == "lane_mismatch":
        text += " (here: --knob NAME for each knob that differs, or --allow-lane-mismatch)"
    return f"{text} [{error}]" if error else text


def api_get(client: ApiClient, path: str, params: Any = None, where: str = "") -> Any:
    """GET a JSON answer; anything else is one line and an exit: 409 (no verdict yet) 1,
    404 and 422 (a name or parameter to fix) 2, a token refused 2, the rest 1."""
    try:
        resp = client.get(path, params=params)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {where}: {exc}; start it or fix --server", FAILURE)
    return _answer(resp)


def _answer(resp: ApiResponse) -> Any:
    status = resp.status_code
    if status == 200:
        return resp.json()
    detail = _detail(resp)
    if status == 409:
        fail(f"refused: {detail}", FAILURE)
    if status in (401, 403):
        fail(f"the service refused the token (HTTP {status}): {detail}; pass --token")
    if status in (404, 422):
        fail(detail)
    fail(f"the service answered HTTP {status}: {detail}", FAILURE)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))


_STATUS_STYLE = {"completed": "green", "failed": "red", "running": "cyan", "stalled": "yellow"}


@app.command("runs")
def list_runs(
    project: Annotated[
        str | None, typer.Option(help="only this project's runs (default: every project)")
    ] = None,
    tag: Annotated[str | None, typer.Option(help="only runs with this tag (default: any)")] = None,
    status: Annotated[
        str | None,
        typer.Option(help="only running, completed, failed or stalled runs (default: any)"),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="only runs whose name holds this, in any case (default: any name)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="show at most this many, newest first")] = 20,
    server: ServerOption = None,
    db: ReadDbOption = DEFAULT_DATABASE_URL,
    token: TokenOption = None,
) -> None:
    """The runs, newest first, as a table (the service's GET /api/v1/runs)."""
    params = {"project": project, "tag": tag, "status": status, "name_contains": name}
    params = {k: v for k, v in params.items() if v is not None}
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    with service_client(server, db, token) as client:
        while len(rows) < limit:
            page_params = {**params, "limit": min(500, limit - len(rows))}
            if cursor:
                page_params["cursor"] = cursor
            page = api_get(client, "/api/v1/runs", page_params, server or "")
            rows += page["runs"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        # A run's step count and layer pattern are in the run itself, not in the list.
        details = [api_get(client, f"/api/v1/runs/{r['run_id']}", None, server or "") for r in rows]
    if not rows:
        console.print("no runs" + (" match" if params else " yet"))
        return
    table = Table(show_header=True)
    widest_id = max(len(r["run_id"]) for r in rows)
    table.add_column("id", no_wrap=True, min_width=widest_id)  # whole, to paste into compare
    for column in ("name", "project", "status", "created", "steps", "pattern", "tags"):
        table.add_column(column, justify="right" if column == "steps" else "left")
    for row, run in zip(rows, details, strict=True):
        table.add_row(
            Text(row["run_id"]),
            Text(row["name"]),
            Text(row["project"]),
            Text(row["status"], style=_STATUS_STYLE.get(row["status"], "")),
            _when(row["created_at"]),
            str(run.get("num_steps", "")),
            Text(str((run.get("model_plan") or {}).get("pattern") or "-")),
            Text(", ".join(row.get("tags") or [])),
        )
    console.print(table)
    if cursor:
        console.print(f"(more runs: raise --limit above {limit})")


_VERDICT_STYLE = {"keep": "green", "tax": "yellow", "drop": "red", "inconclusive": "magenta"}
_FINDING_STYLE = {"better": "green", "worse": "red", "same": "", "unclear": "yellow"}
_SHARE_AXES = ("goodput_fraction", "drop_rate")  # and badput.*: fractions, shown in %


def _is_share(axis: str) -> bool:
    return axis in _SHARE_AXES or axis.startswith("badput.")


def axis_figure(axis: str, value: float | None) -> str:
    """One side's figure of an axis, in the axis's unit."""
    if value is None:
        return "-"
    if _is_share(axis):
        return f"{value:.1%}"
    if axis == "step_time":
        return f"{value * 1e3:.4g} ms"
    if axis == "peak_memory":
        return f"{value / 2**20:.4g} MiB"
    return f"{value:.4g}"


def axis_estimate(axis: dict[str, Any]) -> tuple[str, str]:
    """An axis's estimate and 95% interval: a ratio as x0.930, a difference of shares in
    percentage points, any other difference signed."""
    value, low, high = axis["value"], axis["low"], axis["high"]
    if value is None:
        return "-", "-"
    share = _is_share(axis["name"])

    def one(x: float) -> str:
        if axis["kind"] == "ratio":
            return f"{x:.3f}"
        return f"{100 * x:+.1f}" if share else f"{x:+.4g}"

    estimate = f"x{one(value)}" if axis["kind"] == "ratio" else one(value)
    if share:
        estimate += " pts"
    interval = "-" if low is None or high is None else f"[{one(low)}, {one(high)}]"
    return estimate, interval


def print_comparison(body: dict[str, Any], title: str | None = None) -> None:
    """A comparison as the compare page shows it: the verdict, its reasons, and each axis
    with both sides' figures, the estimate (ratios as xR, differences of shares in
    percentage points) and its 95% interval. Badput categories at zero on both sides are
    left out of the table, and counted under it."""
    verdict = body["verdict"]
    style = _VERDICT_STYLE.get(verdict, "bold")
    sides = f"{len(body['baseline_runs'])} baseline run(s), {len(body['candidate_runs'])} candidate"
    head = (f"[bold]{escape(title)}[/]: " if title else "") + f"verdict [bold {style}]{verdict}[/]"
    console.print(f"{head} ({sides})", soft_wrap=True, highlight=False)
    for reason in body["reasons"]:
        console.print(Text(f"  - {reason}"), soft_wrap=True)
    table = Table(show_header=True)
    for column in ("axis", "baseline", "candidate", "estimate", "95% interval", "finding"):
        left = column in ("axis", "finding")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "axis")
    idle = 0
    for axis in body["axes"]:
        name = axis["name"]
        if name.startswith("badput.") and not axis["baseline"] and not axis["candidate"]:
            idle += 1
            continue
        estimate, interval = axis_estimate(axis)
        finding = axis["finding"]
        table.add_row(
            Text(name),
            Text(axis_figure(name, axis["baseline"])),
            Text(axis_figure(name, axis["candidate"])),
            Text(estimate),
            Text(interval),
            Text(finding, style=_FINDING_STYLE.get(finding, "dim")),
        )
    console.print(table)
    notes = []
    if idle:
        notes.append(f"{idle} badput categories at 0 on both sides not shown")
    if body.get("run_noise") is not None:
        notes.append(f"the intervals allow for {body['run_noise']:.1%} run-to-run step-time noise")
    if notes:
        console.print(Text("  " + "; ".join(notes)), soft_wrap=True)


@app.command()
def compare(
    baseline: Annotated[
        str,
        typer.Argument(
            metavar="BASELINE",
            help="the baseline: a run id, or run ids comma-separated (replicates); with "
            "--ablation, a cell name such as dispatch=grouped",
        ),
    ],
    candidate: Annotated[
        str, typer.Argument(metavar="CANDIDATE", help="the candidate, written like the baseline")
    ],
    knob: Annotated[
        list[str] | None,
        typer.Option(
            "--knob",
            help="a knob the two sides may differ in, e.g. dispatch (repeat for more; "
            "default: none, the lanes must match)",
        ),
    ] = None,
    ablation: Annotated[
        str | None,
        typer.Option(
            "--ablation",
            help="compare two cells of this ablation: BASELINE and CANDIDATE are cell names "
            "(default: none, they are run ids)",
        ),
    ] = None,
    allow_lane_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-lane-mismatch",
            help="compare even where the sides differ beyond the knobs (default: refuse)",
        ),
    ] = False,
    server: ServerOption = None,
    db: ReadDbOption = DEFAULT_DATABASE_URL,
    token: TokenOption = None,
) -> None:
    """Keep/drop: the candidate against the baseline, a verdict with its 95% intervals.

    Asks GET /api/v1/compare and prints the verdict, its reasons and each axis (baseline,
    candidate, estimate, 95% interval, finding). A refusal (incomplete receipts, lanes that
    differ) is one line and exit status 1; an unknown knob or run, exit status 2."""
    params: dict[str, Any] = {"baseline": baseline, "candidate": candidate}
    if knob:
        params["knob"] = knob
    if ablation is not None:
        params["ablation"] = ablation
    if allow_lane_mismatch:
        params["allow_lane_mismatch"] = "true"
    with service_client(server, db, token) as client:
        body = api_get(client, "/api/v1/compare", params, server or "")
    print_comparison(body)


def print_ablation(body: dict[str, Any]) -> None:
    """Each cell of an ablation: the baseline's runs, every other cell's verdict against it
    or why there is none yet."""
    expected = body.get("expected_runs")
    console.print(
        f"[bold]ablation {escape(body['ablation_id'])}[/] ({escape(body['name'])}): "
        f"{body['runs_ended']} of "
        f"{expected if expected is not None else body['runs']} runs ended",
        soft_wrap=True,
        highlight=False,
    )
    for cell in body["cells"]:
        runs = len(cell["runs"])
        if cell["baseline"]:
            console.print(
                f"[bold]{escape(cell['cell'])}[/]: the baseline, {runs} run(s)", highlight=False
            )
        elif cell.get("comparison"):
            print_comparison(cell["comparison"], title=cell["cell"])
        else:
            why = refusal_text(cell["refusal"]) if cell.get("refusal") else "no comparison yet"
            console.print(
                f"[bold]{escape(cell['cell'])}[/]: no verdict ({runs} run(s)): {escape(why)}",
                soft_wrap=True,
                highlight=False,
            )


@contextmanager
def embedded_service(db: str) -> Iterator[str]:
    """Serve the `db` database from a thread on a free loopback port; yields its URL."""
    import uvicorn

    application = _build_app(db)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here: no race with another process
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="goodput-server", daemon=True
    )
    thread.start()
    try:
        _wait_started(server, thread)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        application.state.engine.dispose()


def _declare(base: str, body: dict[str, Any], token: str | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.post(f"{base}/api/v1/ablations", json=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the service at {base}: {exc}; start it or fix --server", FAILURE)
    if resp.status_code != 200:
        _answer(resp)


@app.command(context_settings={"allow_extra_args": True})
def ablate(
    ctx: typer.Context,
    knob: Annotated[
        list[str],
        typer.Option(
            "--knob",
            help="a knob and its values, KNOB=V1,V2,... (the first value is the baseline); "
            f"repeat for a grid of every combination. Knobs: {runner.known_knobs()}",
        ),
    ],
    repeats: Annotated[
        int, typer.Option(min=1, help="runs of each cell, each repeat with its own seed")
    ] = 3,
    steps: Annotated[int, typer.Option(min=1, help="training steps of every run")] = 60,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="the goodput service the runs report to (default: none, serve the --db "
            "database from this process on a free loopback port while it runs)",
        ),
    ] = None,
    project: Annotated[
        str, typer.Option(help="project the ablation and its runs are filed under")
    ] = "default",
    name: Annotated[
        str | None,
        typer.Option(help="the ablation's name (default: its knobs, e.g. dispatch=grouped,padded)"),
    ] = None,
    seed0: Annotated[
        int, typer.Option(help="seed of the first repeat; repeat r runs seed0 + r in every cell")
    ] = 0,
    device: Annotated[str, typer.Option(help="torch device of the runs, e.g. cuda")] = "cpu",
    db: Annotated[
        str,
        typer.Option(
            "--db",
            envvar="GOODPUT_DATABASE_URL",
            help="without --server: the database served, as goodput serve's",
        ),
    ] = DEFAULT_DATABASE_URL,
    token: TokenOption = None,
    keep_serving: Annotated[
        bool,
        typer.Option(
            "--keep-serving",
            help="without --server: keep serving when done, for the browser, until Ctrl-C "
            "(default: stop)",
        ),
    ] = False,
) -> None:
    """Run the bundled loop over a knob grid, replicated and interleaved; print the verdicts.

    Every cell runs REPEATS times, interleaved (each repeat runs every cell once, all on one
    seed), as one ablation the service stores; at the end, each cell's verdict against the
    baseline cell (the first value of every knob). Arguments after -- go to every run
    (goodput train's flags, e.g. -- --d-model 32 --eval-every 5). A run that fails is
    reported and the rest go on; exit status 1 if any failed."""
    extra = list(ctx.args)
    try:
        grid = runner.build_grid(knob)
        runner.check_extra_args(extra, grid)
    except runner.AblateUsageError as exc:
        fail(str(exc))
    ablation_id = runner.new_ablation_id()
    settings = runner.Settings(steps=steps, device=device, project=project, extra=extra)
    title = (name or " ".join(f"{k}={','.join(v)}" for k, v in grid.knobs.items()))[:200]
    plan = runner.schedule(grid, repeats, seed0)
    body = runner.ablation_body(ablation_id, title, grid, repeats, settings, seed0)
    with ExitStack() as stack:
        base = server.rstrip("/") if server else stack.enter_context(embedded_service(db))
        _declare(base, body, token)
        console.print(
            f"ablation {ablation_id}: {len(grid.cells)} cells x {repeats} repeats = "
            f"{len(plan)} runs of {steps} steps; watch it at {base}/ablations/{ablation_id}",
            soft_wrap=True,
            highlight=False,
        )
        failed = _run_plan(ablation_id, plan, settings, base, token, len(grid.cells))
        with service_client(base, db, token) as client:
            print_ablation(api_get(client, f"/api/v1/ablations/{ablation_id}", None, base))
        if failed:
            console.print(f"[red]{failed} of {len(plan)} runs failed[/]")
        if keep_serving and not server:
            console.print(f"serving {base}/ablations/{ablation_id}; Ctrl-C to stop")
            with suppress(KeyboardInterrupt):
                while True:
                    time.sleep(0.5)
    if failed:
        raise typer.Exit(FAILURE)


def _run_plan(
    ablation_id: str,
    plan: list[runner.Planned],
    settings: runner.Settings,
    base: str,
    token: str | None,
    cells: int,
) -> int:
    """Run the schedule one child at a time under a progress bar; returns the failed count.
    Every cell failing in the first repeat stops it (the rest would fail alike)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    env = dict(os.environ)
    if token:
        env["GOODPUT_TOKEN"] = token  # read by the child; never on its command line
    failed = 0
    repeats = plan[-1].repeat + 1
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("starting", total=len(plan))
        for i, planned in enumerate(plan):
            bar.update(
                task, description=f"repeat {planned.repeat + 1}/{repeats} {planned.cell.name}"
            )
            argv = runner.child_argv(ablation_id, planned, settings, base, uuid.uuid4().hex)
            proc = runner.start_child(argv, env)
            try:
                result = runner.finish_child(proc)
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait(30)
                bar.stop()
                fail(
                    f"stopped after {i} of {len(plan)} runs; the ablation {ablation_id} keeps "
                    "the runs that ended",
                    130,
                )
            if result.returncode != 0:
                failed += 1
                bar.console.print(
                    f"[red]run failed[/] ({escape(planned.cell.name)}, repeat "
                    f"{planned.repeat + 1}, exit {result.returncode}): "
                    + escape(result.last_line or "no message"),
                    soft_wrap=True,
                    highlight=False,
                )
            bar.advance(task)
            if i == cells - 1 and failed == cells:
                bar.stop()
                last = result.last_line or "no message"
                fail(
                    f"every cell's first run failed (the last: {last}); stopped, the other "
                    "repeats would fail alike",
                    FAILURE,
                )
    return failed


if __name__ == "__main__":
    app()
