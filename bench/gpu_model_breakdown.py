"""Issue 16 part 2, as run on the H100 (bench/results/hooks_h100_issue16.log, then named
.h2_before/part2_run.py): the bundled model on a GPU as a user runs it, with the hooks; then each
block family timed alone (forward + backward, CUDA events) for a per-family breakdown; with
--compile the run is compiled, and each family is also timed as a compiled block alone."""

import argparse
import statistics
import time

import torch

from moe_core.config import ModelConfig, model_plan
from moe_core.loop import TrainConfig, setup, train
from moe_core.train import runtime_policy
from trainer_hooks import Recorder, SpoolSink

p = argparse.ArgumentParser()
p.add_argument("--d-model", type=int, default=1024)
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--batch-size", type=int, default=8)
p.add_argument("--experts", type=int, default=16)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--compile", action="store_true")
p.add_argument("--spool", default="/tmp/spool")
p.add_argument("--pattern", default="AEMEAEMEAEMR")
p.add_argument(
    "--no-families", action="store_true", help="the run only: no per-family timing after it"
)
a = p.parse_args()
d = a.d_model
mc = ModelConfig(
    pattern=a.pattern,
    d_model=d,
    n_heads=d // 128,
    ffn_hidden=4 * d,
    expert_hidden=d,
    num_experts=a.experts,
    top_k=2,
    seq_len=a.seq_len,
)
cfg = TrainConfig(
    steps=a.steps,
    batch_size=a.batch_size,
    device="cuda",
    compile=a.compile,
    eval_every=0,
    dispatch="grouped",
)
st = setup(mc, cfg, "part2", None, None)
print(
    "params",
    sum(p.numel() for p in st.raw_model.parameters()) / 1e6,
    "M; compile",
    a.compile,
    flush=True,
)
# As `goodput train` builds it: the environment collected (the device's name gives MFU its
# peak) and the runtime policy, so the run's receipt is complete.
rec = Recorder(
    run_name="part2-compiled" if a.compile else "part2-eager",
    sink=SpoolSink(a.spool, None),
    device="cuda",
    model_plan=model_plan(mc),
    runtime_policy=runtime_policy(mc, cfg, 1),
    heartbeat_s=0,
)
rec.watch(st.model)
rec.profile(a.steps - 6, 2, trace_dir=a.spool + "/traces")
t0 = time.time()
train(mc, cfg, st, rec)
torch.cuda.synchronize()
print(f"train wall {time.time() - t0:.1f} s", flush=True)
print("close", rec.close(flush_timeout_s=30))
if a.no_families:
    print(f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    raise SystemExit(0)
# per family: one block of each letter alone, forward + backward under bf16 autocast
model = st.raw_model
x0 = torch.randn(a.batch_size, a.seq_len, d, device="cuda")


def ms(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


seen = {}
seen_compiled = {}
for letter, block in zip(mc.layers, model.blocks, strict=True):
    if letter in seen:
        continue

    def fb(block=block):
        x = x0.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    seen[letter] = ms(fb)
    if a.compile:
        # The same block under torch.compile (compiled alone; its first calls compile).
        compiled = torch.compile(block)
        seen_compiled[letter] = ms(lambda compiled=compiled: fb(compiled))
counts = {f: mc.layers.count(f) for f in seen}
opt_ms = ms(lambda: st.opt.step())


def head():
    t = torch.randint(0, 256, (a.batch_size, a.seq_len), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lo, aux = model(t)
    (torch.nn.functional.cross_entropy(lo.float().flatten(0, 1), t.flatten()) + aux).backward()


full = ms(head, n=5)
print(f"full forward+backward {full:.2f} ms (eager, no optimizer)")
for f in seen:
    total = seen[f] * counts[f]
    print(
        f"family {f}: {seen[f]:.2f} ms per block x {counts[f]} = {total:.2f} ms "
        f"({total / full:.1%} of fwd+bwd)"
    )
if seen_compiled:
    every = sum(seen_compiled[f] * counts[f] for f in seen_compiled)
    for f in seen_compiled:
        total = seen_compiled[f] * counts[f]
        print(
            f"family {f} compiled: {seen_compiled[f]:.2f} ms per block x {counts[f]} = "
            f"{total:.2f} ms ({total / every:.1%} of the compiled blocks' sum)"
        )
print(f"optimizer step (AdamW) {opt_ms:.2f} ms")
print(f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
