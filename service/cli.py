"""The `goodput` command line.

The service side never imports torch: `goodput train` hands over to `python -m moe_core.train`
(its flags are documented by `goodput train --help`), and `goodput demo` runs that loop as a
child process against a service it serves from a thread.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from service.settings import DEFAULT_DATABASE_URL

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


def _build_app(db: str) -> Any:
    from service.app import create_app
    from service.migrate import SchemaError
    from service.settings import Settings

    try:
        application = create_app(Settings(database_url=db))
    except SchemaError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    # The server's long-lived objects (modules, the app, SQLAlchemy's and pydantic's caches)
    # go to the permanent generation: a full collection then scans only what requests
    # allocate, instead of some 100k objects each time (60-75 ms per collection measured,
    # every few requests under load; bench/ingest.py and BENCHMARKS.md).
    gc.collect()
    gc.freeze()
    return application


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            console.print(
                f"[red]error:[/red] cannot listen on {host}:{port}: {exc.strerror}; "
                "choose another with --port"
            )
            raise typer.Exit(2) from exc


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    db: DbOption = DEFAULT_DATABASE_URL,
) -> None:
    """Serve the REST API and dashboards (SQLite is migrated automatically at start)."""
    import uvicorn

    _check_port_free(host, port)
    application = _build_app(db)
    console.print(
        f"goodput serving on http://{host}:{port}  (dashboards: "
        f"http://{host}:{port}/dashboards/goodput, API docs: /docs)"
    )
    uvicorn.run(application, host=host, port=port, log_level="warning")


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
        console.print(f"[red]error:[/red] {file} is not a file")
        raise typer.Exit(2)
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params = {"run_name": run_name} if run_name else {}
    url = server.rstrip("/") + "/api/v1/import/ml-goodput"
    try:
        body = gzip.compress(file.read_bytes())
        resp = httpx.post(url, content=body, headers=headers, params=params, timeout=300)
    except (OSError, httpx.HTTPError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if resp.status_code != 200:
        console.print(f"[red]error:[/red] HTTP {resp.status_code}: {resp.text[:2000]}")
        raise typer.Exit(1)
    result = resp.json()
    for warning in result.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")
    shown = ("run_id", "inserted", "duplicates", "ignored")
    console.print(" ".join(f"{k}={result[k]}" for k in shown), soft_wrap=True)


@db_app.command("upgrade")
def db_upgrade(db: DbOption = DEFAULT_DATABASE_URL, revision: str = "head") -> None:
    """Run the Alembic migrations up to REVISION (default: head)."""
    from service.migrate import upgrade

    upgrade(db, revision)
    console.print(f"database at revision {revision}")


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
    print(f"dashboard: {base}/dashboards/goodput?run_id={run_id}")
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
            console.print("[red]error:[/red] the service did not start")
            raise typer.Exit(1)
        time.sleep(0.05)


if __name__ == "__main__":
    app()
