"""Where ``torch._grouped_mm`` really runs, decided from device, dtype and shapes (no sync).

Facts this relies on (torch 2.11 to 2.13, read from ATen's GroupedBlas.cpp/GroupedMMUtils.h):

- CUDA runs a real grouped kernel only for bf16 on compute capability 9.0 or 10.0. Any other
  CUDA case goes to ATen's fallback, a loop of ``mm`` that first copies the offsets to the
  host (``offs.cpu()``): a device sync per call, so it does not count as available here.
- CPU accepts fp32, bf16 and fp16 (seen on torch 2.11 and 2.13; it is the same ATen loop of
  ``mm``, with no device to wait for). Builds may differ, so support is probed once per device
  and dtype, in eager mode (on CUDA the probe reads its check on the host: one sync, once).
- Row strides must be multiples of 16 bytes: d_model and the expert hidden width times the
  element size.
- Under ``torch.compile`` the op's meta kernel accepts bf16 only.
- Autocast does not cover the op, so callers cast to ``compute_dtype`` themselves.

Shape legend:
    R  probe rows
    D  probe width
    G  probe groups
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FAST_CUDA_CAPABILITIES = ((9, 0), (10, 0))
# (device type, index, dtype) -> reason or None. The probe runs once, never per forward.
_DEVICE_REASONS: dict[tuple[str, int | None, torch.dtype], str | None] = {}


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on for x's device."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def grouped_mm_unavailable_reason(
    device: torch.device, dtype: torch.dtype, d_model: int, hidden: int
) -> str | None:
    """None when ``torch._grouped_mm`` runs here without a host sync, else the reason why not."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if dtype not in GROUPED_MM_DTYPES:
        return f"torch._grouped_mm does not take {dtype}"
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return f"under torch.compile torch._grouped_mm takes bf16 only, got {dtype}"
    alignment = 16 // torch.empty((), dtype=dtype).element_size()
    if d_model % alignment or hidden % alignment:
        return (
            f"d_model={d_model} and expert_hidden={hidden} must be multiples of {alignment} "
            f"for {dtype} (16-byte row strides)"
        )
    key = (device.type, device.index, dtype)
    if key in _DEVICE_REASONS:
        return _DEVICE_REASONS[key]
    reason = _static_reason(*key)
    if torch.compiler.is_compiling():
        # No probe inside a trace: it would break the graph (fullgraph=True fails). The static
        # rules decide; an eager forward before compiling runs the probe and caches it.
        return reason
    _DEVICE_REASONS[key] = reason or _probe(device, dtype)
    return _DEVICE_REASONS[key]


def _static_reason(device_type: str, index: int | None, dtype: torch.dtype) -> str | None:
    if device_type == "cuda":
        if torch.version.hip is not None:
            return "ROCm grouped GEMM is not verified here"
        capability = torch.cuda.get_device_capability(index)
        if capability not in _FAST_CUDA_CAPABILITIES or dtype != torch.bfloat16:
            return (
                f"CUDA sm{capability[0]}{capability[1]} with {dtype} would use ATen's "
                "fallback, which copies the offsets to the host (a sync); the fast kernel "
                "needs bf16 on sm90/sm100"
            )
    elif device_type != "cpu":
        return f"torch._grouped_mm is not verified on {device_type}"
    return None


@torch.compiler.disable
def _probe(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run a tiny grouped matmul, forward and backward, against per-group ``mm``."""
    width = 16
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        gen = torch.Generator(device="cpu").manual_seed(0)
        x_RD = torch.randn(6, width, generator=gen).to(device, dtype).requires_grad_()
        w_GDD = torch.randn(3, width, width, generator=gen).to(device, dtype).requires_grad_()
        offsets_G = torch.tensor([2, 2, 5], dtype=torch.int32, device=device)  # one empty
        try:
            y_RD = torch._grouped_mm(x_RD, w_GDD, offs=offsets_G)
            y_RD[:5].float().sum().backward()
        except (RuntimeError, NotImplementedError) as exc:
            return f"torch._grouped_mm failed on {device.type} with {dtype}: {exc}"
        want_RD = torch.cat([x_RD[:2] @ w_GDD[0], x_RD[2:5] @ w_GDD[2]])
        if not torch.allclose(y_RD[:5].float(), want_RD.float(), rtol=2e-2, atol=2e-2):
            return f"torch._grouped_mm gave wrong results on {device.type} with {dtype}"
    return None
