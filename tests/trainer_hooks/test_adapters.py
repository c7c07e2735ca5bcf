"""The Lightning and Hugging Face adapters, driven by the real frameworks on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer_hooks import Recorder
from trainer_hooks.sink import to_payload

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no downloads
# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; not ours to fix here.
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`")

NUM_SAMPLES = 16
BATCH = 4
FEATURES = 4
NUM_BATCHES = NUM_SAMPLES // BATCH


class MemorySink:
    """Keeps what the recorder emits, as the recorder handed it over (tensors unread)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.closes = 0

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        self.records.append((kind, dict(fields)))

    def close(self, timeout_s: float = 10.0) -> None:
        self.closes += 1

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.records if k == kind]

    def spans(self, category: str) -> list[dict[str, Any]]:
        return [s for s in self.of("span") if s["category"] == category]


def assert_wire_valid(sink: MemorySink) -> None:
    for kind, fields in sink.records:
        to_payload(kind, fields)  # what the spool sink does on its thread; raises if invalid


def assert_disjoint(records: list[dict[str, Any]]) -> None:
    """No two intervals overlap: nothing is charged twice."""
    ordered = sorted(records, key=lambda r: r["start"])
    for a, b in zip(ordered, ordered[1:], strict=False):
        assert a["end"] <= b["start"], f"{a} overlaps {b}"


def assert_one_clean_end(sink: MemorySink, status: str) -> dict[str, Any]:
    assert len(sink.of("run")) == 1
    assert len(sink.of("attempt_start")) == 1
    (end,) = sink.of("attempt_end")
    assert end["status"] == status
    assert end["hook_errors"] == 0
    assert sink.closes == 1
    assert_wire_valid(sink)
    return end


# -- Lightning --


@pytest.fixture
def pl() -> Any:
    return pytest.importorskip("lightning.pytorch")


def make_module(pl: Any, fail_at_batch: int | None = None) -> Any:
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(NUM_SAMPLES, FEATURES, generator=gen),
        torch.randn(NUM_SAMPLES, 1, generator=gen),
    )

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(FEATURES, 1)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
            if batch_idx == fail_at_batch:
                raise RuntimeError(f"boom at batch {batch_idx}")
            xb, yb = batch
            return {"loss": torch.nn.functional.mse_loss(self.layer(xb), yb)}

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            xb, yb = batch
            torch.nn.functional.mse_loss(self.layer(xb), yb)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(TensorDataset(x, y), batch_size=BATCH)

        def val_dataloader(self) -> DataLoader[Any]:
            return DataLoader(TensorDataset(x, y), batch_size=BATCH)

    return Tiny()


def make_trainer(pl: Any, callbacks: list[Any], **kw: Any) -> Any:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 1,
        **kw,
    }
    return pl.Trainer(callbacks=callbacks, **options)


def lightning_callback(sink: MemorySink, **kw: Any) -> Any:
    from trainer_hooks.adapters.lightning import GoodputCallback

    return GoodputCallback(run_name="lit", sink=sink, environment={}, **kw)


def test_lightning_fit_records_every_batch_stall_and_eval_once(pl: Any) -> None:
    sink = MemorySink()
    make_trainer(pl, [lightning_callback(sink)]).fit(make_module(pl))

    assert_one_clean_end(sink, "completed")
    steps = sink.of("step")
    assert [s["step"] for s in steps] == list(range(NUM_BATCHES))
    assert all(s["tokens"] == BATCH * FEATURES for s in steps)
    assert all(isinstance(s["loss"], torch.Tensor) and not s["loss"].requires_grad for s in steps)
    stalls = sink.spans("data_stall")
    assert [s["step"] for s in stalls] == list(range(NUM_BATCHES))
    assert len(sink.spans("eval")) == 2  # the sanity check and the end-of-epoch validation
    assert sink.spans("startup")
    assert_disjoint(steps + sink.of("span"))
    assert sink.of("attempt_start")[0]["world_size"] == 1


