"""The terminal side of keep/drop (issue 15): `goodput --version`, `goodput runs`,
`goodput compare` and `goodput ablate`.

`runs` and `compare` read a SQLite database filled through the ingest API (no training), in
process as they do without --server; each answer is checked against what the filters and the
API say independently. `ablate` runs the bundled loop for real: a two-cell grid of one repeat,
tiny model, against the SQLite database it serves itself.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service import ablate
from service import cli as cli_module
from service.cli import app
from tests import factories as f
from tests.service.test_compare_api import timed_run

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables one line a row, so rows can be read back."""
    monkeypatch.setattr(cli_module.console, "_width", 250)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'goodput.db'}"


@contextmanager
def app_on(url: str) -> Iterator[Any]:
    """The app on the database at `url`, in process."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=url))
    try:
        with TestClient(application) as client:
            yield client
    finally:
        application.state.engine.dispose()


@pytest.fixture
def api(db: str) -> Iterator[Any]:
    """The app on `db`, to fill it and to ask it what the command line should print."""
    with app_on(db) as client:
        yield client


def module_db(factory: pytest.TempPathFactory, fill: Any) -> Iterator[tuple[str, Any]]:
    """A database filled once for the tests of a module that only read it, and its app."""
    url = f"sqlite:///{factory.mktemp('db') / 'goodput.db'}"
    with app_on(url) as client:
        fill(client)
        yield url, client


def post(api: Any, records: list[dict[str, Any]]) -> None:
    resp = api.post("/api/v1/ingest", json={"records": records})
    assert resp.status_code == 200, resp.text


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def table_rows(output: str) -> dict[str, list[str]]:
    """A rich table's body rows, keyed by their first cell."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def one_error_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("goodput: ")
    return lines[0]


def test_version_is_the_installed_package_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"goodput {version('goodput')}"


# --- goodput runs ------------------------------------------------------------------------

RUNS = [
    # run id, name, project, tags, status, pattern, steps
    ("r1", "alpha-grouped", "p1", ["nightly"], "completed", "AEME", 6),
    ("r2", "Alpha-padded", "p1", [], "failed", "AE", 4),
    ("r3", "beta", "p2", ["nightly", "big"], "completed", "AEAE", 3),
]


def fill_runs(api: Any) -> None:
    for i, (run_id, name, project, tags, status, pattern, steps) in enumerate(RUNS):
        records = f.loop_run(run_id, pattern, steps, name=name, project=project, tags=tags)
        records[0]["created_at"] = f.T0 + i  # r3 newest
        records[-1]["status"] = status
        post(api, records)


@pytest.fixture(scope="module")
def runs_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for url, _ in module_db(tmp_path_factory, fill_runs):
        yield url


@pytest.mark.parametrize(
    ("options", "keep"),
    [
        ((), lambda r: True),
        (("--project", "p1"), lambda r: r[2] == "p1"),
        (("--tag", "nightly"), lambda r: "nightly" in r[3]),
        (("--status", "failed"), lambda r: r[4] == "failed"),
        (("--name", "ALPHA"), lambda r: "alpha" in r[1].lower()),
        (("--project", "p1", "--status", "completed"), lambda r: r[2] == "p1" and r[4] != "failed"),
    ],
)
def test_runs_lists_what_the_filters_keep(
    runs_db: str, options: tuple[str, ...], keep: Any
) -> None:
    result = invoke("runs", "--db", runs_db, *options)
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    expected = [r for r in RUNS if keep(r)]
    assert list(rows) == [r[0] for r in reversed(expected)]  # newest first
    for run_id, name, project, tags, status, pattern, steps in expected:
        assert rows[run_id][:3] == [name, project, status]
        assert rows[run_id][4:] == [str(steps), pattern, ", ".join(sorted(tags))]


def test_runs_limit_and_nothing_found(runs_db: str) -> None:
    result = invoke("runs", "--db", runs_db, "--limit", "2")
    assert list(table_rows(result.stdout)) == ["r3", "r2"]
    assert "raise --limit" in result.stdout
    none = invoke("runs", "--db", runs_db, "--project", "nope")
    assert none.exit_code == 0 and none.stdout.strip() == "no runs match"


def test_runs_bad_status_is_one_line(runs_db: str) -> None:
    result = invoke("runs", "--db", runs_db, "--status", "done")
    assert result.exit_code == 2
    assert "status" in one_error_line(result)


# --- goodput compare ---------------------------------------------------------------------


