"""The routing page's data: a run's E layers (or why it has none), one layer's tokens per
expert over steps in buckets (calc/routing_heatmap.py: the heatmap, its per-bucket rates,
dead experts), and every layer's series for the overview (services/receipts.py `routing`).

Speed. The histograms have no rollup: a bucket's sums read its records. At a million steps
that is a million records per layer, so each layer's buckets are cached per run, under the
run's generation (when its row was stored) and the bucket width, each bucket with its record
count; a request reads the counts of every bucket from the routing rollup (fine blocks,
one grouped statement) and re-reads only the buckets whose count changed. Records are
only ever added (a different re-send is refused), so an unchanged count is an unchanged
bucket: a live run re-reads its newest bucket, an ended one nothing. Buckets narrower than
a rollup block (runs shorter than ~FINE * MAX_COLUMNS steps) are read whole each time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from service.calc.receipts import e_layer_count
from service.calc.routing_heatmap import (
    DEAD_WINDOW,
    BucketSums,
    Key,
    accumulate,
    bucket_width,
    dead_experts,
    num_experts,
    split_null,
)
from service.calc.routing_stats import routing_figures
from service.services import receipts
from service.services.errors import Invalid, NotFound
from service.services.runs import run_or_404
from service.store import routing_heatmap as store
from service.store.models import ROLLUP_LEVELS
from service.store.rollups.common import FINE, consecutive

MAX_COLUMNS = 160  # heatmap columns (step buckets), about: the attempts add a few
MAX_EXPERT_ROWS = 256  # heatmap rows of routed experts: past it, neighbours share a row
CACHE_LAYERS = 64  # (run, rank, layer) entries kept, least recently used dropped first


class _Cache:
    """Buckets per (database, run, generation, rank, layer, width), least recently used
    dropped first. Values are never changed once stored: a refresh stores a new dict."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._items: OrderedDict[Hashable, dict[Key, BucketSums]] = OrderedDict()

    def get(self, key: Hashable) -> dict[Key, BucketSums]:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return dict(found or {})

    def put(self, key: Hashable, value: dict[Key, BucketSums]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


CACHE = _Cache(CACHE_LAYERS)


def parse_layer(value: str | None) -> int | None:
    """`?layer=`: an E layer index, `all` (None: the overview), or absent (-1: the first)."""
    if value is None or value == "":
        return -1
    if value == "all":
        return None
    if not value.isdigit():
        raise Invalid.field("query", "layer", f"an E layer number or 'all', got {value!r}")
    return int(value)


def layers_of(session: Session, run_id: str, rank: int) -> dict[str, Any]:
    """The run's E layers with routing records on `rank`, and, when none, why: the plan's
    pattern has no E layer, or the records have not arrived."""
    run = run_or_404(session, run_id)
    found = store.layers(session, run_id, rank)
    reason = None
    if not found:
        planned = e_layer_count(run.model_plan or {})
        pattern = (run.model_plan or {}).get("pattern")
        if planned == 0:
            reason = (
                f"This run's model has no E (routed-expert) layer (pattern {pattern!r}), "
                "so there is no routing to show."
            )
        else:
            layers = "its E layers" if planned is None else f"its {planned} E layer(s)"
            reason = (
                f"No routing record has arrived for {layers} on rank {rank}. The recorder "
                "sends one per E layer every `routing_every` steps once `recorder.watch(model)` "
                "has found the MoE layers' counters (goodput train: --routing-every)."
            )
    return {"layers": found, "reason": reason}


def check_layer(layer: int, layers: list[int]) -> None:
    if layer not in layers:
        have = ", ".join(map(str, layers))
        raise NotFound(f"layer {layer}: this run has routing records for E layers {have} (or all)")


def _db(session: Session) -> str:
    return str(session.get_bind().engine.url)


def _read(
    session: Session,
    run_id: str,
    rank: int,
    layer: int,
    width: int,
    ranges: Iterable[tuple[int, int, int]],
) -> dict[Key, BucketSums]:
    """The buckets of these (attempt, first step, last step) ranges, from their records."""
    out: dict[Key, BucketSums] = {}
    for attempt, lo, hi in ranges:
        for chunk in store.record_chunks(session, run_id, rank, layer, attempt, lo, hi):
            accumulate(out, attempt, width, chunk)
    return out


def layer_buckets(
    session: Session, run_id: str, generation: float, rank: int, layer: int, max_columns: int
) -> tuple[int, dict[Key, BucketSums]]:
    """(bucket width W, the layer's buckets), cached as the module's docstring says."""
    extents = store.extents(session, run_id, rank, layer)
    if not extents:
        return 1, {}
    width = bucket_width(extents, max_columns, ROLLUP_LEVELS)
    if width % FINE:
        ranges = [(a, lo, hi) for a, (lo, hi) in sorted(extents.items())]
        return width, _read(session, run_id, rank, layer, width, ranges)
    counts = store.bucket_counts(session, run_id, rank, layer, width)
    key = (_db(session), run_id, generation, rank, layer, width)
    kept = {k: b for k, b in CACHE.get(key).items() if counts.get(k) == b.n}
    stale: dict[int, list[int]] = {}
    for attempt, bucket in sorted(k for k in counts if k not in kept):
        stale.setdefault(attempt, []).append(bucket)
    ranges = [
        (attempt, first * width, (last + 1) * width - 1)
        for attempt, buckets in stale.items()
        for first, last in consecutive(buckets)
    ]
    kept.update(_read(session, run_id, rank, layer, width, ranges))
    CACHE.put(key, kept)
    return width, kept


def _dead(
    session: Session, run_id: str, rank: int, layer: int, attempts: list[int], n: int
) -> list[int]:
    chunks = store.newest_records(session, run_id, rank, layer, attempts, DEAD_WINDOW)
    if not chunks:
        return []
    routed = [split_null(c)[0] for c in chunks]
    widest = max(r.shape[1] for r in routed)
    stacked = np.vstack([np.pad(r, ((0, 0), (0, widest - r.shape[1]))) for r in routed])
    return dead_experts(stacked, n)


def _row_groups(n: int) -> list[tuple[int, int]]:
    """(first, last) expert of each heatmap row: one expert a row, or neighbours together
    past MAX_EXPERT_ROWS."""
    size = -(-n // MAX_EXPERT_ROWS) if n > MAX_EXPERT_ROWS else 1
    return [(lo, min(n, lo + size) - 1) for lo in range(0, n, size)]


def _padded(a: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    return np.pad(a, (0, max(0, n - len(a))))[:n]


def layer_view(
    session: Session, run_id: str, layer: int, rank: int = 0, max_columns: int = MAX_COLUMNS
) -> dict[str, Any]:
    """One E layer: its heatmap of tokens per expert over step buckets (the null slot its
    own row), the buckets' rates, each expert's totals and the dead experts, as plain
    data for dashboards/figures/routing.py."""
    run = run_or_404(session, run_id)
    width, buckets = layer_buckets(session, run_id, run.ingested_at, rank, layer, max_columns)
    keys = sorted(buckets)
    cols = [buckets[k] for k in keys]
    n = num_experts(cols)
    tokens = np.array([_padded(b.tokens, n) for b in cols], np.int64).reshape(len(cols), n)
    dropped = np.array([_padded(b.dropped, n) for b in cols], np.int64).reshape(len(cols), n)
    attempts = sorted({a for a, _ in keys}, reverse=True)
    dead = _dead(session, run_id, rank, layer, attempts, n)
    dead_set = set(dead)
    total_tokens = tokens.sum(axis=0)
    groups = _row_groups(n)
    rows = [
        {
            "label": f"expert {lo}" if lo == hi else f"experts {lo}–{hi}",
            "z": tokens[:, lo : hi + 1].sum(axis=1).tolist(),
            "dead": all(e in dead_set for e in range(lo, hi + 1)),
        }
        for lo, hi in groups
    ]
    null_slot = any(b.has_null for b in cols)
    if null_slot:
        rows.append({"label": "null slot", "z": [b.null_tokens for b in cols], "dead": False})
    assignments = sum(b.assignments for b in cols)
    return {
        "layer": layer,
        "rank": rank,
        "width": width,
        "records": sum(b.n for b in cols),
        "experts": n,
        "null_slot": null_slot,
        "rows": rows,
        "columns": [
            {
                "attempt": a,
                "first": b.first,
                "last": b.last,
                "records": b.n,
                "assignments": b.assignments,
                "step": b.first,
                "drop_rate": b.drop_rate(),
                "null_fraction": b.null_fraction(),
                "shared_only_fraction": b.shared_only_fraction(),
                "max_vio": b.max_vio_high(),
                "max_vio_mean": b.max_vio_mean(),
                "aux_loss": b.aux_loss(),
                "z_loss": b.z_loss(),
            }
            for (a, _), b in zip(keys, cols, strict=True)
        ],
        "experts_table": [
            {
                "expert": e,
                "tokens": int(total_tokens[e]),
                "dropped": int(dropped[:, e].sum()),
                "dead": e in dead_set,
                "last_step": _last_routed(keys, cols, tokens[:, e]),
            }
            for e in range(n)
        ],
        "dead": dead,
        "dead_window": DEAD_WINDOW,
        "totals": _totals(cols, assignments),
    }


def _last_routed(
    keys: list[Key], cols: list[BucketSums], tokens: np.ndarray[Any, Any]
) -> int | None:
    """The last step of the newest bucket in which the expert received a token."""
    hit = np.flatnonzero(tokens > 0)
    if hit.size == 0:
        return None
    return max((keys[i][0], cols[i].last) for i in hit)[1]


def _totals(cols: list[BucketSums], assignments: int) -> dict[str, Any]:
    """The whole layer as one bucket."""
    whole = BucketSums()
    for b in cols:
        whole.add_slots(b.tokens, b.dropped)
        whole.null_tokens += b.null_tokens
        whole.null_dropped += b.null_dropped
        whole.num_tokens += b.num_tokens
        whole.shared_only += b.shared_only
        whole.shared_tokens += b.shared_tokens
    whole.assignments = assignments
    return {
        "assignments": assignments,
        "drop_rate": whole.drop_rate(),
        "null_fraction": whole.null_fraction(),
        "shared_only_fraction": whole.shared_only_fraction(),
    }


OVERVIEW_POINTS = 400  # per layer: at a million steps, buckets of whole coarse blocks


def overview(
    session: Session, run_id: str, rank: int = 0, max_points: int = OVERVIEW_POINTS
) -> dict[str, Any]:
    """Every E layer's routing series (downsampled keeping each bucket's lowest and highest
    MaxVio) and newest histogram (services/receipts.py `routing`), with the newest record's
    figures computed from that histogram (`newest`: calc/routing_stats.py, as at ingest)."""
    series = receipts.routing(session, run_id, None, max_points, rank)
    for layer in series["layers"]:
        hist = layer["histogram"]
        layer["newest"] = None
        if hist is not None:
            figs = routing_figures(
                hist["tokens_per_expert"],
                hist["dropped_per_expert"],
                hist["num_tokens"],
                hist["top_k"],
                hist["null_slot"],
            )
            layer["newest"] = {"drop_rate": figs.drop_rate, "max_vio": figs.max_vio}
    return series
