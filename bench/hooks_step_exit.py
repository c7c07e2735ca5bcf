"""Host time of the recorder's step exit alone, on CUDA, after a synchronize (so no launch
queue wait is charged), median over 25 steps, for three set-ups: the model watched (routing
every step over its E layers), watched without routing, and not watched at all.

    python3 bench/hooks_step_exit.py          # needs CUDA; the run in bench/results/hooks_parts.log
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from moe_core.config import ModelConfig
from moe_core.loop import TrainConfig, setup, train_step
from trainer_hooks import Recorder, SpoolSink


def main() -> None:
    mc = ModelConfig(
        pattern="AEAEAEAE",
        d_model=1024,
        seq_len=2048,
        num_experts=16,
        n_heads=16,
        ffn_hidden=2048,
        expert_hidden=1024,
    )
    cfg = TrainConfig(steps=100, batch_size=16, device="cuda", eval_every=0)
    st = setup(mc, cfg, "b", None, None)
    batches = st.corpus.batches("train", 16, 2048, seed=0)
    dev = torch.device("cuda")
    for label, kw in [("all", {}), ("no routing", {"routing_every": 10**9}), ("no watch", None)]:
        rec = Recorder(
            run_name="p",
            sink=SpoolSink(tempfile.mkdtemp(), None),
            environment={},
            heartbeat_s=0,
            device="cuda",
            **(kw or {}),
        )
        if kw is not None:
            rec.watch(st.raw_model)
        exits = []
        for step in range(30):
            x, y = (t.pin_memory().cuda(non_blocking=True) for t in next(batches))
            h = rec.step(step, tokens=x.numel())
            h.__enter__()
            loss = train_step(st, cfg, step, x, y, dev)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h.loss = loss
            h.__exit__(None, None, None)
            exits.append(time.perf_counter() - t0)
        print(label, "step exit median us", round(statistics.median(exits[5:]) * 1e6, 1))
        rec.close()


if __name__ == "__main__":
    main()
