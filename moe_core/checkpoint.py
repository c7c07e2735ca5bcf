"""Checkpoints and the attempt ledger of a run directory.

A checkpoint holds everything a resumed run needs to continue the same stream bit for bit on
the CPU: model and optimizer state, the data position, RNG states, the step, the run id. It is
written to a temporary file, fsynced and renamed, so a crash mid-write never leaves a torn
checkpoint behind. `attempts.json` counts the attempts that started in this directory, so a
resumed run gets the next attempt number even when the crashed attempt never checkpointed.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")
_SHARD = re.compile(r"^ep(\d+)-of-(\d+)$")
KEEP_LAST = 2


@dataclass
class Checkpoint:
    step: int  # the last completed step; training continues at step + 1
    run_id: str
    data_position: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    ep_size: int = 1  # > 1: this file holds one expert shard of ep_size (shard_dir)
    # For resharding: the parameters stacked by expert on dim 0, and the optimizer's
    # parameter order (its state is keyed by position). Empty in older checkpoints.
    expert_params: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(directory: Path, ckpt: Checkpoint) -> Path:
    """Write atomically; keep the newest KEEP_LAST checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = step_path(directory, ckpt.step)
    tmp = directory / f".{final.name}.tmp"
    torch.save(ckpt.__dict__, tmp)
    _fsync_replace(tmp, final)
    for old in list_checkpoints(directory)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load(path: Path, device: torch.device) -> Checkpoint:
    # weights_only=False: RNG states hold Python tuples; these files are our own.
    raw = torch.load(path, map_location=device, weights_only=False)
    return Checkpoint(**raw)


def shard_dir(directory: Path, ep_rank: int, ep_size: int) -> Path:
    """Where a rank's checkpoints live: the run directory, or with ep_size P > 1 one
    subdirectory per expert shard (each file also holds the replicated parameters)."""
    return directory if ep_size == 1 else directory / f"ep{ep_rank}-of-{ep_size}"


def ep_sizes_in(directory: Path) -> set[int]:
    """The ep_size of every layout that left checkpoints in the run directory."""
    sizes = {1} if list_checkpoints(directory) else set()
    if directory.is_dir():
        for sub in directory.iterdir():
            m = _SHARD.match(sub.name)
            if m and list_checkpoints(sub):
                sizes.add(int(m.group(2)))
    return sizes


def latest_complete(directory: Path, ep_size: int) -> int | None:
    """The newest step whose checkpoint every shard wrote (a crash between the shards' writes
    leaves a step that not all of them hold); None when there is none."""
    common: set[int] | None = None
    for ep_rank in range(ep_size):
        names = list_checkpoints(shard_dir(directory, ep_rank, ep_size))
        steps = {int(_NAME.match(p.name).group(1)) for p in names}  # type: ignore[union-attr]
        common = steps if common is None else common & steps
    return max(common) if common else None


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def reshard(shards: list[Checkpoint], ep_rank: int, ep_size: int) -> Checkpoint:
    """Shard `ep_rank` of `ep_size` built from every shard of another layout (in shard order):
    each expert-stacked parameter, and its optimizer state, is joined along the experts and
    cut again; everything else (replicated) is taken from the first shard."""
    first = shards[0]
    if not first.expert_params:
        raise ValueError(
            f"ep_size: this checkpoint (ep_size={first.ep_size}) predates resharding; "
            f"resume it with --ep-size {first.ep_size}"
        )
    experts = set(first.expert_params)

    def cut(parts: list[Any]) -> Any:
        whole = torch.cat(parts, dim=0)
        if whole.shape[0] % ep_size:
            raise ValueError(
                f"ep_size: {ep_size} must divide the {whole.shape[0]} experts of the checkpoint"
            )
        local = whole.shape[0] // ep_size
        return whole[ep_rank * local : (ep_rank + 1) * local].clone()

    model = {
        k: cut([s.model[k] for s in shards]) if k in experts else v for k, v in first.model.items()
    }
    state = {}
    for index, values in first.optimizer["state"].items():
        if first.param_names[index] not in experts:
            state[index] = values
            continue
        state[index] = {
            k: cut([s.optimizer["state"][index][k] for s in shards])
            if isinstance(v, torch.Tensor) and v.dim() > 0
            else v
            for k, v in values.items()
        }
    optimizer = {**first.optimizer, "state": state}
    return replace(first, model=model, optimizer=optimizer, ep_size=ep_size)


def newest_layout(directory: Path, prefer: int) -> tuple[int, int] | None:
    """(ep_size, step) of the newest step that some layout in the run directory holds whole
    (on a tie, the layout `prefer`); None when none does."""
    found = []
    for size in ep_sizes_in(directory):
        step = latest_complete(directory, size)
        if step is not None:
            found.append((step, size == prefer, size))
    if not found:
        return None
    step, _, size = max(found)
    return size, step


def load_for(
    directory: Path, ep_rank: int, ep_size: int, device: torch.device
) -> Checkpoint | None:
    """This rank's checkpoint to resume from: the newest whole step in the run directory, in
    its own layout, or resharded from another ep_size."""
    newest = newest_layout(directory, ep_size)
    if newest is None:
        return None
    size, step = newest
    if size == ep_size:
        return load(step_path(shard_dir(directory, ep_rank, ep_size), step), device)
    shards = [load(step_path(shard_dir(directory, r, size), step), device) for r in range(size)]
    return reshard(shards, ep_rank, ep_size)


def next_attempt(directory: Path, fresh: bool) -> int:
    """Record that a new attempt starts here and return its number: 0 for a fresh run, one
    more than the last attempt recorded here for a resumed one."""
    ledger = directory / "attempts.json"
    last = -1
    if not fresh:
        try:
            last = int(json.loads(ledger.read_text())["last_attempt"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            last = -1
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".attempts.json.tmp"
    tmp.write_text(json.dumps({"last_attempt": last + 1}))
    _fsync_replace(tmp, ledger)
    return last + 1
