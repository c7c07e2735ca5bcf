"""What the goodput hooks cost a training step: the bundled loop with hooks on and off,
interleaved in one run.

    python bench/hooks_overhead.py                      # CPU, the small bundled model
    python bench/hooks_overhead.py --device cuda --d-model 1024 --seq-len 1024 --batch-size 8 \
        --pattern AEAEAEAE --num-experts 16

Two figures:
- us_per_step: median host time spent inside the hook calls of a step (span enter/exit around
  the batch fetch, step enter/exit), hooks on minus the same calls on no-op stand-ins; the
  sink's background thread is excluded, as it runs beside training.
- ratio: median step wall time with hooks on over hooks off (the GPU target is <= 1.01).
  Also printed: the ratio of each on block's median to the off block after it, as a geometric
  mean over the pairs with a 95% interval: at short steps the machine drifts by more than the
  hooks cost, and the interval says what one run can tell.

The recorder reads routing every `routing_every` steps and, on CUDA, touches the device on one
step in `device_every` (events, the losses' copy, the allocator's peaks), their defaults (10)
unless `--routing-every` / `--device-every` say otherwise (1: every step, the cost the
defaults avoid). The median step is then a quiet one; the mean host time, also printed,
spreads the device steps over the steps.

Blocks of steps alternate on/off so drift (clocks, caches, other load) hits both alike. The
last line is `hooks_overhead: us_per_step=<x> ratio=<y>`.

On a GPU-bound run the host races ahead until CUDA's launch queue is full; from then on every
kernel launch waits for a free slot, and the few launches the hooks make (counter clones,
pinned copies, events) are charged that wait. `--drain` empties the queue before each timed
hook region (outside the regions), so us_per_step is the hooks' own host cost; read the ratio
from a run without it, since draining serializes host and device.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import torch
from hooks_model import add_model_args, build, device_name

from moe_core.loop import NullRecorder, TrainConfig, train_step
from trainer_hooks import Recorder, SpoolSink


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--blocks", type=int, default=10, help="on/off blocks of each kind")
    p.add_argument("--steps-per-block", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument(
        "--routing-every",
        type=int,
        default=None,
        help="the recorder's routing_every (default: the recorder's own default)",
    )
    p.add_argument(
        "--device-every",
        type=int,
        default=None,
        help="the recorder's device_every (default: the recorder's own default)",
    )
    p.add_argument(
        "--sink-interval",
        type=float,
        default=0.1,
        help="seconds between the sink thread's passes (its flush_interval_s); a long one "
        "keeps it asleep until close, to tell its share of the step-time ratio",
    )
    p.add_argument(
        "--drain",
        action="store_true",
        help="CUDA: empty the launch queue before each step (outside the timed "
        "regions), so hook calls are not charged for waiting on a full queue",
    )
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # between blocks only, never inside a timed step


def run_block(
    st: Any,
    cfg: TrainConfig,
    rec: Any,
    batches: Any,
    first: int,
    n: int,
    device: torch.device,
    drain: bool = False,
) -> tuple[list[float], list[float]]:
    """n steps; returns (host seconds inside hook calls, wall seconds) per step."""
    hook_s, wall_s = [], []
    pc = time.perf_counter
    for step in range(first, first + n):
        if drain:
            sync(device)
        t0 = pc()
        span = rec.span("data_stall", step=step)
        span.__enter__()
        t1 = pc()
        x_BT, y_BT = next(batches)
        x_BT, y_BT = x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)
        if drain:
            sync(device)
        t2 = pc()
        span.__exit__(None, None, None)
        h = rec.step(step, tokens=x_BT.numel(), flops_key=tuple(x_BT.shape))
        h.__enter__()
        t3 = pc()
        loss = train_step(st, cfg, step, x_BT, y_BT, device)
        if drain:
            sync(device)
        t4 = pc()
        h.loss = loss
        h.__exit__(None, None, None)
        t5 = pc()
        hook_s.append((t1 - t0) + (t3 - t2) + (t5 - t4))
        wall_s.append(t5 - t0)
    return hook_s, wall_s


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    st, cfg, batches = build(args, args.warmup + 2 * args.blocks * args.steps_per_block)
    spool = tempfile.mkdtemp(prefix="hooks-bench-")
    every = {} if args.routing_every is None else {"routing_every": args.routing_every}
    if args.device_every is not None:
        every["device_every"] = args.device_every
    rec = Recorder(
        run_name="hooks-overhead",
        sink=SpoolSink(spool, None, flush_interval_s=args.sink_interval),
        device=device,
        environment={},
        **every,
    )
    rec.watch(st.raw_model)
    off = NullRecorder()
    step = 0
    for r in (rec, off):  # warm-up both paths, including the one FLOP-counted step
        run_block(st, cfg, r, batches, step, args.warmup // 2 or 1, device)
        step += args.warmup // 2 or 1
    on_hook, on_wall, off_hook, off_wall = [], [], [], []
    block_medians: list[float] = []  # each block's median step wall, on and off in turn
    for b in range(2 * args.blocks):
        r, hook, wall = (rec, on_hook, on_wall) if b % 2 == 0 else (off, off_hook, off_wall)
        sync(device)
        h, w = run_block(st, cfg, r, batches, step, args.steps_per_block, device, args.drain)
        sync(device)
        step += args.steps_per_block
        hook += h
        wall += w
        block_medians.append(statistics.median(w))
    stats = rec.close()
    us = (statistics.median(on_hook) - statistics.median(off_hook)) * 1e6
    ratio = statistics.median(on_wall) / statistics.median(off_wall)
    name = device_name(device)
    print(
        f"device {name}, torch {torch.__version__}, pattern {args.pattern}, "
        f"d_model {args.d_model}, tokens/step {args.batch_size * args.seq_len}"
    )
    print(
        f"steps: {len(on_wall)} on, {len(off_wall)} off, interleaved in blocks of "
        f"{args.steps_per_block}"
    )
    print(
        f"median step wall: on {statistics.median(on_wall) * 1e3:.3f} ms, "
        f"off {statistics.median(off_wall) * 1e3:.3f} ms"
    )
    print(
        f"median host time in hook calls: on {statistics.median(on_hook) * 1e6:.1f} us, "
        f"off {statistics.median(off_hook) * 1e6:.1f} us"
    )
    # The median step is one without a routing read when routing_every > 1; the mean
    # spreads the reads over the steps (and keeps every outlier: the machine's noise too).
    mean_on, mean_off = statistics.fmean(on_hook), statistics.fmean(off_hook)
    print(
        f"mean host time in hook calls: on {mean_on * 1e6:.1f} us, off {mean_off * 1e6:.1f} us,"
        f" difference {(mean_on - mean_off) * 1e6:.1f} us"
    )
    print(
        f"records spooled {stats.records_spooled}, dropped {stats.records_dropped}, "
        f"hook errors {rec.errors}"
    )
    low, mid, high = paired_ratio(block_medians)
    print(
        f"paired blocks: on/off ratio of each block's median to the next's, geometric mean "
        f"{mid:.4f}, 95% interval [{low:.4f}, {high:.4f}] over {len(block_medians) // 2} pairs"
    )
    print(f"hooks_overhead: us_per_step={us:.1f} ratio={ratio:.4f}")


def paired_ratio(block_medians: list[float]) -> tuple[float, float, float]:
    """The step-time ratio from adjacent block pairs (an on block, then the off block after
    it): drift slower than a pair cancels out of each pair's ratio, and the spread of the
    pairs gives the interval (normal approximation on the log ratios)."""
    logs = [
        math.log(on / off) for on, off in zip(block_medians[::2], block_medians[1::2], strict=False)
    ]
    mean = statistics.fmean(logs)
    half = 1.96 * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else math.nan
    return math.exp(mean - half), math.exp(mean), math.exp(mean + half)


if __name__ == "__main__":
    main()
