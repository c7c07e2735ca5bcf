"""The training loop with expert parallelism (`--ep-size`), under torchrun with 2 gloo ranks on
the CPU: the same steps as data parallel, one checkpoint shard per rank, crash and resume from
the newest step both shards hold, and bad layouts refused up front."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_core import checkpoint as ckpt
from moe_core.config import ModelConfig
from moe_core.loop import FAIL_EXIT_CODE, NullRecorder, TrainConfig, setup, train
from tests.moe_core.test_train import _free_port, run_cli, spooled

STEPS = "5"
COMMON = [
    "--no-progress",
    "--steps",
    STEPS,
    "--d-model",
    "32",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--num-experts",
    "4",
    "--eval-every",
    "0",
    "--dispatch",
    "loop",
    "--run-id",
    "ep-run",
]


def torchrun(work: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """`nproc` ranks of `python -m moe_core.train`, spool and checkpoints under `work`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(_free_port()), "-m", "moe_core.train", *COMMON]
    cmd += ["--spool", str(work / "spool"), "--checkpoint-dir", str(work / "ckpt"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=work, env=env)


def losses(work: Path, attempt: int = 0) -> dict[tuple[int, int], float]:
    """(rank, step) -> loss of one attempt's step records."""
    return {
        (int(r["rank"]), int(r["step"])): float(r["loss"])  # type: ignore[arg-type]
        for r in spooled(work)
        if r["kind"] == "step" and r["attempt"] == attempt
    }


@pytest.mark.timeout(600)
def test_expert_parallel_training_takes_the_steps_of_data_parallel(tmp_path: Path) -> None:
    """ep_size=2 over 2 ranks against ep_size=1 (DDP) over 2 ranks, from one seed: each rank
    reads the same batches, so every step's loss on every rank must agree (float order apart).
    Then a crash after the first checkpoint and a resume continue the same steps."""
    dp = torchrun(tmp_path / "dp")
    assert dp.returncode == 0, dp.stderr[-3000:]
    ep = torchrun(tmp_path / "ep", "--ep-size", "2")
    assert ep.returncode == 0, ep.stderr[-3000:]
    want, got = losses(tmp_path / "dp"), losses(tmp_path / "ep")
    assert sorted(got) == sorted(want) == [(r, s) for r in (0, 1) for s in range(int(STEPS))]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    assert want[0, 0] != want[1, 0]  # the ranks do train on different batches
    records = spooled(tmp_path / "ep")
    runs = [r for r in records if r["kind"] == "run"]
    policy = runs[0]["runtime_policy"]
    assert (policy["ep_size"], policy["dp_size"], policy["expert_dp_size"]) == (2, 2, 1)
    observed = {r["observed"] for r in records if r["kind"] == "observation"}
    assert "ep_all_to_all+loop" in observed

    # Crash at step 3 (checkpoints after steps 1 and 3), resume from step 1's shards.
    work = tmp_path / "crash"
    args = ["--ep-size", "2", "--checkpoint-every", "2"]
    crashed = torchrun(work, *args, "--fail-at-step", "3")
    assert crashed.returncode != 0
    assert re.search(rf"exitcode\s*:\s*{FAIL_EXIT_CODE}\b", crashed.stderr + crashed.stdout)
    shards = [ckpt.shard_dir(work / "ckpt", r, 2) for r in (0, 1)]
    assert [[p.name for p in ckpt.list_checkpoints(d)] for d in shards] == [
        ["step_00000001.pt"]
    ] * 2
    one = ckpt.load(ckpt.step_path(shards[1], 1), torch.device("cpu"))
    assert one.ep_size == 2 and one.run_id == "ep-run"
    resumed = torchrun(work, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = losses(work, attempt=1)
    assert sorted(again) == [(r, s) for r in (0, 1) for s in (2, 3, 4)]
    for key, value in again.items():
        assert value == pytest.approx(got[key], rel=1e-5), key
    commits = {(r["attempt"], r["step"]) for r in spooled(work) if r["kind"] == "checkpoint"}
    assert (1, 3) in commits  # recorded once both shards were written

    # One process, no expert parallelism, resumes the shards of step 3 joined into one model.
    cmd = [sys.executable, "-m", "moe_core.train", *COMMON, "--steps", "7", "--resume"]
    cmd += ["--checkpoint-every", "2"]
    cmd += ["--spool", str(work / "spool"), "--checkpoint-dir", str(work / "ckpt")]
    alone = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=work)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert sorted(losses(work, attempt=2)) == [(0, 4), (0, 5), (0, 6)]
    assert [p.name for p in ckpt.list_checkpoints(work / "ckpt")] == ["step_00000005.pt"]


@pytest.mark.timeout(600)
def test_two_expert_parallel_groups_take_the_steps_of_data_parallel(tmp_path: Path) -> None:
    """4 ranks, ep_size 2: two groups of 2, each expert shard held by 2 ranks. The same losses
    as DDP over 4 ranks; the first group's ranks write the two checkpoint shards."""
    args = ["--steps", "3", "--checkpoint-every", "3"]
    dp = torchrun(tmp_path / "dp", *args, nproc=4)
    assert dp.returncode == 0, dp.stderr[-3000:]
    ep = torchrun(tmp_path / "ep", *args, "--ep-size", "2", nproc=4)
    assert ep.returncode == 0, ep.stderr[-3000:]
    want, got = losses(tmp_path / "dp"), losses(tmp_path / "ep")
    assert sorted(got) == sorted(want) == [(r, s) for r in range(4) for s in range(3)]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
    shards = [ckpt.shard_dir(tmp_path / "ep" / "ckpt", r, 2) for r in (0, 1)]
    assert [[p.name for p in ckpt.list_checkpoints(d)] for d in shards] == [
        ["step_00000002.pt"]
    ] * 2
    assert ckpt.ep_sizes_in(tmp_path / "ep" / "ckpt") == {2}


def test_a_lost_shard_write_resumes_from_the_step_every_shard_holds(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    for rank, steps in ((0, (9, 19)), (1, (4, 9))):  # rank 1 died before writing step 19
        for step in steps:
            path = ckpt.step_path(ckpt.shard_dir(d, rank, 2), step)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    assert ckpt.latest_complete(d, 2) == 9
    assert ckpt.ep_sizes_in(d) == {2}
    assert ckpt.latest_complete(tmp_path / "empty", 2) is None


def test_bad_expert_parallel_layouts_are_refused_with_the_field(tmp_path: Path) -> None:
    odd = run_cli(tmp_path, "--ep-size", "3")  # 4 experts
    assert odd.returncode == 2 and "ep_size" in odd.stderr, odd.stderr
    alone = run_cli(tmp_path, "--ep-size", "2")  # one process: a world of 1
    assert alone.returncode == 2 and "world size 1" in alone.stderr, alone.stderr


def test_reshard_joins_and_cuts_the_experts_and_their_optimizer_state(tmp_path: Path) -> None:
    model_cfg = ModelConfig(
        pattern="AE", d_model=16, n_heads=2, ffn_hidden=16, expert_hidden=8, num_experts=4,
        top_k=2, seq_len=8,
    )  # fmt: skip
    cfg = TrainConfig(
        steps=2, batch_size=2, checkpoint_every=2, checkpoint_dir=tmp_path, dispatch="loop",
        eval_every=0, corpus_bytes=20_000,
    )  # fmt: skip
    train(model_cfg, cfg, setup(model_cfg, cfg, "r", None, None), NullRecorder())
    full = ckpt.load(ckpt.step_path(tmp_path, 1), torch.device("cpu"))
    assert full.expert_params == ["blocks.1.experts.w13", "blocks.1.experts.w2"]
    shards = [ckpt.reshard([full], r, 2) for r in (0, 1)]
    index = full.param_names.index("blocks.1.experts.w2")
    for r, shard in enumerate(shards):
        assert shard.ep_size == 2
        for name in full.expert_params:
            assert torch.equal(shard.model[name], full.model[name][2 * r : 2 * r + 2])
        moments = shard.optimizer["state"][index]
        assert torch.equal(
            moments["exp_avg"], full.optimizer["state"][index]["exp_avg"][2 * r : 2 * r + 2]
        )
        assert shard.model["embed.weight"] is full.model["embed.weight"]  # replicated
    back = ckpt.reshard(shards, 0, 1)
    assert back.model.keys() == full.model.keys()
    for name, value in full.model.items():
        assert torch.equal(back.model[name], value), name
    for i, state in full.optimizer["state"].items():
        for k, v in state.items():
            assert torch.equal(back.optimizer["state"][i][k], v), (i, k)
    with pytest.raises(ValueError, match="ep_size: 3 must divide the 4 experts"):
        ckpt.reshard([full], 0, 3)
    with pytest.raises(ValueError, match="predates resharding"):
        ckpt.reshard([replace(full, expert_params=[])], 0, 2)
