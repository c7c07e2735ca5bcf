"""Property tests: any valid batch, sent in any split and any number of times, is stored
exactly once, and the goodput of what was stored always adds up to its total."""

from __future__ import annotations

import time
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.calc.goodput_window import run_goodput
from service.store import ingest as repo
from service.store import queries
from service.store.db import session_scope
from tests import factories as f
from trainer_hooks.records import IngestBatch

CATEGORIES = ["startup", "data_stall", "eval", "checkpoint_save", "custom:warmup"]


@st.composite
def run_batches(draw: Any) -> list[dict[str, Any]]:
    run_id = draw(st.from_regex(r"[a-z][a-z0-9]{3,10}", fullmatch=True))
    records: list[dict[str, Any]] = [f.run(run_id, "prop")]
    t = f.T0
    spans: set[tuple[int, str, float]] = set()
    for attempt in range(draw(st.integers(1, 3))):
        for rank in range(draw(st.integers(1, 2))):
            records.append(f.attempt_start(run_id, start=t, attempt=attempt, rank=rank))
        steps = draw(st.integers(0, 12))
        for n in range(steps):
            t += draw(st.floats(0.0, 2.0))
            dur = draw(st.floats(0.0, 3.0))
            for rank in range(2):
                records.append(f.step(n, run_id, start=t, dur=dur, attempt=attempt, rank=rank))
            cat = draw(st.sampled_from(CATEGORIES))
            if draw(st.booleans()) and (attempt, cat, t) not in spans:  # a key names one span
                spans.add((attempt, cat, t))
                records.append(
                    f.span(
                        cat,
                        t,
                        t + min(draw(st.floats(0.0, 1.0)), dur),  # before its attempt's end
                        run_id,
                        attempt=attempt,
                        overlapped=draw(st.booleans()),
                    )
                )
            t += dur
        t += draw(st.floats(0.0, 5.0))
        records.append(
            f.attempt_end(
                run_id,
                end=t,
                attempt=attempt,
                status=draw(st.sampled_from(["completed", "failed"])),
            )
        )
        t += draw(st.floats(0.0, 5.0))
    return records


def keys(records: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    """Natural keys, as the wire contract defines them."""
    out: set[tuple[Any, ...]] = set()
    for r in records:
        k = r["kind"]
        if k == "run":
            out.add((k, r["run_id"]))
        elif k in ("attempt_start", "attempt_end"):
            out.add((k, r["run_id"], r.get("attempt", 0), r.get("rank", 0)))
        elif k == "step":
            out.add((k, r["run_id"], r.get("attempt", 0), r.get("rank", 0), r["step"]))
        else:
            out.add(
                (k, r["run_id"], r.get("attempt", 0), r.get("rank", 0), r["category"], r["start"])
            )
    return out


@given(batch=run_batches(), cut=st.integers(0, 10_000), repeats=st.integers(1, 3))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_split_and_resend_stores_each_record_once_and_goodput_adds_up(
    app: Any, batch: list[dict[str, Any]], cut: int, repeats: int
) -> None:
    run_id = f"{batch[0]['run_id']}-{uuid.uuid4().hex[:8]}"  # examples share one database
    batch = [{**r, "run_id": run_id} for r in batch]
    records = IngestBatch.model_validate({"records": batch}).records
    cut %= len(records) + 1
    inserted = 0
    with session_scope(app.state.sessionmaker) as session:
        for _ in range(repeats):
            for part in (records[:cut], records[cut:]):
                inserted += repo.ingest(session, part).inserted
    assert inserted == len(keys(batch))
    with session_scope(app.state.sessionmaker) as session:
        inputs = queries.goodput_inputs(session, run_id)
        stored_steps = len(inputs.steps)
        g = run_goodput(inputs, time.time())
    assert stored_steps == sum(1 for r in batch if r["kind"] == "step")
    parts = g.goodput_s + sum(g.badput_s.values()) + g.other_s
    assert abs(parts - g.total_s) <= 1e-9 * max(1.0, g.total_s)
    assert g.goodput_s >= 0 and all(v >= 0 for v in g.badput_s.values())
