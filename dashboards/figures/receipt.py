"""The receipt page's tables and texts, from a receipt (the plain dict of
`GET /api/v1/runs/{id}/receipt`): the summary figures, what is missing and how to supply
it, the backends observed per seam (fallbacks and mismatches flagged), the model plan,
runtime policy and environment as key/value tables, and the attempts."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

Table = dict[str, Any]

AUTO = "auto"  # a request for no backend in particular (calc/receipts.py)

# What each `missing` entry of a receipt means and how to supply it (service/calc/receipts.py
# `missing_parts` lists them). Keys are exact entries; `observed.moe_dispatch.layer<j>` is
# matched by MISSING_PATTERNS.
_RECORDER = "trainer_hooks.Recorder(...)"
MISSING_HELP: dict[str, tuple[str, str]] = {
    "model_plan.pattern": (
        "the model's layer pattern (e.g. AEME)",
        f"pass model_plan={{'pattern': ...}} to {_RECORDER}; goodput train sends it",
    ),
    "model_plan.num_experts": (
        "routed experts per E layer",
        f"add 'num_experts' to the model_plan given to {_RECORDER}",
    ),
    "model_plan.top_k": (
        "experts each token is routed to",
        f"add 'top_k' to the model_plan given to {_RECORDER}",
    ),
    "model_plan.family_counts": (
        "how many E layers the model has (the plan says neither family_counts, "
        "e_positions, layers, nor a pattern without E)",
        "add 'family_counts' (e.g. {'E': 2}) or 'e_positions' to the model_plan "
        f"given to {_RECORDER}",
    ),
    "runtime_policy.world_size": (
        "how many processes trained",
        f"add 'world_size' to the runtime_policy given to {_RECORDER}",
    ),
    "runtime_policy.dtype": (
        "the training dtype",
        f"add 'dtype' (e.g. 'bfloat16') to the runtime_policy given to {_RECORDER}",
    ),
    "runtime_policy.dispatch_requested": (
        "the MoE dispatch asked for (grouped, padded, auto...)",
        f"add 'dispatch_requested' to the runtime_policy given to {_RECORDER}",
    ),
    "runtime_policy.compile": (
        "eager or compiled",
        f"add 'compile' (e.g. 'eager', 'inductor') to the runtime_policy given to {_RECORDER}",
    ),
    "environment.torch": (
        "the torch version",
        f"leave environment=None in {_RECORDER} (it collects torch, device and host), or "
        "add 'torch' to the environment you pass",
    ),
    "environment.device": (
        "the device trained on",
        f"leave environment=None in {_RECORDER}, or add 'device' to the environment you pass",
    ),
    "environment.host": (
        "the host trained on",
        f"leave environment=None in {_RECORDER}, or add 'host' to the environment you pass",
    ),
    "steps": (
        "no step record",
        "wrap each optimizer step in `with recorder.step(n, tokens=...)`",
    ),
    "attempt_end": (
        "the newest attempt has not ended as completed on every rank",
        "call recorder.close() (status 'completed') on every rank when training finishes; "
        "a crashed or running attempt leaves the receipt incomplete",
    ),
}
MISSING_PATTERNS: list[tuple[re.Pattern[str], tuple[str, str]]] = [
    (
        re.compile(r"observed\.moe_dispatch\.layer(\d+)"),
        (
            "the dispatch backend that ran in E layer {0}",
            "call recorder.watch(model) before training: it observes each E layer's "
            "dispatcher (requested, observed, fallback reason) on the next step",
        ),
    ),
]


def missing_help(entry: str) -> tuple[str, str] | None:
    """(what the entry means, how to supply it), or None for an entry this page does not
    know."""
    if entry in MISSING_HELP:
        return MISSING_HELP[entry]
    for pattern, (what, how) in MISSING_PATTERNS:
        m = pattern.fullmatch(entry)
        if m:
            return what.format(*m.groups()), how.format(*m.groups())
    return None


def completeness(receipt: Mapping[str, Any]) -> tuple[str, Table]:
    """The verdict line and a table of each missing entry with how to supply it."""
    missing = list(receipt.get("missing") or [])
    rows = []
    for entry in missing:
        what, how = missing_help(entry) or ("not described here", "see the receipt's docs")
        rows.append([entry, what, how])
    if not missing:
        verdict = "Complete: nothing is missing from this receipt."
    else:
        verdict = f"Incomplete: {len(missing)} part(s) missing — each below with how to supply it."
    table = {
        "columns": [
            {"label": "missing", "num": False},
            {"label": "what it is", "num": False},
            {"label": "how to supply it", "num": False},
        ],
        "rows": rows,
        "flags": [True] * len(rows),
        "empty": "nothing is missing",
    }
    return verdict, table


# -- observed backends --


def mismatch(seam: Mapping[str, Any]) -> bool:
    """The latest observation ran something other than the specific backend requested."""
    requested = seam.get("requested")
    return requested is not None and requested != AUTO and requested != seam.get("observed")


def seam_flags(seam: Mapping[str, Any]) -> list[str]:
    """Why a seam's row is flagged: fell back, requested ≠ observed, several backends."""
    flags = []
    if seam.get("fallback"):
        flags.append("fell back")
    if mismatch(seam):
        flags.append("requested ≠ observed")
    if seam.get("multiple"):
        flags.append("several backends")
    return flags


