"""Wire contract v1: the records hooks send and the service stores.

One source of truth: the service validates ingest bodies with these models. Times are wall-clock
seconds since the epoch (float); a record's natural key makes resending it harmless.

Natural keys:
  run            (run_id)
  attempt_start  (run_id, attempt, rank)
  attempt_end    (run_id, attempt, rank)        completes the attempt row started above
  heartbeat      (run_id, attempt, rank)        keeps the latest time: when the rank was last seen
  step           (run_id, attempt, rank, step)
  span           (run_id, attempt, rank, category, start)
  checkpoint     (run_id, attempt, rank, step)
  routing        (run_id, attempt, rank, step, layer)
  observation    (run_id, attempt, rank, seam, observed)
  metric         (run_id, attempt, rank, name, step)
  profile        (run_id, attempt, rank, first_step)
  excluded_window (run_id, start, end)

Records may arrive in any order across batches and ranks: a record whose run or attempt_start
has not arrived yet is stored, and the run or attempt is completed when its record comes.

A key names one record: sent again with the same content (compared exactly, floats
included) it is a duplicate; with other content it is a conflict, and the service refuses the
whole batch with a 409 naming the record, its key and both values of each differing field
(`"retriable": false`: sending it again cannot help). What may legitimately change on a
re-send:
  heartbeat      everything: only the newest time and the largest records_dropped are
                 kept, never a conflict
  run            each rank and attempt sends one: `created_at` and `environment` are the
                 sender's own (its start, its host) and the first stored stays; `name`,
                 `project`, `model_plan`, `ablation_id` and `ablation_cell` must be
                 repeated; `tags` may only grow (new ones are added, a stored one left out
                 is a conflict)
  placeholders   a run or attempt made by a record that came first is filled in by its run
                 or attempt_start record (not a conflict); an attempt_start must repeat a
                 declared start and world size, an attempt_end its end, status, cause,
                 hook_errors and counters (a `failed` end after a `completed` one conflicts)
  anything else  nothing: every field but the key must be repeated
Timings that contradict what the service holds are a 422 naming the record: two steps of one
rank sharing time (touching is fine), a step, span, checkpoint or heartbeat after its attempt
rank's end (or an attempt_end before one already stored), a time over a day past the
server's clock.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from typing_extensions import TypeAliasType

SCHEMA_VERSION = 1

BADPUT_CATEGORIES: tuple[str, ...] = (
    "startup",
    "compile",
    "data_stall",
    "checkpoint_save",
    "checkpoint_restore",
    "eval",
    "wasted_progress",
    "infra_recovery",
    "observability",
    "profiling",
)
"""Categories a span may carry; `custom:<name>` is also accepted. `wasted_progress` and
`infra_recovery` are derived by the server, so hooks never send them."""

CUSTOM_PREFIX = "custom:"
_CUSTOM_RE = re.compile(r"^custom:[A-Za-z0-9_.\-]{1,64}$")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_DERIVED = {"wasted_progress", "infra_recovery"}

# Seconds since the epoch: later than 2000-01-01 and earlier than 2200-01-01. Catches
# milliseconds, monotonic clocks and zeros sent by mistake.
_MIN_EPOCH = 946_684_800.0
_MAX_EPOCH = 7_258_118_400.0


def _storable(text: str) -> str:
    """Text every database can hold: no NUL byte (PostgreSQL refuses it), valid UTF-8."""
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from exc
    return text


NO_NUL_PATTERN = r"^[^\x00]*$"


class _NoNulDoc:
    """States `_storable`'s rule in the JSON schema (a pattern without NUL); lone surrogates
    need no pattern: JSON text in UTF-8 cannot carry them."""

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["pattern"] = NO_NUL_PATTERN
        return out


Text = Annotated[str, AfterValidator(_storable), _NoNulDoc()]
MAX_JSON_DEPTH = 32


def _storable_json(value: Any) -> Any:
    """A JSON value every database can hold and query: its strings (keys too) `_storable`,
    its numbers finite, nested at most MAX_JSON_DEPTH deep. PostgreSQL cannot read a
    string member holding `\\u0000` back as text, and SQLite's JSON functions refuse NaN:
    either would make every query of that column fail (`?pattern=`), not only this record."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"is nested deeper than {MAX_JSON_DEPTH} levels (at {where})")
        if isinstance(item, str):
            _storable_at(item, where or "value")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where or 'value'}: {item} is not a finite number")
        elif isinstance(item, dict):
            for key, member in item.items():
                _storable_at(key, f"key {key!r}" if not where else f"{where} key {key!r}")
                stack.append((member, f"{where}[{key!r}]", depth + 1))
        elif isinstance(item, list):
            stack.extend((member, f"{where}[{i}]", depth + 1) for i, member in enumerate(item))
    return value


