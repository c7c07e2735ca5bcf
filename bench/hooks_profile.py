"""Where the hooks' host time per step goes: each part timed where it runs (inside the bundled
loop, right after a training step) and the same call repeated in a tight loop, side by side.

    python bench/hooks_profile.py --pattern 'E*12' --num-experts 128          # CPU
    python bench/hooks_profile.py --device cuda --pattern 'AE*12' --num-experts 128 \\
        --d-model 512 --seq-len 1024 --drain

Each method of the recorder's parts that the step path calls is wrapped with a timer (the
wrappers add about a microsecond each). `in loop` is its median per step inside the loop;
`mean` spreads the calls made on some steps only (a device step's) over every step; `tight`
the median of the same call made 50 times in a row right after, where the caches are
warm and nothing else runs: the gap between the two columns is what running after a
training step costs (caches and branch predictors cold, the sink thread holding the GIL when
a call that released it returns). `--sink idle` keeps the sink thread asleep (records pile up
in memory), to tell its share. Works on any version of trainer_hooks: a method missing there
is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from hooks_model import add_model_args, build, device_name

from moe_core.loop import train_step
from trainer_hooks import Recorder, SpoolSink

# (object name, method): what the step path calls, old and new versions alike
WRAPPED = [
    ("recorder", "_step_enter"),
    ("recorder", "_step_exit"),
    ("parts", "step_enter"),
    ("parts", "step_exit"),
    ("device", "begin"),
    ("device", "end"),
    ("device", "to_host"),
    ("device", "loss_to_host"),
    ("device", "hold_loss"),
    ("device", "flush"),
    ("device", "_copy_out"),
    ("device", "snapshot"),
    ("device", "_memory"),
    ("routing", "collect"),
    ("routing", "make_batch"),
    ("sink", "emit"),
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, pattern="E*12", num_experts=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--drain", action="store_true", help="CUDA: synchronize before hook calls")
    p.add_argument("--sink", choices=("active", "idle"), default="active")
    return p.parse_args()


class Timed:
    """Replaces obj.name with a timing wrapper; sums its calls per step."""

    def __init__(self, obj: Any, name: str) -> None:
        self.fn = getattr(obj, name)
        self.calls: list[float] = []
        self.per_step: list[float] = []
        self.count = 0  # calls in kept steps
        self.args: tuple[Any, ...] | None = None
        fn, calls, pc = self.fn, self.calls, time.perf_counter

        def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = pc()
            try:
                return fn(*args, **kw)
            finally:
                calls.append(pc() - t0)
                if self.args is None and not kw:
                    self.args = args

        setattr(obj, name, wrapper)

    def close_step(self, keep: bool) -> None:
        if keep:
            self.per_step.append(sum(self.calls))
            self.count += len(self.calls)
        self.calls.clear()


# calls that can be repeated alone, with the arguments of their first call
REPEATABLE = {
    "device.begin",
    "device.to_host",
    "device.snapshot",
    "device._memory",
    "routing.collect",
    "routing.make_batch",
}


def tight(fn: Callable[[], Any], calls: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    st, cfg, batches = build(args, args.steps + args.warmup)
    interval = 3600.0 if args.sink == "idle" else 0.1
    sink = SpoolSink(tempfile.mkdtemp(prefix="hooks-prof-"), None, flush_interval_s=interval)
    rec = Recorder(run_name="hooks-profile", sink=sink, device=device, environment={})
    rec.watch(st.raw_model)
    parts = rec._parts
    objects = {
        "recorder": rec,
        "parts": parts,
        "device": parts.device,
        "routing": parts.routing,
        "sink": sink,
    }
    timers = {f"{o}.{m}": Timed(objects[o], m) for o, m in WRAPPED if hasattr(objects[o], m)}

    def sync() -> None:
        if cuda and args.drain:
            torch.cuda.synchronize()

    hook_s: list[float] = []
    pc = time.perf_counter
    for step in range(args.warmup + args.steps):
        x, y = next(batches)
        if cuda:
            x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device)
        sync()
        t0 = pc()
        with rec.span("data_stall", step=step):
            pass
        h = rec.step(step, tokens=x.numel(), flops_key=tuple(x.shape))
        h.__enter__()
        t1 = pc()
        loss = train_step(st, cfg, step, x, y, device)
        sync()
        t2 = pc()
        h.loss = loss
        h.__exit__(None, None, None)
        t3 = pc()
        keep = step >= args.warmup
        if keep:
            hook_s.append((t1 - t0) + (t3 - t2))
        for t in timers.values():
            t.close_step(keep)
    if cuda:
        torch.cuda.synchronize()
    name = device_name(device)
    print(
        f"device {name}, torch {torch.__version__}, pattern {args.pattern}, d_model "
        f"{args.d_model}, experts {args.num_experts}, drain {args.drain}, sink {args.sink}"
    )
    print(
        "hook host time per step (span + step enter + step exit): "
        f"median {statistics.median(hook_s) * 1e6:.1f} us, mean "
        f"{statistics.fmean(hook_s) * 1e6:.1f} us over {len(hook_s)} steps"
    )
    print(f"{'part':22s} {'calls/step':>10s} {'in loop us':>11s} {'mean us':>8s} {'tight us':>9s}")
    for label, t in timers.items():
        if not t.per_step or not t.count:
            continue
        warm = ""
        if label in REPEATABLE and t.args is not None:
            warm = f"{tight(partial(t.fn, *t.args)) * 1e6:9.1f}"
        print(
            f"{label:22s} {t.count / len(t.per_step):10.1f} "
            f"{statistics.median(t.per_step) * 1e6:11.1f} "
            f"{statistics.fmean(t.per_step) * 1e6:8.1f} {warm:>9s}"
        )
    rec.close()


if __name__ == "__main__":
    main()