def _others(seam: Mapping[str, Any]) -> str | None:
    seen = dict.fromkeys(o["observed"] for o in seam.get("observations") or [])
    others = [v for v in seen if v != seam.get("observed")]
    return ", ".join(others) or None


def seams_table(observed: Mapping[str, Mapping[str, Any]]) -> Table:
    rows, flags = [], []
    for name in sorted(observed):
        seam = observed[name]
        why = seam_flags(seam)
        rows.append(
            [
                name,
                seam.get("requested"),
                seam.get("observed"),
                seam.get("reason"),
                "; ".join(why) or "ok",
                len(seam.get("observations") or []),
                _others(seam),
            ]
        )
        flags.append(bool(why))
    return {
        "columns": [
            {"label": "seam", "num": False},
            {"label": "requested", "num": False},
            {"label": "observed", "num": False},
            {"label": "reason", "num": False},
            {"label": "check", "num": False},
            {"label": "observations", "num": True},
            {"label": "also observed", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "sortable": True,
        "empty": "no backend observation: call recorder.watch(model) so the hooks observe "
        "what ran at each seam",
    }


def _seam_brief(name: str, seam: Mapping[str, Any]) -> str:
    fell = [o for o in seam.get("observations") or [] if o.get("fallback")]
    o = fell[-1] if fell else seam
    text = f"{name} ({o.get('requested') or 'nothing requested'} → {o.get('observed')}"
    return text + (f": {o['reason']})" if o.get("reason") else ")")


def seams_summary(observed: Mapping[str, Mapping[str, Any]]) -> str:
    """One line: which seams fell back, which ran other than requested, which saw several
    backends; or that all ran as asked."""
    if not observed:
        return "No backend was observed."
    names = sorted(observed)
    fell = [n for n in names if observed[n].get("fallback")]
    off = [n for n in names if mismatch(observed[n]) and n not in fell]
    multi = [n for n in names if observed[n].get("multiple")]
    parts = []
    if fell:
        briefs = "; ".join(_seam_brief(n, observed[n]) for n in fell)
        parts.append(f"{len(fell)} seam{'s' if len(fell) > 1 else ''} fell back: {briefs}.")
    if off:
        briefs = "; ".join(_seam_brief(n, observed[n]) for n in off)
        parts.append(
            f"{len(off)} seam{'s' if len(off) > 1 else ''} ran other than requested: {briefs}."
        )
    if multi:
        parts.append(
            f"{len(multi)} seam{'s' if len(multi) > 1 else ''} observed several backends: "
            + ", ".join(multi)
            + "."
        )
    if not parts:
        return f"All {len(names)} seams ran what was requested (no fallback)."
    return " ".join(parts)


MAX_OBSERVATION_ROWS = 500


def observations_table(observed: Mapping[str, Mapping[str, Any]]) -> tuple[Table, str]:
    """Every observation of the flagged seams (oldest first), at most MAX_OBSERVATION_ROWS,
    and a line saying how many more the JSON receipt holds (empty when none)."""
    rows, flags = [], []
    for name in sorted(observed):
        seam = observed[name]
        if not seam_flags(seam):
            continue
        for o in seam.get("observations") or []:
            rows.append(
                [
                    name,
                    o["attempt"],
                    o["rank"],
                    o.get("step"),
                    o.get("requested"),
                    o["observed"],
                    o.get("reason"),
                    clock(o.get("time")),
                ]
            )
            flags.append(bool(o.get("fallback")))
    more = len(rows) - MAX_OBSERVATION_ROWS
    note = f"{more} more observations in the JSON receipt." if more > 0 else ""
    return {
        "columns": [
            {"label": "seam", "num": False},
            {"label": "attempt", "num": True},
            {"label": "rank", "num": True},
            {"label": "step", "num": True},
            {"label": "requested", "num": False},
            {"label": "observed", "num": False},
            {"label": "reason", "num": False},
            {"label": "time (UTC)", "num": False},
        ],
        "rows": rows[:MAX_OBSERVATION_ROWS],
        "flags": flags[:MAX_OBSERVATION_ROWS],
        "empty": "no seam fell back or changed backend",
    }, note


# -- key/value parts --


def _text(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(", ", ": "))


def flatten(value: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of a nested mapping, keys in order; a list of scalars stays one
    value (JSON text), a list holding mappings is numbered (`key.0.x`)."""
    out: list[tuple[str, Any]] = []
    for key, v in value.items():
        name = f"{prefix}{key}"
        if isinstance(v, Mapping) and v:
            out += flatten(v, name + ".")
        elif isinstance(v, list) and any(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                if isinstance(x, Mapping):
                    out += flatten(x, f"{name}.{i}.")
                else:
                    out.append((f"{name}.{i}", _text(x)))
        else:
            out.append((name, _text(v)))
    return out


def kv_table(part: Mapping[str, Any] | None, missing: Sequence[str], name: str) -> Table:
    """A part of the receipt as a key/value table, its missing keys flagged."""
    rows = [[k, v] for k, v in flatten(part or {})]
    gaps = {m.split(".", 1)[1] for m in missing if m.startswith(name + ".")}
    rows += [[k, "missing"] for k in sorted(gaps) if k not in {r[0] for r in rows}]
    return {
        "columns": [{"label": "key", "num": False}, {"label": "value", "num": False}],
        "rows": rows,
        "flags": [r[0] in gaps for r in rows],
        "empty": f"the run sent no {name.replace('_', ' ')}",
    }


# -- summary and attempts --


def clock(t: Any) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(float(t), tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _bytes(n: Any) -> str:
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    return f"{1000.0 * s:.1f} ms" if s < 1.0 else f"{s:,.2f} s"


def _num(v: Any, fmt: str, suffix: str = "") -> str:
    return "–" if v is None else format(float(v), fmt) + suffix


def summary_texts(receipt: Mapping[str, Any]) -> dict[str, str]:
    """The cards: goodput, median step time, tokens/s, peak memory, final loss,
    recompiles, steps, completeness."""
    summary = receipt.get("summary") or {}
    g = summary.get("goodput") or {}
    t = summary.get("throughput") or {}
    frac = g.get("goodput_fraction")
    step_s = t.get("median_step_time_s")
    missing = receipt.get("missing") or []
    return {
        "card-goodput": "–" if frac is None else f"{100.0 * float(frac):.1f}%",
        "card-goodput-s": f"{float(g.get('goodput_s', 0.0)):,.1f} s of "
        f"{float(g.get('total_s', 0.0)):,.1f} s",
        "card-step": _duration(step_s),
        "card-tokens": _num(t.get("tokens_per_s"), ",.0f"),
        "card-memory": _bytes(t.get("peak_memory_bytes")),
        "card-loss": _num(t.get("final_loss"), ".4f"),
        "card-recompiles": str(t.get("recompiles", 0)),
        "card-steps": f"{int(t.get('num_steps', 0)):,}",
        "card-complete": "complete" if not missing else f"{len(missing)} missing",
    }


def attempts_table(attempts: Sequence[Mapping[str, Any]]) -> Table:
    rows, flags = [], []
    for a in attempts:
        start, end = a.get("start"), a.get("end")
        duration = None if start is None or end is None else round(float(end) - float(start), 3)
        rows.append(
            [
                a["attempt"],
                a["rank"],
                clock(start),
                clock(end),
                duration,
                a.get("status") or "no end record",
                a.get("cause"),
            ]
        )
        flags.append(a.get("status") not in ("completed", None) or bool(a.get("cause")))
    return {
        "columns": [
            {"label": "attempt", "num": True},
            {"label": "rank", "num": True},
            {"label": "start (UTC)", "num": False},
            {"label": "end (UTC)", "num": False},
            {"label": "seconds", "num": True},
            {"label": "status", "num": False},
            {"label": "cause", "num": False},
        ],
        "rows": rows,
        "flags": flags,
        "sortable": True,
        "empty": "no attempt recorded yet",
    }