def test_lightning_failure_ends_the_attempt_failed_with_its_cause(pl: Any) -> None:
    sink = MemorySink()
    trainer = make_trainer(pl, [lightning_callback(sink)])
    with pytest.raises(RuntimeError, match="boom at batch 2"):
        trainer.fit(make_module(pl, fail_at_batch=2))

    end = assert_one_clean_end(sink, "failed")
    assert end["cause"] == "RuntimeError: boom at batch 2"
    assert [s["step"] for s in sink.of("step")] == [0, 1]  # the crashed step is not a step
    assert "save_checkpoint" not in vars(trainer)


def test_lightning_accumulation_makes_one_step_per_optimizer_step(pl: Any) -> None:
    sink = MemorySink()
    trainer = make_trainer(pl, [lightning_callback(sink)], accumulate_grad_batches=2)
    trainer.fit(make_module(pl))

    assert_one_clean_end(sink, "completed")
    steps = sink.of("step")
    assert [s["step"] for s in steps] == [0, 1]
    assert all(s["tokens"] == 2 * BATCH * FEATURES for s in steps)
    assert all(isinstance(s["loss"], torch.Tensor) for s in steps)
    stalls = sink.spans("data_stall")
    assert len(stalls) == NUM_BATCHES
    inner = [s for s in stalls if any(t["start"] <= s["start"] <= t["end"] for t in steps)]
    assert len(inner) == 2  # the second micro-batch's fetch, inside its step
    assert_disjoint(sink.of("span"))


def test_lightning_hook_failures_are_counted_not_raised(pl: Any) -> None:
    def broken_tokens(batch: Any) -> int:
        raise KeyError("no tokens here")

    sink = MemorySink()
    make_trainer(pl, [lightning_callback(sink, tokens_fn=broken_tokens)]).fit(make_module(pl))

    (end,) = sink.of("attempt_end")
    assert end["status"] == "completed"
    assert end["hook_errors"] == NUM_BATCHES
    assert [s["tokens"] for s in sink.of("step")] == [0] * NUM_BATCHES


def test_lightning_checkpoint_saves_are_timed_and_committed(pl: Any, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from trainer_hooks.adapters.lightning import GoodputCallback

    sink = MemorySink()
    rec = Recorder(run_name="lit-ckpt", sink=sink, environment={})
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(pl, [GoodputCallback(rec), saver], enable_checkpointing=True)
    trainer.fit(make_module(pl))

    assert_one_clean_end(sink, "completed")
    assert len(list(tmp_path.glob("*.ckpt"))) == 2
    assert len(sink.spans("checkpoint_save")) == 2
    assert [(c["step"], c["ok"]) for c in sink.of("checkpoint")] == [(1, True), (3, True)]
    assert_disjoint(sink.of("step") + sink.of("span"))
    assert "save_checkpoint" not in vars(trainer)  # the trainer is handed back untouched


def test_lightning_callback_refuses_ambiguous_arguments(pl: Any) -> None:
    from trainer_hooks.adapters.lightning import GoodputCallback

    with pytest.raises(ValueError, match="run_name"):
        GoodputCallback(sink=MemorySink())
    rec = Recorder(run_name="x", sink=MemorySink(), environment={})
    with pytest.raises(ValueError, match="not both"):
        GoodputCallback(rec, run_name="x")


# -- Hugging Face --


@pytest.fixture
def hf() -> Any:
    return pytest.importorskip("transformers")


SEQ = 8
VOCAB = 50


def make_hf_trainer(
    hf: Any,
    out: Path,
    callback: Any,
    *,
    save: bool = False,
    count_tokens: bool = True,
    collate: Callable[[list[dict[str, torch.Tensor]]], Any] | None = None,
) -> Any:
    torch.manual_seed(0)
    config = hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ)
    ids = torch.randint(0, VOCAB, (NUM_SAMPLES, SEQ))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = hf.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        num_train_epochs=1,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        save_strategy="steps" if save else "no",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen=count_tokens,
        dataloader_num_workers=0,
    )
    return hf.Trainer(
        model=hf.GPT2LMHeadModel(config),
        args=args,
        train_dataset=data,
        eval_dataset=data[: 2 * BATCH],
        data_collator=collate or hf.default_data_collator,
        callbacks=[callback],
    )


