"""Response schemas of the REST API (request schemas are the wire contract, trainer_hooks)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    start_declared: bool = Field(
        True, description="false while only a heartbeat or attempt_end of it has arrived"
    )
    heartbeat_s: float | None = Field(None, description="the heartbeat interval it declared")
    records_dropped: int | None = Field(
        None,
        description="records the rank's hooks dropped so far, as its newest heartbeat said "
        "(its attempt_end says the final count in counters.records_dropped)",
    )


class RunSummary(BaseModel):
    run_id: str
    name: str
    project: str
    created_at: float
    status: str = Field(
        description="running, completed, failed or stalled: the newest attempt's, as "
        "docs/ACCOUNTING.md decides it"
    )
    tags: list[str] = Field(default_factory=list)
    declared: bool = Field(
        True,
        description="false while only other records of the run have arrived (records come "
        "in any order): name, project and receipt parts are placeholders until its run record",
    )
    records_dropped: int = Field(
        0,
        description="records the run's hooks dropped, over every attempt rank (the largest of "
        "what its heartbeats and its attempt_end said): what the service can never hold",
    )


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
    device_time_s: float | None = Field(
        description="CUDA-event time of the step; the hooks time one step in `device_every`"
        " (10 by default) and leave it absent on the others"
    )
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


class MetricSeries(BaseModel):
    """One scalar of one rank's steps, as columns (index i of each list is one step)."""

    run_id: str
    rank: int
    metric: str
    total: int = Field(description="points in range before downsampling")
    step: list[int]
    attempt: list[int]
    value: list[float]


class RankGoodputRead(BaseModel):
    rank: int
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float]
    other_s: float
    steps: int


class StragglerRead(BaseModel):
    rank: int
    median_step_time_s: float
    slower_by: float = Field(description="fraction above the median of the ranks' medians")


class DisruptionRead(BaseModel):
    attempt: int
    time: float
    cause: str
    wasted_steps: int


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
    ideal_step_time_s: float | None = Field(
        default=None, description="mean of steady steps within median +- 3 MAD"
    )
    step_time_deviation_s: float | None = Field(
        default=None, description="p90 of the last 20 steps minus the median of the 100 before"
    )
    stragglers: list[StragglerRead] = Field(default_factory=list)
    disruptions: list[DisruptionRead] = Field(default_factory=list)


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


# -- receipts, routing --


class ObservationRead(BaseModel):
    attempt: int
    rank: int
    requested: str | None
    observed: str
    reason: str | None
    fallback: bool = Field(description="a reason was given, or a backend other than asked ran")
    time: float
    step: int | None


class ObservedSeamRead(BaseModel):
    requested: str | None = Field(description="from the latest observation")
    observed: str = Field(description="from the latest observation")
    reason: str | None = Field(description="from the latest observation")
    fallback: bool = Field(description="any observation of the seam was a fallback")
    multiple: bool = Field(description="seen with several observed values: see observations")
    observations: list[ObservationRead] = Field(description="every one, oldest first")


class ReceiptGoodput(BaseModel):
    total_s: float
    goodput_s: float
    goodput_fraction: float | None
    badput_s: dict[str, float] = Field(description="every category, zeros included")
    other_s: float
    rank: int | None = Field(description="the rank whose figures these are (the slowest)")


class ReceiptThroughput(BaseModel):
    rank: int | None = Field(description="reference rank of the step figures (0 if it stepped)")
    num_steps: int = Field(description="step records of the reference rank")
    median_step_time_s: float | None
    tokens_per_s: float | None = Field(
        description="sum over ranks of tokens / step wall time of the rank"
    )
    peak_memory_bytes: int | None = Field(description="max mem_allocated_peak of any step")
    final_loss: float | None = Field(description="loss of the reference rank's last step")
    recompiles: int


class ReceiptSummary(BaseModel):
    goodput: ReceiptGoodput
    throughput: ReceiptThroughput


class ReceiptRead(BaseModel):
    run_id: str
    name: str
    project: str
    created_at: float
    status: str = Field(description="running, completed or failed (from the last attempt)")
    complete: bool
    missing: list[str] = Field(
        description="what the receipt lacks, e.g. runtime_policy.dtype, "
        "observed.moe_dispatch.layer3, steps, attempt_end"
    )
    model_plan: dict[str, Any]
    runtime_policy: dict[str, Any]
    environment: dict[str, Any]
    observed: dict[str, ObservedSeamRead] = Field(description="per seam, e.g. sdpa")
    summary: ReceiptSummary
    attempts: list[AttemptRead]


class RoutingPoint(BaseModel):
    step: int
    attempt: int
    num_steps: int = Field(description="steps summed into this record")
    num_tokens: int
    max_vio: float | None = Field(description="max / mean - 1 of routed expert assignments")
    drop_rate: float | None
    null_fraction: float | None
    shared_only_fraction: float | None
    aux_loss: float | None
    z_loss: float | None


