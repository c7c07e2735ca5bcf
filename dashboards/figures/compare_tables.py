"""The compare page's tables (dashboards/static/dashboard.js table specs): the lane's
differing fields, the runs side by side, and a refusal (a 409's `detail`, as
services/compare.py words it) with what would fix it, as links back to the page."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from dashboards.figures.compare import DEFAULT_LOSS_TOLERANCE, DEFAULT_MARGIN, ROLES, seconds


def flatten(parts: Mapping[str, Any]) -> dict[str, Any]:
    """{"runtime_policy": {"dtype": "bf16"}} -> {"runtime_policy.dtype": "bf16"}."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", parts)
    return out


def shown(value: Any) -> str | None:
    """A receipt value as a cell: strings as they are, anything else as JSON, absent as –."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def covered(field: str, knobs: Sequence[str]) -> bool:
    """A knob covers its field and every field below it."""
    return any(field == k or field.startswith(k + ".") for k in knobs)


def lane_table(lane_diff: Mapping[str, Mapping[str, Any]], knobs: Sequence[str]) -> dict[str, Any]:
    """The fields whose values differ, each with what let it differ (flagged: not a knob)."""
    rows, flags = [], []
    for field, pair in sorted(lane_diff.items()):
        knob = covered(field, knobs)
        why = "declared knob" if knob else "differs outside the knobs (allow_lane_mismatch)"
        rows.append([field, shown(pair.get("baseline")), shown(pair.get("candidate")), why])
        flags.append(not knob)
    return {
        "columns": [
            {"label": "field", "num": False},
            {"label": "baseline", "num": False},
            {"label": "candidate", "num": False},
            {"label": "allowed as", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "empty": "the lanes are identical: no field differs",
    }


def _pct(v: Any) -> str | None:
    return None if v is None else f"{100 * float(v):.1f}%"


def _gib(v: Any) -> str | None:
    return None if v is None else f"{float(v) / 2**30:.2f} GiB"


def _num(v: Any) -> str | None:
    return None if v is None else f"{float(v):.4g}"


def _secs(v: Any) -> str | None:
    return None if v is None else seconds(float(v))


def summary_table(result: Mapping[str, Any]) -> dict[str, Any]:
    """Goodput, badput, final loss, peak memory and the steps compared, run by run."""
    badput = {
        role: sum(
            float((p or {}).get(role) or 0.0) for p in (result.get("badput_s") or {}).values()
        )
        for role in ROLES
    }
    lines: list[tuple[str, Mapping[str, Any], Callable[[Any], str | None]]] = [
        ("goodput fraction", result.get("goodput_fraction") or {}, _pct),
        ("badput, all categories", badput, _secs),
        ("final loss", result.get("final_loss") or {}, _num),
        ("peak memory", result.get("peak_memory_bytes") or {}, _gib),
        ("steady steps compared", result.get("steady_steps") or {}, _num),
    ]
    return {
        "columns": [
            {"label": "", "num": False},
            {"label": "baseline", "num": True},
            {"label": "candidate", "num": True},
        ],
        "rows": [
            [name, fmt(pair.get("baseline")), fmt(pair.get("candidate"))]
            for name, pair, fmt in lines
        ],
    }


# -- refusals --


def compare_url(
    base: str,
    baseline: str,
    candidate: str,
    knobs: Sequence[str] = (),
    allow_lane_mismatch: bool = False,
    margin: float = DEFAULT_MARGIN,
    loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
) -> str:
    """The compare page's address for these choices (defaults left out)."""
    query: list[tuple[str, Any]] = [("baseline", baseline), ("candidate", candidate)]
    query += [("knob", k) for k in dict.fromkeys(knobs)]
    if allow_lane_mismatch:
        query.append(("allow_lane_mismatch", "true"))
    if margin != DEFAULT_MARGIN:
        query.append(("margin", margin))
    if loss_tolerance != DEFAULT_LOSS_TOLERANCE:
        query.append(("loss_tolerance", loss_tolerance))
    return f"{base}/compare?{urlencode(query)}"


