"""Receipts of runs (ARCHITECTURE.md, "Receipts"), as pure functions of stored records:
completeness, observed backends per seam, the throughput summary, and CSV cells for export.

Nothing here touches the database; the routes in `service.api.routes.receipts` read the records
through the store and hand them over as plain data.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from service.calc.goodput import StepIn
from service.calc.step_stats import RECENT_STEPS
from trainer_hooks.records import (
    ENVIRONMENT_KEYS,
    MOE_PLAN_KEYS,
    MOE_POLICY_KEYS,
    PLAN_KEYS,
    POLICY_KEYS,
)

DISPATCH_SEAM = "moe_dispatch.layer{}"
RECOMPILE_SEAM = "recompile"
AUTO = "auto"
MAX_E_LAYERS = 4096  # as many as routing records may number (records.MAX_SLOTS)


class ObservationIn(NamedTuple):
    attempt: int
    rank: int
    seam: str
    requested: str | None
    observed: str
    reason: str | None
    time: float
    step: int | None


class AttemptEndIn(NamedTuple):
    attempt: int
    rank: int
    end: float | None
    status: str | None
    counters: Mapping[str, Any] | None


# -- completeness --


def _count(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_E_LAYERS
    return value if ok else None


def e_layer_count(model_plan: Mapping[str, Any]) -> int | None:
    """How many E (routed-expert) layers the plan declares: `family_counts["E"]` (a missing
    "E" key counts 0), else `len(e_positions)`, else the E letters of `layers` (the expanded
    pattern), else 0 when `pattern` has no E at all. None when the plan does not say."""
    families = model_plan.get("family_counts")
    if isinstance(families, Mapping):
        return _count(families.get("E", 0))
    positions = model_plan.get("e_positions")
    if isinstance(positions, list):
        return _count(len(positions))
    layers = model_plan.get("layers")
    if isinstance(layers, str):
        return _count(layers.count("E"))
    pattern = model_plan.get("pattern")
    if isinstance(pattern, str) and "E" not in pattern:
        return 0
    return None


def dispatch_seams(num_e_layers: int) -> list[str]:
    """The seams the hooks report for the E layers, numbered 0.. in model order (the j-th E
    layer sits at `model_plan.e_positions[j]`), as trainer_hooks.receipts numbers them."""
    return [DISPATCH_SEAM.format(j) for j in range(num_e_layers)]


def _present(value: Any) -> bool:
    """Non-null; a NaN or infinity (which JSON shows as null) counts as absent too."""
    return value is not None and not (isinstance(value, float) and not math.isfinite(value))


def _absent(part: str, values: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    return [f"{part}.{k}" for k in keys if not _present(values.get(k))]


def last_attempt_completed(attempts: Sequence[AttemptEndIn]) -> bool:
    """True when every rank of the newest attempt sent its end with status completed."""
    if not attempts:
        return False
    last = max(a.attempt for a in attempts)
    return all(a.end is not None and a.status == "completed" for a in attempts if a.attempt == last)


def missing_parts(
    model_plan: Mapping[str, Any],
    runtime_policy: Mapping[str, Any],
    environment: Mapping[str, Any],
    observed_seams: Collection[str],
    num_steps: int,
    attempts: Sequence[AttemptEndIn],
) -> list[str]:
    """What a receipt lacks to be complete; an empty list means complete. Each item is named
    `<part>.<key>` or `observed.<seam>`, or is `steps` / `attempt_end`:

    - `model_plan`: `pattern`, and when the plan has E layers `num_experts` and `top_k`,
      present and non-null. The number of E layers comes from `e_layer_count`; when the plan
      does not say, the MoE keys are required and `model_plan.family_counts` is missing.
    - `runtime_policy`: `world_size`, `dtype`, `compile`, and `dispatch_requested` when the
      plan has E layers (a dense model dispatches nothing), present and non-null.
    - `environment`: `torch`, `device`, `host`, present and non-null.
    - `observed`: a `moe_dispatch.layer<j>` observation, from any rank or attempt, for every
      E layer j = 0 .. count-1 (see `dispatch_seams` for the numbering).
    - `steps`: at least one step record.
    - `attempt_end`: the newest attempt ended with status completed on every rank.
    """
    num_e = e_layer_count(model_plan)
    moe = num_e is None or num_e > 0
    plan_keys = PLAN_KEYS + (MOE_PLAN_KEYS if moe else ())
    policy_keys = [k for k in POLICY_KEYS if moe or k not in MOE_POLICY_KEYS]
    missing = _absent("model_plan", model_plan, plan_keys)
    if num_e is None:
        missing.append("model_plan.family_counts")
    missing += _absent("runtime_policy", runtime_policy, policy_keys)
    missing += _absent("environment", environment, ENVIRONMENT_KEYS)
    missing += [f"observed.{s}" for s in dispatch_seams(num_e or 0) if s not in observed_seams]
    if num_steps < 1:
        missing.append("steps")
    if not last_attempt_completed(attempts):
        missing.append("attempt_end")
    return missing


# -- observed backends --


def is_fallback(requested: str | None, observed: str, reason: str | None) -> bool:
    """Something other than what was asked for ran: a reason was given, or the observed
    backend differs from the request. `auto` asks for no backend in particular, so only a
    reason makes it a fallback; with nothing requested there is nothing to fall back from
    (a recompile's reason says why it recompiled, not why a request was refused)."""
    if requested is None:
        return False
    return reason is not None or (requested != AUTO and requested != observed)


@dataclass(frozen=True)
class SeamReceipt:
    """One seam: its latest observation, whether any was a fallback, and whether it was seen
    with several observed values (`multiple`), every observation kept, oldest first."""

    requested: str | None
    observed: str
    reason: str | None
    fallback: bool
    multiple: bool
    observations: list[ObservationIn]


def observed_seams(observations: Iterable[ObservationIn]) -> dict[str, SeamReceipt]:
    """Group observations by seam, in seam order."""
    by_seam: dict[str, list[ObservationIn]] = {}
    for o in sorted(observations, key=lambda o: (o.time, o.attempt, o.rank, o.observed)):
        by_seam.setdefault(o.seam, []).append(o)
    out: dict[str, SeamReceipt] = {}
    for seam in sorted(by_seam):
        seen = by_seam[seam]
        latest = seen[-1]
        out[seam] = SeamReceipt(
            requested=latest.requested,
            observed=latest.observed,
            reason=latest.reason,
            fallback=any(is_fallback(o.requested, o.observed, o.reason) for o in seen),
            multiple=len({o.observed for o in seen}) > 1,
            observations=seen,
        )
    return out


# -- summary --


class StepSummary(NamedTuple):
    rank: int | None
    num_steps: int
    median_step_time_s: float | None
    tokens_per_s: float | None
    final_loss: float | None


class RankSteps(NamedTuple):
    steps: int
    tokens: int
    busy_s: float  # sum of step wall times


def summarize_steps(
    per_rank: Mapping[int, RankSteps], recent_ref: Sequence[float], final_loss: float | None
) -> StepSummary:
    """Figures of the reference rank (0, else the lowest rank with steps): its step count,
    the median wall time of its newest RECENT_STEPS steps (`recent_ref`) and the loss of its
    newest step; `tokens_per_s` sums every rank's tokens / step wall time (ranks step side by
    side)."""
    ranks = sorted(r for r, v in per_rank.items() if v.steps > 0)
    if not ranks:
        return StepSummary(None, 0, None, None, None)
    ref = 0 if 0 in ranks else ranks[0]
    busy = [per_rank[r].busy_s for r in ranks]
    tokens_per_s = (
        None
        if any(b <= 0 for b in busy)
        else sum(per_rank[r].tokens / per_rank[r].busy_s for r in ranks)
    )
    return StepSummary(
        rank=ref,
        num_steps=per_rank[ref].steps,
        median_step_time_s=statistics.median(recent_ref) if recent_ref else None,
        tokens_per_s=tokens_per_s,
        final_loss=final_loss,
    )


def reference_rank(ranks_with_steps: Iterable[int]) -> int | None:
    ranks = sorted(ranks_with_steps)
    return None if not ranks else 0 if 0 in ranks else ranks[0]


def step_summary(steps: Sequence[StepIn]) -> StepSummary:
    """summarize_steps on raw step records."""
    per_rank: dict[int, RankSteps] = {}
    for s in steps:
        n, t, b = per_rank.get(s.rank, RankSteps(0, 0, 0.0))
        per_rank[s.rank] = RankSteps(n + 1, t + s.tokens, b + (s.end - s.start))
    ref = reference_rank(per_rank)
    mine = sorted((s for s in steps if s.rank == ref), key=lambda s: (s.attempt, s.step))
    recent = [s.end - s.start for s in mine[-RECENT_STEPS:]]
    return summarize_steps(per_rank, recent, mine[-1].loss if mine else None)


def recompile_count(observations: Iterable[ObservationIn], attempts: Iterable[AttemptEndIn]) -> int:
    """Recompiles over every attempt and rank: per attempt-rank the larger of its `recompile`
    observations (sent as they happen: they survive a crash) and its attempt_end counter
    `recompiles` (counts what the sink may have dropped)."""
    seen: dict[tuple[int, int], int] = {}
    for o in observations:
        if o.seam == RECOMPILE_SEAM:
            seen[(o.attempt, o.rank)] = seen.get((o.attempt, o.rank), 0) + 1
    for a in attempts:
        n = (a.counters or {}).get("recompiles")
        if isinstance(n, int) and not isinstance(n, bool):
            seen[(a.attempt, a.rank)] = max(seen.get((a.attempt, a.rank), 0), n)
    return sum(seen.values())


# -- CSV export --

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formula(text: str) -> str:
    """A text cell a spreadsheet would run as a formula gets a leading single quote."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_cell(value: Any) -> str:
    """One CSV cell: empty for null, true/false, numbers exactly (repr round-trips floats),
    lists and dicts as compact JSON, text guarded against formula injection."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return neutralise_formula(str(value))


def csv_lines(rows: Iterable[Sequence[Any]]) -> str:
    """RFC 4180 lines (CRLF, quoted where needed) of the given rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows([csv_cell(v) for v in row] for row in rows)
    return buf.getvalue()