class RoutingHistogram(BaseModel):
    step: int
    attempt: int
    num_tokens: int
    top_k: int
    null_slot: bool = Field(description="the last slot is the null slot")
    capacity: int | None
    tokens_per_expert: list[int]
    dropped_per_expert: list[int]


class RoutingLayerSeries(BaseModel):
    layer: int = Field(description="the E layer, numbered 0.. in model order")
    total: int = Field(description="points before downsampling")
    points: list[RoutingPoint] = Field(
        description="downsampled keeping each bucket's lowest and highest max_vio"
    )
    histogram: RoutingHistogram | None = Field(description="the newest record's histogram")


class RoutingSeries(BaseModel):
    run_id: str
    rank: int
    layers: list[RoutingLayerSeries]


# -- errors: what every error response carries, for the routes' OpenAPI `responses` --


class ImportResult(BaseModel):
    inserted: int
    duplicates: int
    run_id: str
    ignored: int
    warnings: list[str]
    existing_run: bool = Field(
        False,
        description="the run was already stored (this log, or a shorter one, imported "
        "before): the import extended or repeated it, as its first warning says",
    )


class RatioRead(BaseModel):
    value: float | None = Field(
        description="candidate / baseline: the ratio of the sides' geometric means of their "
        "runs' medians"
    )
    low: float | None = Field(description="95% interval over the runs, low end")
    high: float | None = Field(description="95% interval over the runs, high end")


class Pair(BaseModel):
    baseline: Any
    candidate: Any


class AxisRead(BaseModel):
    """One axis of a comparison: its estimate and 95% interval, each side's figure."""

    name: str = Field(
        description="step_time, tokens_per_s, eval_loss, goodput_fraction, peak_memory, "
        "drop_rate, max_vio, or badput.<category> (its share of the wall time)"
    )
    kind: Literal["ratio", "difference"] = Field(
        description="ratio: candidate / baseline; difference: candidate - baseline"
    )
    value: float | None
    low: float | None = Field(description="95% interval, low end")
    high: float | None = Field(description="95% interval, high end")
    baseline: float | None = Field(description="the baseline side's figure")
    candidate: float | None = Field(description="the candidate side's figure")
    better: Literal["lower", "higher"] = Field(description="which direction is better")
    finding: Literal["better", "worse", "same", "unclear", "no data"]
    reason: str = Field(description="the finding in plain words, with its numbers")


class CompareRead(BaseModel):
    baseline: str = Field(description="the baseline side as asked: run ids, comma-separated")
    candidate: str = Field(description="the candidate side as asked")
    baseline_runs: list[str] = Field(description="the baseline's runs (replicates)")
    candidate_runs: list[str] = Field(description="the candidate's runs (replicates)")
    ablation: str | None = Field(None, description="the ablation the cells belong to")
    verdict: Literal["keep", "tax", "drop", "inconclusive"] = Field(
        description="keep: faster or leaner, quality not worse; tax: costs speed or memory, "
        "buys quality (keep only on purpose); drop: worse quality, or slower or heavier "
        "without better quality; inconclusive: the data cannot tell"
    )
    reasons: list[str] = Field(description="the verdict's grounds in plain words, first first")
    axes: list[AxisRead]
    run_noise: float | None = Field(
        description="the run-to-run relative noise of the step time the intervals allow for "
        "(estimated from replicates, or the documented floor with one run a side)"
    )
    step_time_ratio: RatioRead
    tokens_per_s_ratio: RatioRead
    runs: Pair = Field(description="runs per side")
    steady_steps: Pair = Field(description="steady-state steps compared per side, summed")
    goodput_fraction: Pair
    badput_s: dict[str, Pair]
    peak_memory_bytes: Pair
    final_loss: Pair
    eval_loss: Pair = Field(description="each side's eval loss at the matched steps")
    lane_diff: dict[str, Pair] = Field(
        description="receipt fields in which the sides differ (dispatch as observed)"
    )
    knobs: list[str] = Field(description="the knobs the sides may differ in")
    knob_fields: list[str] = Field(description="the receipt fields those knobs cover")


class KnobRead(BaseModel):
    name: str = Field(description="what users type: dispatch, capacity_factor, compile, ...")
    fields: list[str] = Field(description="the receipt fields it covers, the first its value")
    observed_seam: str | None = Field(
        description="the seam whose observed backend is the knob's value where a run has it"
    )
    help: str