def fill_compare(api: Any) -> None:
    """Two baseline replicates (0.10 s steps), two faster candidates (0.08 s), and one run
    of another dtype."""
    for run_id, step_s, seed, dispatch in [
        ("b1", 0.10, 1, "loop"),
        ("b2", 0.10, 2, "loop"),
        ("c1", 0.08, 3, "grouped"),
        ("c2", 0.08, 4, "grouped"),
    ]:
        records = timed_run(run_id, step_s, seed, dispatch_requested=dispatch)
        records[0]["runtime_policy"]["seed"] = seed  # replicates: only their seeds differ
        post(api, records)
    post(api, timed_run("d1", 0.08, 5, dispatch_requested="grouped", dtype="bf16"))


@pytest.fixture(scope="module")
def compare_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    yield from module_db(tmp_path_factory, fill_compare)


@pytest.fixture
def compare_db(compare_site: tuple[str, Any]) -> str:
    return compare_site[0]


def test_compare_prints_the_verdict_and_every_axis_as_the_api_gives_them(
    compare_site: tuple[str, Any],
) -> None:
    compare_db, api = compare_site
    result = invoke("compare", "b1,b2", "c1,c2", "--knob", "dispatch", "--db", compare_db)
    assert result.exit_code == 0, result.output
    body = api.get(
        "/api/v1/compare", params={"baseline": "b1,b2", "candidate": "c1,c2", "knob": "dispatch"}
    ).json()
    first = result.stdout.splitlines()[0]
    assert first == f"verdict {body['verdict']} (2 baseline run(s), 2 candidate)"
    for reason in body["reasons"]:
        assert f"  - {reason}" in result.stdout
    rows = table_rows(result.stdout)
    shown = [a for a in body["axes"] if a["baseline"] or a["candidate"] or a["value"] is None]
    for axis in shown:
        row = rows[axis["name"]]
        assert row[-1] == axis["finding"]
    step = rows["step_time"]
    axis = next(a for a in body["axes"] if a["name"] == "step_time")
    # the figures in ms, the ratio and its interval to 3 places: recomputed from the JSON
    assert step[0] == f"{axis['baseline'] * 1e3:.4g} ms"
    assert step[1] == f"{axis['candidate'] * 1e3:.4g} ms"
    assert step[2] == f"x{axis['value']:.3f}"
    assert step[3] == f"[{axis['low']:.3f}, {axis['high']:.3f}]"
    assert axis["value"] == pytest.approx(0.8, rel=0.05)  # what the runs were made to be
    goodput = next(a for a in body["axes"] if a["name"] == "goodput_fraction")
    assert rows["goodput_fraction"][0] == f"{goodput['baseline']:.1%}"
    assert rows["goodput_fraction"][2] == f"{100 * goodput['value']:+.1f} pts"


def test_compare_refusal_is_one_line_with_the_fix_and_exit_1(compare_db: str) -> None:
    result = invoke("compare", "b1", "d1", "--knob", "dispatch", "--db", compare_db)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "[lane_mismatch]" in line and "runtime_policy.dtype" in line
    assert "--allow-lane-mismatch" in line
    forced = invoke(
        "compare", "b1", "d1", "--knob", "dispatch", "--allow-lane-mismatch", "--db", compare_db
    )
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.startswith("verdict ")


def test_compare_unknown_knob_or_run_is_a_usage_error(compare_db: str) -> None:
    result = invoke("compare", "b1", "c1", "--knob", "speed", "--db", compare_db)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "unknown knob" in line and "dispatch" in line and "capacity_factor" in line
    missing = invoke("compare", "b1", "nope", "--db", compare_db)
    assert missing.exit_code == 2
    assert "nope" in one_error_line(missing)


def test_compare_cells_of_an_ablation(db: str, api: Any) -> None:
    cells = {"dispatch=loop": "loop", "dispatch=grouped": "grouped"}
    declared = api.post(
        "/api/v1/ablations",
        json={
            "ablation_id": "abl-t",
            "name": "t",
            "created_at": f.T0,
            "knobs": {"dispatch": list(cells.values())},
            "cells": {name: {"dispatch": v} for name, v in cells.items()},
            "baseline_cell": "dispatch=loop",
            "repeats": 1,
        },
    )
    assert declared.status_code == 200, declared.text
    for run_id, (cell, dispatch), step_s in zip(
        ("a", "b"), cells.items(), (0.10, 0.08), strict=True
    ):
        records = timed_run(run_id, step_s, 1, dispatch_requested=dispatch)
        records[0].update(ablation_id="abl-t", ablation_cell=cell)
        post(api, records)
    result = invoke(
        "compare", "--ablation", "abl-t", "dispatch=loop", "dispatch=grouped", "--db", db
    )
    assert result.exit_code == 0, result.output
    body = api.get(
        "/api/v1/compare",
        params={"ablation": "abl-t", "baseline": "dispatch=loop", "candidate": "dispatch=grouped"},
    ).json()
    assert result.stdout.startswith(f"verdict {body['verdict']} (1 baseline run(s), 1 candidate)")


