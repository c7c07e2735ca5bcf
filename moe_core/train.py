"""The bundled training loop's command line, with goodput hooks attached.

    python -m moe_core.train --steps 30 --server http://127.0.0.1:8787
    goodput train --steps 30 --server http://127.0.0.1:8787      (the same, via the CLI)
    torchrun --nproc-per-node 2 -m moe_core.train ...           (data parallel, one rank each)
    torchrun --nproc-per-node 4 -m moe_core.train --ep-size 2   (+ experts split over 2 ranks)

Training never waits for the service: records go to an on-disk spool and a background thread
sends them. With no --server the run is offline and the spool is replayed later with
`goodput spool replay`. `--resume` continues the run in --checkpoint-dir (same run id, next
attempt); `--fail-at-step N` kills the process at step N, for restart tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moe_core import checkpoint as ckpt
from moe_core.config import ModelConfig, check_ep_size, model_plan, parse_pattern
from moe_core.loop import TrainConfig, TrainResult, setup, train
from moe_core.parallel import Layout, make_layout
from trainer_hooks import Recorder, SpoolSink
from trainer_hooks.device import DEVICE_EVERY
from trainer_hooks.recorder import ROUTING_EVERY


class _DefaultsShown(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it says it itself or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        none = action.default is None or action.default is False or action.default == []
        if "default" in text or none or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="goodput train",
        description="Train the bundled MoE model, with goodput hooks attached.",
        formatter_class=_DefaultsShown,
    )
    p.add_argument(
        "--server", default=None, help="service URL (default: none, offline: spool only)"
    )
    p.add_argument("--spool", default="./goodput-spool", help="spool root directory")
    p.add_argument(
        "--token",
        default=os.environ.get("GOODPUT_TOKEN"),
        help="the service's write token (default: $GOODPUT_TOKEN)",
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer steps to train")
    p.add_argument("--pattern", default="AE", help="layer plan of A/M/E/R letters, e.g. AEME*2")
    p.add_argument("--depth", type=int, default=1, help="repeat the pattern this many times")
    p.add_argument(
        "--dispatch",
        default="auto",
        choices=["grouped", "padded", "loop", "auto"],
        help="how E layers run their experts (auto: the fastest this machine supports)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (default: eager)"
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    p.add_argument(
        "--run-name", default=None, help="the run's name (default: moe-<pattern>-<time>)"
    )
    p.add_argument("--run-id", default=None, help="client-chosen run id (default: random)")
    p.add_argument("--project", default="default", help="project the run is filed under")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step and rank")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--num-experts", type=int, default=4, help="routed experts per E layer")
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    p.add_argument(
        "--capacity-factor",
        type=float,
        default=None,
        help="expert capacity as a multiple of the even share; tokens over it are dropped "
        "(default: none, no capacity limit)",
    )
    p.add_argument(
        "--null-slot",
        action="store_true",
        help="give the router a null slot (a choice that runs no routed expert)",
    )
    p.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="split the routed experts over this many ranks (expert parallel; divides the "
        "world size and --num-experts)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (0: never)")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)"
    )
    p.add_argument("--checkpoint-dir", default=None, help="default: ./checkpoints/<run name>")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --checkpoint-dir from its latest checkpoint",
    )
    p.add_argument(
        "--fail-at-step",
        type=int,
        default=None,
        help="crash the process for real at this step (restart tests; default: never)",
    )
    p.add_argument(
        "--profile-steps",
        default=None,
        metavar="A:B",
        help="capture a torch.profiler window over steps A..B-1 (default: none)",
    )
    p.add_argument(
        "--routing-every",
        type=int,
        default=ROUTING_EVERY,
        help="send routing histograms summed over this many steps; 1 sends one a step, at the "
        "cost of a copy of the counters every step (default: %(default)s)",
    )
    p.add_argument(
        "--device-every",
        type=int,
        default=DEVICE_EVERY,
        help="CUDA: time one step in this many with CUDA events and read the losses of the "
        "steps between in one copy; 1 times every step (default: %(default)s)",
    )
    p.add_argument(
        "--flush-timeout",
        type=float,
        default=10.0,
        help="seconds to keep sending at the end before leaving the rest spooled",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="a label to filter runs by (repeat for more)",
    )
    p.add_argument(
        "--ablation",
        default=None,
        metavar="ID",
        help="the ablation this run is a replicate of (goodput ablate sets it)",
    )
    p.add_argument(
        "--cell",
        default=None,
        help="its cell in that ablation, e.g. dispatch=padded (with --ablation)",
    )
    p.add_argument(
        "--slowdown",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="a real delay in every step, this fraction of its compute (calibration runs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads on CPU (default: torch's, one per core); 1 keeps step "
        "times steady on a machine shared with other work (the service, the sink's thread)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    for name in ("depth", "routing_every", "device_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    pattern = args.pattern if args.depth == 1 else "".join(parse_pattern(args.pattern)) * args.depth
    model_cfg = ModelConfig(
        pattern=pattern,
        d_model=args.d_model,
        seq_len=args.seq_len,
        num_experts=args.num_experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        null_slot=args.null_slot,
    )
    check_ep_size(args.ep_size, model_cfg.num_experts)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=Path(args.checkpoint_dir),
        fail_at_step=args.fail_at_step,
        dispatch=args.dispatch,
        compile=args.compile,
        seed=args.seed,
        device=args.device,
        ep_size=args.ep_size,
        slowdown=args.slowdown,
    )
    if (args.ablation is None) != (args.cell is None):
        raise ValueError("--ablation and --cell come together")
    return model_cfg, cfg


def parse_window(text: str | None) -> tuple[int, int] | None:
    """ "A:B" -> (first_step A, num_steps B - A)."""
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise ValueError(f"profile_steps must look like A:B, got {text!r}") from exc
    if not 0 <= a < b:
        raise ValueError(f"profile_steps needs 0 <= A < B, got {text!r}")
    return a, b - a


def runtime_policy(model_cfg: ModelConfig, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    return {
        "world_size": world_size,
        "dp_size": world_size,  # every rank runs its own batch
        "ep_size": cfg.ep_size,
        "expert_dp_size": world_size // cfg.ep_size,  # ranks holding each expert shard
        "batch_size": cfg.batch_size,
        "seq_len": model_cfg.seq_len,
        "tokens_per_step": cfg.batch_size * model_cfg.seq_len * world_size,
        "compile": "default" if cfg.compile else "eager",
        "dispatch_requested": cfg.dispatch,
        "dtype": "bfloat16-autocast" if cfg.device.startswith("cuda") else "float32",
        "device": cfg.device,
        "optimizer": "adamw",
        "lr": cfg.lr,
        "steps": cfg.steps,
        "seed": cfg.seed,
        **({"slowdown": cfg.slowdown} if cfg.slowdown else {}),
    }


def _init_distributed(device: str) -> int:
    """torchrun sets WORLD_SIZE; join its process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    return world


