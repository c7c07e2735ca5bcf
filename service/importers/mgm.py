"""Map the log entries of Google's ml-goodput-measurement library onto wire-contract records.

Pure: text in, records out, no I/O. The mapping (README, "Importing ml-goodput-measurement
logs", has it as a table):

- one run per import: `run_id` = `mgm-` + a hash of the job name and the first
  `job_start_time`, so importing the same log again stores nothing twice;
- each `job_start_time` begins an attempt (0, 1, ...) of rank 0. A `job_end_time` completes it.
  A later `job_start_time` (or a step count logged again without one: the library counts that
  as a disruption too) fails it with cause "restarted", ending it when it was last seen: its
  last entry, as the library charges the time from there to the restart to infrastructure
  recovery. An attempt with neither stays open (a heartbeat marks when it was last seen);
- `step_start_time` + `step_count` is a step (tokens 0: the log does not say) that ends at the
  next step's start, or at `job_end_time` for the last step of a completed attempt. The last
  step of a failed or open attempt has no known end: it is not imported (its time counts as
  the crash's wasted progress);
- when attempt k+1 resumes at step N > 0, the library's own rule (progress up to N - 1 was
  preserved) becomes a checkpoint commit of step N - 1 in attempt k;
- spans: `tpu_init_*` and `training_prep_*` -> `startup`, `data_loading_*` -> `data_stall`,
  `custom_badput_event_*` of type T -> `custom:<t>` (lower case, characters outside
  `[A-Za-z0-9_.-]` replaced by `_`), Orbax checkpoint-manager entries (`event_type` `save`,
  `restore`, `emergency_restore`) -> `checkpoint_save` / `checkpoint_restore` spans of their
  blocking duration. All are blocking, as the library charges them all as badput.

Entries it does not recognise, or cannot place, are counted in `ignored` and explained in
`warnings`. Entries of the wrong type raise `MgmFormatError`, naming the entry and the key
(`index.3.step_count`, `line.7.jsonPayload.job_name`); a log that cannot be read names where
it stops (`index.3` of a JSON array, `line.7`), a log that lacks something whole names the
body (`body`: empty, no entries, no job_start_time). `entry_errors` names the errors of
storing the records (a date past the server's clock, say) by the entry each record's time
came from.

An import never merges silently into a run already stored under its id (`check_stored`,
given what the route read of that run): a record that contradicts a stored one of the same
natural key, or a run name other than the stored one, raises `ImportConflict` (a 409) before
anything is stored. The same log again, or a longer one (the job ran on), agrees with what is
stored and lands on the run; `existing_run_warning` says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

from pydantic import ValidationError

from trainer_hooks.records import (
    MAX_COUNT,
    AttemptEndRecord,
    AttemptStartRecord,
    CheckpointRecord,
    HeartbeatRecord,
    Record,
    RunRecord,
    SpanRecord,
    StepRecord,
)

PROJECT = "ml-goodput-import"
SOURCE = "ml-goodput-measurement"
MAX_WARNINGS = 50
_MIN_EPOCH = 946_684_800.0
_MAX_EPOCH = 7_258_118_400.0

# (prefix of `<prefix>_start_time` / `<prefix>_end_time`, our category)
PAIRED_SPANS: dict[str, str] = {
    "tpu_init": "startup",
    "training_prep": "startup",
    "data_loading": "data_stall",
}
CUSTOM_TYPE = "custom_badput_event_type"
CUSTOM_START = "custom_badput_event_start_time"
CUSTOM_END = "custom_badput_event_end_time"
# Orbax checkpoint-manager entries: event_type -> (category, start key, duration key)
CHECKPOINT_EVENTS: dict[str, tuple[str, str, str]] = {
    "save": (
        "checkpoint_save",
        "checkpoint_manager_blocking_start_time",
        "checkpoint_manager_blocking_duration_secs",
    ),
    "restore": (
        "checkpoint_restore",
        "checkpoint_manager_start_time",
        "checkpoint_manager_duration_secs",
    ),
    "emergency_restore": (
        "checkpoint_restore",
        "checkpoint_manager_start_time",
        "checkpoint_manager_duration_secs",
    ),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


MAX_IMPORT_ENTRIES = 1_000_000  # entries of one import (the body limit usually comes first)


class ImportTooLarge(ValueError):
    """More entries than one import takes (a 413 naming the limit)."""


class MgmFormatError(ValueError):
    """The log cannot be read; `errors` is in FastAPI's validation-error shape."""

    def __init__(self, loc: list[Any], msg: str) -> None:
        super().__init__(msg)
        self.errors = [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]