# --- goodput ablate ----------------------------------------------------------------------

# Independent of service/ablate.py: each knob, a value, and the `goodput train` arguments
# that run it.
EXPECTED_FLAGS: dict[str, list[tuple[str, list[str]]]] = {
    "dispatch": [("padded", ["--dispatch", "padded"]), ("loop", ["--dispatch", "loop"])],
    "compile": [("on", ["--compile"]), ("off", [])],
    "capacity_factor": [("1.25", ["--capacity-factor", "1.25"]), ("none", [])],
    "null_slot": [("on", ["--null-slot"]), ("off", [])],
    "top_k": [("1", ["--top-k", "1"])],
    "num_experts": [("8", ["--num-experts", "8"])],
    "lr": [("0.001", ["--lr", "0.001"])],
    "batch_size": [("4", ["--batch-size", "4"])],
    "seq_len": [("32", ["--seq-len", "32"])],
    "d_model": [("48", ["--d-model", "48"])],
    "pattern": [("AEME", ["--pattern", "AEME"])],
    "slowdown": [("0.1", ["--slowdown", "0.1"]), ("0", ["--slowdown", "0"])],
}


def test_every_knob_maps_to_its_train_flag() -> None:
    assert set(ablate.KNOB_FLAGS) == set(EXPECTED_FLAGS)
    for knob, cases in EXPECTED_FLAGS.items():
        for value, flags in cases:
            ablate.KNOB_FLAGS[knob].check(knob, value)
            assert ablate.KNOB_FLAGS[knob].flags(value) == flags, (knob, value)
    # every flag is one the bundled loop takes (read from its source: no torch import here)
    source = (ROOT / "moe_core" / "train.py").read_text()
    taken = set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', source))
    assert {spec.flag for spec in ablate.KNOB_FLAGS.values()} <= taken
    assert set(ablate.MANAGED_FLAGS) <= taken


def test_the_knobs_are_the_services_less_the_ones_a_single_run_cannot_set() -> None:
    from service.calc.knobs import KNOBS

    assert set(ablate.KNOB_FLAGS) | set(ablate.NOT_SETTABLE) == set(KNOBS)
    assert not set(ablate.KNOB_FLAGS) & set(ablate.NOT_SETTABLE)


