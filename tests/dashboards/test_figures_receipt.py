"""The receipt page's builders (dashboards/figures/receipt.py) on hand-built receipts, and
an instruction for every `missing` entry the service can report."""

from __future__ import annotations

from typing import Any

from dashboards.figures import receipt as fig
from service.calc import receipts as calc


def seam(
    requested: str | None, observed: str, reason: str | None = None, **kw: Any
) -> dict[str, Any]:
    obs = kw.pop("observations", None) or [
        {
            "attempt": 0,
            "rank": 0,
            "requested": requested,
            "observed": observed,
            "reason": reason,
            "fallback": kw.get("fallback", False),
            "time": 1_790_000_000.0,
            "step": 0,
        }
    ]
    return {
        "requested": requested,
        "observed": observed,
        "reason": reason,
        "fallback": False,
        "multiple": False,
        "observations": obs,
        **kw,
    }


OBSERVED = {
    "sdpa": seam("auto", "flash"),
    "moe_dispatch.layer0": seam("grouped", "padded", "no CUDA", fallback=True),
    "moe_dispatch.layer1": seam("auto", "grouped", "capacity", fallback=True),
    "compile": seam(
        None,
        "inductor",
        multiple=True,
        observations=[
            {
                "attempt": 0,
                "rank": 0,
                "requested": None,
                "observed": "eager",
                "reason": None,
                "fallback": False,
                "time": 1.0,
                "step": None,
            },
            {
                "attempt": 1,
                "rank": 0,
                "requested": None,
                "observed": "inductor",
                "reason": None,
                "fallback": False,
                "time": 2.0,
                "step": 3,
            },
        ],
    ),
}


def test_every_missing_entry_the_service_reports_has_an_instruction() -> None:
    """What calc/receipts.py `missing_parts` can produce: all of it on an empty receipt (no
    E count: the MoE keys are asked for), and one dispatch seam per E layer."""
    produced = set(calc.missing_parts({}, {}, {}, [], 0, []))
    produced |= set(calc.missing_parts({"family_counts": {"E": 3}}, {}, {}, [], 0, []))
    documented = (
        {f"model_plan.{k}" for k in calc.PLAN_KEYS + calc.MOE_PLAN_KEYS}
        | {"model_plan.family_counts"}
        | {f"runtime_policy.{k}" for k in calc.POLICY_KEYS}
        | {f"environment.{k}" for k in calc.ENVIRONMENT_KEYS}
        | {f"observed.{s}" for s in calc.dispatch_seams(3)}
        | {"steps", "attempt_end"}
    )
    assert produced == documented  # the enumeration above is all the calculator says
    for entry in sorted(produced):
        found = fig.missing_help(entry)
        assert found is not None, entry
        what, how = found
        assert what and how, entry
    assert fig.missing_help("observed.moe_dispatch.layer12") == (
        "the dispatch backend that ran in E layer 12",
        fig.MISSING_PATTERNS[0][1][1],
    )
    assert fig.missing_help("model_plan.something_new") is None


def test_completeness_lists_each_missing_part_with_how_to_supply_it() -> None:
    verdict, table = fig.completeness({"missing": ["runtime_policy.dtype", "x.unknown"]})
    assert verdict.startswith("Incomplete: 2 part(s) missing")
    assert table["rows"][0][0] == "runtime_policy.dtype" and "'dtype'" in table["rows"][0][2]
    assert table["rows"][1][1:] == ["not described here", "see the receipt's docs"]
    verdict, table = fig.completeness({"missing": []})
    assert verdict.startswith("Complete") and table["rows"] == []


def test_seams_flag_fallbacks_mismatches_and_several_backends() -> None:
    table = fig.seams_table(OBSERVED)
    by_name = {row[0]: (row, flag) for row, flag in zip(table["rows"], table["flags"], strict=True)}
    assert by_name["sdpa"] == (["sdpa", "auto", "flash", None, "ok", 1, None], False)
    row, flag = by_name["moe_dispatch.layer0"]
    assert row[4] == "fell back; requested ≠ observed" and flag
    assert by_name["moe_dispatch.layer1"][0][4] == "fell back"  # auto: no mismatch, a reason
    assert by_name["compile"][0][4:] == ["several backends", 2, "eager"]
    assert [r[0] for r in table["rows"]] == sorted(OBSERVED)