def _shared_run_id(wanted: str | None) -> str:
    """Every rank must report under one run id: rank 0 picks it unless one was given."""
    run_id = wanted or os.environ.get("GOODPUT_RUN_ID") or uuid.uuid4().hex
    if torch.distributed.is_initialized():
        box = [run_id]
        torch.distributed.broadcast_object_list(box, src=0)
        run_id = box[0]
    return run_id


def _resume_point(args: argparse.Namespace, cfg: TrainConfig) -> ckpt.Checkpoint | None:
    """This rank's checkpoint to resume from: the newest step that every shard of some layout
    holds, resharded when it was written with another --ep-size (torchrun's RANK says which
    shard)."""
    directory = cfg.checkpoint_dir
    assert directory is not None
    if ckpt.ep_sizes_in(directory) and not args.resume:
        raise ValueError(
            f"checkpoint_dir {directory} already holds checkpoints; "
            "pass --resume to continue that run, or choose another directory"
        )
    ep_rank = int(os.environ.get("RANK", "0")) % cfg.ep_size
    # None: resuming a run that crashed before its first checkpoint
    return ckpt.load_for(directory, ep_rank, cfg.ep_size, torch.device(cfg.device))


def _shared_name(args: argparse.Namespace) -> None:
    """Every rank must send one run name (a run record that names it otherwise is a
    conflict): without --run-name, rank 0's default, stamped with its clock, is everyone's;
    and so is the default checkpoint directory made from it."""
    named, placed = args.run_name is not None, args.checkpoint_dir is not None
    if not named:
        args.run_name = f"moe-{args.pattern}-{time.strftime('%Y%m%d-%H%M%S')}"
        if torch.distributed.is_initialized():
            box = [args.run_name]
            torch.distributed.broadcast_object_list(box, src=0)
            args.run_name = box[0]
    if not placed:
        args.checkpoint_dir = str(Path("checkpoints") / args.run_name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    named, placed = args.run_name, args.checkpoint_dir
    _shared_name(args)  # this rank's own default, for the checks before the process group
    try:
        model_cfg, cfg = configs(args)
        profile = parse_window(args.profile_steps)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    world = _init_distributed(cfg.device)
    args.run_name, args.checkpoint_dir = named, placed
    _shared_name(args)  # now rank 0's, on every rank
    cfg = dataclasses.replace(cfg, checkpoint_dir=Path(args.checkpoint_dir))
    try:
        resume = _resume_point(args, cfg)
        layout = make_layout(cfg.ep_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rank = layout.rank
    run_id = resume.run_id if resume is not None else _shared_run_id(args.run_id)
    assert cfg.checkpoint_dir is not None
    attempt = ckpt.next_attempt(cfg.checkpoint_dir / f"rank{rank}", fresh=not args.resume)
    sink = SpoolSink(
        Path(args.spool) / run_id / f"attempt{attempt}-rank{rank}", args.server, token=args.token
    )
    if rank == 0:
        _say_where_it_starts(args, resume, attempt)
        if args.server:
            _check_server(args.server, Path(args.spool) / run_id)
    rec = Recorder(
        run_name=args.run_name,
        project=args.project,
        run_id=run_id,
        sink=sink,
        attempt=attempt,
        model_plan=model_plan(model_cfg),
        runtime_policy={
            **runtime_policy(model_cfg, cfg, world),
            **({"threads": args.threads} if args.threads is not None else {}),
        },
        device=cfg.device,
        routing_every=args.routing_every,
        device_every=args.device_every,
        tags=args.tag,
        ablation=args.ablation,
        cell=args.cell,
    )
    if profile is not None:
        rec.profile(*profile, trace_dir=str(Path(args.spool) / run_id / "traces"))
    print(f"run_id {run_id}  name {args.run_name}  attempt {attempt}", flush=True)
    try:
        with rec.span("startup"):
            state = setup(model_cfg, cfg, run_id, resume, _ddp_wrapper(cfg, layout), layout)
        rec.watch(state.model)  # what the loop calls: compiled or DDP-wrapped, as it runs
        result = _run_with_progress(model_cfg, cfg, state, rec, show=not args.no_progress)
    except BaseException as exc:
        rec.close(
            status="failed",
            cause=f"{type(exc).__name__}: {exc}",
            flush_timeout_s=args.flush_timeout,
        )
        raise
    stats = rec.close(status="completed", flush_timeout_s=args.flush_timeout)
    _report(result, stats, Path(args.spool) / run_id)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _say_where_it_starts(
    args: argparse.Namespace, resume: ckpt.Checkpoint | None, attempt: int
) -> None:
    if not args.resume:
        return
    if resume is None:
        print(
            f"--resume: no checkpoint in {args.checkpoint_dir} yet: attempt {attempt} "
            "starts from step 0",
            flush=True,
        )
    else:
        print(
            f"resumed from the checkpoint of step {resume.step} in {args.checkpoint_dir}: "
            f"attempt {attempt} starts at step {resume.step + 1}",
            flush=True,
        )


def _check_server(url: str, spool_dir: Path) -> None:
    """Say at once when the service cannot be reached: training goes on regardless, and its
    records wait in the spool until the service answers."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=2.0)
    except httpx.HTTPError as exc:
        print(
            f"goodput: the service at {url} cannot be reached ({type(exc).__name__}); training "
            f"goes on and its records are kept in the spool {spool_dir}, sent as soon as the "
            "service answers (or later: goodput spool replay DIR --server URL)",
            file=sys.stderr,
            flush=True,
        )


def _ddp_wrapper(cfg: TrainConfig, layout: Layout) -> Any:
    """Data parallel without expert parallel: DDP. With ep_size > 1 the loop exchanges the
    gradients itself (moe_core.parallel), since the expert shards differ between ranks."""
    if layout.world <= 1 or layout.ep_size > 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        ids = [torch.cuda.current_device()] if cfg.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    return wrap


def _run_with_progress(
    model_cfg: ModelConfig, cfg: TrainConfig, state: Any, rec: Recorder, show: bool
) -> TrainResult:
    if not show:
        return train(model_cfg, cfg, state, rec)
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("training", total=cfg.steps, completed=state.first_step)
        return train(model_cfg, cfg, state, rec, progress=lambda _s: bar.advance(task))


def _report(result: TrainResult, stats: Any, spool_dir: Path) -> None:
    loss = f"{float(result.final_loss):.4f}" if result.final_loss is not None else "n/a"
    print(f"trained {result.steps} steps, final loss {loss}")
    for step, value in result.eval_losses:
        print(f"eval loss at step {step}: {float(value):.4f}")
    if result.dispatch_observed:
        print(f"dispatch observed per E layer: {', '.join(result.dispatch_observed)}")
    if stats is not None:
        print(
            f"records: spooled {stats.records_spooled}, sent {stats.records_sent}, "
            f"dropped {stats.records_dropped}, rejected {stats.records_rejected}"
        )
        if stats.pending_bytes:
            print(
                f"{stats.pending_bytes} bytes not yet sent remain in {spool_dir}; send them "
                f"with: goodput spool replay {spool_dir} --server URL"
            )
    print(f"run_id {result.run_id}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
