"""The service's OpenAPI 3.0.3 document, served at ``/api/dcu/openapi.json``.

The operations are written by hand in ``_described`` from the handlers' own contracts.
``document`` is built each time it is asked for, from the routes the app has at that
moment: a described operation appears only when its route is registered, and a registered
route this module does not describe yet still appears, as an envelope-only operation marked
``x-undescribed``, so the document never omits an endpoint nor names one the app lacks.

The document itself is plain OpenAPI, not wrapped in the envelope, so tools load it as is.
Every other response, errors included, is the envelope (``#/components/schemas/Envelope``):
``code`` 0 exactly when the HTTP status is 2xx, ``status`` equal to the HTTP status.

Security follows the settings (gateway/auth.py): with ``auth.enabled`` off, POST
operations accept an optional bearer token; on, they require one (and ``/start`` takes
its username from it); with ``auth.protect_reads`` every GET but ``/health`` requires one
as well and documents the 401.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from aiohttp import web

from events.limits import IMAGE_NAME_MAX, PLATFORM_MAX, USERNAME_MAX
from events.platform import DEFAULT_PLATFORM, PLATFORM_PATTERN
from events.schema import EventType
from events.states import PROGRESS, TaskState
from gateway import start, views
from gateway.keys import API, SETTINGS
from kernel.settings import AuthSettings

PATH = "/openapi.json"
VERSION = "3.0.3"
CLEANUP_KINDS = ["gzip", "objects"]

Schema = dict[str, Any]

_REF = "#/components"
_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_TIME = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$"
# What events.platform.parse_platform takes: os/architecture[/variant], any letter case.


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"{_REF}/{kind}/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


# --- schemas ---------------------------------------------------------------------------


def _schemas(auth: AuthSettings) -> dict[str, Schema]:
    event_types = [t.value for t in EventType]
    states = [s.value for s in TaskState]
    time = {"type": "string", "pattern": _TIME, "example": "2025-12-10 20:25:00"}
    return {
        "Envelope": {
            "type": "object",
            "description": "Every response but this document: `code` 0 means success, "
            "`status` mirrors the HTTP status.",
            "required": ["code", "status", "message", "data"],
            "properties": {
                "code": {"type": "integer"},
                "status": {"type": "integer"},
                "message": {"type": "string"},
                "data": {"nullable": True},
            },
            "additionalProperties": False,
        },
        "StartRequest": {
            "type": "object",
            "required": ["docker_image_name"]
            if auth.enabled
            else ["username", "docker_image_name"],
            "properties": {
                "username": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": USERNAME_MAX,
                    "description": "Trimmed; must not be blank nor hold control characters."
                    + (
                        " Optional and ignored: the task's username is the token's name "
                        "(still checked when given)."
                        if auth.enabled
                        else ""
                    ),
                    "example": "test_user",
                },
                "docker_image_name": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": IMAGE_NAME_MAX,
                    "description": "An image reference in the distribution grammar "
                    "(`[registry/]path[:tag][@digest]`), checked before anything reaches "
                    "the engine or a path; anything else is a 400.",
                    "example": "nginx:latest",
                },
                "platform": {
                    "type": "string",
                    "maxLength": PLATFORM_MAX,
                    "pattern": PLATFORM_PATTERN,
                    "description": "The platform to take from a multi-platform image, "
                    "`os/architecture[/variant]`; normalised as containerd does (`x86_64` is "
                    "`amd64`, `aarch64` is `arm64`, `arm` is `arm/v7`). Absent: the "
                    f"service's `download.platform` (`{DEFAULT_PLATFORM}` by default).",
                    "example": "linux/arm64",
                },
            },
            "additionalProperties": True,
            "description": "Unknown fields are ignored.",
        },
        "StartResult": {
            "type": "object",
            "required": ["task_id", "state"],
            "properties": {
                "task_id": {"type": "string", "format": "uuid"},
                "state": {
                    "type": "string",
                    "enum": states,
                    "description": "`idle` for a new task; a start repeated with its "
                    "`Idempotency-Key` answers the task's current state.",
                },
            },
        },
        "Task": {
            "type": "object",
            "required": [
                "task_id",
                "state",
                "state_display",
                "docker_image_name",
                "gzip_file_name",
                "minio_object_name",
                "progress",
                "duration",
                "username",
                "start_time",
                "end_time",
                "error_message",
            ],
            "properties": {
                "task_id": {"type": "string", "format": "uuid"},
                "state": {"type": "string", "enum": states},
                "state_display": {"type": "string"},
                "docker_image_name": {"type": "string"},
                "gzip_file_name": _nullable({"type": "string"}),
                "minio_object_name": _nullable({"type": "string"}),
                "progress": {"type": "integer", "enum": sorted(set(PROGRESS.values()))},
                "duration": {"type": "integer", "minimum": 0, "description": "ms"},
                "username": {"type": "string"},
                "start_time": time,
                "end_time": _nullable(time),
                "error_message": _nullable({"type": "string"}),
                # /status only, once the task has details
                "image_id": _nullable({"type": "string"}),
                "archive_bytes": _nullable({"type": "integer", "minimum": 0}),
                "archive_sha256": _nullable({"type": "string"}),
                "stage": _nullable({"type": "string"}),
                "stage_progress": _nullable({"type": "number", "minimum": 0, "maximum": 100}),
                "stage_bytes_done": _nullable({"type": "integer", "minimum": 0}),
                "stage_bytes_total": _nullable({"type": "integer", "minimum": 0}),
                "stage_rate": _nullable({"type": "number", "minimum": 0}),
                "platform": _nullable(
                    {
                        "type": "string",
                        "maxLength": PLATFORM_MAX,
                        "description": "Normalised: the one requested, then the one packaged.",
                    }
                ),
                "manifest_digest": _nullable({"type": "string"}),
                "engine": _nullable({"type": "string", "example": "registry"}),
                "reused": _nullable(
                    {
                        "type": "boolean",
                        "description": "Whether an existing archive of the same manifest "
                        "was copied instead of built; null until the download stage ends.",
                    }
                ),
                "download_bytes_fetched": _nullable(
                    {"type": "integer", "minimum": 0, "description": "from the registry"}
                ),
                "download_bytes_cached": _nullable(
                    {"type": "integer", "minimum": 0, "description": "from the blob cache"}
                ),
            },
        },
        "TaskPage": {
            "type": "object",
            "required": ["total", "items"],
            "properties": {
                "total": {"type": "integer", "minimum": 0},
                "items": {"type": "array", "items": _ref("schemas", "Task")},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "nats", "database"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unhealthy"]},
                "nats": {"type": "string", "enum": ["connected", "disconnected"]},
                "database": {"type": "string", "description": "`ok` or `error: <kind>`"},
            },
        },
        "Event": {
            "type": "object",
            "required": ["event_id", "task_id", "type", "schema_version", "time", "payload"],
            "properties": {
                "event_id": {"type": "string"},
                "task_id": {"type": "string"},
                "type": {"type": "string", "enum": event_types},
                "schema_version": {"type": "integer"},
                "time": {"type": "string", "format": "date-time"},
                "payload": {"type": "object"},
            },
        },
        "EventHistory": {
            "type": "object",
            "required": ["task_id", "total", "events"],
            "properties": {
                "task_id": {"type": "string", "format": "uuid"},
                "total": {"type": "integer", "minimum": 0},
                "truncated": {"type": "boolean"},
                "events": {
                    "type": "array",
                    "items": {
                        "allOf": [
                            _ref("schemas", "Event"),
                            {
                                "type": "object",
                                "required": ["seq"],
                                "properties": {
                                    "seq": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "description": "stream sequence",
                                    }
                                },
                            },
                        ]
                    },
                },
            },
        },
        "CleanupRequest": {
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {"type": "string", "enum": CLEANUP_KINDS},
                "timeout": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 600,
                    "default": 60,
                    "description": "Seconds to wait for the run to finish; past it the "
                    "answer is 202 and the run goes on.",
                },
                "requested_by": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": USERNAME_MAX,
                    "description": "Who asks (as a username); `admin` by default.",
                },
            },
            "additionalProperties": True,
        },
        "CleanupCompleted": {
            "type": "object",
            "required": ["event_id", "kind", "type", "time", "payload"],
            "properties": {
                "event_id": {"type": "string"},
                "kind": {"type": "string", "enum": CLEANUP_KINDS},
                "type": {"type": "string", "enum": ["completed"]},
                "schema_version": {"type": "integer"},
                "time": {"type": "string", "format": "date-time"},
                "payload": {
                    "type": "object",
                    "required": ["request_id", "deleted", "bytes_freed"],
                    "properties": {
                        "request_id": {"type": "string"},
                        "deleted": {"type": "integer", "minimum": 0},
                        "bytes_freed": {"type": "integer", "minimum": 0},
                        "kept": {"type": "integer", "minimum": 0},
                        "errors": {"type": "array", "items": {"type": "string"}},
                        "seconds": {"type": "number", "minimum": 0},
                    },
                },
            },
        },
        "CleanupPending": {
            "type": "object",
            "required": ["request_id", "kind", "subject"],
            "properties": {
                "request_id": {"type": "string"},
                "kind": {"type": "string", "enum": CLEANUP_KINDS},
                "subject": {
                    "type": "string",
                    "description": "Where the completion will be published.",
                },
            },
        },
    }


def _envelope(status: int, data: Schema | None = None) -> Schema:
    """The envelope with ``status`` and its ``code`` pinned (0 for 2xx, else status*100)."""
    code = 0 if 200 <= status < 300 else status * 100
    fixed: Schema = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "enum": [code]},
            "status": {"type": "integer", "enum": [status]},
        },
    }
    if data is not None:
        fixed["properties"]["data"] = data
    return {"allOf": [_ref("schemas", "Envelope"), fixed]}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _responses() -> dict[str, Schema]:
    return {
        "BadRequest": _json(
            "Malformed input; `message` names the problem.", _envelope(400, {"nullable": True})
        ),
        "Unauthorized": {
            **_json(
                "Only with `auth.enabled`: the bearer token is missing or wrong.",
                _envelope(401, {"nullable": True}),
            ),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        "TooManyRequests": _json(
            "The user already has `server.max_active_tasks_per_user` unfinished tasks.",
            _envelope(429, {"nullable": True}),
        ),
        "NotFound": _json("No such task, or an unknown route.", _envelope(404)),
        "Conflict": _json(
            "The `Idempotency-Key` was used for a different request (another image or platform).",
            _envelope(409),
        ),
        "MethodNotAllowed": {
            **_json("A method the path does not take (any path).", _envelope(405)),
            "headers": {"Allow": {"schema": {"type": "string"}}},
        },
        "PayloadTooLarge": _json(
            "The body is larger than `server.max_body_bytes`.", _envelope(413)
        ),
        "Unavailable": _json(
            "NATS or the database failed; try again.", _envelope(503, {"nullable": True})
        ),
        "GatewayTimeout": _json("NATS did not answer in time; try again.", _envelope(504)),
    }


# --- operations ------------------------------------------------------------------------


def _errors(*names: str) -> dict[str, Schema]:
    statuses = {
        "BadRequest": "400",
        "Unauthorized": "401",
        "TooManyRequests": "429",
        "NotFound": "404",
        "Conflict": "409",
        "PayloadTooLarge": "413",
        "Unavailable": "503",
        "GatewayTimeout": "504",
    }
    return {statuses[name]: _ref("responses", name) for name in names}


def _ok(description: str, data: Schema, status: int = 200) -> dict[str, Schema]:
    return {str(status): _json(description, _envelope(status, data))}


def _query(name: str, schema: Schema, description: str = "") -> Schema:
    """An optional query parameter; the handlers take an empty value as no value."""
    parameter: Schema = {
        "name": name,
        "in": "query",
        "required": False,
        "allowEmptyValue": True,
        "schema": schema,
    }
    if description:
        parameter["description"] = description
    return parameter


def _task_id() -> Schema:
    return {
        "name": "task_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "format": "uuid"},
    }


def _include_progress() -> Schema:
    return _query(
        "include_progress",
        {"type": "boolean", "default": True},
        "Leave out `progress` events when false.",
    )


_SSE = {
    "description": "Server-sent events: `id: <event_id>`, `event: <type>`, `data: <event JSON>`"
    "; `: keep-alive` comments during silence.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_OPTIONAL_AUTH: list[dict[str, list[str]]] = [{}, {"bearerAuth": []}]
_REQUIRED_AUTH: list[dict[str, list[str]]] = [{"bearerAuth": []}]
_OPEN_READS = {"/health"}  # gateway.auth.ALWAYS_OPEN, below API


def _described(max_page_size: int) -> dict[str, dict[str, Schema]]:
    """Path (below ``API``) -> method -> operation, for every route written by hand."""
    return {
        "/start": {
            "post": {
                "operationId": "startTask",
                "tags": ["tasks"],
                "summary": "Request a task: pull, compress and upload one image.",
                "description": "Answers once the `requested` event is stored in JetStream; "
                "the task's row follows from it (`/status` shows the task at once). With an "
                "`Idempotency-Key` the task id follows from the username and the key: a "
                "repeated start answers the same task, and starts no other.",
                "parameters": [
                    {
                        "name": start.IDEMPOTENCY_HEADER,
                        "in": "header",
                        "required": False,
                        "description": f"1-{start.IDEMPOTENCY_KEY_MAX} printable ASCII "
                        "characters (space to `~`, none around it), else a 400. The same user's "
                        "start with the same key answers the same task; with another image or "
                        "platform it is a 409.",
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": start.IDEMPOTENCY_KEY_MAX,
                            "pattern": start.IDEMPOTENCY_KEY_PATTERN,
                        },
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("schemas", "StartRequest")}},
                },
                "responses": {
                    **_ok(
                        "The task was requested (message `任务已启动`).",
                        _ref("schemas", "StartResult"),
                    ),
                    **_errors(
                        "BadRequest",
                        "Unauthorized",
                        "Conflict",
                        "PayloadTooLarge",
                        "TooManyRequests",
                        "Unavailable",
                    ),
                },
            }
        },
        "/status/{task_id}": {
            "get": {
                "operationId": "getTask",
                "tags": ["tasks"],
                "summary": "One task, with its live stage figures.",
                "description": "Until the persistence subscriber has recorded a task just "
                "started, its `requested` event in the stream answers for it (`idle`).",
                "parameters": [_task_id()],
                "responses": {
                    **_ok("The task.", _ref("schemas", "Task")),
                    **_errors("BadRequest", "NotFound", "Unavailable"),
                },
            }
        },
        "/query": {
            "get": {
                "operationId": "queryTasks",
                "tags": ["tasks"],
                "summary": "Tasks matching every filter given, newest first.",
                "parameters": [
                    _query(
                        "docker_image_name",
                        {"type": "string", "maxLength": IMAGE_NAME_MAX},
                        "Substring of the reference.",
                    ),
                    _query(
                        "username",
                        {"type": "string", "maxLength": USERNAME_MAX},
                        "Exact user (trimmed).",
                    ),
                    _query("state", {"type": "string", "enum": [s.value for s in TaskState]}),
                    _query(
                        "page",
                        {"type": "integer", "minimum": 1, "maximum": views.PAGE_MAX, "default": 1},
                    ),
                    _query(
                        "page_size",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": max_page_size,
                            "default": min(views.DEFAULT_PAGE_SIZE, max_page_size),
                        },
                    ),
                ],
                "responses": {
                    **_ok("One page of tasks and the total matching.", _ref("schemas", "TaskPage")),
                    **_errors("BadRequest", "Unavailable"),
                },
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "tags": ["meta"],
                "summary": "Whether NATS and the database answer.",
                "responses": {
                    **_ok("Healthy.", _ref("schemas", "Health")),
                    "503": _json(
                        "NATS or the database does not answer; `data` says which.",
                        _envelope(503, _ref("schemas", "Health")),
                    ),
                },
            }
        },
        "/events/{task_id}": {
            "get": {
                "operationId": "getTaskEvents",
                "tags": ["events"],
                "summary": "The task's events as stored in the stream.",
                "parameters": [_task_id(), _include_progress()],
                "responses": {
                    **_ok("The events, oldest first.", _ref("schemas", "EventHistory")),
                    **_errors("BadRequest", "NotFound", "Unavailable", "GatewayTimeout"),
                },
            }
        },
        "/events/{task_id}/stream": {
            "get": {
                "operationId": "streamTaskEvents",
                "tags": ["events"],
                "summary": "The task's events so far, then live ones until it ends (SSE).",
                "parameters": [
                    _task_id(),
                    _include_progress(),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume after this event.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _SSE,
                    "204": {"description": "The client already has the terminal event."},
                    **_errors("BadRequest", "NotFound", "Unavailable", "GatewayTimeout"),
                },
            }
        },
        "/events/stream": {
            "get": {
                "operationId": "streamAllEvents",
                "tags": ["events"],
                "summary": "Every task's live events, optionally of one type (SSE).",
                "parameters": [
                    _query("type", {"type": "string", "enum": [t.value for t in EventType]})
                ],
                "responses": {"200": _SSE, **_errors("BadRequest", "Unavailable")},
            }
        },
        "/cleanup": {
            "post": {
                "operationId": "startCleanup",
                "tags": ["admin"],
                "summary": "Run the gzip or object cleanup now.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("schemas", "CleanupRequest")}},
                },
                "responses": {
                    **_ok(
                        "The run finished; `data` is its completed event.",
                        _ref("schemas", "CleanupCompleted"),
                    ),
                    **_ok(
                        "The run was requested but did not finish within `timeout`.",
                        _ref("schemas", "CleanupPending"),
                        status=202,
                    ),
                    **_errors("BadRequest", "Unauthorized", "PayloadTooLarge", "Unavailable"),
                },
            }
        },
        PATH: {
            "get": {
                "operationId": "getOpenApi",
                "tags": ["meta"],
                "summary": "This document (plain OpenAPI, not in the envelope).",
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _undescribed(path: str) -> Schema:
    """A registered route nobody described yet: its parameters and the envelope."""
    return {
        "summary": "Not described yet.",
        "x-undescribed": True,
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAMETER.findall(path)
        ],
        "responses": {"default": _json("The envelope.", _ref("schemas", "Envelope"))},
    }


def _secured(path: str, method: str, operation: Schema, auth: AuthSettings) -> Schema:
    """``operation`` with the security the settings give it (see the module docstring)."""
    if method not in {"get", "head", "options"}:
        security = _REQUIRED_AUTH if auth.enabled else _OPTIONAL_AUTH
        responses = {**operation["responses"], "401": _ref("responses", "Unauthorized")}
        return {**operation, "security": security, "responses": responses}
    if auth.enabled and auth.protect_reads and path not in _OPEN_READS:
        responses = {**operation["responses"], "401": _ref("responses", "Unauthorized")}
        return {**operation, "security": _REQUIRED_AUTH, "responses": responses}
    return operation


def _scheme_description(auth: AuthSettings) -> str:
    if not auth.enabled:
        return "Not enforced (auth.enabled is off); POST endpoints accept it."
    reads = "and every GET but /health " if auth.protect_reads else ""
    return (
        f"Required by POST endpoints {reads}(auth.enabled); "
        "`POST /start` takes the task's username from the token's name."
    )


def _routes(app: web.Application) -> list[tuple[str, str]]:
    """``(path below API, lower-case method)`` of every route, in registration order;
    HEAD (aiohttp's automatic twin of GET) and catch-all routes are left out."""
    found: list[tuple[str, str]] = []
    for route in app.router.routes():
        method = route.method.lower()
        canonical = route.resource.canonical if route.resource is not None else ""
        if method in {"head", "*"} or not canonical.startswith(f"{API}/"):
            continue
        key = (_PARAMETER.sub(r"{\1}", canonical[len(API) :]), method)
        if key not in found:
            found.append(key)
    return found


def _version() -> str:
    try:
        return metadata.version("dcu")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document for the routes ``app`` has now."""
    settings = app[SETTINGS]
    described = _described(settings.server.max_page_size)
    paths: dict[str, dict[str, Schema]] = {}
    for path, method in _routes(app):
        operation = described.get(path, {}).get(method) or _undescribed(path)
        paths.setdefault(path, {})[method] = _secured(path, method, operation, settings.auth)
    return {
        "openapi": VERSION,
        "info": {
            "title": "DCU",
            "version": _version(),
            "description": "Download-Compress-Upload: package container images as "
            "docker-loadable .tar.gz archives in S3. Every response but this document is "
            "the envelope `{code, status, message, data}`; an unknown route answers 404 and "
            "a method a path does not take 405 (with `Allow`), both in the envelope.",
        },
        "servers": [{"url": API}],
        "tags": [
            {"name": "tasks"},
            {"name": "events"},
            {"name": "admin"},
            {"name": "meta"},
        ],
        "paths": paths,
        "components": {
            "schemas": _schemas(settings.auth),
            "responses": _responses(),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": _scheme_description(settings.auth),
                }
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document(request.app))


def setup(app: web.Application) -> None:
    """Register the OpenAPI route on ``app``."""
    app.router.add_get(f"{API}{PATH}", serve)