@dataclass(frozen=True)
class Event:
    """One recognised entry: `kind` is job_start, job_end, step, open, close or span."""

    where: str
    index: int
    time: float
    kind: str
    job: str | None = None
    step: int = 0
    key: str = ""  # open/close: which pair; span: unused
    category: str = ""
    end: float = 0.0  # span (Orbax): its end
    source: str = ""  # the entry's key holding `time`
    end_source: str = ""  # span (Orbax): the key `end` comes from

    @property
    def name(self) -> str:
        return f"{self.where} {self.index}"


@dataclass
class Mapped:
    run_id: str
    records: list[Record]
    ignored: int
    warnings: list[str]
    name: str = ""  # the run's name: run_name, else the job name
    job: str | None = None
    first_start: float = 0.0
    events: list[Event] = field(default_factory=list)  # what the records were made of


# ---------------------------------------------------------------- reading the body


def split_entries(text: str) -> tuple[str, list[tuple[int, Any]]]:
    """A JSON array ("index", 0-based) or JSON lines ("line", 1-based; blank lines skipped)."""
    stripped = text.strip()
    if not stripped:
        raise MgmFormatError([], "the log is empty")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            _locate_array_error(text, len(text) - len(text.lstrip()))
        return "index", list(enumerate(items))
    out: list[tuple[int, Any]] = []
    # Lines end at \n, \r\n or \r only: str.splitlines also splits at U+0085, U+2028 and
    # U+2029, which JSON strings may hold as they are.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append((n, json.loads(line, parse_constant=_no_constant)))
            except ValueError as exc:
                raise MgmFormatError(["line", n], f"line {n} is not JSON: {exc}") from exc
            except RecursionError as exc:
                msg = f"line {n} is nested too deeply to read"
                raise MgmFormatError(["line", n], msg) from exc
    return "line", out


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _locate_array_error(text: str, start: int) -> NoReturn:
    """Raise the MgmFormatError of the JSON array at text[start] that `json.loads` refused,
    naming the entry where it fails: the array is read again one entry at a time (only when
    it is broken, so that a good log is read at `json.loads`'s speed)."""
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    pos = _skip_space(text, start + 1)  # text[start] is "["
    index = 0
    closed = text.startswith("]", pos)
    pos += closed
    while not closed:
        if pos >= len(text):
            msg = f"index {index}: the JSON array is cut short before it"
            raise MgmFormatError(["index", index], msg)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except RecursionError as exc:
            msg = f"index {index} is nested too deeply to read"
            raise MgmFormatError(["index", index], msg) from exc
        except ValueError as exc:
            raise MgmFormatError(["index", index], f"index {index} is not JSON: {exc}") from exc
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif text.startswith("]", pos):
            pos, closed = pos + 1, True
        elif pos >= len(text):
            msg = f"index {index}: the JSON array is cut short after it (no closing ']')"
            raise MgmFormatError(["index", index], msg)
        else:
            line, column = _position(text, pos)
            msg = f"index {index + 1}: expected ',' or ']' after index {index}"
            msg += f" (line {line} column {column})"
            raise MgmFormatError(["index", index + 1], msg)
        index += 1
    pos = _skip_space(text, pos)
    line, column = _position(text, pos)
    if not text[pos:].strip():  # json.loads refused what reads well here: name the body
        raise MgmFormatError([], "malformed JSON array")
    msg = f"line {line}: data after the JSON array's closing bracket (column {column})"
    raise MgmFormatError(["line", line], msg)


def _skip_space(text: str, pos: int) -> int:
    """The position of the first character at or after `pos` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _position(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of text[pos]."""
    line_start = text.rfind("\n", 0, pos) + 1
    return text.count("\n", 0, pos) + 1, pos - line_start + 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _fail(where: str, index: int, key: str, msg: str) -> MgmFormatError:
    return MgmFormatError([where, index, key], f"{where} {index}, key {key!r}: {msg}")


