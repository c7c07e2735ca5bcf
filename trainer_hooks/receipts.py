"""Backend-observed receipts: what really ran at each seam, beside what was asked for.

Seams: `moe_dispatch.layer<i>` (from each E block's dispatcher: requested, observed, fallback
reason), `sdpa` (the backend `torch._fused_sdp_choice` picks for the real q/k/v of the first
eager step), `dtype.attention` (the dtype attention really computed in: autocast shows here),
`compile` (eager or compiled module) and `recompile` (reasons, from compile_watch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

Observe = Callable[..., None]

_SDP_NAMES = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def dispatch_seams(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(seam, dispatcher) for every module carrying a dispatcher with requested/observed."""
    out = []
    layer = 0
    for _name, m in model.named_modules():
        d = getattr(m, "dispatcher", None)
        if d is not None and hasattr(d, "observed") and hasattr(d, "requested"):
            out.append((f"moe_dispatch.layer{layer}", d))
            layer += 1
    return out


def is_compiled(model: Any) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:
        return False
    return isinstance(model, OptimizedModule)


class DispatchWatch:
    """Reports a seam when its observed backend (or fallback reason) changes."""

    def __init__(self, seams: list[tuple[str, Any]]) -> None:
        self.seams = seams
        self._last: dict[str, tuple[Any, Any]] = {}

    def poll(self, observe: Observe, step: int) -> None:
        for seam, d in self.seams:
            now = (d.observed, getattr(d, "fallback_reason", None))
            if now[0] is not None and self._last.get(seam) != now:
                self._last[seam] = now
                observe(seam, str(now[0]), requested=str(d.requested), reason=now[1], step=step)


@contextmanager
def sdpa_probe(observe: Observe, step: int) -> Iterator[None]:
    """For one eager step: note which SDPA backend the real inputs select, and their dtype."""
    original = F.scaled_dot_product_attention
    seen: dict[str, str] = {}

    def probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any) -> Any:
        if not seen:
            try:
                attn_mask = kw.get("attn_mask", args[0] if args else None)
                is_causal = bool(kw.get("is_causal", args[2] if len(args) > 2 else False))
                choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal)
                seen["sdpa"] = _SDP_NAMES.get(int(choice), f"backend{int(choice)}")
            except Exception as exc:  # a probe failure must not cost the step
                seen["sdpa"] = f"unknown ({type(exc).__name__})"
            seen["dtype"] = str(q.dtype).replace("torch.", "")
        return original(q, k, v, *args, **kw)

    F.scaled_dot_product_attention = probe  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        if "sdpa" in seen:
            observe("sdpa", seen["sdpa"], requested="auto", step=step)
            observe("dtype.attention", seen["dtype"], step=step)
