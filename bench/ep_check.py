"""Expert-parallel MoE block against the ep_size=1 block: the same numbers, and what EP costs.

    torchrun --nproc-per-node 2 bench/ep_check.py                      # NCCL, one GPU per rank
    python -m torch.distributed.run --nproc-per-node 2 bench/ep_check.py --device cpu --small

Check, in fp32 and bf16: every rank runs the EP block (seed 0, experts split over the ranks)
forward and backward on its own T tokens. Outputs, input grads and expert-shard grads are
gathered to rank 0 and replicated grads summed over ranks (as data parallel would). Rank 0
runs the ep_size=1 block built with the same seed on each rank's slice of the gathered batch
(EP routes, drops and computes the aux loss per rank, so the reference does too) and prints,
per tensor, max abs difference and max rel difference, max|a - b| / max|b|.

Timing: forward+backward of the EP block against the ep_size=1 block on the same T tokens per
rank (every expert local, no exchange), median of --iters after --warmup, CUDA events on a
GPU (perf_counter on CPU); the slowest rank's median is printed.

The last line is `ep_check: ok` or `ep_check: FAIL <tensors>` (exit status 1).

Shape legend:
    P  ranks
    T  tokens per rank
    D  model width
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from moe_core.config import ModelConfig
from moe_core.expert_parallel import sharded_parameter_names
from moe_core.moe import MoEBlock

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # on max|a - b| / max|b|


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--num-experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=1024)
    p.add_argument("--capacity-factor", type=float, default=None)
    p.add_argument("--dispatch", default="auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    if args.small:
        args.tokens, args.d_model, args.expert_hidden, args.num_experts = 64, 32, 32, 4
        args.iters, args.warmup = 5, 2
    return args


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment."""
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        pattern="E",
        d_model=args.d_model,
        n_heads=max(1, args.d_model // 64),
        ffn_hidden=args.expert_hidden,  # the shared expert
        expert_hidden=args.expert_hidden,
        num_experts=args.num_experts,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
    )


def build(cfg: ModelConfig, args: argparse.Namespace, ep: bool, device, dtype) -> MoEBlock:
    torch.manual_seed(0)  # same seed: the EP shard equals the matching slice of the full block
    group = dist.group.WORLD if ep else None
    block = MoEBlock(cfg, dispatch_backend=args.dispatch, ep_group=group)
    return block.to(device, dtype).train()


def fwd_bwd(block: MoEBlock, x_BTD: torch.Tensor, up_BTD: torch.Tensor) -> torch.Tensor:
    """One forward and backward of (out * up).sum() + block loss; returns the output."""
    out_BTD, loss = block(x_BTD)
    ((out_BTD.float() * up_BTD.float()).sum() + loss).backward()
    return out_BTD.detach()


def ep_results(block: MoEBlock, x_PTD, up_PTD, rank: int, world: int) -> dict[str, Any]:
    """Run the EP block on this rank's slice; return everything gathered (rank 0 uses it)."""
    x_1TD = x_PTD[rank : rank + 1].clone().requires_grad_()
    out_1TD = fwd_bwd(block, x_1TD, up_PTD[rank : rank + 1])
    got = {"output": gather(out_1TD, world), "x.grad": gather(x_1TD.grad, world)}
    sharded = sharded_parameter_names(block)
    for name, param in block.named_parameters():
        if name in sharded:
            got[name] = gather(param.grad, world)  # local experts, ranks in global order
        else:
            dist.all_reduce(param.grad)
            got[name] = param.grad
    return got


