"""The response envelope and the one table that maps error kinds to HTTP status and code.

Every response is ``{"code": int, "status": int, "message": str, "data": ...}`` (``Envelope``;
the helpers below build its fields, ``gateway.http.respond`` validates and serializes them);
``code`` 0 means success and ``status`` mirrors the HTTP status.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from events import messages
from kernel import errors

SUCCESS = "success"
STARTED = messages.text("api.started")  # in the default language; see gateway.language

# error kind -> (HTTP status, envelope code)
ERROR_TABLE: dict[type[errors.DcuError], tuple[int, int]] = {
    errors.InvalidInput: (400, 40000),
    errors.Unauthorized: (401, 40100),
    errors.NotFound: (404, 40400),
    errors.Conflict: (409, 40900),
    errors.TooManyRequests: (429, 42900),
    errors.UpstreamTimeout: (504, 50400),
    errors.UpstreamError: (503, 50300),
}
INTERNAL = (500, 50000)


class Envelope(BaseModel):
    """Every response but the OpenAPI document: `code` 0 means success, `status` mirrors
    the HTTP status."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    code: int
    status: int
    message: str
    data: Any
    """A response model of ``gateway.models`` (or None); serialized with the envelope."""


def ok(data: Any, message: str = SUCCESS, status: int = 200) -> dict[str, Any]:
    return {"code": 0, "status": status, "message": message, "data": data}


def failure(status: int, code: int, message: str, data: Any = None) -> dict[str, Any]:
    return {"code": code, "status": status, "message": message, "data": data}


def for_error(exc: errors.DcuError) -> dict[str, Any]:
    for kind in type(exc).__mro__:
        if kind in ERROR_TABLE:
            status, code = ERROR_TABLE[kind]
            return failure(status, code, str(exc))
    return failure(*INTERNAL, "internal error")


def for_status(status: int, message: str) -> dict[str, Any]:
    """An envelope for an HTTP-level refusal (unknown route, wrong method, body too large)."""
    return failure(status, status * 100, message)
