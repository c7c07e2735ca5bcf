"""The training loop: AdamW with warmup and cosine decay, grad clipping, bf16 autocast on CUDA,
periodic eval and atomic checkpoints, every phase timed by the goodput recorder.

The recorder is any object with the `trainer_hooks.Recorder` interface; this module does not
construct one, so the loop also runs under other hooks or none (`NullRecorder`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_core import checkpoint as ckpt
from moe_core.config import ModelConfig
from moe_core.data import ByteCorpus
from moe_core.expert_parallel import expert_parameter_names
from moe_core.model import build_model
from moe_core.parallel import SINGLE, Layout, sync_and_clip

FAIL_EXIT_CODE = 17
EVAL_SEED = 7919  # the held-out batches every run evaluates on, whatever its --seed


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
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    fail_at_step: int | None = None
    dispatch: str = "auto"
    compile: bool = False
    seed: int = 0
    device: str = "cpu"
    corpus_bytes: int = 2_000_000
    ep_size: int = 1  # routed experts split over this many ranks (moe_core.parallel)
    # A real delay inside every step, this fraction of the step's own compute time (a known
    # slowdown, to calibrate keep/drop verdicts against: bench/compare_calibration.py).
    slowdown: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches", "corpus_bytes", "ep_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.slowdown <= 10.0:
            raise ValueError(f"slowdown must be within [0, 10], got {self.slowdown}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir is required when checkpoint_every > 0")
        if self.fail_at_step is not None and self.fail_at_step < 0:
            raise ValueError(f"fail_at_step must be >= 0, got {self.fail_at_step}")


class NullRecorder:
    """Stands in for a recorder when none is attached."""

    def span(self, *_a: Any, **_k: Any) -> Any:
        return nullcontext()

    def step(self, *_a: Any, **_k: Any) -> Any:
        return _NullStep()

    def checkpoint_committed(self, *_a: Any, **_k: Any) -> None:
        pass

    def metric(self, *_a: Any, **_k: Any) -> None:
        pass


class _NullStep(nullcontext):  # type: ignore[type-arg]
    loss: Any = None

    def __enter__(self) -> _NullStep:
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: torch.device) -> Any:
    # bf16 autocast on CUDA only: CPU bf16 matmuls are slow and this loop's CPU runs are tests.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    n: int,
    device: torch.device,
) -> torch.Tensor:
    """Mean cross-entropy over n held-out batches, as a device tensor (no sync here)."""
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(n):
        x_BT, y_BT = next(batches)
        with _autocast(device):
            logits_BTV, _aux = model(x_BT.to(device))
        total += F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten())
    model.train()
    return total / n


@dataclass
class TrainState:
    model: torch.nn.Module
    raw_model: torch.nn.Module  # without compile/DDP wrappers: what checkpoints hold
    opt: torch.optim.Optimizer
    corpus: ByteCorpus
    first_step: int
    data_position: int  # train batches already consumed
    run_id: str
    layout: Layout = SINGLE


@dataclass
class TrainResult:
    """Losses stay device tensors: reading them is the caller's one sync, after the loop."""

    run_id: str
    steps: int
    final_loss: torch.Tensor | None
    eval_losses: list[tuple[int, torch.Tensor]]
    dispatch_observed: list[str]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and the state-space parameters marked
    `_no_weight_decay` (A_log, D, dt bias, decay logits) keep their values."""
    decay, keep = [], []
    for p in model.parameters():
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False):
            keep.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def setup(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    run_id: str,
    resume_from: ckpt.Checkpoint | None,
    wrap: Callable[[Any], Any] | None,
    layout: Layout | None = None,
) -> TrainState:
    """Build (or restore) model, optimizer and data; the caller times this as `startup`.
    With a layout of ep_size > 1 the model holds this rank's expert shard."""
    layout = layout or SINGLE
    if layout.ep_size != cfg.ep_size:
        raise ValueError(f"ep_size: the config says {cfg.ep_size}, the layout {layout.ep_size}")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    corpus = ByteCorpus.from_stdlib(max_bytes=cfg.corpus_bytes)
    raw = build_model(
        model_cfg, seed=cfg.seed, dispatch_backend=cfg.dispatch, ep_group=layout.ep_group
    ).to(device)
    opt = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr)
    first, position = 0, 0
    if resume_from is not None:
        if resume_from.ep_size != layout.ep_size:  # ckpt.load_for reshards
            raise ValueError(
                f"ep_size: the checkpoint holds a shard of ep_size={resume_from.ep_size}, "
                f"this run has {layout.ep_size}"
            )
        raw.load_state_dict(resume_from.model)
        opt.load_state_dict(resume_from.optimizer)
        ckpt.set_rng_state(resume_from.rng)
        first, position = resume_from.step + 1, resume_from.data_position
        run_id = resume_from.run_id
    model = wrap(raw) if wrap is not None else raw
    if cfg.compile:
        model = torch.compile(model)
    return TrainState(model, raw, opt, corpus, first, position, run_id, layout)


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    st: TrainState,
    rec: Any,
    progress: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run steps st.first_step .. cfg.steps-1. Raises what training raises."""
    device = torch.device(cfg.device)
    rank = int(os.environ.get("RANK", "0"))
    data_seed = cfg.seed + 1000 * rank
    batches = st.corpus.batches(
        "train", cfg.batch_size, model_cfg.seq_len, data_seed, start=st.data_position
    )
    loss: torch.Tensor | None = None
    evals: list[tuple[int, torch.Tensor]] = []
    for step in range(st.first_step, cfg.steps):
        if cfg.fail_at_step is not None and step == cfg.fail_at_step:
            os._exit(FAIL_EXIT_CODE)  # a real crash: no cleanup, no flush, no attempt_end
        with rec.span("data_stall", step=step):
            x_BT, y_BT = _to_device(next(batches), device)
        with rec.step(step, tokens=x_BT.numel(), flops_key=tuple(x_BT.shape)) as s:
            t0 = time.perf_counter()
            loss = train_step(st, cfg, step, x_BT, y_BT, device)
            s.loss = loss
            if cfg.slowdown:
                _delay(cfg.slowdown, t0, device)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            with rec.span("eval", step=step):
                # The same held-out batches every time, so eval losses compare across steps
                # and across runs (its seed is fixed, not the run's).
                val = st.corpus.batches("val", cfg.batch_size, model_cfg.seq_len, EVAL_SEED)
                value = evaluate(st.model, val, cfg.eval_batches, device)
            evals.append((step, value))
            rec.metric("eval_loss", value, step=step)  # a tensor: read off the training thread
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _checkpoint(st, cfg, step, rec)
        if progress is not None:
            progress(step)
    return TrainResult(st.run_id, cfg.steps - st.first_step, loss, evals, _observed(st.raw_model))


def _delay(fraction: float, t0: float, device: torch.device) -> None:
    """Sleep `fraction` of the step's compute so far (on CUDA after waiting for it: this
    knob is for calibration runs, where a sync per step is part of the experiment)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    time.sleep(fraction * (time.perf_counter() - t0))


