"""The bundled training loop with expert parallelism against data parallel, on N GPUs.

    python3 bench/ep_train_check.py --nproc 2            # bench/results/ep_train_check.log
    python3 bench/ep_train_check.py --nproc 2 --compile

Runs `python -m moe_core.train` under torchrun twice from one seed, `--ep-size 1` (DDP) and
`--ep-size N` (the routed experts split over the N ranks, gradients exchanged by
moe_core.parallel), with the hooks spooling offline, then reads both spools and prints per
rank the step losses' largest relative difference over the first `--close-steps` steps and
over all steps, the median step time of each, and the checkpoint shards written. bf16
autocast on CUDA: the two runs sum in different orders, so their losses drift apart slowly;
the first steps must agree closely (`--rtol`), else it prints `ep_train_check: FAILED`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer_hooks.spool import Spool  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train(work: Path, nproc: int, ep_size: int, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-port", str(free_port()), "-m", "moe_core.train", "--no-progress"]
    cmd += ["--device", args.device, "--steps", str(args.steps), "--ep-size", str(ep_size)]
    cmd += ["--dispatch", args.dispatch, "--num-experts", str(args.experts)]
    cmd += ["--d-model", str(args.d_model), "--seq-len", str(args.seq_len)]
    cmd += ["--batch-size", str(args.batch_size), "--eval-every", "0", "--pattern", args.pattern]
    cmd += ["--checkpoint-every", str(args.steps), "--run-id", f"ep{ep_size}"]
    cmd += ["--compile"] if args.compile else []
    cmd += ["--spool", str(work / "spool"), "--checkpoint-dir", str(work / "ckpt")]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-5000:], sep="\n")
        raise SystemExit(f"ep_size={ep_size} failed with exit code {done.returncode}")


def steps(work: Path) -> dict[tuple[int, int], dict[str, float]]:
    out = {}
    for seg_dir in sorted({p.parent for p in (work / "spool").rglob("*.seg")}):
        for seg in Spool(seg_dir).segments():
            for payload in seg.read(0, 1_000_000).payloads:
                r = json.loads(payload)
                if r["kind"] == "step":
                    out[r["rank"], r["step"]] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--close-steps", type=int, default=5)
    p.add_argument("--rtol", type=float, default=2e-2)
    p.add_argument("--dispatch", default="grouped")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pattern", default="AEAE")
    p.add_argument("--compile", action="store_true", help="torch.compile both runs")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="ep-train-") as tmp:
        runs = {}
        for ep in (1, args.nproc):
            work = Path(tmp) / f"ep{ep}"
            work.mkdir()
            train(work, args.nproc, ep, args)
            runs[ep] = steps(work)
            shards = sorted(
                str(c.relative_to(work / "ckpt")) for c in (work / "ckpt").rglob("step_*.pt")
            )
            print(f"ep_size={ep}: {len(runs[ep])} step records, checkpoints {shards}")
        dp, ep = runs[1], runs[args.nproc]
        if sorted(dp) != sorted(ep):
            raise SystemExit("the two runs recorded different steps")
        ok = True
        for rank in range(args.nproc):
            keys = sorted(k for k in dp if k[0] == rank)
            rel = [abs(ep[k]["loss"] - dp[k]["loss"]) / abs(dp[k]["loss"]) for k in keys]
            first = max(rel[: args.close_steps])
            ok = ok and first <= args.rtol
            times = {
                name: statistics.median(r[k]["end"] - r[k]["start"] for k in keys[5:])
                for name, r in (("dp", dp), ("ep", ep))
            }
            print(
                f"rank {rank}: loss step 0 {dp[keys[0]]['loss']:.4f} (dp) {ep[keys[0]]['loss']:.4f}"
                f" (ep), last {dp[keys[-1]]['loss']:.4f} / {ep[keys[-1]]['loss']:.4f}; max rel "
                f"diff first {args.close_steps} steps {first:.2e}, all steps {max(rel):.2e}; "
                f"median step time dp {times['dp'] * 1e3:.1f} ms, ep {times['ep'] * 1e3:.1f} ms"
            )
    print("ep_train_check: " + ("ok" if ok else "FAILED"))


if __name__ == "__main__":
    main()
