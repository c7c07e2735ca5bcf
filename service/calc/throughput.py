"""Per-step throughput figures, a pure function of one stored step and the device's peak."""

from __future__ import annotations

from typing import Any, NamedTuple

from service.calc.goodput import StepIn


class StepRates(NamedTuple):
    tokens_per_s: float | None
    tflops_per_s: float | None
    mfu: float | None


def peak_of(environment: dict[str, Any]) -> float | None:
    """The bf16 peak the hooks recorded; anything but a positive number means unknown."""
    peak = environment.get("peak_flops_per_s")
    return float(peak) if isinstance(peak, int | float) and peak > 0 else None


def step_rates(step: StepIn, peak_flops_per_s: float | None) -> StepRates:
    """Rates over the step's wall time; None where the time is zero or an input is missing."""
    wall = step.end - step.start
    if wall <= 0:
        return StepRates(None, None, None)
    flops_per_s = step.flops / wall if step.flops is not None else None
    mfu = flops_per_s / peak_flops_per_s if flops_per_s is not None and peak_flops_per_s else None
    tflops = flops_per_s / 1e12 if flops_per_s is not None else None
    return StepRates(step.tokens / wall, tflops, mfu)
