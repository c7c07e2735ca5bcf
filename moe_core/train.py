"""The bundled training loop, with goodput hooks attached.

    python -m moe_core.train --steps 30 --server http://127.0.0.1:8787
    goodput train --steps 30 --server http://127.0.0.1:8787      (the same, via the CLI)

Training never waits for the service: records go to an on-disk spool and a background thread
sends them. With no --server the run is offline and the spool is replayed later with
`goodput spool replay`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_core import ByteCorpus, ModelConfig, build_model, model_plan
from trainer_hooks import Recorder, SpoolSink


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 10
    eval_batches: int = 2
    seed: int = 0
    device: str = "cpu"
    corpus_bytes: int = 2_000_000

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "corpus_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lm_loss(model: torch.nn.Module, x_BT: torch.Tensor, y_BT: torch.Tensor) -> torch.Tensor:
    logits_BTV, aux_loss = model(x_BT)
    return F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.flatten()) + aux_loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    device: torch.device,
) -> torch.Tensor:
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n):
        x_BT, y_BT = next(batches)
        logits_BTV, _aux = model(x_BT.to(device))
        total += F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.to(device).flatten())
    model.train()
    return total / n


@dataclass
class TrainResult:
    run_id: str
    steps: int
    final_loss: float | None


def train(
    model_cfg: ModelConfig, cfg: TrainConfig, rec: Recorder, progress: Any = None
) -> TrainResult:
    """Run the loop; every phase is timed by the recorder. Raises what training raises."""
    device = torch.device(cfg.device)
    with rec.span("startup"):
        torch.manual_seed(cfg.seed)
        corpus = ByteCorpus.from_stdlib(max_bytes=cfg.corpus_bytes)
        model = build_model(model_cfg, seed=cfg.seed).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        train_batches = corpus.batches("train", cfg.batch_size, model_cfg.seq_len, cfg.seed)
        val_batches = corpus.batches("val", cfg.batch_size, model_cfg.seq_len, cfg.seed + 1)
    loss = None
    for step in range(cfg.steps):
        with rec.span("data_stall", step=step):
            x_BT, y_BT = next(train_batches)
            x_BT, y_BT = x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)
        with rec.step(step, tokens=x_BT.numel()) as s:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = _lm_loss(model, x_BT, y_BT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            s.loss = loss.detach()
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            with rec.span("eval", step=step):
                evaluate(model, val_batches, cfg.eval_batches, device)
        if progress is not None:
            progress(step)
    final = float(loss.detach()) if loss is not None else None  # one sync, after the loop
    return TrainResult(rec.run_id, cfg.steps, final)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goodput train", description=__doc__.split("\n")[1])
    p.add_argument("--server", default=None, help="service URL; none = offline (spool only)")
    p.add_argument("--spool", default="./goodput-spool", help="spool root directory")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pattern", default="AE", help="layer plan, letters A and E, e.g. AEAE")
    p.add_argument("--run-name", default=None)
    p.add_argument("--run-id", default=None, help="client-chosen run id (default: random)")
    p.add_argument("--project", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--flush-timeout",
        type=float,
        default=10.0,
        help="seconds to keep sending at the end before leaving the rest spooled",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def _configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    model_cfg = ModelConfig(
        pattern=args.pattern,
        d_model=args.d_model,
        seq_len=args.seq_len,
        num_experts=args.num_experts,
        top_k=args.top_k,
    )
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
    )
    return model_cfg, cfg


def runtime_policy(model_cfg: ModelConfig, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    return {
        "world_size": world_size,
        "ep_size": 1,
        "batch_size": cfg.batch_size,
        "seq_len": model_cfg.seq_len,
        "tokens_per_step": cfg.batch_size * model_cfg.seq_len * world_size,
        "compile": False,
        "dispatch_requested": "loop",
        "dtype": "float32",
        "device": cfg.device,
        "train": asdict(cfg),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_cfg, cfg = _configs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_id = args.run_id or uuid.uuid4().hex
    run_name = args.run_name or f"moe-{args.pattern}-{time.strftime('%Y%m%d-%H%M%S')}"
    sink = SpoolSink(Path(args.spool) / run_id, args.server)
    rec = Recorder(
        run_name=run_name,
        project=args.project,
        run_id=run_id,
        sink=sink,
        model_plan=model_plan(model_cfg),
        runtime_policy=runtime_policy(model_cfg, cfg, 1),
    )
    print(f"run_id {run_id}  name {run_name}", flush=True)
    try:
        result = _run_with_progress(model_cfg, cfg, rec, show=not args.no_progress)
    except BaseException as exc:
        rec.close(
            status="failed",
            cause=f"{type(exc).__name__}: {exc}",
            flush_timeout_s=args.flush_timeout,
        )
        raise
    stats = rec.close(status="completed", flush_timeout_s=args.flush_timeout)
    _report(result, stats, Path(args.spool) / run_id)
    return 0


def _run_with_progress(
    model_cfg: ModelConfig, cfg: TrainConfig, rec: Recorder, show: bool
) -> TrainResult:
    if not show:
        return train(model_cfg, cfg, rec)
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task("training", total=cfg.steps)
        return train(model_cfg, cfg, rec, progress=lambda _s: bar.advance(task))


def _report(result: TrainResult, stats: Any, spool_dir: Path) -> None:
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(f"trained {result.steps} steps, final loss {loss}")
    if stats is None:
        return
    print(
        f"records: spooled {stats.records_spooled}, sent {stats.records_sent}, "
        f"dropped {stats.records_dropped}, rejected {stats.records_rejected}"
    )
    if stats.pending_bytes:
        print(
            f"{stats.pending_bytes} bytes not yet sent remain in {spool_dir}; send them with: "
            f"goodput spool replay {spool_dir} --server URL"
        )
    print(f"run_id {result.run_id}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
