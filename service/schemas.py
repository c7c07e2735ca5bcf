"""Response schemas of the REST API (request schemas are the wire contract, trainer_hooks)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AttemptRead(BaseModel):
    attempt: int
    rank: int
    world_size: int
    start: float
    end: float | None
    status: str | None
    cause: str | None
    hook_errors: int
    last_seen: float | None
    counters: dict[str, int] | None


class RunSummary(BaseModel):
    run_id: str
    name: str
    project: str
    created_at: float
    status: str = Field(description="running, completed or failed (from the last attempt)")
    tags: list[str] = Field(default_factory=list)


class RunRead(RunSummary):
    model_plan: dict[str, Any]
    runtime_policy: dict[str, Any]
    environment: dict[str, Any]
    attempts: list[AttemptRead]
    num_steps: int


class RunList(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None


class StepPoint(BaseModel):
    step: int
    attempt: int
    loss: float | None
    step_time_s: float
    tokens: int
    start: float
    tokens_per_s: float | None = Field(description="tokens / step wall time")
    device_time_s: float | None = Field(description="CUDA-event time of the step")
    tflops_per_s: float | None = Field(description="model FLOPs / step wall time, in TFLOP/s")
    mfu: float | None = Field(
        description="model FLOPs utilisation against the device's bf16 peak; null when the "
        "device is not in the hooks' peak table"
    )


class StepSeries(BaseModel):
    run_id: str
    rank: int
    total: int = Field(description="steps in range before downsampling")
    points: list[StepPoint]


class RankGoodputRead(BaseModel):
    rank: int
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float]
    other_s: float
    steps: int


class GoodputRead(BaseModel):
    run_id: str
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float] = Field(description="every category, zeros included")
    other_s: float = Field(description="residual, unclamped: total - goodput - badput")
    rank: int | None = Field(description="the rank whose figures these are (the slowest)")
    steps: int
    tokens: int
    ranks: list[RankGoodputRead]


class GoodputWindow(BaseModel):
    start: float
    end: float
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float]
    other_s: float
    rank: int | None
    steps: int
    tokens: int


class RollingGoodput(BaseModel):
    run_id: str
    window_s: float
    step_s: float
    windows: list[GoodputWindow]


class Health(BaseModel):
    status: str
    database: str
    revision: str | None