class AblationIn(BaseModel):
    """An ablation declared before its runs: the knob grid, its cells and the baseline."""

    model_config = ConfigDict(extra="forbid")

    ablation_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
    name: str = Field(min_length=1, max_length=200)
    project: str = Field("default", min_length=1, max_length=200)
    created_at: float = Field(ge=946_684_800.0, le=7_258_118_400.0)
    knobs: dict[str, list[str | int | float | bool | None]] = Field(
        description="each knob's values, in the order run", max_length=16
    )
    cells: dict[str, dict[str, str | int | float | bool | None]] = Field(
        description="each cell's name and the knob values it runs", max_length=256
    )
    baseline_cell: str = Field(min_length=1, max_length=200)
    repeats: int = Field(ge=1, le=1000)
    settings: dict[str, Any] = Field(
        default_factory=dict, description="what every cell shares (steps, pattern, ...)"
    )


class AblationRunRead(BaseModel):
    run_id: str
    name: str
    status: str
    seed: Any = Field(description="runtime_policy.seed, when the run says")
    created_at: float


class AblationCellRead(BaseModel):
    cell: str
    knobs: dict[str, Any] = Field(description="the knob values the cell runs")
    baseline: bool
    runs: list[AblationRunRead]
    comparison: CompareRead | None = Field(
        description="this cell against the baseline cell, once both have completed runs"
    )
    refusal: dict[str, Any] | None = Field(
        description="why there is no comparison yet (runs missing, incomplete receipts, lanes)"
    )


class AblationSummary(BaseModel):
    ablation_id: str
    name: str
    project: str
    created_at: float
    declared: bool = Field(description="declared (POST /ablations), not only named by runs")
    knobs: dict[str, list[Any]]
    baseline_cell: str | None
    repeats: int | None
    runs: int = Field(description="runs that named it")
    runs_ended: int = Field(description="of them, ended (completed or failed)")
    expected_runs: int | None = Field(description="cells x repeats, when declared")


class AblationRead(AblationSummary):
    settings: dict[str, Any]
    cells: list[AblationCellRead]


class AblationList(BaseModel):
    ablations: list[AblationSummary]


class LedgerVerdict(BaseModel):
    ablation_id: str
    cell: str
    baseline_cell: str
    date: float = Field(description="when its newest run was created")
    verdict: str
    reasons: list[str]
    step_time_ratio: RatioRead
    environment: dict[str, Any] = Field(description="torch, cuda, device, git_sha of its runs")
    lane: dict[str, Any] = Field(description="pattern, world size, dtype of its runs")
    runs: Pair


class LedgerEntry(BaseModel):
    knob: str
    value: Any
    standing: Literal["default-on win", "measured tax", "dropped", "unproven"]
    standing_reason: str
    needs_rereview: bool = Field(
        description="a newer run's environment (torch, CUDA, device) differs from the one "
        "its standing rests on"
    )
    rereview_reason: str | None
    verdicts: list[LedgerVerdict] = Field(description="every verdict of it, oldest first")


class LedgerRead(BaseModel):
    project: str | None
    entries: list[LedgerEntry]
    newest_environment: dict[str, Any] | None = Field(
        description="the environment of the project's newest run, which standings are "
        "checked against"
    )


class ErrorMessage(BaseModel):
    """An error told in one message."""

    detail: str


class FieldError(BaseModel):
    """One invalid field or record, in FastAPI's validation-error shape plus `field`."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where: body, query or path, then the field")
    msg: str
    type: str
    field: str = Field(
        description="the field, record or import entry named, dotted, without its location "
        "(records.3.step.end, run_id, line.7.step_count, index.2); `body` for the body whole"
    )


class FieldErrors(BaseModel):
    """A 422: each error names its field; nothing of a refused body is stored."""

    detail: list[FieldError]


class StoredAndSent(BaseModel):
    stored: Any
    sent: Any


class ConflictItem(BaseModel):
    """A record resent under a stored natural key with other content."""

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    record: str = Field(description="records.N.<kind>: the record of the batch")
    key: dict[str, Any] = Field(description="its natural key")
    fields: dict[str, StoredAndSent] = Field(description="each differing field, both values")
    msg: str
    type: Literal["conflict"]
    field: str | None = None


class IngestConflictError(BaseModel):
    """A 409 of ingest: permanent (sending the batch again cannot help)."""

    detail: list[ConflictItem]
    retriable: Literal[False]


class ImportConflictDetail(BaseModel):
    """The log contradicts the run stored under its id, or names that run otherwise."""

    model_config = ConfigDict(extra="allow")

    error: Literal["conflicting_records", "run_name_mismatch"]
    message: str
    run_id: str
    stored_name: str
    import_name: str


class ImportConflictError(BaseModel):
    """A 409 of the import: permanent; nothing was stored."""

    detail: ImportConflictDetail | list[ConflictItem]
    retriable: Literal[False]


class CompareRefusalDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: Literal["incomplete_receipt", "lane_mismatch", "replicates_differ"]
    message: str


class CompareRefusal(BaseModel):
    """A 409 of compare: no verdict for these two runs (as they are stored now)."""

    detail: CompareRefusalDetail
