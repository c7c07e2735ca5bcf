"""What each candidate per-step operation of the hooks costs where the hooks make it: right
after a real training step of the bundled model (and a synchronize, as `--drain` does), against
the same call in a tight loop. It tells which designs of the step path can meet a host-time
budget of tens of microseconds on a GPU host, where every CUDA call is dear.

    python bench/hooks_step_ops.py --device cuda --pattern 'AE*12' --num-experts 128 \\
        --d-model 256 --seq-len 1024 --batch-size 8

Each operation is timed alone on `--steps` training steps (median, microseconds), each right
after the step's synchronize; `tight` is the median of 50 calls in a row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from hooks_model import add_model_args, build, device_name

from moe_core.loop import train_step


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, device="cuda", pattern="AE*12", d_model=256, seq_len=1024, num_experts=128)
    p.add_argument("--steps", type=int, default=25)
    return p.parse_args()


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    st, cfg, batches = build(args, 10**6)
    state: dict[str, Any] = {"step": 0, "loss": None}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def one_step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        state["loss"] = train_step(st, cfg, state["step"], x, y, device)
        state["step"] += 1
        sync()

    for _ in range(3):
        one_step()
    loss0 = state["loss"]
    ring = torch.zeros(16, dtype=loss0.dtype, device=device)
    slots = list(ring.unbind(0))
    held = [loss0.detach().clone() for _ in range(10)]
    counters = torch.zeros(12 * (2 * 128 + 4), dtype=torch.float64, device=device)
    pinned_loss = torch.empty((), dtype=loss0.dtype, pin_memory=cuda)
    q: deque[Any] = deque()
    pc = time.perf_counter
    ev_pool = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if cuda else []

    def record() -> None:
        ev_pool[0].record()

    def loss_pinned() -> None:
        pinned_loss.copy_(state["loss"].detach(), non_blocking=True)

    def ring_slot() -> None:
        slots[state["step"] % 16].copy_(state["loss"].detach())

    def detach_ptr() -> None:
        t = state["loss"].detach()
        t.data_ptr()

    def stack_pin() -> None:
        flat = torch.stack(held)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=cuda)
        host.copy_(flat, non_blocking=True)

    def counters_pin() -> None:
        host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=cuda)
        host.copy_(counters, non_blocking=True)

    def python_record() -> None:
        t = pc()
        q.append(
            (
                "step",
                {
                    "run_id": "r",
                    "attempt": 0,
                    "rank": 0,
                    "step": 1,
                    "start": t,
                    "end": t,
                    "tokens": 1,
                    "hook_overhead_s": 0.0,
                    "loss": None,
                    "flops": None,
                },
            )
        )

    ops: dict[str, Callable[[], None]] = {
        "python: perf_counter + dict + deque append": python_record,
        "loss.detach() + data_ptr()": detach_ptr,
    }
    if cuda:
        ops.update(
            {
                "event record (pooled)": record,
                "loss copy into pinned (non_blocking)": loss_pinned,
                "loss copy into a device ring slot": ring_slot,
                "stack 10 losses + pinned copy": stack_pin,
                "12 x 260 fp64 counters pinned copy": counters_pin,
                "two event records": lambda: (ev_pool[1].record(), ev_pool[2].record()),
            }
        )
    name = device_name(device)
    print(f"device {name}, torch {torch.__version__}, pattern {args.pattern}, d {args.d_model}")
    print(f"{'operation':46s} {'after a step us':>15s} {'tight us':>9s}")
    for label, fn in ops.items():
        fn()
        after = []
        for _ in range(args.steps):
            one_step()
            t0 = pc()
            fn()
            after.append(pc() - t0)
        sync()
        tight = []
        for _ in range(20):
            t0 = pc()
            for _ in range(50):
                fn()
            tight.append((pc() - t0) / 50)
            sync()
            q.clear()
        print(
            f"{label:46s} {statistics.median(after) * 1e6:15.1f} "
            f"{statistics.median(tight) * 1e6:9.1f}"
        )


if __name__ == "__main__":
    main()
