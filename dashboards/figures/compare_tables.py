"""The compare page's tables (dashboards/static/dashboard.js table specs): every axis with its
95% interval (also drawn per cell on the ablation page), the lane's differing fields, the
sides' figures side by side, and a refusal (a 409's `detail`, as services/compare.py words it)
with what would fix it, as links back to the page."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

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


def lane_table(
    lane_diff: Mapping[str, Mapping[str, Any]], knob_fields: Sequence[str]
) -> dict[str, Any]:
    """The fields whose values differ, each with what let it differ (flagged: not a field
    of a declared knob)."""
    rows, flags = [], []
    for field, pair in sorted(lane_diff.items()):
        knob = covered(field, knob_fields)
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
    """Runs, goodput, badput, losses, peak memory and the steps compared, side by side."""
    badput = {
        role: sum(
            float((p or {}).get(role) or 0.0) for p in (result.get("badput_s") or {}).values()
        )
        for role in ROLES
    }
    lines: list[tuple[str, Mapping[str, Any], Callable[[Any], str | None]]] = [
        ("runs (replicates)", result.get("runs") or {}, _num),
        ("goodput fraction (mean)", result.get("goodput_fraction") or {}, _pct),
        ("badput, all categories (mean)", badput, _secs),
        ("eval loss (matched steps)", result.get("eval_loss") or {}, _num),
        ("final training loss (mean)", result.get("final_loss") or {}, _num),
        ("peak memory (highest)", result.get("peak_memory_bytes") or {}, _gib),
        ("steady steps compared (all runs)", result.get("steady_steps") or {}, _num),
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


# -- axes --

AXIS_LABELS = {
    "step_time": "step time",
    "tokens_per_s": "tokens/s",
    "eval_loss": "eval loss",
    "peak_memory": "peak memory",
    "goodput_fraction": "goodput fraction",
    "drop_rate": "drop rate",
    "max_vio": "MaxVio",
}
# a finding's badge (dashboard.css `.badge-<class>`)
FINDING_BADGES = {
    "better": "better",
    "worse": "worse",
    "same": "same",
    "unclear": "unclear",
    "no data": "nodata",
}


def axis_label(name: str, reason: str = "") -> str:
    """An axis's name in plain words (`badput.data_stall` -> `badput: data_stall`); quality
    says which loss it was judged on (its reason: the final training loss where no eval step
    is common to every run)."""
    if name == "eval_loss" and reason.startswith("final training loss"):
        return "final training loss"
    if name.startswith("badput."):
        return f"badput: {name.removeprefix('badput.')} (share of wall time)"
    return AXIS_LABELS.get(name, name)


def _duration(v: float) -> str:
    return f"{1000 * v:.3g} ms" if abs(v) < 1 else seconds(v)


def _figure(name: str, v: Any) -> str | None:
    """One side's figure of an axis, in its unit."""
    if v is None:
        return None
    v = float(v)
    if name == "step_time":
        return _duration(v)
    if name == "tokens_per_s":
        return f"{v:,.0f}"
    if name == "peak_memory":
        return _gib(v)
    if name in ("goodput_fraction", "drop_rate") or name.startswith("badput."):
        return _pct(v)
    return _num(v)


def _estimate(name: str, kind: str, v: Any) -> str | None:
    """An axis's estimate: a ratio as `0.812×`, a difference of shares in percentage points."""
    if v is None:
        return None
    v = float(v)
    if kind == "ratio":
        return f"{v:.3f}×"
    if name in ("goodput_fraction", "drop_rate") or name.startswith("badput."):
        return f"{100 * v:+.2f} pp"
    return f"{v:+.3g}"


def idle_badput(axis: Mapping[str, Any]) -> bool:
    """A badput category neither side spent any time in (nothing to read in its row)."""
    return str(axis["name"]).startswith("badput.") and not any(
        axis.get(side) for side in ("baseline", "candidate")
    )


