"""What the framework adapters share: building blocks only, no framework import."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar, cast

from trainer_hooks.recorder import Recorder, Sink, SpanHandle, StepHandle

MAX_CAUSE_CHARS = 2000  # the wire contract's limit on `cause`
SinkOrFactory = Sink | Callable[[int], Sink]


class _Adapter(Protocol):
    def _hook_failed(self, where: str) -> None: ...


_P = ParamSpec("_P")
_C = TypeVar("_C", bound=_Adapter)
_H = TypeVar("_H", SpanHandle, StepHandle)


def entered(handle: _H) -> _H:
    """A step or span handle, entered now (frameworks split enter and exit over two hooks)."""
    handle.__enter__()
    return handle


def guarded(hook: Callable[Concatenate[_C, _P], None]) -> Callable[Concatenate[_C, _P], None]:
    """A hook that never raises into training: its failure is counted in `hook_errors`."""

    @functools.wraps(hook)
    def run(self: _C, *args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:
            self._hook_failed(hook.__name__)

    return run


def check_source(recorder: Recorder | None, run_name: str | None, sink: object) -> None:
    """Either a ready recorder or what builds one; ValueError names what is missing."""
    if recorder is not None and (run_name is not None or sink is not None):
        raise ValueError("pass either recorder= or run_name= and sink=, not both")
    if recorder is None and (not run_name or sink is None):
        raise ValueError(
            f"without recorder=, run_name and sink are required (run_name={run_name!r}, "
            f"sink={sink!r})"
        )


def resolve_sink(sink: SinkOrFactory, rank: int) -> Sink:
    """A sink, or a `rank -> Sink` factory (each rank of a multi-process run needs its own)."""
    if callable(getattr(sink, "emit", None)):
        return cast(Sink, sink)
    return cast(Callable[[int], Sink], sink)(rank)