def test_grid_cells_and_interleaved_schedule() -> None:
    grid = ablate.build_grid(["dispatch=grouped,padded", "compile=off,on"])
    names = [c.name for c in grid.cells]
    assert names == [
        "dispatch=grouped,compile=off",
        "dispatch=grouped,compile=on",
        "dispatch=padded,compile=off",
        "dispatch=padded,compile=on",
    ]
    assert grid.baseline.name == names[0]
    plan = ablate.schedule(grid, repeats=3, seed0=7)
    assert [(p.repeat, p.cell.name, p.seed) for p in plan] == [
        (r, name, 7 + r) for r in range(3) for name in names
    ]
    assert grid.cells[3].flags() == ["--dispatch", "padded", "--compile"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--knob", "speed=1,2"], ["not a knob", "dispatch=grouped|padded|loop|auto"]),
        (["--knob", "dtype=float32,bfloat16"], ["no dtype flag", "known knobs"]),
        (["--knob", "dispatch=grouped,fast"], ["dispatch takes grouped, padded, loop, auto"]),
        (["--knob", "compile=yes,no"], ["compile takes off, on"]),
        (["--knob", "top_k=1,two"], ["top_k takes a whole number"]),
        (["--knob", "dispatch=grouped"], ["one cell"]),
        (["--knob", "dispatch"], ["KNOB=VALUE"]),
        (["--knob", "lr=1e-3,1e-3"], ["a value given twice"]),
        (["--knob", "lr=1e-3,2e-3", "--knob", "lr=3e-3"], ["given twice"]),
        (["--knob", "dispatch=grouped,padded", "--", "--seed", "3"], ["--seed", "sets it"]),
        (["--knob", "dispatch=grouped,padded", "--", "--dispatch=loop"], ["the knob dispatch"]),
    ],
)
def test_a_bad_grid_is_one_line_and_runs_nothing(
    args: list[str], words: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("ablate", *args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    for word in words:
        assert word in line, line
    assert list(tmp_path.iterdir()) == []  # no database served, no run started


TINY = ["--", "--d-model", "32", "--seq-len", "32", "--batch-size", "4", "--eval-every", "3"]


def test_ablate_runs_the_grid_against_its_own_service(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the runs' spools and checkpoint folders
    result = invoke(
        "ablate",
        *("--knob", "dispatch=grouped,padded", "--repeats", "1", "--steps", "6"),
        *("--seed0", "5", "--project", "abl-test", "--db", db),
        *TINY,
    )
    assert result.exit_code == 0, result.output
    head = re.search(r"ablation (\S+): 2 cells x 1 repeats = 2 runs of 6 steps; watch it at "
                     r"http://127\.0\.0\.1:\d+/ablations/(\S+)", result.stdout)  # fmt: skip
    assert head and head.group(1) == head.group(2), result.stdout
    ablation_id = head.group(1)
    assert f"ablation {ablation_id} (dispatch=grouped,padded): 2 of 2 runs ended" in result.stdout
    assert "dispatch=grouped: the baseline, 1 run(s)" in result.stdout
    assert re.search(r"dispatch=padded: (verdict \w+|no verdict)", result.stdout)

    # What the service stored, read back on its own: the declaration, one run a cell, each
    # run of its cell's dispatch, on the repeat's seed, baseline first.
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    application = create_app(Settings(database_url=db))
    with TestClient(application) as api:
        body = api.get(f"/api/v1/ablations/{ablation_id}").json()
        assert body["declared"] and body["project"] == "abl-test"
        assert body["knobs"] == {"dispatch": ["grouped", "padded"]}
        assert body["baseline_cell"] == "dispatch=grouped" and body["repeats"] == 1
        assert body["settings"]["steps"] == 6 and body["settings"]["seed0"] == 5
        runs = {c["cell"]: c["runs"] for c in body["cells"]}
        assert [len(r) for r in runs.values()] == [1, 1]
        (base,), (cand,) = runs["dispatch=grouped"], runs["dispatch=padded"]
        assert base["status"] == cand["status"] == "completed"
        assert base["seed"] == cand["seed"] == 5
        assert base["created_at"] <= cand["created_at"]
        for cell, run in (("grouped", base), ("padded", cand)):
            got = api.get(f"/api/v1/runs/{run['run_id']}").json()
            assert got["runtime_policy"]["dispatch_requested"] == cell
            assert got["runtime_policy"]["steps"] == 6
            assert got["model_plan"]["d_model"] == 32
            assert got["project"] == "abl-test" and ablation_id in got["tags"]
            assert got["name"] == f"dispatch={cell}-r0"
    application.state.engine.dispose()


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Runs that fail fast, without torch: a child that exits 1 saying why for the cells
    named in the list, 0 for the others."""
    failing: list[str] = []

    def argv(ablation_id: str, planned: Any, settings: Any, server: str, run_id: str) -> list:
        if planned.cell.name in failing:
            code = f"import sys; print('noise'); sys.exit('boom in {planned.cell.name}')"
        else:
            code = "pass"
        return [sys.executable, "-c", code]

    monkeypatch.setattr(ablate, "child_argv", argv)
    return failing


def test_a_failed_run_is_reported_and_the_ablation_goes_on(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_runs: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    fake_runs.append("dispatch=padded")
    grid = ("--knob", "dispatch=grouped,padded", "--repeats", "2", "--steps", "6")
    result = invoke("ablate", *grid, "--db", db)
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stdout.splitlines() if line.startswith("run failed")]
    assert failed == [
        f"run failed (dispatch=padded, repeat {r}, exit 1): boom in dispatch=padded" for r in (1, 2)
    ]
    assert "2 of 4 runs failed" in result.stdout
    assert "repeat 2/2 dispatch=padded" in result.stdout and "4/4" in result.stdout  # the bar


def test_every_cell_failing_in_the_first_repeat_stops_the_rest(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_runs: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    fake_runs += ["dispatch=grouped", "dispatch=padded"]
    grid = ("--knob", "dispatch=grouped,padded", "--repeats", "3", "--steps", "6")
    result = invoke("ablate", *grid, "--db", db)
    assert result.exit_code == 1, result.output
    assert result.stdout.count("run failed") == 2  # repeat 1's two runs, no more
    line = one_error_line(result)
    assert "every cell's first run failed (the last: boom in dispatch=padded)" in line
