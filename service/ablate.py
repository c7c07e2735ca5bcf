"""`goodput ablate`'s runner: the knob grid, its cells, the interleaved schedule of runs, and
the child processes of the bundled loop (`python -m moe_core.train`) that carry them out.

It never imports torch: each run is a child process, so one that fails (an out-of-memory, a
bad flag) is reported and the ablation goes on. The command line around it (options, the
progress bar, the service it reports to) is service/cli.py.

A knob is named as users type it (`dispatch`, `compile`, `capacity_factor`...; the service's
table is service/calc/knobs.py) and reaches the loop through one flag of `goodput train`
(`KNOB_FLAGS`). Its first value is the baseline's. Cells are the cartesian product of the
knobs' values, named `knob=value[,knob=value]` in the order the knobs were given; the first
cell, every knob at its first value, is the baseline cell.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

ValueKind = Literal["choice", "switch", "int", "float", "float_or_none", "text"]


class AblateUsageError(ValueError):
    """A grid, knob or argument `goodput ablate` cannot run: its message is one line."""


@dataclass(frozen=True)
class KnobFlag:
    """How one knob's value becomes flags of `goodput train`."""

    flag: str
    kind: ValueKind
    choices: tuple[str, ...] = ()

    def values_form(self) -> str:
        """What values it takes, as the usage error lists them."""
        if self.choices:
            return "|".join(self.choices)
        return {"int": "N", "float": "X", "float_or_none": "X|none", "text": "TEXT"}[self.kind]

    def check(self, knob: str, value: str) -> None:
        """Refuse a value the loop would refuse, before any run starts."""
        if self.kind in ("choice", "switch"):
            if value not in self.choices:
                raise AblateUsageError(
                    f"--knob {knob}={value}: {knob} takes {', '.join(self.choices)}"
                )
            return
        if self.kind == "text":
            if not value.strip():
                raise AblateUsageError(f"--knob {knob}: an empty value")
            return
        if self.kind == "float_or_none" and value == "none":
            return
        try:
            number = int(value) if self.kind == "int" else float(value)
        except ValueError:
            what = "a whole number" if self.kind == "int" else "a number"
            extra = " or none" if self.kind == "float_or_none" else ""
            raise AblateUsageError(f"--knob {knob}={value}: {knob} takes {what}{extra}") from None
        zero_ok = knob == "slowdown"  # no delay is the baseline of a slowdown ablation
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
            what = "a number of 0 or more" if zero_ok else "a positive number"
            raise AblateUsageError(f"--knob {knob}={value}: {knob} takes {what}")

    def flags(self, value: str) -> list[str]:
        """The `goodput train` arguments that run this value."""
        if self.kind == "switch":
            return [self.flag] if value == "on" else []
        if self.kind == "float_or_none" and value == "none":
            return []  # the loop's default: no capacity limit
        return [self.flag, value]


ON_OFF = ("off", "on")

# The knobs `goodput ablate` can set, each through one flag of `goodput train`. The service
# knows dtype and ep_size too (service/calc/knobs.py), but the bundled loop takes no dtype
# flag, and ep_size needs several ranks (torchrun), which one child process does not have.
KNOB_FLAGS: dict[str, KnobFlag] = {
    "dispatch": KnobFlag("--dispatch", "choice", ("grouped", "padded", "loop", "auto")),
    "compile": KnobFlag("--compile", "switch", ON_OFF),
    "capacity_factor": KnobFlag("--capacity-factor", "float_or_none"),  # none: no limit
    "null_slot": KnobFlag("--null-slot", "switch", ON_OFF),
    "top_k": KnobFlag("--top-k", "int"),
    "num_experts": KnobFlag("--num-experts", "int"),
    "lr": KnobFlag("--lr", "float"),
    "batch_size": KnobFlag("--batch-size", "int"),
    "seq_len": KnobFlag("--seq-len", "int"),
    "d_model": KnobFlag("--d-model", "int"),
    "pattern": KnobFlag("--pattern", "text"),
    "slowdown": KnobFlag("--slowdown", "float"),
}
NOT_SETTABLE = {
    "dtype": "the bundled loop has no dtype flag (it runs bfloat16 autocast on CUDA, float32 "
    "on CPU)",
    "ep_size": "expert parallel needs several ranks (torchrun), and each run of goodput "
    "ablate is one process",
}

# `goodput train` flags that `goodput ablate` sets itself: not to be passed after `--`.
MANAGED_FLAGS = (
    "--ablation",
    "--cell",
    "--seed",
    "--server",
    "--run-id",
    "--run-name",
    "--steps",
    "--device",
    "--project",
    "--no-progress",
)


def known_knobs() -> str:
    """The knobs and the values each takes, for usage errors and --help."""
    return ", ".join(f"{name}={spec.values_form()}" for name, spec in KNOB_FLAGS.items())


def parse_knob(text: str) -> tuple[str, list[str]]:
    """`dispatch=grouped,padded` -> ("dispatch", ["grouped", "padded"]), each value checked."""
    name, sep, values_text = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise AblateUsageError(
            f"--knob {text!r}: write it KNOB=VALUE[,VALUE...], e.g. --knob dispatch=grouped,padded"
        )
    if name not in KNOB_FLAGS:
        why = f" ({NOT_SETTABLE[name]})" if name in NOT_SETTABLE else ""
        raise AblateUsageError(
            f"--knob {name}: not a knob goodput ablate can set{why}; known knobs: {known_knobs()}"
        )
    values = [v.strip() for v in values_text.split(",")]
    if any(not v for v in values):
        raise AblateUsageError(f"--knob {text!r}: an empty value; separate values with commas")
    if len(set(values)) != len(values):
        raise AblateUsageError(f"--knob {text!r}: a value given twice")
    for value in values:
        KNOB_FLAGS[name].check(name, value)
    return name, values


