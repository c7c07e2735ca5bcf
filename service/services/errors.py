"""What a service refuses, in plain exceptions; the API answers each with its status
(api/errors.py: 404, 409, 413, 422), a page or a command line can word them otherwise."""

from __future__ import annotations

from typing import Any


class NotFound(LookupError):
    """The run (or the rank of a run) named is not stored: a 404 with this message."""


class Invalid(ValueError):
    """Invalid input, each error naming its field in FastAPI's shape (`loc`, `msg`, `type`):
    a 422; nothing of the input is stored."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors

    @classmethod
    def field(cls, where: str, field: str, msg: str) -> Invalid:
        """One invalid field: `where` is query, path or body."""
        return cls([{"loc": [where, field], "msg": msg, "type": "value_error"}])


class Conflict(Exception):
    """Records that contradict what is stored under their keys: a 409 naming both values,
    never worth sending again (`retriable: false`); nothing is stored."""

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class Refused(Exception):
    """A question with no answer for these runs as they are stored (compare's 409): the
    `detail` says why and what would fix it."""

    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail)
        self.detail = detail


class TooLarge(ValueError):
    """Input past a limit of the service (a 413 naming the limit)."""