def _storable_at(text: str, where: str) -> None:
    try:
        _storable(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


class ContractJsonSchema(GenerateJsonSchema):
    """Pydantic's JSON schema of the contract, where a pattern of a dict's keys holds for
    every key (`propertyNames`), as the contract checks it, rather than only choosing the keys
    its value schema applies to (`patternProperties`). The OpenAPI document uses it."""

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        out = super().dict_schema(schema)
        patterns = out.pop("patternProperties", None)
        if patterns:
            ((pattern, values),) = patterns.items()
            out["additionalProperties"] = values or True
            out["propertyNames"] = {**out.get("propertyNames", {}), "pattern": pattern}
        return out


# The JSON schema of a JsonObject: any JSON whose strings and keys hold no NUL (its depth,
# at most MAX_JSON_DEPTH, is said in the description; JSON itself has no NaN or Infinity).
_NoNulText = Annotated[str, _NoNulDoc()]
JsonValue = TypeAliasType(
    "JsonValue",
    "None | bool | int | float | _NoNulText | list[JsonValue] | dict[_NoNulText, JsonValue]",
)


class _JsonTreeDoc:
    def __get_pydantic_json_schema__(
        self, _schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(TypeAdapter(dict[_NoNulText, JsonValue]).core_schema)
        out["description"] = (
            f"any JSON object, nested at most {MAX_JSON_DEPTH} levels deep, its strings and "
            "keys without NUL"
        )
        return out


JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json), _JsonTreeDoc()]
Tag = Annotated[Text, Field(min_length=1, max_length=64)]
RunId = Annotated[str, Field(pattern=ID_PATTERN, description="client-chosen id, e.g. a uuid4 hex")]
Name = Annotated[Text, Field(min_length=1, max_length=200)]
MAX_COUNT = 2**53  # the largest integer JSON numbers carry exactly
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
# A step's tokens are summed in 64-bit integers (per block of 4096 steps, and over a run's
# blocks): at most 2^32 per step and rank keeps every sum of up to 2^31 steps exact.
MAX_STEP_TOKENS = 2**32
MAX_RANK = 1_000_000  # ranks, world sizes and attempt numbers are 32-bit columns
Small = Annotated[int, Field(ge=0, le=MAX_RANK)]
Epoch = Annotated[float, Field(ge=_MIN_EPOCH, le=_MAX_EPOCH, allow_inf_nan=False)]
Seconds = Annotated[float, Field(ge=0.0, le=1e9, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e300, le=1e300)]
MAX_SLOTS = 4096


def _kind_required(schema: dict[str, Any]) -> None:
    """On the wire `kind` chooses a record's model (the union's discriminator): the JSON
    schema requires it, though the Python classes default it."""
    if "kind" in schema.get("properties", {}):
        schema["required"] = ["kind", *(r for r in schema.get("required", []) if r != "kind")]


class _Record(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, json_schema_extra=_kind_required
    )

    schema_version: int = Field(default=SCHEMA_VERSION, json_schema_extra={"const": SCHEMA_VERSION})

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown schema_version {v}; this server speaks {SCHEMA_VERSION}")
        return v


class _RankScoped(_Record):
    run_id: RunId
    attempt: Small = 0
    rank: Small = 0


def _end_after_start(end: float, info: ValidationInfo) -> float:
    start = info.data.get("start")
    if start is not None and end < start:
        raise ValueError(f"end ({end}) is before start ({start})")
    return end


# The keys a receipt needs to be complete (the service's `complete` and `missing`): present
# and non-null in the run record's parts. The MoE keys are needed only when the plan has E
# (routed-expert) layers; every E layer must also have reported what its dispatch ran (an
# observation at seam `moe_dispatch.layer<j>`, which `Recorder.watch` sends for the bundled
# model), the run must hold steps, and its newest attempt must have ended `completed`.
PLAN_KEYS = ("pattern",)
MOE_PLAN_KEYS = ("num_experts", "top_k")
POLICY_KEYS = ("world_size", "dtype", "dispatch_requested", "compile")
MOE_POLICY_KEYS = ("dispatch_requested",)
ENVIRONMENT_KEYS = ("torch", "device", "host")

_RECEIPT_DOC = (
    "Receipt keys a complete receipt needs: model_plan.pattern (A/M/E/R letters), and with E "
    "layers model_plan.num_experts and model_plan.top_k; runtime_policy.world_size, .dtype, "
    ".compile, and with E layers .dispatch_requested; environment.torch, .device, .host "
    "(the hooks fill the environment and world_size themselves)."
)


