"""Goodput recording for Lightning: `GoodputCallback`.

    cb = GoodputCallback(run_name="lit-a", sink=SpoolSink("spool/lit-a"))
    L.Trainer(callbacks=[cb]).fit(model, datamodule)

What it records during `Trainer.fit` (host wall-clock times, like every recorder record):

- `startup` span: the callback's `setup` -> `on_train_start`: model to device, strategy wrapping,
  checkpoint restore, the dataloader iterators and the batch Lightning prefetches. The sanity
  check inside that window is an `eval` span, and startup is cut around it.
- one step record per optimizer step: `on_train_batch_start` -> `on_train_batch_end`, numbered
  by `trainer.global_step` at batch start (one more than the last number when the optimizer did
  not step in between, so numbers stay unique). With `accumulate_grad_batches > 1` (automatic
  optimization) the micro-batches of one optimizer step make one record: tokens summed, loss the
  sum of Lightning's normalised micro-batch losses (the step's mean). The loss is the detached
  `outputs["loss"]` tensor, never read on the training thread.
- `data_stall` span: previous batch end (or epoch start) -> this batch start: the dataloader's
  wait, plus the host-to-device copy and Lightning's per-batch bookkeeping between the hooks.
  Validation and checkpoint saves are cut out of it.
- `eval` span: `on_validation_start` -> `on_validation_end`.
- `checkpoint_save` span and a `checkpoint` commit record, by wrapping `trainer.save_checkpoint`
  on this trainer instance: Lightning has no hook after a save (`on_save_checkpoint` runs while
  the checkpoint dict is built, before anything is written). `time_checkpoints=False` leaves the
  trainer untouched and records no saves.
- attempt end: `on_exception` -> `failed` with the exception as cause; `on_train_end` (or
  `teardown`, when no training batch ran) -> `completed`. Sent once.

Not captured: time before `setup` (process start, distributed init, model and Trainer
construction) unless you pass a `Recorder` you built and time that yourself; on CUDA, kernels
still queued at `on_train_batch_end` finish at the next sync (often Lightning moving logged
metrics to the host), so that device time can land in the next `data_stall` span; saves that
bypass `trainer.save_checkpoint`; with an asynchronous `CheckpointIO`, the span is the blocking
hand-off and the commit record means "handed off", not "durable"; the partial step at a crash
(the server derives it); `validate`/`test`/`predict` runs, except `eval` spans on a recorder
you passed in.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from trainer_hooks.adapters._common import (
    MAX_CAUSE_CHARS,
    SinkOrFactory,
    check_source,
    entered,
    guarded,
    resolve_sink,
)
from trainer_hooks.recorder import Recorder, SpanHandle, StepHandle

log = logging.getLogger("trainer_hooks.adapters.lightning")


def first_tensor_numel(batch: Any) -> int:
    """The default `tokens_fn`: numel of the first tensor in the batch (depth first), else 0."""
    found = _first_tensor(batch)
    return 0 if found is None else found.numel()


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    items = (
        obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, list | tuple) else ()
    )
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _loss_tensor(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, torch.Tensor) else None  # detach: no device sync


class GoodputCallback(Callback):
    """Records `Trainer.fit` into a `Recorder`; the module docstring says what is captured.

    Pass a ready `recorder`, or `run_name` and `sink` (a Sink, or a `rank -> Sink` factory for
    multi-process runs and spawn-based strategies) and the callback builds the recorder in
    `setup` with `trainer.global_rank` and `trainer.world_size`; a built recorder lives for one
    `fit`; `recorder_options` are further `Recorder` keyword arguments. `tokens_fn(batch)`
    counts a batch's tokens (default: `first_tensor_numel`).
    `close_on_end=False` keeps a recorder you passed open after a completed fit; a failed fit
    always closes it.
    """

    def __init__(
        self,
        recorder: Recorder | None = None,
        *,
        run_name: str | None = None,
        sink: SinkOrFactory | None = None,
        project: str = "default",
        model_plan: dict[str, Any] | None = None,
        runtime_policy: dict[str, Any] | None = None,
        environment: dict[str, Any] | None = None,
        run_id: str | None = None,
        attempt: int | None = None,
        recorder_options: dict[str, Any] | None = None,
        tokens_fn: Callable[[Any], int] | None = None,
        time_checkpoints: bool = True,
        close_on_end: bool = True,
        flush_timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        check_source(recorder, run_name, sink)
        self._rec = recorder
        self._sink = sink
        self._spec: dict[str, Any] = {
            **(recorder_options or {}),
            "run_name": run_name,
            "project": project,
            "model_plan": model_plan,
            "runtime_policy": runtime_policy,
            "environment": environment,
            "run_id": run_id,
            "attempt": attempt,
        }
        self.tokens_fn = tokens_fn or first_tensor_numel
        self.time_checkpoints = time_checkpoints
        self.close_on_end = close_on_end
        self.flush_timeout_s = flush_timeout_s
        self._wrapper: Callable[..., Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._gap: SpanHandle | None = None  # open startup or data_stall span
        self._eval: SpanHandle | None = None
        self._eval_resume: str | None = None
        self._step: StepHandle | None = None
        self._step_gs = 0  # trainer.global_step when the open step began
        self._last_step: int | None = None

    @property
    def recorder(self) -> Recorder | None:
        """The recorder in use; None before `setup` when the callback builds it."""
        return self._rec

    def close(self, status: str = "completed", cause: str | None = None) -> Any:
        """End the attempt now (once; later calls do nothing); returns the sink's stats."""
        rec = self._live()
        if rec is None:
            return None
        self._gap = self._step = None  # an unfinished step is not a step
        self._end_eval()
        cause = cause[:MAX_CAUSE_CHARS] if cause else cause
        return rec.close(status=status, cause=cause, flush_timeout_s=self.flush_timeout_s)

    # -- Lightning hooks --
    @guarded
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._rec is None or (self._sink is not None and self._rec.closed):
            self._build(trainer)
        self._reset()
        if self.time_checkpoints:
            self._wrap_save(trainer)
        self._open_gap("startup")

    @guarded
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_gap(emit=True)
        rec = self._live()
        if rec is not None:
            rec.watch(pl_module)  # MoE counters and dispatch/SDPA receipts, if any

    @guarded
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_gap(emit=False)
        self._open_gap("data_stall")

    @guarded
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rec = self._live()
        if rec is None:
            return
        if self._step is not None:  # the next micro-batch of an accumulating step
            self._close_gap(emit=True, step=self._step.step)
            self._step.tokens += self._tokens(batch)
            return
        number = self._next_number(trainer.global_step)
        self._close_gap(emit=True, step=number)
        self._step = entered(rec.step(number, tokens=self._tokens(batch)))
        self._step_gs = trainer.global_step

    @guarded
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._step
        if step is None or self._live() is None:
            return
        loss = _loss_tensor(outputs)
        if loss is not None:
            step.loss = loss if step.loss is None else step.loss + loss
        if not self._accumulating(trainer, pl_module):
            self._finish_step()
        self._open_gap("data_stall")

    @guarded
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_gap(emit=False)
        self._step = None  # a batch that never ended (`on_train_batch_start` returned -1)

    @guarded
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rec = self._live()
        if rec is None or self._eval is not None:
            return
        self._eval_resume = self._pause()
        self._eval = entered(rec.span("eval", step=self._last_step))

    @guarded
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_eval()
        self._resume(self._eval_resume)
        self._eval_resume = None

    @guarded
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = None
        self._close_gap(emit=False)
        if self.close_on_end:
            self.close("completed")

    @guarded
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap_save(trainer)
        if self.close_on_end:
            self.close("completed")

    @guarded
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unwrap_save(trainer)
        if self._rec is None and trainer.state.fn == "fit":  # failed before our setup ran
            self._build(trainer)
        step, self._step = self._step, None
        if step is not None:  # the recorder drops a failed step (and notes an OOM)
            step.__exit__(type(exception), exception, exception.__traceback__)
        self.close("failed", cause=f"{type(exception).__name__}: {exception}")

    # -- internals --
    def _live(self) -> Recorder | None:
        rec = self._rec
        return rec if rec is not None and not rec.closed else None

    def _build(self, trainer: pl.Trainer) -> None:
        assert self._sink is not None, "check_source guarantees a sink without a recorder"
        rank = trainer.global_rank
        self._rec = Recorder(
            sink=resolve_sink(self._sink, rank),
            rank=rank,
            world_size=trainer.world_size,
            **self._spec,
        )

    def _hook_failed(self, where: str) -> None:
        log.debug("goodput lightning hook %s failed", where, exc_info=True)
        if self._rec is not None:
            self._rec.errors += 1

    def _tokens(self, batch: Any) -> int:
        try:
            return max(0, int(self.tokens_fn(batch)))
        except Exception:
            self._hook_failed("tokens_fn")
            return 0

    def _next_number(self, global_step: int) -> int:
        last = self._last_step
        return global_step if last is None or global_step > last else last + 1

    def _accumulating(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """True while the optimizer has not stepped within a gradient-accumulation window."""
        return (
            pl_module.automatic_optimization
            and trainer.accumulate_grad_batches > 1
            and trainer.global_step == self._step_gs
        )

    def _finish_step(self) -> None:
        step, self._step = self._step, None
        if step is not None:
            step.__exit__(None, None, None)
            self._last_step = step.step

    def _open_gap(self, category: str) -> None:
        rec = self._live()
        if rec is not None:
            self._close_gap(emit=False)
            self._gap = entered(rec.span(category))

    def _close_gap(self, emit: bool, step: int | None = None) -> None:
        gap, self._gap = self._gap, None
        if gap is not None and emit:
            gap.step = step
            gap.__exit__(None, None, None)

    def _pause(self) -> str | None:
        """Cut the open gap before an eval or a save: startup so far is sent; a data_stall so
        far is dropped (that time went to Lightning's bookkeeping, not to waiting for data).
        Returns the category to resume afterwards."""
        gap = self._gap
        if gap is None:
            return None
        self._close_gap(emit=gap.category == "startup")
        return gap.category

    def _resume(self, category: str | None) -> None:
        if category is not None and self._gap is None:
            self._open_gap(category)

    def _end_eval(self) -> None:
        span, self._eval = self._eval, None
        if span is not None:
            span.__exit__(None, None, None)

    # -- checkpoint saves --
    def _wrap_save(self, trainer: pl.Trainer) -> None:
        if self._wrapper is not None and vars(trainer).get("save_checkpoint") is self._wrapper:
            return
        original = trainer.save_checkpoint

        @functools.wraps(original)
        def save_checkpoint(*args: Any, **kwargs: Any) -> None:
            ticket = self._begin_save()
            ok = False
            try:
                original(*args, **kwargs)
                ok = True
            finally:
                self._end_save(ticket, ok)

        self._wrapper = save_checkpoint
        setattr(trainer, "save_checkpoint", save_checkpoint)  # noqa: B010 (mypy: method-assign)

    def _unwrap_save(self, trainer: pl.Trainer) -> None:
        if self._wrapper is not None and vars(trainer).get("save_checkpoint") is self._wrapper:
            del vars(trainer)["save_checkpoint"]
        self._wrapper = None

    def _begin_save(self) -> tuple[SpanHandle, str | None] | None:
        rec = self._live()
        if rec is None:
            return None
        try:
            resume = self._pause()
            return entered(rec.span("checkpoint_save", step=self._last_step)), resume
        except Exception:
            self._hook_failed("save_checkpoint")
            return None

    def _end_save(self, ticket: tuple[SpanHandle, str | None] | None, ok: bool) -> None:
        if ticket is None or self._rec is None:
            return
        try:
            span, resume = ticket
            span.__exit__(None, None, None)
            if self._last_step is not None:
                self._rec.checkpoint_committed(self._last_step, ok=ok)
            self._resume(resume)
        except Exception:
            self._hook_failed("save_checkpoint")
