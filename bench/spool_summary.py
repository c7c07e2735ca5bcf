"""Summarise a run of the bundled loop from its spool (issue 16 part 2, as run on the H100:
bench/results/hooks_h100_issue16.log, then named .h2_before/part2.py): tokens/s, MFU, peak
memory, top kernels.

    python3 bench/spool_summary.py SPOOL_DIR SKIP_STEPS "DEVICE NAME"
"""

import json
import statistics
import sys
from pathlib import Path

from trainer_hooks.flops import peak_flops
from trainer_hooks.spool import Spool

root = Path(sys.argv[1])
skip = int(sys.argv[2])
device = sys.argv[3] if len(sys.argv) > 3 else ""
recs = []
for d in sorted({p.parent for p in root.rglob("*.seg")}):
    for seg in Spool(d).segments():
        recs += [json.loads(p) for p in seg.read(0, 10**7).payloads]
steps = sorted((r for r in recs if r["kind"] == "step"), key=lambda r: r["step"])
prof = [r for r in recs if r["kind"] == "profile"]
pw = set()
for p in prof:
    pw |= set(range(p["first_step"], p["first_step"] + p["num_steps"]))
steady = [s for s in steps if s["step"] >= skip and s["step"] not in pw]
wall = [s["end"] - s["start"] for s in steady]
dev = [s["device_time_s"] for s in steady if s.get("device_time_s")] or [float("nan")]
tok = steady[0]["tokens"]
flops = next((s["flops"] for s in steps if s.get("flops")), None)
peak = peak_flops(device)
print(
    f"steps {len(steps)}, steady {len(steady)} (from step {skip}, profiled {sorted(pw)} left out)"
)
print(
    f"median step wall {statistics.median(wall) * 1e3:.2f} ms, "
    f"device {statistics.median(dev) * 1e3:.2f} ms"
)
print(f"tokens/step {tok}, tokens/s (median wall) {tok / statistics.median(wall):.0f}")
if flops:
    print(f"model FLOPs/step {flops:.4g} (counted by the hooks, MoE-active)")
    if peak:
        by_dev = flops / statistics.median(dev) / peak
        by_wall = flops / statistics.median(wall) / peak
        print(f"MFU (device time) {by_dev:.4f}, (wall) {by_wall:.4f}, peak {peak:.3g}")
mem = [s["mem_allocated_peak"] for s in steps if s.get("mem_allocated_peak")]
if mem:
    reserved = max(s.get("mem_reserved_peak") or 0 for s in steps)
    print(f"peak memory allocated {max(mem) / 2**30:.2f} GiB, reserved {reserved / 2**30:.2f} GiB")
hooks = [s.get("hook_overhead_s") or 0 for s in steady]
print(f"hook overhead per step median {statistics.median(hooks) * 1e6:.1f} us")
routing = [r for r in recs if r["kind"] == "routing"]
print(f"routing records {len(routing)}")
for p in prof:
    print(
        f"profile window steps {p['first_step']}..{p['first_step'] + p['num_steps'] - 1}: "
        "top kernels by device time"
    )
    total = sum(k["device_time_s"] for k in p["top_kernels"])
    for k in p["top_kernels"][:30]:
        print(f"  {k['device_time_s'] * 1e3:9.2f} ms {k['count']:6d}  {k['name'][:110]}")