def axes_table(axes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every axis of a comparison: each side's figure, the estimate (candidate / baseline or
    candidate - baseline) with its 95% interval, and the finding (its reason as the cell's
    title); rows found worse flagged. Badput categories neither side spent time in are left
    out, and a last row says which."""
    rows, flags = [], []
    idle = [str(a["name"]).removeprefix("badput.") for a in axes if idle_badput(a)]
    for a in axes:
        if idle_badput(a):
            continue
        name, kind = str(a["name"]), str(a["kind"])
        low, high = _estimate(name, kind, a.get("low")), _estimate(name, kind, a.get("high"))
        finding = str(a.get("finding") or "no data")
        rows.append(
            [
                {
                    "text": axis_label(name, str(a.get("reason") or "")),
                    "title": f"{a['better']} is better",
                },
                _figure(name, a.get("baseline")),
                _figure(name, a.get("candidate")),
                _estimate(name, kind, a.get("value")),
                f"{low} to {high}" if low is not None and high is not None else None,
                {
                    "text": finding,
                    "badge": FINDING_BADGES.get(finding, "nodata"),
                    "title": str(a.get("reason") or ""),
                },
            ]
        )
        flags.append(finding == "worse")
    if idle:
        rows.append([f"badput, none on either side: {', '.join(idle)}", *[None] * 5])
        flags.append(False)
    return {
        "columns": [
            {"label": "axis", "num": False},
            {"label": "baseline", "num": True},
            {"label": "candidate", "num": True},
            {"label": "candidate vs baseline", "num": True, "help": "ratio ×, or difference"},
            {"label": "95% interval", "num": True},
            {"label": "finding", "num": False, "help": "hover a finding for its reason"},
        ],
        "rows": rows,
        "flags": flags,
        "empty": "no axis compared",
    }


# -- refusals --

Side = Sequence[Mapping[str, Any]]  # a side's runs: {run_id, name, parts}


def compare_url(
    base: str,
    baseline: str,
    candidate: str,
    knobs: Sequence[str] = (),
    allow_lane_mismatch: bool = False,
    margin: float = DEFAULT_MARGIN,
    loss_tolerance: float = DEFAULT_LOSS_TOLERANCE,
    ablation: str | None = None,
) -> str:
    """The compare page's address for these choices (defaults left out): each side a run id,
    replicates' ids comma-separated, or with `ablation` a cell's name."""
    query: list[tuple[str, Any]] = [("ablation", ablation)] if ablation else []
    query += [("baseline", baseline), ("candidate", candidate)]
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
    runs: Mapping[str, Side],
    choice: Mapping[str, Any],
    base: str = "",
    field_knobs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Why there is no verdict and what would give one: {error, title, message, table,
    fixes: [{text, href}]}. `runs`: role -> the side's runs, each {run_id, name, parts:
    {model_plan, runtime_policy, environment}}; `choice`: the page's baseline and candidate
    (as asked), ablation, knobs, allow_lane_mismatch, margin, loss_tolerance; `field_knobs`:
    receipt field -> the knob name whose value it is (links declare knobs by name)."""
    error = str(detail.get("error", ""))
    message = str(detail.get("message", ""))
    if error == "incomplete_receipt":
        return _incomplete(detail, runs, message, base)
    if error == "lane_mismatch":
        return _mismatch(detail, runs, choice, message, base, field_knobs or {})
    if error == "replicates_differ":
        return _replicates(detail, runs, choice, message, base)
    return {"error": error, "title": "No verdict", "message": message, "table": None, "fixes": []}


def _whose(runs: Mapping[str, Side], run_id: str) -> tuple[str, Mapping[str, Any]]:
    """The side a run is on, and the run."""
    for role in ROLES:
        for r in runs.get(role) or ():
            if r["run_id"] == run_id:
                return role, r
    return "run", {"run_id": run_id, "name": run_id, "parts": {}}