def hf_callback(sink: MemorySink, **kw: Any) -> Any:
    from trainer_hooks.adapters.hf import GoodputTrainerCallback

    return GoodputTrainerCallback(run_name="hf", sink=sink, environment={}, **kw)


def test_hf_train_records_steps_logged_losses_stalls_and_evals(hf: Any, tmp_path: Path) -> None:
    sink = MemorySink()
    make_hf_trainer(hf, tmp_path, hf_callback(sink)).train()

    assert_one_clean_end(sink, "completed")
    steps = sink.of("step")
    assert [s["step"] for s in steps] == list(range(NUM_BATCHES))
    assert all(s["tokens"] == BATCH * SEQ for s in steps)
    logged = [s["step"] for s in steps if s["loss"] is not None]
    assert logged == [1, 3]  # logging_steps=2: HF logs after global steps 2 and 4
    assert all(isinstance(s["loss"], float) for s in steps if s["loss"] is not None)
    assert [s["step"] for s in sink.spans("data_stall")] == list(range(NUM_BATCHES))
    assert [s["step"] for s in sink.spans("eval")] == [1, 3]
    assert len(sink.spans("startup")) == 2  # the recorder's own, then the adapter's
    assert_disjoint(steps + sink.of("span"))


def test_hf_saves_are_timed_and_committed(hf: Any, tmp_path: Path) -> None:
    sink = MemorySink()
    make_hf_trainer(hf, tmp_path, hf_callback(sink), save=True).train()

    assert_one_clean_end(sink, "completed")
    assert len(list(tmp_path.glob("checkpoint-*"))) == 2
    assert [s["step"] for s in sink.spans("checkpoint_save")] == [1, 3]
    assert [(c["step"], c["ok"]) for c in sink.of("checkpoint")] == [(1, True), (3, True)]
    assert_disjoint(sink.of("step") + sink.of("span"))


def test_hf_failure_is_closed_by_the_caller_with_its_cause(hf: Any, tmp_path: Path) -> None:
    calls = iter(range(100))

    def collate(items: list[dict[str, torch.Tensor]]) -> Any:
        if next(calls) == 2:
            raise RuntimeError("bad batch 2")
        return hf.default_data_collator(items)

    sink = MemorySink()
    callback = hf_callback(sink, seq_len=SEQ)
    try:
        make_hf_trainer(hf, tmp_path, callback, collate=collate).train()
    except RuntimeError as exc:
        callback.close(status="failed", cause=f"{type(exc).__name__}: {exc}")
    callback.close(status="completed")  # a second close sends nothing

    end = assert_one_clean_end(sink, "failed")
    assert end["cause"] == "RuntimeError: bad batch 2"
    done = [s["step"] for s in sink.of("step")]  # accelerate fetches a batch ahead
    assert done == list(range(len(done))) and 0 < len(done) < NUM_BATCHES


def test_hf_tokens_fall_back_to_the_declared_sequence_length(hf: Any, tmp_path: Path) -> None:
    sink = MemorySink()
    declared = 10  # not SEQ, so the count visibly comes from the declaration
    callback = hf_callback(sink, seq_len=declared)
    make_hf_trainer(hf, tmp_path, callback, count_tokens=False).train()

    assert [s["tokens"] for s in sink.of("step")] == [BATCH * declared] * NUM_BATCHES


@pytest.fixture(autouse=True)
def _quiet_frameworks() -> Iterator[None]:
    import logging

    names = ("lightning.pytorch", "lightning.fabric", "transformers")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
