"""Forward+backward of one routed MoE layer in bf16: our dispatch backends beside torchtitan's
MoE layer, at two shapes, balanced and skewed routing, eager and compiled, in one run.

    python bench/moe_layer.py                    # on a CUDA machine; torchtitan==0.3.0 beside
    python bench/moe_layer.py --tokens 1024 --quick --device cpu    # a smoke run anywhere

Shapes (T = 16384 tokens): fine = 128 experts, top-8, d_model 2048, expert ffn 768; coarse =
8 experts, top-2, d_model 4096, expert ffn 14336. The layer is router + dispatch + routed
experts + combine (no shared expert, no norm) on both sides, with bf16 parameters, the gate in
fp32, the same gate weights and expert weights, and the same input. Both routers see logits
built so that each token's top-k set is chosen by the benchmark: round-robin (balanced, MaxVio
about 0) or with one hot expert (skewed: MaxVio about 9 at fine and 1.3 at coarse); so both
sides do the same expert work and the outputs can be compared.

Useful TF/s = 18 * T * k * d_model * ffn / time (three GEMMs, forward and two backward). The
padded backend needs a capacity to be practical: it runs with capacity factor 1.25 and its
line says how many assignments that dropped. The roofline is a bf16 8192^3 matmul. The last
line is `moe_layer: best_vs_torchtitan=<ratio>`: per shape and routing, our best useful TF/s
over torchtitan's best, the minimum over the cases.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moe_core.dispatch import Dispatcher
from moe_core.experts import RoutedExperts
from moe_core.router import TopKRouter


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    top_k: int
    d_model: int
    ffn: int
    skew_max_vio: float


SHAPES = {
    "fine": Shape("fine", 128, 8, 2048, 768, 9.0),
    "coarse": Shape("coarse", 8, 2, 4096, 14336, 1.3),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--shapes", default="fine,coarse")
    p.add_argument("--backends", default="grouped,padded,loop")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-torchtitan", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run")
    p.add_argument("--routings", default="balanced,skewed")
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="append a torch.profiler table per case to FILE (compiled cases: a trace beside it)",
    )
    return p.parse_args()


def timer(fn: Callable[[], None], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call: CUDA events around each call (host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_experts(shape: Shape, tokens: int, skewed: bool, gen: torch.Generator) -> torch.Tensor:
    """[T, k] distinct experts per token: round-robin, or expert 0 in a fraction q of tokens so
    that its load is (1 + MaxVio) times the mean: q = (1 + MaxVio) * k / E."""
    e, k = shape.experts, shape.top_k
    base_TK = (torch.arange(tokens).unsqueeze(1) * k + torch.arange(k)) % e
    if not skewed:
        return base_TK
    q = min(1.0, (1.0 + shape.skew_max_vio) * k / e)
    rand_TE = torch.rand(tokens, e, generator=gen)
    hot_T = torch.rand(tokens, generator=gen) < q
    rand_TE[:, 0] = torch.where(hot_T, 2.0, -1.0)  # hot expert first, or never
    return rand_TE.topk(k, dim=-1).indices


def routed_inputs(shape: Shape, tokens: int, skewed: bool, device: torch.device) -> tuple:
    """x [T, D] and gate W [E, D] whose logits pick exactly the chosen experts."""
    gen = torch.Generator().manual_seed(1234 + int(skewed))
    d, e = shape.d_model, shape.experts
    q_DD, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    gate_ED = q_DD[:e] * 4.0  # orthonormal rows: logit_e = 4 <x, q_e>
    chosen_TK = choose_experts(shape, tokens, skewed, gen)
    x_TD = 0.05 * torch.randn(tokens, d, generator=gen)
    strength_K = torch.linspace(2.0, 1.0, shape.top_k)  # distinct margins, no ties
    x_TD += (q_DD[:e][chosen_TK] * strength_K[None, :, None]).sum(1)
    return x_TD.to(device, torch.bfloat16), gate_ED.to(device), chosen_TK


def ours(
    shape: Shape,
    backend: str,
    gate_ED: torch.Tensor,
    w: dict[str, torch.Tensor],
    capacity_factor: float | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    router = TopKRouter(
        shape.d_model, shape.experts, shape.top_k, score="softmax", capacity_factor=capacity_factor
    ).to(gate_ED.device)
    router.weight.data.copy_(gate_ED)
    experts = RoutedExperts(shape.experts, shape.d_model, shape.ffn).to(gate_ED.device)
    experts.w13.data = torch.cat([w["w1"], w["w3"]], dim=-1)
    experts.w2.data = w["w2"].clone()
    dispatcher = Dispatcher(backend)

    def layer(x_TD: torch.Tensor) -> torch.Tensor:
        routing = router(x_TD)
        return dispatcher(x_TD, routing, experts.w13, experts.w2)

    layer.dispatcher = dispatcher  # type: ignore[attr-defined]
    layer.router = router  # type: ignore[attr-defined]
    return layer


def ours_kmajor(
    shape: Shape, gate_ED: torch.Tensor, w: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our grouped path with the expert weights stored K-major ([E, H, D] for w1/w3, [E, D, H]
    for w2) and handed to _grouped_mm transposed, as torchtitan stores them: isolates the
    weight layout's effect on the grouped GEMMs."""
    from moe_core.dispatch import combine, sort_assignments

    router = TopKRouter(shape.d_model, shape.experts, shape.top_k, score="softmax").to(
        gate_ED.device
    )
    router.weight.data.copy_(gate_ED)
    w1t = torch.nn.Parameter(w["w1"].transpose(1, 2).contiguous())  # [E, H, D]
    w3t = torch.nn.Parameter(w["w3"].transpose(1, 2).contiguous())
    w2t = torch.nn.Parameter(w["w2"].transpose(1, 2).contiguous())  # [E, D, H]

    def layer(x_TD: torch.Tensor) -> torch.Tensor:
        routing = router(x_TD)
        sorted_ = sort_assignments(routing)
        x_AD = x_TD.index_select(0, sorted_.token_ids_A)
        offs = sorted_.rows_per_group_G[:-1].cumsum(0).to(torch.int32)
        gate = torch._grouped_mm(x_AD, w1t.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x_AD, w3t.transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2t.transpose(-2, -1), offs=offs)
        return combine(y, sorted_, x_TD.shape[0])

    layer.router = router  # type: ignore[attr-defined]
    layer.dispatcher = type("D", (), {"observed": "grouped-kmajor"})()  # type: ignore[attr-defined]
    return layer


