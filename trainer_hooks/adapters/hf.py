"""Goodput recording for the Hugging Face `Trainer`: `GoodputTrainerCallback`.

    cb = GoodputTrainerCallback(run_name="hf-a", sink=SpoolSink("spool/hf-a"))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    try:
        trainer.train()
    except BaseException as exc:
        cb.close(status="failed", cause=f"{type(exc).__name__}: {exc}")
        raise

The Trainer has no exception hook, hence the `except`: without it a crashed run sends no attempt
end, and the service dates the crash from the last record it got.

HF gives begin hooks only for training and steps, so the callback keeps one open "gap" from the
last thing that ended, and the hook that closes the gap names what it was:

- `startup` spans: the recorder's own, from the process start until the recorder (built in the
  callback's construction; rank and world size from torch.distributed or `RANK`/`WORLD_SIZE`,
  like any Recorder, unless passed) is ready; then the callback's, from there to
  `on_train_begin`: Trainer construction, dataloader and optimizer, accelerate's `prepare`, a
  checkpoint restore.
- one step record per optimizer step: `on_step_begin` -> `on_step_end`, all micro-batches of a
  gradient-accumulation step together, numbered by `state.global_step` at its begin.
- `data_stall` span: the gap closed by `on_step_begin`: from the previous step's end (or the
  epoch's start, or the end of an eval or a save) to this step's begin. HF fetches all of a
  step's micro-batches (and, at an epoch's start, builds the iterator) just before
  `on_step_begin`, so the step holds no data wait.
- `eval` span: the gap closed by `on_evaluate` during `train()`: from the step's end (or its
  log) to the end of `Trainer.evaluate`. HF has no hook before an evaluation, and
  `on_prediction_step` first fires after the first eval batch, so the step end is the start.
- `checkpoint_save` span and a `checkpoint` commit record: the gap closed by `on_save`, which HF
  calls after `_save_checkpoint` returned.
- loss: callbacks get no loss tensor. On a step HF logs (`control.should_log` at `on_step_end`)
  the step stays open until `on_log` and takes `logs["loss"]`: HF's mean loss since its previous
  log (a float, read after HF's own device sync, which that step's end then includes). Steps HF
  does not log carry no loss.
- tokens: `tokens_fn(args, state)` when given (callbacks never see the batch); else the step's
  growth of `state.num_input_tokens_seen` (`include_num_input_tokens_seen`; HF sums it over
  ranks, so it is divided by `args.world_size`); else, with `seq_len`, `seq_len *
  per_device_train_batch_size * gradient_accumulation_steps` (an estimate: a short last step
  counts as full); else 0.
- attempt end: `on_train_end` -> `completed`, once; a failure only through `close("failed")`.

Not captured: the time between an epoch's end and the next epoch's start beyond evals and saves
(left as `other`); evaluations and saves outside `train()`; on CUDA, device work of a step HF
does not log can finish inside the next gap; the partial step at a crash (the server derives
it); a second `train()` with the same callback (one callback, one attempt).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainer_hooks.adapters._common import (
    MAX_CAUSE_CHARS,
    SinkOrFactory,
    check_source,
    entered,
    guarded,
    resolve_sink,
)
from trainer_hooks.recorder import Recorder, SpanHandle, StepHandle

log = logging.getLogger("trainer_hooks.adapters.hf")

TokensFn = Callable[[TrainingArguments, TrainerState], int]


class GoodputTrainerCallback(TrainerCallback):
    """Records `Trainer.train()` into a `Recorder`; the module docstring says what is captured.

    Pass a ready `recorder`, or `run_name` and `sink` (a Sink, or a `rank -> Sink` factory,
    called with `rank` or else `RANK`) and the recorder is built now; `recorder_options` are
    further `Recorder` keyword arguments. Call `close(status="failed", cause=...)` when
    `train()` raises: HF has no exception hook.
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
        rank: int | None = None,
        world_size: int | None = None,
        attempt: int | None = None,
        recorder_options: dict[str, Any] | None = None,
        tokens_fn: TokensFn | None = None,
        seq_len: int | None = None,
        close_on_end: bool = True,
        flush_timeout_s: float = 10.0,
    ) -> None:
        check_source(recorder, run_name, sink)
        if recorder is None:
            assert sink is not None and run_name is not None
            sink_rank = rank if rank is not None else int(os.environ.get("RANK", "0"))
            recorder = Recorder(
                run_name=run_name,
                sink=resolve_sink(sink, sink_rank),
                project=project,
                model_plan=model_plan,
                runtime_policy=runtime_policy,
                environment=environment,
                run_id=run_id,
                rank=rank,
                world_size=world_size,
                attempt=attempt,
                **(recorder_options or {}),
            )
        self.recorder = recorder
        self.tokens_fn = tokens_fn
        self.seq_len = seq_len
        self.close_on_end = close_on_end
        self.flush_timeout_s = flush_timeout_s
        self._training = False
        self._step: StepHandle | None = None  # between on_step_begin and on_step_end
        self._pending: StepHandle | None = None  # ended, waiting for on_log's loss
        self._tokens_seen0 = 0
        self._last_step: int | None = None
        self._gap: SpanHandle | None = entered(recorder.span("startup"))

    def close(self, status: str = "completed", cause: str | None = None) -> Any:
        """End the attempt now (once; later calls do nothing); returns the sink's stats.
        Call it with `status="failed"` and a cause when `Trainer.train()` raises."""
        rec = self.recorder
        if rec.closed:
            return None
        self._flush_pending()
        self._step = self._gap = None  # an unfinished step is not a step
        self._training = False
        return rec.close(
            status=status,
            cause=cause[:MAX_CAUSE_CHARS] if cause else cause,
            flush_timeout_s=self.flush_timeout_s,
        )

    # -- HF hooks --
    @guarded
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self.recorder.closed:
            return
        self._training = True
        self._close_gap_as("startup")
        if kw.get("model") is not None:
            self.recorder.watch(kw["model"])  # MoE counters and dispatch/SDPA receipts
        self._mark()

    @guarded
    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._mark()  # drop HF's bookkeeping between epochs; time the next fetch from here

    @guarded
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if not self._live():
            return
        self._flush_pending()
        last = self._last_step
        number = state.global_step if last is None or state.global_step > last else last + 1
        self._close_gap_as("data_stall", step=number)
        self._step = entered(self.recorder.step(number))
        self._tokens_seen0 = state.num_input_tokens_seen

    @guarded
    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        step, self._step = self._step, None
        if step is None or not self._live():
            return
        step.tokens = self._step_tokens(args, state)
        self._last_step = step.step
        if control.should_log:  # HF logs right after this hook: take its loss in on_log
            self._pending = step
            return
        step.__exit__(None, None, None)
        self._mark()

    @guarded
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        step = self._pending
        if step is None:
            return  # eval metrics, end-of-training summary: no step waits for them
        loss = (logs or {}).get("loss")
        if isinstance(loss, int | float):
            step.loss = float(loss)
        self._flush_pending()

    @guarded
    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._training and self._live():
            self._flush_pending()
            self._close_gap_as("eval", step=self._last_step)
            self._mark()

    @guarded
    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        if self._training and self._live():
            self._flush_pending()
            self._close_gap_as("checkpoint_save", step=self._last_step)
            if self._last_step is not None:
                self.recorder.checkpoint_committed(self._last_step)
            self._mark()

    @guarded
    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._flush_pending()
        self._mark()

    @guarded
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self._flush_pending()
        self._gap = None
        self._training = False
        if self.close_on_end:
            self.close("completed")

    # -- internals --
    def _live(self) -> bool:
        return not self.recorder.closed

    def _hook_failed(self, where: str) -> None:
        log.debug("goodput HF hook %s failed", where, exc_info=True)
        self.recorder.errors += 1

    def _step_tokens(self, args: TrainingArguments, state: TrainerState) -> int:
        try:
            if self.tokens_fn is not None:
                return max(0, int(self.tokens_fn(args, state)))
            seen = int(state.num_input_tokens_seen) - int(self._tokens_seen0)
            if seen > 0:
                return seen // max(1, int(args.world_size))
            if self.seq_len:
                batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
                return int(self.seq_len * batch)
        except Exception:
            self._hook_failed("tokens")
        return 0

    def _flush_pending(self) -> None:
        """Send the step that waited for HF's log (from `on_log`, or from any later hook when
        HF did not log after all)."""
        step, self._pending = self._pending, None
        if step is not None:
            step.__exit__(None, None, None)
            self._mark()

    def _mark(self) -> None:
        """Something just ended: open a new gap; the hook that closes it names it."""
        if self._live():
            self._gap = entered(self.recorder.span("data_stall"))

    def _close_gap_as(self, category: str, step: int | None = None) -> None:
        gap, self._gap = self._gap, None
        if gap is not None:
            gap.category = category
            gap.step = step
            gap.__exit__(None, None, None)