@dataclass(frozen=True)
class Cell:
    name: str
    knobs: dict[str, str]

    def flags(self) -> list[str]:
        """The `goodput train` arguments that run this cell."""
        return [f for knob, value in self.knobs.items() for f in KNOB_FLAGS[knob].flags(value)]


def cell_name(knobs: Mapping[str, str]) -> str:
    return ",".join(f"{knob}={value}" for knob, value in knobs.items())


@dataclass(frozen=True)
class Grid:
    """The knobs (in the order given, each with its values, the first the baseline's) and the
    cells, the cartesian product of their values, the baseline cell first."""

    knobs: dict[str, list[str]]
    cells: list[Cell]

    @property
    def baseline(self) -> Cell:
        return self.cells[0]


def build_grid(knob_texts: Sequence[str]) -> Grid:
    """The grid of the `--knob` options; a grid of one cell compares nothing and is refused."""
    if not knob_texts:
        raise AblateUsageError(
            f"give at least one --knob, e.g. --knob dispatch=grouped,padded; known knobs: "
            f"{known_knobs()}"
        )
    knobs: dict[str, list[str]] = {}
    for text in knob_texts:
        name, values = parse_knob(text)
        if name in knobs:
            raise AblateUsageError(
                f"--knob {name} given twice; give its values once: --knob {name}=A,B"
            )
        knobs[name] = values
    cells = [
        Cell(cell_name(dict(zip(knobs, combo, strict=True))), dict(zip(knobs, combo, strict=True)))
        for combo in itertools.product(*knobs.values())
    ]
    if len(cells) < 2:
        raise AblateUsageError(
            "the grid has one cell, nothing to compare it with: give a knob two values or more, "
            "e.g. --knob dispatch=grouped,padded"
        )
    return Grid(knobs, cells)


@dataclass(frozen=True)
class Planned:
    """One run of the schedule: its repeat, its cell, its seed."""

    repeat: int
    cell: Cell
    seed: int


def schedule(grid: Grid, repeats: int, seed0: int) -> list[Planned]:
    """Interleaved: repeat r runs every cell once, in grid order, all with seed seed0 + r
    (ABAB..., not AA BB: drift of the machine falls on every cell alike, and each repeat
    compares the cells on the same weights and data)."""
    return [Planned(r, cell, seed0 + r) for r in range(repeats) for cell in grid.cells]


def check_extra_args(extra: Sequence[str], grid: Grid) -> None:
    """Refuse arguments after `--` that `goodput ablate` sets itself or that a knob sets."""
    knob_flags = {KNOB_FLAGS[k].flag: k for k in grid.knobs}
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS:
            raise AblateUsageError(
                f"{flag} after --: goodput ablate sets it itself"
                + (
                    f" (use its {flag} option)"
                    if flag in ("--steps", "--device", "--project", "--server")
                    else ""
                )
            )
        if flag in knob_flags:
            raise AblateUsageError(
                f"{flag} after --: the knob {knob_flags[flag]} sets it in every cell; drop one"
            )


def new_ablation_id() -> str:
    """A readable, unique id: when it started, and a random tail."""
    return f"abl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class Settings:
    """What every run of the ablation shares."""

    steps: int
    device: str
    project: str
    extra: list[str] = field(default_factory=list)

    def as_dict(self, seed0: int) -> dict[str, object]:
        return {
            "steps": self.steps,
            "device": self.device,
            "seed0": seed0,
            "train_args": list(self.extra),
        }


def run_name(planned: Planned) -> str:
    """`<cell>-r<repeat>`: the ablation is in the run's ablation id and tag."""
    return f"{planned.cell.name}-r{planned.repeat}"


def child_argv(
    ablation_id: str, planned: Planned, settings: Settings, server: str, run_id: str
) -> list[str]:
    """The command line of one run: the bundled loop, this cell's flags, the shared ones."""
    return [
        sys.executable,
        "-m",
        "moe_core.train",
        *planned.cell.flags(),
        "--steps",
        str(settings.steps),
        "--device",
        settings.device,
        "--project",
        settings.project,
        "--seed",
        str(planned.seed),
        "--ablation",
        ablation_id,
        "--cell",
        planned.cell.name,
        "--tag",
        ablation_id,
        "--run-id",
        run_id,
        "--run-name",
        run_name(planned),
        "--server",
        server,
        "--no-progress",
        *settings.extra,
    ]


def ablation_body(
    ablation_id: str,
    name: str,
    grid: Grid,
    repeats: int,
    settings: Settings,
    seed0: int,
    created_at: float | None = None,
) -> dict[str, object]:
    """The declaration the service stores (POST /api/v1/ablations, schemas.AblationIn)."""
    return {
        "ablation_id": ablation_id,
        "name": name,
        "project": settings.project,
        "created_at": time.time() if created_at is None else created_at,
        "knobs": {k: list(v) for k, v in grid.knobs.items()},
        "cells": {cell.name: dict(cell.knobs) for cell in grid.cells},
        "baseline_cell": grid.baseline.name,
        "repeats": repeats,
        "settings": settings.as_dict(seed0),
    }


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    last_line: str  # the last line the child wrote to stderr, for a failure


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def start_child(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start one run; its stdout is dropped (the progress bar is the parent's), its stderr
    kept for the failure's last line."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=dict(env),
    )


def finish_child(proc: subprocess.Popen[str]) -> ChildResult:
    _, err = proc.communicate()
    return ChildResult(proc.returncode, last_line(err or ""))