def torchtitan_layer(
    shape: Shape, gate_ED: torch.Tensor, w: dict[str, torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import (
        GroupedExperts,
        MoE,
        TokenChoiceTopKRouter,
    )
    from torchtitan.models.common.moe import (
        RoutedExperts as TTRouted,
    )
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    e, k, d, f = shape.experts, shape.top_k, shape.d_model, shape.ffn
    cfg = MoE.Config(
        num_experts=e,
        routed_experts=TTRouted.Config(
            inner_experts=GroupedExperts.Config(dim=d, hidden_dim=f, num_experts=e),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=e, top_k=k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=e,
            gate=Linear.Config(in_features=d, out_features=e),
            top_k=k,
            score_func="softmax",
            route_norm=True,
        ),
        load_balance_coeff=None,
        shared_experts=None,
    )
    moe = cfg.build().to(gate_ED.device)
    inner = moe.routed_experts.inner_experts
    with torch.no_grad():
        moe.router.gate.weight.copy_(gate_ED)
        inner.w1_EFD.data = w["w1"].transpose(1, 2).contiguous()  # [E, D, H] -> [E, H, D]
        inner.w3_EFD.data = w["w3"].transpose(1, 2).contiguous()
        inner.w2_EDF.data = w["w2"].transpose(1, 2).contiguous()  # [E, H, D] -> [E, D, H]
    moe.train()

    def layer(x_TD: torch.Tensor) -> torch.Tensor:
        return moe(x_TD.unsqueeze(0)).squeeze(0)

    layer.moe = moe  # type: ignore[attr-defined]
    return layer


def fwd_bwd(
    layer: Callable[[torch.Tensor], torch.Tensor], x_TD: torch.Tensor, dy_TD: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        x = x_TD.detach().requires_grad_(True)
        layer(x).backward(dy_TD)

    return run


def roofline(device: torch.device, iters: int) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timer(lambda: torch.mm(a, b), device, iters, 3)
    return 2 * n**3 / t / 1e12


def expert_weights(shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    e, d, f = shape.experts, shape.d_model, shape.ffn
    std_in, std_out = 1 / math.sqrt(d), 1 / math.sqrt(f)
    return {
        "w1": (torch.randn(e, d, f, generator=gen) * std_in).to(device, torch.bfloat16),
        "w3": (torch.randn(e, d, f, generator=gen) * std_in).to(device, torch.bfloat16),
        "w2": (torch.randn(e, f, d, generator=gen) * std_out).to(device, torch.bfloat16),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_shape(
    shape: Shape, args: argparse.Namespace, device: torch.device, peak: float
) -> list[tuple[str, bool, float, float | None]]:
    """Returns (routing, skewed, our best TF/s, torchtitan best TF/s) per routing. Layers are
    built (and compiled) once per shape; only the gate weights change between routings."""
    tokens = args.tokens
    useful = 18 * tokens * shape.top_k * shape.d_model * shape.ffn
    w = expert_weights(shape, device)
    cases = routing_cases(shape, tokens, device)
    variants = []
    for backend in args.backends.split(","):
        if backend == "kmajor":
            layer = ours_kmajor(shape, cases[0][1], w)
            variants.append(("ours grouped K-major", backend, layer, False))
            if not args.no_compile:
                variants.append(("ours grouped K-major compiled", backend, layer, True))
            continue
        layer = ours(shape, backend, cases[0][1], w, 1.25 if backend == "padded" else None)
        variants.append((f"ours {backend}", backend, layer, False))
        if not args.no_compile and backend != "loop":
            variants.append((f"ours {backend} compiled", backend, layer, True))
    if not args.no_torchtitan:
        tt = torchtitan_layer(shape, cases[0][1], w)
        variants += [("torchtitan", "tt", tt, False)]
        if not args.no_compile:
            variants += [("torchtitan compiled", "tt", tt, True)]
    compiled_fns = {id(v): torch.compile(v[2]) for v in variants if v[3]}
    results = []
    for skewed, (x_TD, gate_ED, chosen_TK) in zip((False, True), cases, strict=True):
        if ("skewed" if skewed else "balanced") not in args.routings.split(","):
            continue
        load_E = torch.bincount(chosen_TK.flatten(), minlength=shape.experts).float()
        label = (
            f"{shape.name} {'skewed' if skewed else 'balanced'} "
            f"MaxVio={float(load_E.max() / load_E.mean() - 1):.2f}"
        )
        dy_TD = torch.randn_like(x_TD)
        best: dict[str, float] = {}
        reference = None
        for v in variants:
            name, backend, layer, compiled = v
            set_gate(layer, gate_ED)
            fn = compiled_fns[id(v)] if compiled else layer
            note = ""
            if backend != "tt":
                routing = layer.router(x_TD)
                got = routing.expert_ids.sort(-1).values.cpu()
                if not torch.equal(got, chosen_TK.sort(-1).values):
                    raise AssertionError(f"{label}: the router did not pick the chosen experts")
                note = f", dropped {int(routing.dropped_per_expert.sum())}"
            with torch.no_grad():
                out = fn(x_TD)
            if name == "ours grouped":
                reference = out
            if backend != "tt":
                note = f" (observed {layer.dispatcher.observed}){note}"
            elif reference is not None:
                note = f", rel err vs ours grouped {rel_err(out, reference):.2e}"
            t = timer(fwd_bwd(fn, x_TD, dy_TD), device, args.iters, args.warmup)
            if args.profile:
                profile(fwd_bwd(fn, x_TD, dy_TD), f"{label} {name}", args.profile)
            tfs = useful / t / 1e12
            key = "tt" if backend == "tt" else "ours_grouped" if backend == "grouped" else backend
            best[key] = max(best.get(key, 0.0), tfs)
            print(
                f"{label} {name}{note}: {t * 1e3:.3f} ms {tfs:.1f} TF/s "
                f"{100 * tfs / peak:.1f}% of matmul",
                flush=True,
            )
        ours_best = best.get("ours_grouped", max(v for k, v in best.items() if k != "tt"))
        results.append((label, skewed, ours_best, best.get("tt")))
    return results


def profile(fn: Callable[[], None], title: str, path: str) -> None:
    """Three calls under torch.profiler; the table by device time goes to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            fn()
            torch.cuda.synchronize()  # as the timer does: each call starts on an idle device
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    if "compiled" in title:
        prof.export_chrome_trace(f"{path}.{title.replace(' ', '_').replace('=', '')}.json")
    with open(path, "a") as f:
        f.write(f"== {title} (3 calls)\n{table}\n")


def routing_cases(shape: Shape, tokens: int, device: torch.device) -> list[tuple]:
    return [routed_inputs(shape, tokens, skewed, device) for skewed in (False, True)]


def set_gate(layer: Any, gate_ED: torch.Tensor) -> None:
    with torch.no_grad():
        if hasattr(layer, "router"):
            layer.router.weight.copy_(gate_ED)
        else:
            layer.moe.router.gate.weight.copy_(gate_ED)


def main() -> None:
    args = parse()
    device = torch.device(args.device)
    if args.quick:
        SHAPES["fine"] = Shape("fine", 16, 4, 256, 128, 3.0)
        SHAPES["coarse"] = Shape("coarse", 4, 2, 256, 512, 1.3)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, T={args.tokens}")
    peak = roofline(device, args.iters)
    print(f"roofline: bf16 matmul {peak:.1f} TF/s")
    rows: list[Any] = []
    for shape_name in args.shapes.split(","):
        rows += run_shape(SHAPES[shape_name], args, device, peak)
    ratios = []
    for label, _skewed, ours_best, tt_best in rows:
        ratio = ours_best / tt_best if tt_best else float("nan")
        ratios.append(ratio)
        print(
            f"summary {label}: ours grouped best {ours_best:.1f} TF/s, torchtitan best "
            f"{tt_best or float('nan'):.1f} TF/s, ratio {ratio:.3f}"
        )
    for shape_name in args.shapes.split(","):
        bals = [r[2] for r in rows if r[0].startswith(shape_name) and not r[1]]
        skws = [r[2] for r in rows if r[0].startswith(shape_name) and r[1]]
        if not bals or not skws:
            continue
        bal, skw = bals[0], skws[0]
        print(
            f"summary {shape_name}: skewed/balanced {skw / bal:.3f}, grouped best "
            f"{100 * bal / peak:.1f}% of matmul balanced"
        )
    finite = [r for r in ratios if r == r]
    print(f"moe_layer: best_vs_torchtitan={min(finite) if finite else float('nan'):.3f}")


if __name__ == "__main__":
    main()