def _to_device(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type != "cuda":
        return batch
    # Pinned sources make the copies truly asynchronous: no host wait, no hidden sync.
    x_BT, y_BT = (t.pin_memory().to(device, non_blocking=True) for t in batch)
    return x_BT, y_BT


def train_step(
    st: TrainState,
    cfg: TrainConfig,
    step: int,
    x_BT: torch.Tensor,
    y_BT: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    for group in st.opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    with _autocast(device):
        logits_BTV, aux_loss = st.model(x_BT)
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten())
    st.opt.zero_grad(set_to_none=True)
    (loss + aux_loss).backward()
    if st.layout.ep_size > 1:  # the expert shards differ between ranks: no DDP
        sync_and_clip(st.raw_model, st.layout, cfg.grad_clip)
    else:
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
    st.opt.step()
    # Every replica of a router takes the same balancing step, from the whole job's counts.
    st.raw_model.update_router_biases(group=dist.group.WORLD if st.layout.world > 1 else None)
    return loss.detach()


def _checkpoint(st: TrainState, cfg: TrainConfig, step: int, rec: Any) -> None:
    """Rank 0 writes the checkpoint, or with ep_size > 1 the first group's ranks write one
    shard each; the commit is recorded once every shard is on disk."""
    layout = st.layout
    if layout.saves_checkpoints:
        with rec.span("checkpoint_save", step=step):
            _save(st, cfg, step, data_position=st.data_position + step + 1 - st.first_step)
    if layout.ep_size > 1:
        with rec.span("checkpoint_save", step=step):  # waiting for the other shards blocks too
            dist.barrier()
    if layout.rank == 0:
        rec.checkpoint_committed(step)


def _save(st: TrainState, cfg: TrainConfig, step: int, data_position: int) -> None:
    assert cfg.checkpoint_dir is not None
    layout = st.layout
    ckpt.save(
        ckpt.shard_dir(cfg.checkpoint_dir, layout.ep_rank, layout.ep_size),
        ckpt.Checkpoint(
            step=step,
            run_id=st.run_id,
            data_position=data_position,
            model=st.raw_model.state_dict(),
            optimizer=st.opt.state_dict(),
            rng=ckpt.rng_state(),
            ep_size=layout.ep_size,
            expert_params=sorted(expert_parameter_names(st.raw_model)),
            param_names=_optimizer_order(st),
        ),
    )


def _optimizer_order(st: TrainState) -> list[str]:
    """Parameter names in the optimizer's order, which keys its state."""
    names = {id(p): n for n, p in st.raw_model.named_parameters()}
    return [names[id(p)] for group in st.opt.param_groups for p in group["params"]]


def _observed(model: torch.nn.Module) -> list[str]:
    return [str(b.dispatcher.observed) for b in getattr(model, "moe_blocks", [])]
