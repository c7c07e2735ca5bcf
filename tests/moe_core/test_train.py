"""The training loop: learning, checkpoints, crash and resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_core import checkpoint as ckpt
from moe_core.config import ModelConfig
from moe_core.loop import FAIL_EXIT_CODE, NullRecorder, TrainConfig, evaluate, lr_at, setup, train
from trainer_hooks.spool import Spool

SMALL = {
    "pattern": "AE",
    "d_model": 32,
    "n_heads": 2,
    "ffn_hidden": 64,
    "expert_hidden": 32,
    "num_experts": 4,
    "top_k": 2,
    "seq_len": 32,
}


def small_cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "steps": 12,
        "batch_size": 4,
        "eval_every": 0,
        "corpus_bytes": 200_000,
        "dispatch": "loop",
    }
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("lr", 0.0), ("eval_every", -1), ("min_lr_ratio", 1.5), ("fail_at_step", -2)],
)
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_200_steps_from_a_fixed_seed_clearly_lower_the_eval_loss() -> None:
    model_cfg = ModelConfig(**SMALL)  # type: ignore[arg-type]
    cfg = small_cfg(steps=200, lr=3e-3, batch_size=8, warmup_steps=10)
    st = setup(model_cfg, cfg, "r", None, None)

    def eval_loss() -> float:
        val = st.corpus.batches("val", 8, model_cfg.seq_len, seed=123)
        return float(evaluate(st.model, val, 4, torch.device("cpu")))

    before = eval_loss()
    result = train(model_cfg, cfg, st, NullRecorder())
    after = eval_loss()
    assert result.steps == 200
    assert before > 5.0  # about ln(256) = 5.55 for an untrained byte model
    assert after < before - 1.5, (before, after)


def test_resuming_from_a_checkpoint_continues_the_run_exactly(tmp_path: Path) -> None:
    model_cfg = ModelConfig(**SMALL)  # type: ignore[arg-type]
    cfg = small_cfg(checkpoint_every=6, checkpoint_dir=tmp_path)
    straight = setup(model_cfg, cfg, "run-x", None, None)
    train(model_cfg, cfg, straight, NullRecorder())
    # step_00000005.pt holds the state after 6 steps: resume from it and finish the run.
    mid = ckpt.Checkpoint(**torch.load(tmp_path / "step_00000005.pt", weights_only=False))
    assert (mid.step, mid.data_position, mid.run_id) == (5, 6, "run-x")
    resumed = setup(model_cfg, cfg, "ignored", mid, None)
    assert resumed.first_step == 6 and resumed.run_id == "run-x"
    train(model_cfg, cfg, resumed, NullRecorder())
    for (name, a), (_, b) in zip(
        straight.raw_model.state_dict().items(), resumed.raw_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path: Path) -> None:
    model_cfg = ModelConfig(**SMALL)  # type: ignore[arg-type]
    cfg = small_cfg(checkpoint_every=3, checkpoint_dir=tmp_path)
    train(model_cfg, cfg, setup(model_cfg, cfg, "r", None, None), NullRecorder())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000008.pt", "step_00000011.pt"]  # no temp files left behind


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "moe_core.train",
        "--no-progress",
        "--spool",
        str(tmp_path / "spool"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--d-model",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--dispatch",
        "loop",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def spooled(tmp_path: Path) -> list[dict[str, object]]:
    out = []
    for seg_dir in sorted({p.parent for p in (tmp_path / "spool").rglob("*.seg")}):
        for seg in Spool(seg_dir).segments():
            out += [json.loads(p) for p in seg.read(0, 100_000).payloads]
    return out


def test_crash_then_resume_is_the_same_run_in_a_new_attempt(tmp_path: Path) -> None:
    crashed = run_cli(
        tmp_path,
        "--steps",
        "70",
        "--checkpoint-every",
        "25",
        "--fail-at-step",
        "60",
        "--run-id",
        "crashy",
    )
    assert crashed.returncode == FAIL_EXIT_CODE, crashed.stderr
    resumed = run_cli(tmp_path, "--steps", "70", "--checkpoint-every", "25", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "attempt 1" in resumed.stdout and "trained 20 steps" in resumed.stdout
    assert "resumed from the checkpoint of step 49" in resumed.stdout
    records = spooled(tmp_path)
    assert {r["run_id"] for r in records} == {"crashy"}
    steps = sorted((r["attempt"], r["step"]) for r in records if r["kind"] == "step")
    assert [s for a, s in steps if a == 1] == list(range(50, 70))
    first = [s for a, s in steps if a == 0]
    # A hard crash loses only what the sink had not spooled yet: its last flush interval
    # (0.1 s, a few dozen of these tiny steps). What was spooled is whole and in order.
    assert first == list(range(len(first))) and 20 <= len(first) <= 60
    commits = [(r["attempt"], r["step"]) for r in records if r["kind"] == "checkpoint"]
    assert (0, 24) in commits and (0, 49) in commits and (1, 69) not in commits
    ends = [r for r in records if r["kind"] == "attempt_end"]
    assert [(e["attempt"], e["status"]) for e in ends] == [(1, "completed")]


def test_the_cli_sends_eval_losses_tags_and_its_ablation_cell(tmp_path: Path) -> None:
    args = [
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--tag",
        "nightly",
        "--tag",
        "ab",
        "--threads",
        "1",
    ]
    got = run_cli(tmp_path, *args, "--ablation", "abl-1", "--cell", "dispatch=loop")
    assert got.returncode == 0, got.stderr
    records = spooled(tmp_path)
    (run,) = [r for r in records if r["kind"] == "run"]
    assert run["tags"] == ["nightly", "ab"]
    assert (run["ablation_id"], run["ablation_cell"]) == ("abl-1", "dispatch=loop")
    assert run["runtime_policy"]["threads"] == 1  # in the lane only when asked for
    evals = {r["step"]: r["value"] for r in records if r["kind"] == "metric"}
    assert sorted(evals) == [3, 7] and all(2.0 < v < 7.0 for v in evals.values())
    printed = [line for line in got.stdout.splitlines() if line.startswith("eval loss")]
    assert printed == [f"eval loss at step {s}: {v:.4f}" for s, v in sorted(evals.items())]
    half = run_cli(tmp_path, "--steps", "2", "--ablation", "abl-1")
    assert half.returncode == 2 and "--ablation and --cell come together" in half.stderr


def test_a_fresh_run_refuses_a_directory_that_holds_checkpoints(tmp_path: Path) -> None:
    assert run_cli(tmp_path, "--steps", "2", "--checkpoint-every", "1").returncode == 0
    again = run_cli(tmp_path, "--steps", "2")
    assert again.returncode == 2
    assert "checkpoint_dir" in again.stderr and "--resume" in again.stderr


@pytest.mark.timeout(300)
def test_torchrun_two_ranks_report_one_run(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "moe_core.train",
        "--no-progress",
        "--steps",
        "3",
        "--spool",
        str(tmp_path / "spool"),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--d-model",
        "32",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--dispatch",
        "loop",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = spooled(tmp_path)
    assert len({r["run_id"] for r in records}) == 1
    assert sorted({r["rank"] for r in records if r["kind"] == "step"}) == [0, 1]
    starts = [r for r in records if r["kind"] == "attempt_start"]
    assert {r["world_size"] for r in starts} == {2}
    assert len({r["name"] for r in records if r["kind"] == "run"}) == 1


def _name_on_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group whose clocks disagree: rank 1 is a second late."""
    import time as clock

    from moe_core import train as cli

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    stamp = "20260101-000000" if rank == 0 else "20260101-000001"
    clock.strftime = lambda *_a: stamp  # type: ignore[assignment]
    args = cli.build_parser().parse_args(["--pattern", "AE"])
    cli._shared_name(args)
    Path(out, f"rank{rank}").write_text(f"{args.run_name} {args.checkpoint_dir}")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_rank_takes_rank_zeros_default_run_name(tmp_path: Path) -> None:
    """Without --run-name each rank would stamp the name with its own clock, and a run record
    naming the run otherwise is a conflict (the later rank's first batch refused): rank 0's
    name, and the checkpoint directory made from it, are everyone's."""
    import torch.multiprocessing as mp

    mp.spawn(_name_on_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    names = {(tmp_path / f"rank{r}").read_text() for r in (0, 1)}
    assert names == {f"moe-AE-20260101-000000 {Path('checkpoints') / 'moe-AE-20260101-000000'}"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_goodput_train_compile_compiles_and_its_receipt_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process, with a backend that counts dynamo's graphs and runs them as traced
    # (inductor's code generation would take a minute of CI for nothing asserted here).
    from moe_core import loop
    from moe_core import train as train_cli

    graphs: list[int] = []
    real_compile = torch.compile

    def counting(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
        def backend(gm: torch.fx.GraphModule, _inputs: object) -> object:
            graphs.append(len(gm.graph.nodes))
            return gm.forward

        return real_compile(model, backend=backend, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(loop.torch, "compile", counting)
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    argv = ["--no-progress", "--spool", str(tmp_path / "spool"), "--checkpoint-dir"]
    argv += [str(tmp_path / "ckpt"), "--d-model", "32", "--seq-len", "32", "--batch-size", "4"]
    argv += ["--eval-every", "0", "--steps", "3", "--compile"]
    assert train_cli.main(argv) == 0
    assert graphs, "the compiled model never reached dynamo's backend"
    records = spooled(tmp_path)
    seams = {(r["seam"], r["observed"]) for r in records if r["kind"] == "observation"}
    assert ("compile", "compiled") in seams
    assert any(r["kind"] == "span" and r["category"] == "compile" for r in records)


@pytest.mark.parametrize("flag", ["--routing-every", "--device-every", "--depth"])
def test_a_cadence_below_one_is_one_line_naming_the_flag(flag: str) -> None:
    from moe_core.train import build_parser, configs

    args = build_parser().parse_args([flag, "0"])
    name = flag[2:].replace("-", "_")
    with pytest.raises(ValueError, match=f"^{name} must be >= 1, got 0$"):
        configs(args)
