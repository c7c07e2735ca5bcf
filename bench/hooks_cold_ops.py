"""Why one hook operation costs a few microseconds alone and several times that at a step's
end: the first torch call after heavy work runs with cold caches, whoever makes it.

    python bench/hooks_cold_ops.py          # CPU; the run in bench/results/hooks_cold_ops_cpu.log

A 512x512 matmul stands in for the training step. Each line is the median over 100 rounds of
the timed call made right after it (after a given warm-up call in between, where named):
`torch.cat` of 12 routing-counter vectors (the hooks' one operation per step on CPU) costs
tens of microseconds straight after the matmul and a few when another torch call went first,
so in a loop without hooks that cost moves to the training's next call instead of vanishing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def main() -> None:
    bufs = [torch.zeros(2 * 128 + 4, dtype=torch.float64) for _ in range(12)]
    a = torch.randn(512, 512)

    def after(fn: Callable[[], object], pre: Callable[[], object], n: int = 100) -> float:
        out = []
        for _ in range(n):
            a @ a
            pre()
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out) * 1e6

    def warm(fn: Callable[[], object], n: int = 100) -> float:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out) * 1e6

    def cat() -> torch.Tensor:
        return torch.cat(bufs)

    def nothing() -> None:
        return None

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [
        ("cat, warm (in a tight loop)", warm(cat)),
        ("cat right after the matmul", after(cat, nothing)),
        ("cat after the matmul and a 1 ms sleep", after(cat, lambda: time.sleep(0.001))),
        ("cat after the matmul and another cat", after(cat, cat)),
        ("cat after the matmul and an add", after(cat, lambda: bufs[0].add(1))),
        (
            "12 x data_ptr() right after the matmul",
            after(lambda: [b.data_ptr() for b in bufs], nothing),
        ),
        ("a dict copy right after the matmul", after(lambda: {"a": 1}.copy(), nothing)),
    ]
    for label, us in rows:
        print(f"{label:42s} {us:8.1f} us")


if __name__ == "__main__":
    main()