class RunRecord(_Record):
    """A run's identity and its receipt parts (model plan, runtime policy, environment)."""

    model_config = ConfigDict(json_schema_extra=lambda s: _run_schema_doc(s))

    kind: Literal["run"] = "run"
    run_id: RunId
    name: Name
    project: Name = "default"
    created_at: Epoch
    model_plan: JsonObject = Field(default_factory=dict)
    runtime_policy: JsonObject = Field(default_factory=dict)
    environment: JsonObject = Field(default_factory=dict)
    tags: Annotated[list[Tag], Field(max_length=32)] = Field(default_factory=list)
    ablation_id: RunId | None = Field(
        default=None, description="the ablation this run is one replicate of (with ablation_cell)"
    )
    ablation_cell: Annotated[Text, Field(min_length=1, max_length=200)] | None = Field(
        default=None,
        description="its cell of the ablation: the knob values it ran, e.g. dispatch=padded",
    )

    @model_validator(mode="after")
    def _cell_with_ablation(self) -> RunRecord:
        if (self.ablation_cell is None) != (self.ablation_id is None):
            raise ValueError("ablation_id and ablation_cell come together (or neither)")
        return self


def _run_schema_doc(schema: dict[str, Any]) -> None:
    _kind_required(schema)
    schema["description"] = f"{schema.get('description', '')} {_RECEIPT_DOC}".strip()


class AttemptStartRecord(_RankScoped):
    """One rank of one attempt (restart) began."""

    kind: Literal["attempt_start"] = "attempt_start"
    world_size: Annotated[int, Field(ge=1, le=MAX_RANK)] = 1
    start: Epoch


class AttemptEndRecord(_RankScoped):
    """One rank of one attempt ended, well or badly."""

    kind: Literal["attempt_end"] = "attempt_end"
    end: Epoch
    status: Literal["completed", "failed"]
    cause: Annotated[Text, Field(max_length=2000)] | None = None
    hook_errors: Count = 0
    counters: dict[Annotated[Text, Field(max_length=64)], Count] = Field(
        default_factory=dict,
        description="the hooks' own tallies: records_dropped, recompiles, ooms, ...",
        max_length=64,
    )


Interval = Annotated[float, Field(gt=0.0, le=86_400.0, allow_inf_nan=False)]


class HeartbeatRecord(_RankScoped):
    """The rank was alive at `time`; dates a crash that sent no attempt_end."""

    kind: Literal["heartbeat"] = "heartbeat"
    time: Epoch
    interval_s: Interval | None = Field(
        default=None,
        description="how often this rank sends heartbeats; with it, a rank silent for "
        "STALL_INTERVALS intervals is judged stalled (docs/ACCOUNTING.md)",
    )
    records_dropped: Count | None = Field(
        default=None,
        description="records this rank's hooks dropped so far in this attempt (their spool "
        "disk full, say): a running total; the service keeps the largest it has seen",
    )


class StepRecord(_RankScoped):
    """One training step on one rank: its wall interval, tokens and loss."""

    kind: Literal["step"] = "step"
    step: Count
    start: Epoch
    end: Epoch
    tokens: Annotated[int, Field(ge=0, le=MAX_STEP_TOKENS)] = Field(
        0, description="tokens of the step on this rank; at most 2^32, so that sums stay exact"
    )
    loss: Finite | None = None
    device_time_s: Seconds | None = Field(
        None,
        description="CUDA-event time of the step; the hooks time one step in `device_every`"
        " (10 by default) and leave it absent on the others",
    )
    hook_overhead_s: Seconds | None = Field(None, description="the hooks' own host time")
    flops: Count | None = Field(None, description="model FLOPs of the step (counted once)")
    mem_allocated_peak: Count | None = Field(
        None,
        description="bytes, the peak since the previous step that carried one (the hooks "
        "read the allocator every 8 steps: the run's maximum stays exact)",
    )
    mem_reserved_peak: Count | None = Field(
        None, description="bytes, the peak since the previous step that carried one"
    )
    alloc_retries: Count | None = Field(None, description="allocator retries so far")

    _end = field_validator("end")(_end_after_start)


class SpanRecord(_RankScoped):
    """Wall time spent in one badput category. `overlapped` spans ran beside the step and do
    not block it, so they are shown but not charged."""

    kind: Literal["span"] = "span"
    category: Annotated[
        str,
        WithJsonSchema(
            {
                "type": "string",
                "anyOf": [
                    {"enum": [c for c in BADPUT_CATEGORIES if c not in _DERIVED]},
                    {"pattern": _CUSTOM_RE.pattern},
                ],
                "description": "a badput category the hooks send, or custom:<name>",
            }
        ),
    ]
    start: Epoch
    end: Epoch
    overlapped: bool = False
    step: Count | None = None

    @field_validator("category")
    @classmethod
    def _known_category(cls, v: str) -> str:
        if v in _DERIVED:
            raise ValueError(f"category {v!r} is derived by the server and cannot be sent")
        if v in BADPUT_CATEGORIES or _CUSTOM_RE.match(v):
            return v
        known = ", ".join(c for c in BADPUT_CATEGORIES if c not in _DERIVED)
        raise ValueError(f"unknown category {v!r}; expected one of {known} or custom:<name>")

    _end = field_validator("end")(_end_after_start)


