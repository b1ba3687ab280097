"""The errors a request can meet, each with its HTTP status and the field and row at fault."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx), a message that says what to change, and
    optionally the (row, field, reason) of every bad value."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        row: int | None = None,
        errors: list[dict[str, Any]] | None = None,
        kind: str = "bad_request",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.row = row
        self.errors = errors
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.row is not None:
            out["row"] = self.row
        if self.errors:
            out["errors"] = self.errors
        return out