def gather(x: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def reference_results(block: MoEBlock, x_PTD, up_PTD) -> dict[str, Any]:
    """The ep_size=1 block on each rank's slice in turn, grads summed over the slices."""
    x_PTD = x_PTD.clone().requires_grad_()
    outs = [fwd_bwd(block, x_PTD[r : r + 1], up_PTD[r : r + 1]) for r in range(len(x_PTD))]
    want = {"output": torch.cat(outs), "x.grad": x_PTD.grad}
    want.update({name: param.grad for name, param in block.named_parameters()})
    return want


def compare(got: dict[str, Any], want: dict[str, Any], dtype: torch.dtype) -> list[str]:
    """Print the differences; return the names over the dtype's tolerance."""
    failed = []
    for name, want_x in want.items():
        a, b = got[name].float(), want_x.float()
        abs_diff = (a - b).abs().max().item()
        rel_diff = abs_diff / max(b.abs().max().item(), 1e-30)
        bad = not rel_diff <= TOLERANCE[dtype]  # NaN fails too
        print(f"  {name:24s} max_abs={abs_diff:.3e} max_rel={rel_diff:.3e}{' FAIL' * bad}")
        if bad:
            failed.append(f"{dtype_name(dtype)}:{name}")
    return failed


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def time_ms(block: MoEBlock, x_BTD, up_BTD, args: argparse.Namespace, device) -> float:
    """Median forward+backward milliseconds over ``args.iters`` after ``args.warmup``."""
    x_BTD = x_BTD.clone().requires_grad_()
    times = []
    dist.barrier()
    for _ in range(args.warmup + args.iters):
        block.zero_grad(set_to_none=True)
        x_BTD.grad = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd(block, x_BTD, up_BTD)
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            fwd_bwd(block, x_BTD, up_BTD)
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize()  # after the loop: reading events earlier would stall it
        times = [start.elapsed_time(end) / 1e3 for start, end in times]
    median_ms = torch.tensor(statistics.median(times[args.warmup :]) * 1e3, device=device)
    dist.all_reduce(median_ms, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
    return median_ms.item()


def check_and_time(args, cfg, rank, world, device, dtype) -> list[str]:
    gen = torch.Generator().manual_seed(1)
    shape = (world, args.tokens, cfg.d_model)
    x_PTD = torch.randn(shape, generator=gen).to(device, dtype)
    up_PTD = torch.randn(shape, generator=gen).to(device, dtype)
    ep_block, ref_block = (
        build(cfg, args, True, device, dtype),
        build(cfg, args, False, device, dtype),
    )
    got = ep_results(ep_block, x_PTD, up_PTD, rank, world)
    failed = []
    if rank == 0:
        want = reference_results(ref_block, x_PTD, up_PTD)
        print(f"{dtype_name(dtype)}: ep observed {ep_block.dispatcher.as_dict()}")
        print(f"{dtype_name(dtype)}: ep_size=1 observed {ref_block.dispatcher.as_dict()}")
        failed = compare(got, want, dtype)
    del got
    ep_ms = time_ms(ep_block, x_PTD[rank : rank + 1], up_PTD[rank : rank + 1], args, device)
    ref_ms = time_ms(ref_block, x_PTD[rank : rank + 1], up_PTD[rank : rank + 1], args, device)
    if rank == 0:
        print(
            f"{dtype_name(dtype)}: fwd+bwd median ms (slowest rank): ep={ep_ms:.3f} "
            f"ep_size=1={ref_ms:.3f} ratio={ep_ms / ref_ms:.2f}"
        )
    return failed


def main() -> int:
    args = parse()
    rank, world, device = setup(args)
    cfg = model_config(args)
    if rank == 0:
        print(
            f"ep_check: {world} ranks on {device.type} ({dist.get_backend()}), torch "
            f"{torch.__version__}; T={args.tokens} per rank, D={cfg.d_model}, "
            f"E={cfg.num_experts}, top_k={cfg.top_k}, H={cfg.expert_hidden}, "
            f"capacity_factor={cfg.capacity_factor}, dispatch={args.dispatch}"
        )
    failed = []
    for dtype in (torch.float32, torch.bfloat16):
        failed += check_and_time(args, cfg, rank, world, device, dtype)
    dist.destroy_process_group()
    if rank == 0:
        print("ep_check: ok" if not failed else f"ep_check: FAIL {' '.join(failed)}", flush=True)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
