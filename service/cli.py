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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

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


if __name__ == "__main__":
    app()
