"""A sink for the recorder's tests: keeps every record as it comes, in memory."""

from __future__ import annotations

from typing import Any


class ListSink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.closed = False

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        self.records.append((kind, dict(fields)))

    def close(self, timeout_s: float = 10.0) -> None:
        self.closed = True

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.records if k == kind]
