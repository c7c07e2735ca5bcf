"""The performance page's figure builders on hand-built data: the empty case, the two-attempt
case, absent measures said rather than drawn, the heatmap's cells."""

from __future__ import annotations

from typing import Any

import pytest

from dashboards.figures import performance as figures

T = 1_790_000_000.0


def point(step: int, attempt: int, **kw: Any) -> dict[str, Any]:
    base = {
        "step": step,
        "attempt": attempt,
        "start": T + 2 * step + 100 * attempt,
        "step_time_s": 0.5,
        "tokens_per_s": 1024.0,
        "tflops_per_s": 400.0,
        "mfu": 0.4,
        "device_time_s": 0.45,
        "loss": 2.0,
    }
    return {**base, **kw}


def two_attempts(**kw: Any) -> list[dict[str, Any]]:
    """Steps 0..5 of attempt 0, then 4..7 again in attempt 1 (it resumed at step 4)."""
    return [point(s, 0, **kw) for s in range(6)] + [point(s, 1, **kw) for s in range(4, 8)]


ENDS = {0: "failed: oom", 1: "completed"}


def boundary_labels(fig: Any) -> list[str]:
    return [a.text for a in fig.layout.annotations if a.text.startswith("attempt")]


@pytest.mark.parametrize(
    "build",
    [
        figures.step_time_band,
        figures.tokens_per_s,
        figures.tflops,
        figures.mfu,
        figures.device_vs_host,
    ],
)
def test_every_series_without_steps_says_so(build: Any) -> None:
    fig = build([])
    assert len(fig.data) == 0 and "no steps" in fig.layout.annotations[0].text


def test_step_time_per_attempt_with_the_ideal_and_its_deviation_band() -> None:
    fig = figures.step_time_band(two_attempts(), "step", ENDS, ideal_s=0.4, deviation_s=0.05)
    assert [t.name for t in fig.data] == ["step time · attempt 0", "step time · attempt 1"]
    assert list(fig.data[1].x) == [4, 5, 6, 7] and list(fig.data[0].y) == [500.0] * 6
    assert boundary_labels(fig) == ["attempt 1 (after: failed: oom)"]
    band = next(s for s in fig.layout.shapes if s.type == "rect")
    assert (band.y0, band.y1) == pytest.approx((400.0, 450.0))
    line = [s for s in fig.layout.shapes if s.type == "line" and s.y0 == s.y1]
    assert [s.y0 for s in line] == [400.0]
    texts = [a.text for a in fig.layout.annotations]
    assert "ideal 400.0 ms" in texts and "deviation +50.0 ms" in texts
    faster = figures.step_time_band(two_attempts(), "step", ENDS, 0.4, -0.1)
    band = next(s for s in faster.layout.shapes if s.type == "rect")
    assert (band.y0, band.y1) == pytest.approx((300.0, 400.0))  # below: recent steps faster


def test_series_on_the_wall_clock_axis() -> None:
    fig = figures.tokens_per_s(two_attempts(), "time", ENDS)
    assert fig.data[0].x[0].timestamp() == T and fig.layout.xaxis.title.text.startswith("wall")
    assert list(fig.data[1].y) == [1024.0] * 4


def test_mfu_without_the_devices_peak_is_a_note_not_zeros() -> None:
    fig = figures.mfu(two_attempts(mfu=None), "step", ENDS, peak_note="no MFU: <peak> unknown")
    assert len(fig.data) == 0 and "&lt;peak&gt;" in fig.layout.annotations[0].text
    drawn = figures.mfu(two_attempts(), "step", ENDS)
    assert list(drawn.data[0].y) == [40.0] * 6  # percent of peak
    assert (
        "no MFU"
        in figures.mfu(two_attempts(mfu=None, tflops_per_s=None)).layout.annotations[0].text
    )


def test_flops_absent_is_said() -> None:
    fig = figures.tflops(two_attempts(tflops_per_s=None))
    assert len(fig.data) == 0 and "no FLOPs" in fig.layout.annotations[0].text


def test_device_time_beside_host_time_and_its_absence_on_a_cpu() -> None:
    fig = figures.device_vs_host(two_attempts(), "step", ENDS, "NVIDIA H100")
    assert [t.name for t in fig.data] == [
        "host (wall) · attempt 0",
        "host (wall) · attempt 1",
        "device · attempt 0",
        "device · attempt 1",
    ]
    assert list(fig.data[2].y) == [450.0] * 6
    cpu = figures.device_vs_host(two_attempts(device_time_s=None), "step", ENDS, "cpu")
    assert len(cpu.data) == 0
    assert (
        "CUDA events" in cpu.layout.annotations[0].text and "cpu" in cpu.layout.annotations[0].text
    )


def cell(rank: int, attempt: int, bucket: int, n: int, busy: float, **kw: Any) -> dict[str, Any]:
    base = {
        "rank": rank,
        "attempt": attempt,
        "bucket": bucket,
        "n": n,
        "busy_s": busy,
        "mem_peak": 2**31 * (bucket + 1),
        "first_start": T + 100 * bucket + 1000 * attempt,
        "first_step": 10 * bucket,
    }
    return {**base, **kw}


def grid(cells: list[dict[str, Any]], axis: str = "step", ranks: Any = None) -> dict[str, Any]:
    return {
        "axis": axis,
        "origin": T,
        "width": 10.0,
        "ranks": ranks if ranks is not None else sorted({c["rank"] for c in cells}),
        "ranks_total": 2,
        "cells": cells,
    }