def _incomplete(
    detail: Mapping[str, Any], runs: Mapping[str, Side], message: str, base: str
) -> dict[str, Any]:
    rows, fixes = [], []
    for run_id, items in (detail.get("missing") or {}).items():
        if not items:
            continue
        role, run = _whose(runs, str(run_id))
        href = f"{base}/runs/{quote(str(run_id), safe='')}/receipt"
        for item in items:
            rows.append(
                [{"text": f"{role}: {run['name']}", "href": href}, item, missing_hint(item)]
            )
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


def _keep(choice: Mapping[str, Any]) -> dict[str, Any]:
    """The choices a fix's link keeps as they are."""
    out = {k: choice[k] for k in ("margin", "loss_tolerance") if k in choice}
    return {**out, "ablation": choice.get("ablation")}


def _mismatch(
    detail: Mapping[str, Any],
    runs: Mapping[str, Side],
    choice: Mapping[str, Any],
    message: str,
    base: str,
    field_knobs: Mapping[str, str],
) -> dict[str, Any]:
    fields = [str(f) for f in detail.get("fields") or ()]
    values = {
        role: flatten((list(runs.get(role) or ()) or [{}])[0].get("parts") or {}) for role in ROLES
    }
    rows = [[f, *(shown(values[role].get(f)) for role in ROLES)] for f in fields]
    knobs = list(choice.get("knobs") or ())
    named = list(dict.fromkeys(field_knobs.get(f, f) for f in fields))
    sides = (str(choice.get("baseline", "")), str(choice.get("candidate", "")))
    fixes = [
        {
            "text": f"compare with {'this knob' if len(named) == 1 else 'these knobs'} "
            "declared: " + ", ".join(named),
            "href": compare_url(base, *sides, [*knobs, *named], **_keep(choice)),
        },
        {
            "text": "compare anyway (allow_lane_mismatch=true)",
            "href": compare_url(base, *sides, knobs, allow_lane_mismatch=True, **_keep(choice)),
        },
    ]
    return {
        "error": "lane_mismatch",
        "title": "No verdict: the sides differ beyond the declared knobs",
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


def _replicates(
    detail: Mapping[str, Any],
    runs: Mapping[str, Side],
    choice: Mapping[str, Any],
    message: str,
    base: str,
) -> dict[str, Any]:
    fields = [str(f) for f in detail.get("fields") or ()]
    pair = [str(r) for r in detail.get("runs") or ()][:2]
    found = [_whose(runs, r) for r in pair]
    values = [flatten(run.get("parts") or {}) for _, run in found]
    rows = [[f, *(shown(v.get(f)) for v in values)] for f in fields]
    fixes = []
    if len(found) == 2 and not choice.get("ablation"):
        role, odd = found[1]
        mine = [r["run_id"] for r in runs.get(role) or () if r["run_id"] != odd["run_id"]]
        sides = {r: str(choice.get(r, "")) for r in ROLES}
        sides[role] = ",".join(mine)
        knobs = list(choice.get("knobs") or ())
        if mine:
            fixes.append(
                {
                    "text": f"leave {odd['name']} out of the {role}",
                    "href": compare_url(
                        base, sides["baseline"], sides["candidate"], knobs, **_keep(choice)
                    ),
                }
            )
        fixes.append(
            {
                "text": f"compare {found[0][1]['name']} against {odd['name']} as two sides",
                "href": compare_url(base, pair[0], pair[1], [*knobs, *fields], **_keep(choice)),
            }
        )
    return {
        "error": "replicates_differ",
        "title": "No verdict: a side's runs are not replicates of one lane",
        "message": message,
        "table": {
            "columns": [
                {"label": "field", "num": False},
                *({"label": str(run["name"]), "num": False} for _, run in found),
            ],
            "rows": rows,
            "empty": "no field listed",
        },
        "fixes": fixes,
    }