def test_the_summary_line_names_the_seams_that_fell_back() -> None:
    line = fig.seams_summary(OBSERVED)
    assert line == (
        "2 seams fell back: moe_dispatch.layer0 (grouped → padded: no CUDA); "
        "moe_dispatch.layer1 (auto → grouped: capacity). "
        "1 seam observed several backends: compile."
    )
    assert fig.seams_summary({"sdpa": seam("auto", "flash")}) == (
        "All 1 seams ran what was requested (no fallback)."
    )
    assert fig.seams_summary({}) == "No backend was observed."


def test_the_observations_of_flagged_seams_only() -> None:
    table, more = fig.observations_table(OBSERVED)
    assert [r[0] for r in table["rows"]] == [
        "compile",
        "compile",
        "moe_dispatch.layer0",
        "moe_dispatch.layer1",
    ]
    assert table["flags"] == [False, False, True, True] and more == ""
    assert table["rows"][1][1:4] == [1, 0, 3]
    assert fig.observations_table({})[0]["rows"] == []


def test_nested_parts_flatten_to_dotted_keys() -> None:
    part = {
        "pattern": "AEME",
        "family_counts": {"E": 2, "A": 1},
        "e_positions": [1, 3],
        "ssm": {"inner": {"d": 4}},
        "stages": [{"name": "a"}, 7],
        "none": None,
        "flag": True,
        "empty": {},
    }
    assert fig.flatten(part) == [
        ("pattern", "AEME"),
        ("family_counts.E", 2),
        ("family_counts.A", 1),
        ("e_positions", "[1, 3]"),
        ("ssm.inner.d", 4),
        ("stages.0.name", "a"),
        ("stages.1", 7),
        ("none", "null"),
        ("flag", "true"),
        ("empty", "{}"),
    ]


def test_a_key_value_table_flags_its_missing_keys() -> None:
    table = fig.kv_table(
        {"dtype": None, "world_size": 2},
        ["runtime_policy.dtype", "runtime_policy.compile", "model_plan.top_k"],
        "runtime_policy",
    )
    assert table["rows"] == [["dtype", "null"], ["world_size", 2], ["compile", "missing"]]
    assert table["flags"] == [True, False, True]
    assert fig.kv_table({}, [], "environment")["rows"] == []


def test_summary_cards() -> None:
    receipt = {
        "missing": ["steps"],
        "summary": {
            "goodput": {"goodput_fraction": 0.7012, "goodput_s": 14.39, "total_s": 20.52},
            "throughput": {
                "median_step_time_s": 0.37963,
                "tokens_per_s": 760.3,
                "peak_memory_bytes": 3 * 1024**3,
                "final_loss": 3.37373,
                "recompiles": 2,
                "num_steps": 24,
            },
        },
    }
    texts = fig.summary_texts(receipt)
    assert texts == {
        "card-goodput": "70.1%",
        "card-goodput-s": "14.4 s of 20.5 s",
        "card-step": "379.6 ms",
        "card-tokens": "760",
        "card-memory": "3.00 GiB",
        "card-loss": "3.3737",
        "card-recompiles": "2",
        "card-steps": "24",
        "card-complete": "1 missing",
    }
    receipt["summary"]["throughput"]["median_step_time_s"] = 1.0
    assert fig.summary_texts(receipt)["card-step"] == "1.00 s"
    empty = fig.summary_texts({"summary": {"goodput": {}, "throughput": {}}})
    assert empty["card-goodput"] == "–" and empty["card-memory"] == "–"
    assert empty["card-complete"] == "complete" and empty["card-steps"] == "0"


def test_attempts_table() -> None:
    attempts = [
        {"attempt": 0, "rank": 0, "start": 0.0, "end": 10.5, "status": "failed", "cause": "oom"},
        {"attempt": 1, "rank": 0, "start": 12.0, "end": None, "status": None, "cause": None},
    ]
    table = fig.attempts_table(attempts)
    assert table["rows"] == [
        [0, 0, "1970-01-01 00:00:00", "1970-01-01 00:00:10", 10.5, "failed", "oom"],
        [1, 0, "1970-01-01 00:00:12", None, None, "no end record", None],
    ]
    assert table["flags"] == [True, False]
    assert fig.attempts_table([])["rows"] == []