def two_rank_grid() -> dict[str, Any]:
    """Ranks 0 and 1 over buckets 0..3; bucket 2 holds steps of both attempts; rank 1 is
    slow; rank 0 has no step in bucket 3 (a gap)."""
    return grid(
        [
            cell(0, 0, 0, 10, 5.0),
            cell(0, 0, 1, 10, 5.0),
            cell(0, 0, 2, 4, 2.0),
            cell(0, 1, 2, 6, 4.0),  # attempt 1 resumed in bucket 2: its first step there
            cell(1, 0, 0, 10, 8.0),
            cell(1, 0, 1, 10, 8.0),
            cell(1, 1, 2, 10, 8.0, first_step=26),
            cell(1, 1, 3, 10, 8.0),
        ]
    )


def test_the_heatmap_has_a_row_per_rank_and_averages_each_cell() -> None:
    fig = figures.rank_heatmap(two_rank_grid(), ENDS, stragglers=[1])
    heat = fig.data[0]
    assert list(heat.y) == ["rank 0", "rank 1 (straggler)"]
    assert list(heat.x) == [5.0, 15.0, 25.0, 35.0]  # bucket middles, in steps
    assert [list(r) for r in heat.z] == [[500.0, 500.0, 600.0, None], [800.0] * 4]
    assert [list(r) for r in heat.customdata] == [[10, 10, 10, 0], [10, 10, 10, 10]]
    assert boundary_labels(fig) == ["attempt 1 (after: failed: oom)"]
    assert [s.x0 for s in fig.layout.shapes] == [20]  # attempt 1's first step
    assert heat.zmin < heat.zmax


def test_the_heatmap_on_the_wall_clock_and_empty() -> None:
    fig = figures.rank_heatmap(grid([cell(0, 0, 0, 1, 1.0)], "time"))
    assert fig.data[0].x[0].timestamp() == T + 5
    assert "per 10 s" in fig.layout.title.text
    empty = figures.rank_heatmap(grid([]))
    assert len(empty.data) == 0 and "no steps" in empty.layout.annotations[0].text


def test_peak_memory_per_attempt_in_gib_and_its_absence() -> None:
    fig = figures.memory(two_rank_grid(), 0, ENDS)
    assert [t.name for t in fig.data] == [
        "peak allocated · attempt 0",
        "peak allocated · attempt 1",
    ]
    assert list(fig.data[0].y) == [2.0, 4.0, 6.0] and list(fig.data[0].x) == [0, 10, 20]
    # Read every few steps: the steps between reads are left out, a lone read is a marker.
    sparse = [cell(0, 0, b, 1, 1.0, mem_peak=None if b % 8 else 2**30 * (b + 1)) for b in range(12)]
    [trace] = figures.memory(grid(sparse), 0).data
    assert list(trace.x) == [0, 80] and list(trace.y) == [1.0, 9.0]
    assert "markers" in trace.mode
    none = figures.memory(grid([cell(0, 0, 0, 1, 1.0, mem_peak=None)]), 0, None, "cpu")
    assert len(none.data) == 0 and "no peak memory" in none.layout.annotations[0].text
    assert "no steps" in figures.memory(grid([]), 0).layout.annotations[0].text


def test_recompiles_table_and_note() -> None:
    recompiles = {
        "observed": 1,
        "counted": 3,
        "rows": [
            {
                "attempt": 0,
                "rank": 1,
                "step": 5,
                "time": T,
                "observed": "recompile 0/1",
                "reason": "size mismatch",
            }
        ],
    }
    t = figures.recompile_table(recompiles)
    assert t["rows"] == [[0, 1, 5, "2026-09-21 14:13:20", "recompile 0/1", "size mismatch"]]
    assert figures.recompile_note(recompiles) == (
        "1 recompile observed; the attempts' end counters say 3 (some observations were dropped)"
    )
    none = {"observed": 0, "counted": 0, "rows": []}
    assert figures.recompile_table(none)["rows"] == []
    assert figures.recompile_note(none) == "0 recompiles observed"


def test_the_heatmaps_colors_span_at_least_the_straggler_margin() -> None:
    import numpy as np

    noise = np.array([351.5, 351.8, 352.0, 352.2, 352.5])
    lo, hi = figures.color_range(noise)
    assert lo == pytest.approx(352.0 * 0.95) and hi == pytest.approx(352.0 * 1.05)
    slow = np.array([100.0] * 40 + [130.0] * 10)  # a rank 30% slower
    lo, hi = figures.color_range(slow)
    assert lo == pytest.approx(95.0) and hi == pytest.approx(130.0)


def test_a_series_spans_its_data_and_leaves_room_for_the_labels_above() -> None:
    fig = figures.tokens_per_s(two_attempts(), "step", ENDS)
    assert list(fig.layout.xaxis.range) == [0, 7]
    assert list(fig.layout.yaxis.range) == pytest.approx([0, 1.18 * 1024.0])


def test_device_time_of_every_few_steps_is_joined_with_markers_not_drawn_as_gaps() -> None:
    """The hooks time one step in `device_every` on the device: the device line holds those
    steps alone (a line broken at every other step would draw nothing), each with a marker."""
    points = [point(s, 0, device_time_s=0.45 if s % 3 == 0 else None) for s in range(7)] + [
        point(s, 1, device_time_s=0.4 if s == 5 else None) for s in range(4, 8)
    ]
    fig = figures.device_vs_host(points, "step", ENDS, "NVIDIA H100")
    device = [t for t in fig.data if t.name.startswith("device")]
    assert [list(t.x) for t in device] == [[0, 3, 6], [5]]
    assert [list(t.y) for t in device] == [[450.0] * 3, [400.0]]
    assert all("markers" in t.mode for t in device)
    assert len(fig.data[0].x) == 7  # the host line keeps every step
