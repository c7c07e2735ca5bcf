"""The M and R blocks' scans, before and after issue 16 part 2: forward + backward of one whole
block with the old scan and with the new one, interleaved in one run, as ratios.

    python bench/scan_speed.py                                    # CPU, small shapes
    python bench/scan_speed.py --device cuda --shapes 8x2048x1024 --chunks 16,64

Old: a Hillis-Steele (log-space doubling) prefix scan within chunks, then across chunks; each
of its 2 log2(chunk) passes reads and writes the full [B, T, W, N] states several times
(copied below from moe_core at 3d9a8cc, so both run in this process). New: moe_core's
``chunked_scan``, chunk_size sequential steps over all chunks at once. The blocks are the
model's own (``MambaBlock``, ``RecurrentBlock``, same weights); the old scan is swapped in
through the module attribute each block calls, so everything around the scan is identical.

Rounds alternate old and new so drift hits both alike; each figure is the median over rounds.
CUDA runs under bf16 autocast, as the training loop does, and report each variant's peak
memory. Lines: `scan_speed: block=M shape=BxTxD chunk=C old_ms=.. new_ms=.. ratio=..` (ratio =
old / new, > 1 is faster now; ms are only comparable within one run). The M block also runs
with the new scan not checkpointed (``new_nockpt``: its states kept for backward, not
recomputed), to show what checkpointing still costs now that they are smaller. ``--compile`` adds a
line per block with the new scan under torch.compile (the old one is not compiled: its
compile is the slow part, and only the new form is what a compiled run now gets).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from moe_core import recurrent, scan_fused, ssm
from moe_core.recurrent import RecurrentBlock
from moe_core.ssm import MambaBlock


def old_linear_recurrence_scan(log_a_BTX: Tensor, b_BTX: Tensor, chunk_size: int) -> Tensor:
    """moe_core.recurrent.linear_recurrence_scan at 3d9a8cc (Hillis-Steele within chunks)."""
    out_dtype = b_BTX.dtype
    B, T, *X = b_BTX.shape
    L = min(chunk_size, T)
    K = math.ceil(T / L)
    log_a_BKLX = _old_pad_time(log_a_BTX.float(), K * L - T).reshape(B, K, L, *X)
    b_BKLX = _old_pad_time(b_BTX.float(), K * L - T).reshape(B, K, L, *X)
    cum_log_a_BKLX, h_local_BKLX = _old_prefix_scan(log_a_BKLX, b_BKLX, dim=2)
    _, h_end_BKX = _old_prefix_scan(cum_log_a_BKLX[:, :, -1], h_local_BKLX[:, :, -1], dim=1)
    h_start_BKX = _old_shift(h_end_BKX, 1, dim=1)
    h_BKLX = h_local_BKLX + cum_log_a_BKLX.exp() * h_start_BKX.unsqueeze(2)
    return h_BKLX.reshape(B, K * L, *X)[:, :T].to(out_dtype)


def old_selective_scan_chunked(
    x_BTW: Tensor,
    dt_BTW: Tensor,
    A_WN: Tensor,
    B_BTN: Tensor,
    C_BTN: Tensor,
    D_W: Tensor,
    chunk_size: int,
) -> Tensor:
    """moe_core.ssm.selective_scan_chunked at 3d9a8cc."""
    x, dt, A, Bm, Cm, D = (t.float() for t in (x_BTW, dt_BTW, A_WN, B_BTN, C_BTN, D_W))
    log_a_BTWN = dt.unsqueeze(-1) * A
    b_BTWN = (dt * x).unsqueeze(-1) * Bm.unsqueeze(2)
    h_BTWN = old_linear_recurrence_scan(log_a_BTWN, b_BTWN, chunk_size)
    y_BTW = (h_BTWN * Cm.unsqueeze(2)).sum(-1) + D * x
    return y_BTW.to(x_BTW.dtype)


def _old_prefix_scan(log_a: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    offset = 1
    while offset < b.shape[dim]:
        b = b + log_a.exp() * _old_shift(b, offset, dim)
        log_a = log_a + _old_shift(log_a, offset, dim)
        offset *= 2
    return log_a, b


def _old_shift(x: Tensor, offset: int, dim: int) -> Tensor:
    kept = x.narrow(dim, 0, x.shape[dim] - offset)
    fill = x.new_zeros(*x.shape[:dim], offset, *x.shape[dim + 1 :])
    return torch.cat([fill, kept], dim=dim)


def _old_pad_time(x_BTX: Tensor, pad: int) -> Tensor:
    if pad == 0:
        return x_BTX
    return torch.cat([x_BTX, x_BTX.new_zeros(x_BTX.shape[0], pad, *x_BTX.shape[2:])], dim=1)


@contextlib.contextmanager
def old_scans() -> Iterator[None]:
    """Both blocks call the old scans inside this context (module attributes swapped)."""
    saved = ssm.selective_scan_chunked, recurrent.linear_recurrence_scan
    ssm.selective_scan_chunked = old_selective_scan_chunked
    recurrent.linear_recurrence_scan = old_linear_recurrence_scan
    try:
        yield
    finally:
        ssm.selective_scan_chunked, recurrent.linear_recurrence_scan = saved


class Timer:
    """Forward + backward of a block, in ms: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, block: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> None:
        x = x.detach().requires_grad_()
        with self.autocast():
            out, _ = block(x)
        out.float().square().mean().backward()

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def build(letter: str, d_model: int, chunk: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    block: nn.Module = (
        MambaBlock(d_model, chunk_size=chunk)
        if letter == "M"
        else RecurrentBlock(d_model, chunk_size=chunk)
    )
    if letter == "M":
        block.fused_scan = False  # "old" and "new" are the chunked scans; "fused" is timed apart
    return block.to(device)


def max_output_diff(block: nn.Module, x: Tensor, timer: Timer) -> float:
    """Largest |old - new| of the block's output: the two scans must agree before timing."""
    with torch.no_grad(), timer.autocast():
        new = block(x)[0].float()
        with old_scans():
            old = block(x)[0].float()
    return float((old - new).abs().max())


def bench_block(
    args: argparse.Namespace, letter: str, shape: tuple[int, int, int], chunk: int
) -> None:
    device = torch.device(args.device)
    batch, seq, d_model = shape
    block = build(letter, d_model, chunk, device)
    x = torch.randn(batch, seq, d_model, device=device)
    timer = Timer(device)
    diff = max_output_diff(block, x, timer)

    def new() -> None:
        timer.step(block, x)

    def old() -> None:
        with old_scans():
            timer.step(block, x)

    def with_block(attr: str, value: bool) -> Callable[[], None]:
        """A step of the new block with one of its switches turned, then turned back."""

        def step() -> None:
            saved = getattr(block, attr)
            setattr(block, attr, value)
            try:
                timer.step(block, x)
            finally:
                setattr(block, attr, saved)

        return step

    new_no_checkpoint = with_block("checkpoint_scan", False)
    fused = with_block("fused_scan", True)

    variants: dict[str, Callable[[], None]] = {"old": old, "new": new}
    if letter == "M":
        variants["new_nockpt"] = new_no_checkpoint  # the scan's states kept, not recomputed
        if scan_fused.available(x):
            variants["fused"] = fused  # the Triton scan (moe_core/scan_fused.py)
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, float] = {}
    for name, fn in variants.items():
        for _ in range(args.warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(timer.time_ms(fn))
    ms = {name: statistics.median(values) for name, values in times.items()}
    figures = " ".join(f"{name}_ms={value:.2f}" for name, value in ms.items())
    figures += f" ratio={ms['old'] / ms['new']:.2f}"
    if "new_nockpt" in ms:
        figures += f" ratio_nockpt={ms['old'] / ms['new_nockpt']:.2f}"
    if "fused" in ms:
        figures += f" new_over_fused={ms['new'] / ms['fused']:.2f}"
        with torch.no_grad(), timer.autocast():
            chunked = block(x)[0].float()
            block.fused_scan = True
            at_once = block(x)[0].float()
            block.fused_scan = False
        figures += f" fused_abs_diff={float((chunked - at_once).abs().max()):.2e}"
    memory = "".join(f" {name}_peak_gib={peak:.2f}" for name, peak in peaks.items())
    print(
        f"scan_speed: block={letter} shape={batch}x{seq}x{d_model} chunk={chunk} {figures} "
        f"max_abs_diff={diff:.2e}{memory}",
        flush=True,
    )
    if args.profile:
        profile_new(block, x, timer)
    if args.compile:
        bench_compiled(args, block, x, timer, letter, shape, chunk)


def profile_new(block: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor, timer: Timer) -> None:
    """The new scan's block (compiled too), one forward + backward under torch.profiler: its
    top ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    with torch.profiler.profile(activities=activities) as prof:
        timer.step(block, x)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15), flush=True)


def bench_compiled(
    args: argparse.Namespace,
    block: nn.Module,
    x: Tensor,
    timer: Timer,
    letter: str,
    shape: tuple[int, int, int],
    chunk: int,
) -> None:
    """The new scan's block under torch.compile: compile time and forward + backward."""
    compiled = torch.compile(block, fullgraph=True)
    t0 = time.perf_counter()
    timer.step(compiled, x)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        timer.step(compiled, x)
    ms = statistics.median(
        timer.time_ms(lambda: timer.step(compiled, x)) for _ in range(args.rounds)
    )
    batch, seq, d_model = shape
    print(
        f"scan_speed: block={letter} shape={batch}x{seq}x{d_model} chunk={chunk} "
        f"compiled_new_ms={ms:.2f} compile_s={compile_s:.1f}",
        flush=True,
    )
    if args.profile:
        profile_new(compiled, x, timer)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--shapes",
        default="2x512x128,1x1000x64",
        help="comma-separated BATCHxSEQxD_MODEL (the M block's width is 2 * D_MODEL, 16 states)",
    )
    p.add_argument("--chunks", default="16,64", help="comma-separated chunk sizes")
    p.add_argument("--blocks", default="M,R", help="M, R or both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="print the new block's top ops")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: steadier when other work shares the cores); 0 keeps torch's",
    )
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"# scan_speed: device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} rounds={args.rounds}",
        flush=True,
    )
    for shape in shapes:
        for letter in args.blocks.split(","):
            for chunk in (int(c) for c in args.chunks.split(",")):
                bench_block(args, letter, shape, chunk)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
