"""Column types of service/store/models.py."""

from __future__ import annotations

import pytest

from service.store.models import PackedCounts


@pytest.mark.parametrize(
    ("counts", "width"),
    [
        ([0], 1),
        ([3, 255], 1),
        ([256, 0], 2),
        ([65_535], 2),
        ([65_536, 1], 4),
        ([2**32 - 1], 4),
        ([2**32], 8),
        ([2**53, 0, 7], 8),  # MAX_COUNT, the largest count a record may carry
    ],
)
def test_packed_counts_take_the_narrowest_width_and_round_trip(
    counts: list[int], width: int
) -> None:
    packed = PackedCounts()
    raw = packed.process_bind_param(counts, None)  # type: ignore[arg-type]
    assert raw is not None and len(raw) == 1 + width * len(counts)
    assert packed.process_result_value(raw, None) == counts  # type: ignore[arg-type]
    assert packed.process_bind_param(None, None) is None  # type: ignore[arg-type]