class CheckpointRecord(_RankScoped):
    """A checkpoint covering steps up to `step` was committed (ok) or failed to save."""

    kind: Literal["checkpoint"] = "checkpoint"
    step: Count
    time: Epoch
    ok: bool = True


class ExcludedWindowRecord(_Record):
    """A stretch of wall time the operator declares out of the run's accounting (maintenance,
    an incident): it is subtracted from the total and from every part, on every rank."""

    kind: Literal["excluded_window"] = "excluded_window"
    run_id: RunId
    start: Epoch
    end: Epoch
    reason: Annotated[Text, Field(max_length=2000)] | None = None

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and not end > start:
            raise ValueError(f"end ({end}) must be after start ({start})")
        return end


Counts = Annotated[list[Count], Field(min_length=1, max_length=MAX_SLOTS)]


class RoutingRecord(_RankScoped):
    """One MoE layer's routing, summed over `num_steps` steps ending at `step`. Slots are the
    routed experts, then the null slot when `null_slot` is set."""

    kind: Literal["routing"] = "routing"
    step: Count
    layer: Annotated[int, Field(ge=0, le=MAX_SLOTS)]
    num_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    num_tokens: Count
    top_k: Annotated[int, Field(ge=1, le=MAX_SLOTS)]
    null_slot: bool = False
    tokens_per_expert: Counts
    dropped_per_expert: Counts
    capacity: Count | None = None
    shared_only_tokens: Count | None = Field(
        None, description="tokens no routed expert computed (all choices null or dropped)"
    )
    aux_loss: Finite | None = None
    z_loss: Finite | None = None

    @field_validator("dropped_per_expert")
    @classmethod
    def _same_slots(cls, v: list[int], info: ValidationInfo) -> list[int]:
        tokens = info.data.get("tokens_per_expert")
        if tokens is not None and len(v) != len(tokens):
            raise ValueError(f"has {len(v)} slots, tokens_per_expert has {len(tokens)}")
        if tokens is not None and not all(map(operator.le, v, tokens)):
            raise ValueError("a slot dropped more assignments than it received")
        return v


Label = Annotated[Text, Field(min_length=1, max_length=200)]


class ObservationRecord(_RankScoped):
    """What really ran at one seam (e.g. `moe_dispatch.layer3`, `sdpa`, `compile`, `dtype`,
    `recompile`), beside what was requested, and why they differ."""

    kind: Literal["observation"] = "observation"
    seam: Label
    requested: Label | None = None
    observed: Label
    reason: Annotated[Text, Field(max_length=2000)] | None = None
    time: Epoch
    step: Count | None = None


class MetricRecord(_RankScoped):
    """A value the run measured at a step besides its training loss, e.g. `eval_loss` (the
    held-out loss keep/drop verdicts judge quality by)."""

    kind: Literal["metric"] = "metric"
    name: Label
    step: Count
    value: Finite
    time: Epoch


class KernelTime(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: Annotated[Text, Field(min_length=1, max_length=1000)]
    device_time_s: Seconds
    count: Count


class ProfileRecord(_RankScoped):
    """Summary of a torch.profiler window; the chrome trace stays on the trainer's disk."""

    kind: Literal["profile"] = "profile"
    first_step: Count
    num_steps: Annotated[int, Field(ge=1, le=1_000_000)]
    trace_path: Annotated[Text, Field(max_length=4096)] | None = None
    top_kernels: Annotated[list[KernelTime], Field(max_length=200)] = Field(default_factory=list)


Record = Annotated[
    RunRecord
    | AttemptStartRecord
    | AttemptEndRecord
    | HeartbeatRecord
    | StepRecord
    | SpanRecord
    | CheckpointRecord
    | RoutingRecord
    | ObservationRecord
    | MetricRecord
    | ProfileRecord
    | ExcludedWindowRecord,
    Field(discriminator="kind"),
]

MAX_BATCH_RECORDS = 10_000


class IngestBatch(BaseModel):
    """Body of POST /api/v1/ingest. Strict: each value of its JSON type, an integer written
    as one (`5`, never `5.0` or `"5"`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    records: Annotated[list[Record], Field(max_length=MAX_BATCH_RECORDS)]


class IngestResult(BaseModel):
    inserted: int
    duplicates: int
