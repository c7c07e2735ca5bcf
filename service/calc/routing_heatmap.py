"""One E layer's routing records summed per bucket of step numbers: the routing page's
heatmap (tokens per expert over steps), its per-bucket rates and its dead experts. Pure
numpy on plain arrays (the store decodes the packed histograms).

Buckets are the aligned step ranges [k * W, (k + 1) * W) of one attempt: attempts stay
apart (a resumed attempt repeats step numbers). Per bucket, over its records (each record's
slots are its routed experts, then the null slot when `null_slot` is set):

- tokens[e], dropped[e]: the sums of `tokens_per_expert[e]` and `dropped_per_expert[e]`;
  the null slot's sums apart (`null_tokens`, `null_dropped`);
- assignments: the sum of `num_tokens * top_k`;
- drop rate: every slot's dropped assignments / assignments; null fraction: the null slot's
  tokens / assignments (both at most 1, as calc/routing_stats.py per record);
- shared-only fraction: the sum of `shared_only_tokens` / the sum of `num_tokens`, over
  the records that report it;
- MaxVio: the highest and the mean of the records' MaxVio; aux and z loss: their means
  (each over the records that have one).

A *dead* expert is a routed expert that received no token in the layer's newest
`DEAD_WINDOW` records (newest attempt first, then highest step), or in all of them when
there are fewer: an expert the router stopped choosing, whatever it did earlier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from service.calc.downsample import bucket_plan

DEAD_WINDOW = 100  # records: an expert idle in the layer's newest this many records is dead

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


class RecordChunk(NamedTuple):
    """Records of one attempt of one layer, in step order: one entry per record, and its
    slots as a matrix padded with zeros to the widest record (`slots`: its own width)."""

    steps: Ints
    num_tokens: Ints
    top_k: Ints
    null_slot: Bools
    shared_only: Floats  # NaN: not reported
    max_vio: Floats  # NaN: none
    aux_loss: Floats
    z_loss: Floats
    slots: Ints
    tokens: Ints  # (records, widest)
    dropped: Ints


def _grow(a: Ints, n: int) -> Ints:
    return a if len(a) >= n else np.concatenate([a, np.zeros(n - len(a), np.int64)])


@dataclass
class BucketSums:
    """What one bucket of one attempt holds (see the module's docstring)."""

    n: int = 0
    first: int = 0  # lowest and highest step of its records
    last: int = 0
    tokens: Ints = field(default_factory=lambda: np.zeros(0, np.int64))
    dropped: Ints = field(default_factory=lambda: np.zeros(0, np.int64))
    null_tokens: int = 0
    null_dropped: int = 0
    has_null: bool = False
    experts: int = 0  # routed experts of its widest record
    assignments: int = 0
    num_tokens: int = 0
    shared_only: int = 0
    shared_tokens: int = 0  # num_tokens of the records that report shared_only_tokens
    vio_max: float = -np.inf
    vio_sum: float = 0.0
    vio_n: int = 0
    aux_sum: float = 0.0
    aux_n: int = 0
    z_sum: float = 0.0
    z_n: int = 0

    def add_slots(self, tokens: Ints, dropped: Ints) -> None:
        width = max(len(self.tokens), len(tokens))
        self.tokens = _grow(self.tokens, width)
        self.dropped = _grow(self.dropped, width)
        self.tokens[: len(tokens)] += tokens
        self.dropped[: len(dropped)] += dropped

    def drop_rate(self) -> float | None:
        if self.assignments <= 0:
            return None
        return min(1.0, (int(self.dropped.sum()) + self.null_dropped) / self.assignments)

    def null_fraction(self) -> float | None:
        return None if self.assignments <= 0 else min(1.0, self.null_tokens / self.assignments)

    def shared_only_fraction(self) -> float | None:
        return None if self.shared_tokens <= 0 else min(1.0, self.shared_only / self.shared_tokens)

    @staticmethod
    def _mean(total: float, n: int) -> float | None:
        return total / n if n else None

    def max_vio_mean(self) -> float | None:
        return self._mean(self.vio_sum, self.vio_n)

    def max_vio_high(self) -> float | None:
        return None if self.vio_n == 0 else self.vio_max

    def aux_loss(self) -> float | None:
        return self._mean(self.aux_sum, self.aux_n)

    def z_loss(self) -> float | None:
        return self._mean(self.z_sum, self.z_n)


Key = tuple[int, int]  # (attempt, bucket)


def split_null(chunk: RecordChunk) -> tuple[Ints, Ints, Ints, Ints]:
    """(routed tokens, routed dropped, null tokens, null dropped) per record: the null slot
    (each null-slot record's last slot) taken out of the matrices."""
    rows = np.flatnonzero(chunk.null_slot)
    last = chunk.slots[rows] - 1
    tokens, dropped = chunk.tokens.copy(), chunk.dropped.copy()
    null_tokens = np.zeros(len(chunk.steps), np.int64)
    null_dropped = np.zeros(len(chunk.steps), np.int64)
    null_tokens[rows] = tokens[rows, last]
    null_dropped[rows] = dropped[rows, last]
    tokens[rows, last] = 0
    dropped[rows, last] = 0
    return tokens, dropped, null_tokens, null_dropped


def _present_sum(values: Floats, starts: Ints) -> tuple[Floats, Ints]:
    ok = ~np.isnan(values)
    return (
        np.add.reduceat(np.where(ok, values, 0.0), starts),
        np.add.reduceat(ok.astype(np.int64), starts),
    )


def accumulate(acc: dict[Key, BucketSums], attempt: int, width: int, chunk: RecordChunk) -> None:
    """Add a chunk of one attempt's records (in step order) to the buckets of width W."""
    if len(chunk.steps) == 0:
        return
    buckets = chunk.steps // width
    assert bool(np.all(np.diff(buckets) >= 0)), "records must come in step order"
    starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
    ends = np.r_[starts[1:], len(buckets)] - 1
    tokens, dropped, null_t, null_d = split_null(chunk)
    routed = chunk.slots - chunk.null_slot.astype(np.int64)
    widest = int(routed.max())
    tokens, dropped = tokens[:, :widest], dropped[:, :widest]
    per = {
        "experts": np.maximum.reduceat(routed, starts),
        "tokens": np.add.reduceat(tokens, starts, axis=0),
        "dropped": np.add.reduceat(dropped, starts, axis=0),
        "null_t": np.add.reduceat(null_t, starts),
        "null_d": np.add.reduceat(null_d, starts),
        "has_null": np.add.reduceat(chunk.null_slot.astype(np.int64), starts),
        "assign": np.add.reduceat(chunk.num_tokens * chunk.top_k, starts),
        "num_tokens": np.add.reduceat(chunk.num_tokens, starts),
    }
    shared = ~np.isnan(chunk.shared_only)
    per["shared"] = np.add.reduceat(np.where(shared, chunk.shared_only, 0).astype(np.int64), starts)
    per["shared_tokens"] = np.add.reduceat(np.where(shared, chunk.num_tokens, 0), starts)
    vio_sum, vio_n = _present_sum(chunk.max_vio, starts)
    vio_max = np.maximum.reduceat(np.where(np.isnan(chunk.max_vio), -np.inf, chunk.max_vio), starts)
    aux_sum, aux_n = _present_sum(chunk.aux_loss, starts)
    z_sum, z_n = _present_sum(chunk.z_loss, starts)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        key = (attempt, int(buckets[s]))
        b = acc.get(key)
        if b is None:
            b = acc[key] = BucketSums(first=int(chunk.steps[s]), last=int(chunk.steps[e]))
        b.n += int(e - s + 1)
        b.first, b.last = min(b.first, int(chunk.steps[s])), max(b.last, int(chunk.steps[e]))
        b.add_slots(per["tokens"][i], per["dropped"][i])
        b.null_tokens += int(per["null_t"][i])
        b.null_dropped += int(per["null_d"][i])
        b.has_null = b.has_null or bool(per["has_null"][i])
        b.experts = max(b.experts, int(per["experts"][i]))
        b.assignments += int(per["assign"][i])
        b.num_tokens += int(per["num_tokens"][i])
        b.shared_only += int(per["shared"][i])
        b.shared_tokens += int(per["shared_tokens"][i])
        b.vio_max = max(b.vio_max, float(vio_max[i]))
        b.vio_sum += float(vio_sum[i])
        b.vio_n += int(vio_n[i])
        b.aux_sum += float(aux_sum[i])
        b.aux_n += int(aux_n[i])
        b.z_sum += float(z_sum[i])
        b.z_n += int(z_n[i])


def bucket_width(
    extents: Mapping[int, tuple[int, int]], max_columns: int, levels: Sequence[int]
) -> int:
    """W such that the attempts' step ranges (attempt -> (lowest, highest step)) meet about
    `max_columns` buckets in all (at most max_columns + 2 per attempt): the downsampling's
    plan (calc/downsample.py) on their summed length, so W is a whole number of rollup
    blocks once it reaches one."""
    span = sum(hi - lo + 1 for lo, hi in extents.values())
    if span <= 0:
        return 1
    width, _ = bucket_plan(0, span - 1, 2 * max(2, max_columns), levels)
    return width


def dead_experts(newest_tokens: Ints, num_experts: int) -> list[int]:
    """The routed experts (0 .. num_experts - 1) with no token in the newest records given
    (routed slots only: `split_null`'s tokens)."""
    if num_experts <= 0 or newest_tokens.size == 0:
        return []
    seen = _grow(newest_tokens.sum(axis=0), num_experts)[:num_experts]
    return [int(e) for e in np.flatnonzero(seen == 0)]


def num_experts(buckets: Iterable[BucketSums]) -> int:
    return max((b.experts for b in buckets), default=0)
