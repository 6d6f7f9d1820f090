"""The response envelope and the one table that maps error kinds to HTTP status and code.

Every response is ``{"code": int, "status": int, "message": str, "data": ...}``; ``code`` 0
means success and ``status`` mirrors the HTTP status.
"""

from __future__ import annotations

from typing import Any

from kernel import errors

SUCCESS = "success"
STARTED = "任务已启动"

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


def ok(data: Any, message: str = SUCCESS) -> dict[str, Any]:
    return {"code": 0, "status": 200, "message": message, "data": data}


def failure(status: int, code: int, message: str) -> dict[str, Any]:
    return {"code": code, "status": status, "message": message, "data": None}


def for_error(exc: errors.DcuError) -> dict[str, Any]:
    for kind in type(exc).__mro__:
        if kind in ERROR_TABLE:
            status, code = ERROR_TABLE[kind]
            return failure(status, code, str(exc))
    return failure(*INTERNAL, "internal error")


def for_status(status: int, message: str) -> dict[str, Any]:
    """An envelope for an HTTP-level refusal (unknown route, wrong method, body too large)."""
    return failure(status, status * 100, message)