def missing_hint(item: str) -> str:
    """What would supply one missing receipt item (service/calc/receipts.py names them)."""
    if item == "attempt_end":
        return (
            "the newest attempt has not ended `completed` on every rank: wait for the run to "
            "finish (a failed run: resume it to completion)"
        )
    if item == "steps":
        return "no step recorded yet: the recorder's step() sends them"
    if item.startswith("observed."):
        return (
            f"no `{item.removeprefix('observed.')}` observation arrived: the hooks' receipts "
            "part reports the dispatch each E layer ran"
        )
    part, _, key = item.partition(".")
    return f"declare `{key}` in the run record's `{part}`"


def refusal_view(
    detail: Mapping[str, Any],
    runs: Mapping[str, Mapping[str, Any]],
    choice: Mapping[str, Any],
    base: str = "",
) -> dict[str, Any]:
    """Why there is no verdict and what would give one: {error, title, message, table,
    fixes: [{text, href}]}. `runs`: role -> {run_id, name, parts: {model_plan,
    runtime_policy, environment}}; `choice`: the page's knobs, allow_lane_mismatch, margin,
    loss_tolerance."""
    error = str(detail.get("error", ""))
    message = str(detail.get("message", ""))
    if error == "incomplete_receipt":
        return _incomplete(detail, runs, message, base)
    if error == "lane_mismatch":
        return _mismatch(detail, runs, choice, message, base)
    return {"error": error, "title": "No verdict", "message": message, "table": None, "fixes": []}


def _incomplete(
    detail: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]], message: str, base: str
) -> dict[str, Any]:
    rows, fixes = [], []
    missing = detail.get("missing") or {}
    for role in ROLES:
        run = runs[role]
        href = f"{base}/runs/{run['run_id']}/receipt"
        for item in missing.get(role) or ():
            rows.append(
                [{"text": f"{role}: {run['name']}", "href": href}, item, missing_hint(item)]
            )
        if missing.get(role):
            fixes.append({"text": f"open the {role}'s receipt ({run['name']})", "href": href})
    return {
        "error": "incomplete_receipt",
        "title": "No verdict: a receipt is incomplete",
        "message": message,
        "table": {
            "columns": [
                {"label": "run", "num": False},
                {"label": "missing", "num": False},
                {"label": "what would supply it", "num": False},
            ],
            "rows": rows,
            "empty": "nothing listed as missing",
        },
        "fixes": fixes,
    }


def _mismatch(
    detail: Mapping[str, Any],
    runs: Mapping[str, Mapping[str, Any]],
    choice: Mapping[str, Any],
    message: str,
    base: str,
) -> dict[str, Any]:
    fields = [str(f) for f in detail.get("fields") or ()]
    values = {role: flatten(runs[role].get("parts") or {}) for role in ROLES}
    rows = [[f, *(shown(values[role].get(f)) for role in ROLES)] for f in fields]
    knobs = list(choice.get("knobs") or ())
    keep = {k: choice[k] for k in ("margin", "loss_tolerance") if k in choice}
    ids = (runs["baseline"]["run_id"], runs["candidate"]["run_id"])
    named = "this field" if len(fields) == 1 else f"these {len(fields)} fields"
    fixes = [
        {
            "text": f"compare with {named} declared as knob{'s' * (len(fields) > 1)}: "
            + ", ".join(fields),
            "href": compare_url(base, *ids, [*knobs, *fields], **keep),
        },
        {
            "text": "compare anyway (allow_lane_mismatch=true)",
            "href": compare_url(base, *ids, knobs, allow_lane_mismatch=True, **keep),
        },
    ]
    return {
        "error": "lane_mismatch",
        "title": "No verdict: the lanes differ beyond the declared knobs",
        "message": message,
        "table": {
            "columns": [
                {"label": "field", "num": False},
                {"label": "baseline", "num": False},
                {"label": "candidate", "num": False},
            ],
            "rows": rows,
            "empty": "no field listed",
        },
        "fixes": fixes,
    }
