"""The bundled model and loop as the hooks benches build them (`hooks_overhead.py`,
`hooks_profile.py`, `hooks_step_ops.py`): the same flags give the same model in each, so
their figures can be set side by side. Imported from the bench folder (each bench runs as a
script, so its folder is on the path)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import torch

from moe_core.config import ModelConfig
from moe_core.loop import TrainConfig, setup


def add_model_args(
    p: argparse.ArgumentParser,
    *,
    device: str = "cpu",
    pattern: str = "AE",
    d_model: int = 64,
    seq_len: int = 64,
    num_experts: int = 4,
) -> None:
    """The model's flags, with this bench's defaults."""
    p.add_argument("--device", default=device)
    p.add_argument("--pattern", default=pattern)
    p.add_argument("--d-model", type=int, default=d_model)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-experts", type=int, default=num_experts)
    p.add_argument("--dispatch", default="auto")


def build(args: argparse.Namespace, steps: int) -> tuple[Any, TrainConfig, Iterator[Any]]:
    """The loop's state for `steps` steps, its config, and its training batches. Heads of
    64, a dense FFN twice d_model wide, experts d_model wide."""
    model_cfg = ModelConfig(
        pattern=args.pattern,
        d_model=args.d_model,
        seq_len=args.seq_len,
        num_experts=args.num_experts,
        n_heads=max(2, args.d_model // 64),
        ffn_hidden=2 * args.d_model,
        expert_hidden=args.d_model,
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        dispatch=args.dispatch,
        device=args.device,
        eval_every=0,
    )
    st = setup(model_cfg, cfg, "bench", None, None)
    return st, cfg, st.corpus.batches("train", args.batch_size, args.seq_len, seed=0)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
