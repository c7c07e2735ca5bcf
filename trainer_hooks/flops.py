"""Model FLOPs per step, counted once per input shape, and the peak table behind MFU.

`torch.utils.flop_counter.FlopCounterMode` counts the matmuls a real step executes, so an MoE
step counts the routed experts its tokens actually visited (active parameters), not all of
them. The counted step runs eager (`torch.compiler.set_stance("force_eager")`): dynamo marks
every frame it first meets under a dispatch mode such as FlopCounterMode as skipped, for good,
so a compiled model counted that way would never compile. Eager and compiled steps run the same
matmuls, so the count is the same. Peaks are dense bf16 tensor-core rates from the vendors'
datasheets; a device missing from the table gets None, never a guess.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 80GB HBM3": 989e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


class FlopCounter:
    """Counts one step per new shape key, under FlopCounterMode; later steps reuse it."""

    def __init__(self) -> None:
        self.by_key: dict[Any, int] = {}
        self._mode: Any = None
        self._eager: Any = None
        self._key: Any = None

    @property
    def counting(self) -> bool:
        return self._mode is not None

    def enter(self, key: Any) -> None:
        if key is None or key in self.by_key:
            return
        from torch.utils.flop_counter import FlopCounterMode

        self._eager = _force_eager()
        if self._eager is not None:
            self._eager.__enter__()
        self._mode = FlopCounterMode(display=False)
        self._key = key
        self._mode.__enter__()

    def exit(self, ok: bool) -> None:
        if self._mode is None:
            return
        mode, self._mode = self._mode, None
        eager, self._eager = self._eager, None
        try:
            mode.__exit__(None, None, None)
        finally:
            if eager is not None:
                eager.__exit__(None, None, None)
        if ok:
            self.by_key[self._key] = int(mode.get_total_flops())

    def flops(self, key: Any) -> int | None:
        return self.by_key.get(key)


def _force_eager() -> Any | None:
    """A context that runs torch.compile'd code eagerly, untouched by dynamo (None where torch
    has no `set_stance`, before 2.6)."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else None