def _number(where: str, index: int, entry: dict[str, Any], key: str) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, index, key, f"expected a number, got {_shown(value)}")
    try:
        number = float(value)  # an int past 1.8e308 overflows
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _fail(where, index, key, f"expected a finite number, got {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    """The value as the message shows it: short, whatever it is."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _epoch(where: str, index: int, entry: dict[str, Any], key: str) -> float:
    value = _number(where, index, entry, key)
    if not _MIN_EPOCH <= value <= _MAX_EPOCH:
        raise _fail(where, index, key, f"{value} is not seconds since the epoch (2000..2200)")
    return value


def _count(where: str, index: int, entry: dict[str, Any], key: str) -> int:
    value = _number(where, index, entry, key)  # a float: an int past 2^53 is compared exact
    exact = entry[key] if isinstance(entry[key], int) else value
    if value != int(value) or not 0 <= exact <= MAX_COUNT:
        raise _fail(
            where, index, key, f"expected a whole number from 0 to 2^53, got {_shown(entry[key])}"
        )
    return int(exact)


def _text(where: str, index: int, entry: dict[str, Any], key: str) -> str:
    value = entry[key]
    if not isinstance(value, str):
        raise _fail(where, index, key, f"expected a string, got {_shown(value)}")
    if "\x00" in value:
        raise _fail(where, index, key, "must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _fail(where, index, key, "must be valid UTF-8 (no lone surrogates)") from exc
    return value


def custom_category(event_type: str) -> str:
    """`custom:<type>`: lower case (the library aggregates types case-insensitively),
    characters the contract refuses replaced by `_`, at most 64 characters."""
    name = _UNSAFE.sub("_", event_type.strip().lower())[:64]
    return f"custom:{name or 'unknown'}"


def read_entry(where: str, index: int, raw: Any) -> Event | None:
    """The entry as an Event; None when no known key is in it."""
    if not isinstance(raw, dict):
        raise MgmFormatError([where, index], f"{where} {index}: expected a JSON object")
    entry = raw.get("jsonPayload", raw)  # a Cloud Logging export wraps the entry
    if not isinstance(entry, dict):
        raise _fail(where, index, "jsonPayload", "expected a JSON object")
    try:
        job = _text(where, index, entry, "job_name") if "job_name" in entry else None
        event = _job_or_step(where, index, entry) or _span_event(where, index, entry)
    except MgmFormatError as exc:
        if entry is not raw:  # the key is in the wrapper: name it (index.3.jsonPayload.x)
            for err in exc.errors:
                err["loc"] = [*err["loc"][:3], "jsonPayload", *err["loc"][3:]]
        raise
    if event is None:
        return None
    return replace(event, job=job)


def _job_or_step(where: str, i: int, entry: dict[str, Any]) -> Event | None:
    for key, kind in (("job_start_time", "job_start"), ("job_end_time", "job_end")):
        if key in entry:
            return Event(where, i, _epoch(where, i, entry, key), kind, source=key)
    if "step_start_time" in entry:
        if "step_count" not in entry:
            raise _fail(where, i, "step_count", "missing beside step_start_time")
        step = _count(where, i, entry, "step_count")
        t = _epoch(where, i, entry, "step_start_time")
        return Event(where, i, t, "step", step=step, source="step_start_time")
    return None


def _span_event(where: str, i: int, entry: dict[str, Any]) -> Event | None:
    for prefix, category in PAIRED_SPANS.items():
        for edge, kind in (("start", "open"), ("end", "close")):
            key = f"{prefix}_{edge}_time"
            if key in entry:
                t = _epoch(where, i, entry, key)
                return Event(where, i, t, kind, key=prefix, category=category, source=key)
    if CUSTOM_START in entry or CUSTOM_END in entry:
        kind, key = ("open", CUSTOM_START) if CUSTOM_START in entry else ("close", CUSTOM_END)
        event_type = _text(where, i, entry, CUSTOM_TYPE) if CUSTOM_TYPE in entry else "unknown"
        category = custom_category(event_type)
        t = _epoch(where, i, entry, key)
        return Event(where, i, t, kind, key=category, category=category, source=key)
    return _checkpoint_event(where, i, entry)


def _checkpoint_event(where: str, i: int, entry: dict[str, Any]) -> Event | None:
    spec = CHECKPOINT_EVENTS.get(entry.get("event_type"))  # type: ignore[arg-type]
    if spec is None or spec[1] not in entry or spec[2] not in entry:
        return None
    category, start_key, duration_key = spec
    start = _epoch(where, i, entry, start_key)
    duration = _number(where, i, entry, duration_key)
    if duration < 0:
        raise _fail(where, i, duration_key, f"a duration cannot be negative ({duration})")
    if start + duration > _MAX_EPOCH:
        raise _fail(where, i, duration_key, f"{duration} s ends after the year 2200")
    return Event(
        where,
        i,
        start,
        "span",
        category=category,
        end=start + duration,
        source=start_key,
        end_source=duration_key,
    )


# ---------------------------------------------------------------- attempts


Status = Literal["completed", "failed"]


@dataclass
class Attempt:
    number: int
    start: float
    last_seen: float
    steps: list[tuple[int, float]] = field(default_factory=list)
    step_numbers: set[int] = field(default_factory=set)  # of `steps`, to find a repeat at once
    spans: list[tuple[str, float, float]] = field(default_factory=list)
    open_spans: dict[str, Event] = field(default_factory=dict)
    end: float | None = None
    status: Status | None = None
    cause: str | None = None


@dataclass
class _State:
    attempts: list[Attempt] = field(default_factory=list)
    ignored: int = 0
    warnings: list[str] = field(default_factory=list)

    def ignore(self, msg: str, n: int = 1) -> None:
        self.ignored += n
        self.warnings.append(msg)

    @property
    def current(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].end is None:
            return self.attempts[-1]
        return None


def _begin(state: _State, t: float) -> Attempt:
    attempt = Attempt(number=len(state.attempts), start=t, last_seen=t)
    state.attempts.append(attempt)
    return attempt


def _close(state: _State, a: Attempt, end: float, status: Status, cause: str | None) -> None:
    for ev in a.open_spans.values():
        state.ignore(f"{ev.name}: {ev.key} started but never ended in attempt {a.number}")
    a.open_spans.clear()
    a.end, a.status, a.cause = end, status, cause


def _fail_current(state: _State, cause: str) -> None:
    a = state.current
    if a is not None:
        _close(state, a, a.last_seen, "failed", cause)


def _apply(state: _State, ev: Event) -> None:
    if ev.kind == "job_start":
        _fail_current(state, "restarted")
        _begin(state, ev.time)
        return
    a = state.current
    if a is None:
        when = "before the first job_start_time" if not state.attempts else "after job_end_time"
        state.ignore(f"{ev.name}: {ev.kind} entry {when} (no attempt to put it in)")
        return
    if ev.kind == "step" and ev.step in a.step_numbers:
        _fail_current(state, f"restarted (step {ev.step} logged again, no job_start_time)")
        a = _begin(state, ev.time)
    a.last_seen = max(a.last_seen, ev.end if ev.kind == "span" else ev.time)
    _place(state, a, ev)


def _place(state: _State, a: Attempt, ev: Event) -> None:
    if ev.kind == "job_end":
        _close(state, a, ev.time, "completed", None)
    elif ev.kind == "step":
        a.steps.append((ev.step, ev.time))
        a.step_numbers.add(ev.step)
    elif ev.kind == "span":
        a.spans.append((ev.category, ev.time, ev.end))
    elif ev.kind == "open":
        if ev.key in a.open_spans:
            old = a.open_spans[ev.key]
            state.ignore(f"{old.name}: {ev.key} started again at {ev.name} before it ended")
        a.open_spans[ev.key] = ev
    else:
        opened = a.open_spans.pop(ev.key, None)
        if opened is None:
            state.ignore(f"{ev.name}: {ev.key} ended but never started in attempt {a.number}")
        else:
            a.spans.append((ev.category, opened.time, ev.time))


def _order(ev: Event) -> tuple[float, int, int]:
    """By time; at the same time a job starts before, and ends after, anything else."""
    return ev.time, {"job_start": 0, "job_end": 2}.get(ev.kind, 1), ev.index


def build_attempts(events: list[Event]) -> _State:
    """Split the time-ordered events into attempts."""
    state = _State()
    for ev in sorted(events, key=_order):
        _apply(state, ev)
    a = state.current
    if a is not None:
        for ev in a.open_spans.values():
            state.ignore(f"{ev.name}: {ev.key} started but the log ends before it ended")
        a.open_spans.clear()
    return state


# ---------------------------------------------------------------- records


def run_id_of(job: str, first_start: float) -> str:
    digest = hashlib.sha256(f"{job}\n{first_start!r}".encode()).hexdigest()
    return f"mgm-{digest[:32]}"


def _step(run_id: str, attempt: int, step: int, start: float, end: float) -> Record:
    fields = {"run_id": run_id, "attempt": attempt, "step": step, "start": start, "end": end}
    return StepRecord.model_validate(fields)  # tokens 0: the log does not say


def _step_records(run_id: str, a: Attempt, state: _State) -> list[Record]:
    out: list[Record] = []
    for (step, start), (_, end) in zip(a.steps, a.steps[1:], strict=False):
        out.append(_step(run_id, a.number, step, start, end))
    if not a.steps:
        return out
    step, start = a.steps[-1]
    if a.status == "completed" and a.end is not None:
        out.append(_step(run_id, a.number, step, start, a.end))
    else:
        why = "failed" if a.status == "failed" else "has no end in the log"
        state.ignore(f"step {step} (attempt {a.number}): its end is unknown, the attempt {why}")
    return out


def _span_records(run_id: str, a: Attempt, state: _State) -> list[Record]:
    """One span per (category, start): the contract's natural key."""
    seen: dict[tuple[str, float], float] = {}
    for category, start, end in a.spans:
        if (category, start) in seen:
            state.ignore(f"a second {category} span starting at {start} in attempt {a.number}")
        else:
            seen[(category, start)] = end
    return [
        SpanRecord(run_id=run_id, attempt=a.number, category=c, start=s, end=e)
        for (c, s), e in seen.items()
    ]


def _attempt_records(run_id: str, a: Attempt, state: _State) -> list[Record]:
    out: list[Record] = [AttemptStartRecord(run_id=run_id, attempt=a.number, start=a.start)]
    out += _step_records(run_id, a, state)
    out += _span_records(run_id, a, state)
    if a.end is not None and a.status is not None:
        out.append(
            AttemptEndRecord(
                run_id=run_id, attempt=a.number, end=a.end, status=a.status, cause=a.cause
            )
        )
    else:
        out.append(HeartbeatRecord(run_id=run_id, attempt=a.number, time=a.last_seen))
    return out


def _inferred_checkpoints(run_id: str, attempts: list[Attempt]) -> list[Record]:
    """Attempt k+1 resuming at step N > 0 means steps up to N - 1 of attempt k were kept."""
    out: list[Record] = []
    for a, nxt in zip(attempts, attempts[1:], strict=False):
        if a.status == "failed" and a.end is not None and nxt.steps and nxt.steps[0][0] > 0:
            out.append(
                CheckpointRecord(
                    run_id=run_id, attempt=a.number, step=nxt.steps[0][0] - 1, time=a.end
                )
            )
    return out


def _job_name(events: list[Event], state: _State) -> tuple[str | None, list[Event]]:
    """The first job name seen; entries of any other job are ignored."""
    names = [e.job for e in events if e.job is not None]
    job = names[0] if names else None
    others = Counter(e.job for e in events if e.job is not None and e.job != job)
    for name, n in others.items():
        state.ignore(f"{n} entries of job {name!r} ignored: one job per import", n)
    return job, [e for e in events if e.job is None or e.job == job]


def map_log(text: str, run_name: str | None = None) -> Mapped:
    """The records of one import; raises MgmFormatError for an unreadable log."""
    where, raw = split_entries(text)
    if len(raw) > MAX_IMPORT_ENTRIES:
        raise ImportTooLarge(
            f"the log has {len(raw)} entries; one import takes at most {MAX_IMPORT_ENTRIES}"
        )
    pre = _State()
    events: list[Event] = []
    for index, item in raw:
        ev = read_entry(where, index, item)
        if ev is None:
            pre.ignore(f"{where} {index}: no ml-goodput-measurement key recognised")
        else:
            events.append(ev)
    if not raw:
        raise MgmFormatError([], "the log has no entries")
    job, events = _job_name(events, pre)
    state = build_attempts(events)
    if not state.attempts:
        raise MgmFormatError([], "the log has no job_start_time entry: nothing starts the job")
    mapped = _records(job, run_name, state, pre)
    mapped.events = events
    return mapped


def _records(job: str | None, run_name: str | None, state: _State, pre: _State) -> Mapped:
    first = state.attempts[0].start
    run_id = run_id_of(job or "", first)
    records: list[Record] = []
    name = run_name or (job or "ml-goodput-import")[:200]
    try:
        records.append(
            RunRecord(
                run_id=run_id,
                name=name,
                project=PROJECT,
                created_at=first,
                environment={"source": SOURCE, "job_name": job},
            )
        )
        for a in state.attempts:
            records += _attempt_records(run_id, a, state)
        records += _inferred_checkpoints(run_id, state.attempts)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        msg = f"the log maps to an invalid {exc.title}: {field}: {err['msg']}"
        raise MgmFormatError([exc.title, *err["loc"]], msg) from exc
    warnings = pre.warnings + state.warnings
    if len(warnings) > MAX_WARNINGS:
        more = len(warnings) - MAX_WARNINGS
        warnings = [*warnings[:MAX_WARNINGS], f"... and {more} more"]
    return Mapped(run_id, records, pre.ignored + state.ignored, warnings, name, job, first)


_TIMES = ("start", "time", "end", "created_at")  # a record's fields that may hold a time


def entry_errors(mapped: Mapped, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The errors of storing the import's records (`store.ingest.IngestError`, which names
    `records.N.<kind>.<field>`), each told by the log entry its record's time came from:
    `loc` names that entry and key (`line.7.step_start_time`), the message the record."""
    sources: dict[float, tuple[str, int, str]] = {}  # a time -> the entry it came from first
    for ev in mapped.events:
        sources.setdefault(ev.time, (ev.where, ev.index, ev.source))
        if ev.end_source:
            sources.setdefault(ev.end, (ev.where, ev.index, ev.end_source))
    out = []
    for err in errors:
        loc = err.get("loc", [])
        i = loc[2] if len(loc) > 3 and loc[:2] == ["body", "records"] else None
        if not isinstance(i, int) or not 0 <= i < len(mapped.records):
            out.append(err)
            continue
        rec = mapped.records[i]
        named = loc[-1] if isinstance(loc[-1], str) else ""
        found = None
        for name in (named, *_TIMES):
            value = getattr(rec, name, None)
            if isinstance(value, float) and value in sources:
                found = sources[value]
                break
        if found is None:
            out.append(err)
            continue
        where, index, key = found
        msg = f"{where} {index}, key {key!r}: {err['msg']} (as the {rec.kind} record it maps to)"
        out.append({**err, "loc": ["body", where, index, key], "msg": msg})
    return out


# ---------------------------------------------------------------- against the stored run

# Per kind of record compared: the names of its natural key (run_id aside). Attempt starts
# and ends are both keyed by the attempt row; heartbeats only ever advance it (never a
# conflict) and the run record is compared by name alone.
KEYS: dict[str, tuple[str, ...]] = {
    "attempt_start": ("attempt", "rank"),
    "attempt_end": ("attempt", "rank"),
    "step": ("attempt", "rank", "step"),
    "span": ("attempt", "rank", "category", "start"),
    "checkpoint": ("attempt", "rank", "step"),
}
MAX_CONFLICTS = 20  # listed in a 409; the count covers them all


@dataclass
class StoredRun:
    """What a run holds already, read by the route before an import lands on it: per kind
    of KEYS, natural key -> the values an import must agree with. `attempt_start` holds
    declared starts only (not a placeholder from a record that came first), `attempt_end`
    ended attempts only (an open one may be ended by a longer log)."""

    run_id: str
    name: str
    declared: bool = True  # False: a placeholder run row, its name not sent yet
    rows: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)


def compared_values(rec: Record) -> tuple[str, tuple[Any, ...], dict[str, Any]] | None:
    """(its kind, its natural key, the values compared with the stored record's)."""
    if isinstance(rec, StepRecord):
        return "step", (rec.attempt, rec.rank, rec.step), {"start": rec.start, "end": rec.end}
    if isinstance(rec, SpanRecord):
        key = (rec.attempt, rec.rank, rec.category, rec.start)
        return "span", key, {"end": rec.end, "overlapped": rec.overlapped}
    if isinstance(rec, CheckpointRecord):
        return "checkpoint", (rec.attempt, rec.rank, rec.step), {"time": rec.time, "ok": rec.ok}
    if isinstance(rec, AttemptStartRecord):
        return "attempt_start", (rec.attempt, rec.rank), {"start": rec.start}
    if isinstance(rec, AttemptEndRecord):
        values = {"end": rec.end, "status": rec.status, "cause": rec.cause}
        return "attempt_end", (rec.attempt, rec.rank), values
    return None


@dataclass(frozen=True)
class Conflict:
    """One record of the import that contradicts the stored record of its natural key."""

    kind: str
    key: dict[str, Any]
    stored: dict[str, Any]
    imported: dict[str, Any]

    def describe(self) -> str:
        key = ", ".join(f"{k} {v!r}" for k, v in self.key.items())
        return f"{self.kind} ({key}): stored {self.stored}, this log {self.imported}"

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "stored": self.stored, "import": self.imported}


class ImportConflict(Exception):
    """The import contradicts the run stored under its id; `detail` is the 409's body."""

    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail["message"])
        self.detail = detail


def conflicts(records: list[Record], stored: StoredRun) -> list[Conflict]:
    out: list[Conflict] = []
    for rec in records:
        found = compared_values(rec)
        if found is None:
            continue
        kind, key, new = found
        old = stored.rows.get(kind, {}).get(key)
        if old is not None and any(old[k] != v for k, v in new.items()):
            out.append(Conflict(kind, dict(zip(KEYS[kind], key, strict=True)), old, new))
    return out


def check_stored(mapped: Mapped, stored: StoredRun | None) -> None:
    """Raise ImportConflict when the import contradicts the run stored under its id: a
    record of the same natural key with other values (the first MAX_CONFLICTS listed), or,
    when every record agrees, another run name. Nothing to check for a new run."""
    if stored is None:
        return
    found = conflicts(mapped.records, stored)
    origin = (
        f"run {mapped.run_id} (job {mapped.job!r}, first job_start_time {mapped.first_start!r})"
    )
    names = {"run_id": mapped.run_id, "stored_name": stored.name, "import_name": mapped.name}
    if found:
        raise ImportConflict(
            {
                "error": "conflicting_records",
                "message": f"{len(found)} record(s) of this log contradict what {origin} "
                f"already stores, first {found[0].describe()}: this is not that run's log nor "
                "a longer version of it, and nothing was stored. The run id comes from the job "
                "name and the first job_start_time only, so another job's log needs its own "
                "job_name to be imported apart.",
                **names,
                "count": len(found),
                "conflicts": [c.as_json() for c in found[:MAX_CONFLICTS]],
            }
        )
    if stored.declared and stored.name != mapped.name:
        raise ImportConflict(
            {
                "error": "run_name_mismatch",
                "message": f"this log maps to {origin}, stored under the name {stored.name!r}; "
                f"this import would name it {mapped.name!r}. Nothing was stored. To add this "
                f"log to that run (the same log again, or a longer one), pass "
                f"run_name={stored.name!r}. Another job's log cannot share the id: give its "
                "entries their own job_name.",
                **names,
                "suggested_run_name": stored.name,
            }
        )


def existing_run_warning(mapped: Mapped, stored: StoredRun, inserted: int, duplicates: int) -> str:
    """What landing on an existing run did: extended it, or repeated it."""
    total = inserted + duplicates
    head = (
        f"run {mapped.run_id} ({stored.name!r}) was already stored: {duplicates} of this "
        f"log's {total} records were already there"
    )
    if inserted:
        return f"{head}; this import extended that run with {inserted} new records"
    return f"{head}; this import repeated that run and stored nothing new"
